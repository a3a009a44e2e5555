"""Score one model folder on one task: `evomerge eval`, and the baselines a campaign reports."""

from __future__ import annotations

import math
import time
from pathlib import Path

from evomerge.checkpoint import Checkpoint, read_config, resolve_model_path
from evomerge.devices import check_device
from evomerge.errors import EvomergeError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def is_vision_language(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def _auto_classes(folder: str | Path, processor=None):
    """(config, model class, processor) for a folder: vision-language models get their processor.
    A `processor` already loaded is passed through rather than loaded again."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    folder = Path(folder)
    read_config(folder)  # a missing or broken config.json is one line, not a transformers traceback
    if processor is None and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise EvomergeError(f"{folder} has no tokenizer files ({', '.join(TOKENIZER_FILES[:4])}, ...); copy them "
                            "from the model it came from (or set tokenizer_source in the recipe)")
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        if is_vision_language(config):
            from transformers import AutoModelForImageTextToText

            return config, AutoModelForImageTextToText, processor or AutoProcessor.from_pretrained(
                folder, trust_remote_code=False)
        return config, AutoModelForCausalLM, processor or AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # tokenizers raises bare Exceptions for a tokenizer.json it cannot read
        raise EvomergeError(f"{folder}: transformers cannot load its config or tokenizer "
                            f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}); "
                            "check the folder is a complete Hugging Face model (no remote code is run)") from None


def load_processor(folder: str | Path):
    """The tokenizer (or a VLM's processor) of a model folder, without loading weights."""
    return _auto_classes(folder)[2]


def json_safe(values: dict) -> dict:
    """Non-finite numbers (NaN, inf: not JSON) become null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in values.items()}


def new_model_and_processor(folder: str | Path, dtype=None, processor=None):
    """An uninitialised model with the folder's config (to materialize into) and its tokenizer/processor."""
    import torch

    config, model_cls, processor = _auto_classes(folder, processor)
    return model_cls.from_config(config, dtype=dtype or torch.float32), processor


def load_model(folder: str | Path, device: str = "cpu", allow_pickle: bool = False, processor=None):
    """(model, tokenizer or processor) from a local folder; never runs remote code."""
    import torch

    from transformers.utils import logging as hf_logging

    check_device(device)
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per model is noise beside evomerge's own output
    path = resolve_model_path(folder)
    Checkpoint(path, allow_pickle=allow_pickle)  # refuses pickles unless opted in, before transformers sees them
    _, model_cls, processor = _auto_classes(path, processor)
    try:
        model = model_cls.from_pretrained(path, trust_remote_code=False, dtype=torch.float32,
                                          use_safetensors=not allow_pickle)
    except Exception as exc:
        raise EvomergeError(f"{path}: transformers cannot load the weights ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    return model.to(device).eval(), processor


def evaluate_folder(folder: str | Path, spec: dict, device: str = "cpu", allow_pickle: bool = False) -> dict:
    """Metrics (non-finite ones as None, listed under `non_finite`) and the identity of the measurement."""
    from evomerge.evaluators import build_evaluator

    check_device(device)
    path = resolve_model_path(folder)
    processor = load_processor(path)
    evaluator = build_evaluator(spec, processor, where="eval")  # a bad spec costs no weight loading
    model, _ = load_model(path, device, allow_pickle, processor)
    start = time.perf_counter()
    try:
        metrics = evaluator.score(model)
    except (ValueError, FileNotFoundError) as exc:
        raise EvomergeError(f"eval {spec.get('task')}: {exc}") from None
    bad = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    report = {"model": str(folder), "metrics": json_safe(metrics), "identity": evaluator.identity(),
              "seconds": round(time.perf_counter() - start, 3)}
    if bad:
        report["non_finite"] = bad
    return report
