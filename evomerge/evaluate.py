"""Score one model folder on one task: `evomerge eval`, and the baselines a campaign reports."""

from __future__ import annotations

import time
from pathlib import Path

from evomerge.checkpoint import Checkpoint, resolve_model_path
from evomerge.errors import EvomergeError


def is_vision_language(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def _auto_classes(folder: str | Path):
    """(config, model class, processor) for a folder: vision-language models get their processor."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if is_vision_language(config):
        from transformers import AutoModelForImageTextToText

        return config, AutoModelForImageTextToText, AutoProcessor.from_pretrained(folder, trust_remote_code=False)
    return config, AutoModelForCausalLM, AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def new_model_and_processor(folder: str | Path, dtype=None):
    """An uninitialised model with the folder's config (to materialize into) and its tokenizer/processor."""
    import torch

    config, model_cls, processor = _auto_classes(folder)
    return model_cls.from_config(config, dtype=dtype or torch.float32), processor


def load_model(folder: str | Path, device: str = "cpu", allow_pickle: bool = False):
    """(model, tokenizer or processor) from a local folder; never runs remote code."""
    import torch

    path = resolve_model_path(folder)
    Checkpoint(path, allow_pickle=allow_pickle)  # refuses pickles unless opted in, before transformers sees them
    _, model_cls, processor = _auto_classes(path)
    model = model_cls.from_pretrained(path, trust_remote_code=False, dtype=torch.float32,
                                      use_safetensors=not allow_pickle)
    return model.to(device).eval(), processor


def evaluate_folder(folder: str | Path, spec: dict, device: str = "cpu", allow_pickle: bool = False) -> dict:
    from evaluators import build_evaluator

    model, tokenizer = load_model(folder, device, allow_pickle)
    evaluator = build_evaluator(spec, tokenizer, where="eval")
    start = time.perf_counter()
    try:
        metrics = evaluator.score(model)
    except (ValueError, FileNotFoundError) as exc:
        raise EvomergeError(f"eval {spec.get('task')}: {exc}") from None
    return {"model": str(folder), "metrics": metrics, "identity": evaluator.identity(),
            "seconds": round(time.perf_counter() - start, 3)}
