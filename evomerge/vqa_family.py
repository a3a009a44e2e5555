"""`builtin:vqa/*`: a tiny LLaVA and a text-only language model to merge into it (experiments/demo_vqa.yaml).

`vlm` is the tiny LLaVA of `evomerge.tiny.build_tiny_llava` (CLIP tower + 2-layer Llama), trained
on easy-vqa's training images and questions until it answers shapes, colours and yes/no. `llm` is
its language model taken out and fine-tuned on the questions alone, as text (no image): it learns
the answer priors a question allows ("what color ..." → a colour) and forgets how to look. The
campaign merges `llm` into the VLM's language model only (`component: {"language_model.": ""}`;
the vision tower and projector stay bit-identical) and scores ROUGE-L on easy-vqa test images.
Built locally on first use (~1-2 min on 2 cores) from the images the easy-vqa package ships; no
download.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch

FAMILY_VERSION = "vqa-v1"
MEMBERS = ("vlm", "llm")
VLM_STEPS, LLM_STEPS, BATCH, LR = 300, 100, 32, 3e-3


def family_dir() -> Path:
    from evomerge.demo import cache_root

    return cache_root() / FAMILY_VERSION


def _processor_and_model(root: Path):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    return AutoProcessor.from_pretrained(root), LlavaForConditionalGeneration.from_pretrained(root, dtype=torch.float32)


def _fit(model, folder: Path, batch, steps: int, lr: float, seed: int) -> None:
    """AdamW on `batch(rng) -> (inputs, answer prompt lengths)`, loss on the answers only; saved in place."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        enc, prompt_lengths = batch(rng)
        labels = enc["input_ids"].clone()
        for r, n in enumerate(prompt_lengths):
            labels[r, :n] = -100
        labels[enc["attention_mask"] == 0] = -100
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    model.save_pretrained(folder, safe_serialization=True)


def _train_vlm(folder: Path, steps: int, seed: int) -> None:
    import easy_vqa
    from PIL import Image

    from evomerge.evaluators.vqa import PROMPT

    processor, model = _processor_and_model(folder)
    tok = processor.tokenizer
    tok.padding_side = "right"
    questions, answers, image_ids = easy_vqa.get_train_questions()
    paths = easy_vqa.get_train_image_paths()

    def batch(rng: random.Random):
        rows = rng.sample(range(len(questions)), BATCH)
        images = [Image.open(paths[image_ids[i]]).convert("RGB") for i in rows]
        prompts = [PROMPT.format(question=questions[i]) for i in rows]
        full = [p + " " + answers[i] + tok.eos_token for p, i in zip(prompts, rows)]
        lengths = [len(ids) for ids in processor(images=images, text=prompts, padding=False)["input_ids"]]
        return processor(images=images, text=full, return_tensors="pt", padding=True), lengths

    _fit(model, folder, batch, steps, LR, seed)


def _train_llm(folder: Path, steps: int, seed: int) -> None:
    """The language model alone, on questions as text: it never sees an image."""
    import easy_vqa
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.padding_side = "right"
    questions, answers, _ = easy_vqa.get_train_questions()

    def batch(rng: random.Random):
        rows = rng.sample(range(len(questions)), BATCH)
        prompts = [f"USER: {questions[i]} ASSISTANT:" for i in rows]
        enc = tok([p + " " + answers[i] + tok.eos_token for p, i in zip(prompts, rows)], return_tensors="pt",
                  padding=True, add_special_tokens=False)
        return enc, [len(tok(p, add_special_tokens=False).input_ids) for p in prompts]

    _fit(model, folder, batch, steps, LR / 3, seed)


def build(root: Path) -> None:
    from safetensors.torch import save_file

    from evomerge.checkpoint import Checkpoint
    from evomerge.tiny import build_tiny_llava

    paths = build_tiny_llava(root, seed=0, with_llm=True)
    _train_vlm(paths["vlm"], VLM_STEPS, seed=1)
    # The trained VLM's language model becomes the LLM's starting point (same shapes, shared init).
    vlm = Checkpoint(paths["vlm"])
    prefix = "language_model."
    state = {n[len(prefix):]: vlm.get(n).contiguous() for n in vlm.names() if n.startswith(prefix)}
    for f in paths["llm"].glob("*.safetensors"):
        f.unlink()
    save_file(state, str(paths["llm"] / "model.safetensors"), metadata={"format": "pt"})
    _train_llm(paths["llm"], LLM_STEPS, seed=2)


def ensure_family() -> Path:
    from evomerge.models import build_once

    def build_noisily(tmp: Path) -> None:
        print("evomerge: training the builtin:vqa family on easy-vqa images (a minute or two, once)", flush=True)
        build(tmp)

    return build_once(family_dir(), build_noisily, FAMILY_VERSION)


def describe_member(member: str):
    """Config and shapes without training: an untrained family in a temporary folder, read, removed."""
    from evomerge.checkpoint import Checkpoint, read_config
    from evomerge.models import ModelInfo
    from evomerge.tiny import build_tiny_llava

    with tempfile.TemporaryDirectory(prefix="evomerge-vqa-describe-") as tmp:
        folder = build_tiny_llava(tmp, seed=0, with_llm=True)[member]
        ckpt = Checkpoint(folder)
        shapes = {n: tuple(ckpt.shape(n)) for n in ckpt.names()}
        config = read_config(folder)
    return ModelInfo(f"builtin:vqa/{member}", family_dir() / member, config, shapes, 4)


def _register() -> None:
    from evomerge.models import register_cached

    register_cached("vqa", MEMBERS, family_dir, ensure_family, describe_member)


_register()
