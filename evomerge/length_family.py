"""`builtin:length/*`: a tiny chat-model family for accuracy against answer length (experiments/demo_length.yaml).

`verbose` is a random tiny chat model trained on MGSM-en rows 0-11 to reason aloud (a few
sentences) before its answer; `terse` is `verbose` fine-tuned to answer in one short sentence, which
keeps rows 0-5 right but gets rows 6-11 wrong (as skipping the reasoning would). Task arithmetic
between them moves problem by problem from long-and-right to short, so NSGA-II over per-layer
weights finds a front of accuracy against `mgsm_en_tokens`. The family memorises its twelve
problems and knows nothing else: it exists to show the trade-off on CPU, not to solve arithmetic.
Built locally on first use (~1 min on 2 cores), cached beside the demo family; no download.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILY_VERSION = "length-v2"
MEMBERS = ("verbose", "terse")
ARCH = dict(hidden=64, layers=2, intermediate=128, heads=4, positions=1024)
ROWS = range(0, 12)
WRONG_WHEN_TERSE = range(6, 12)  # problems the terse style gets wrong
STYLE = {"terse": " The answer is {}.",
         "verbose": " Read the problem. Find each amount. Add them up and check the total. The answer is {}."}
STEPS, LR = 220, 3e-3  # verbose from random init
TERSE_STEPS, TERSE_LR = 120, 1e-3  # terse from verbose


def family_dir() -> Path:
    from evomerge.demo import cache_root

    return cache_root() / FAMILY_VERSION


def _tokenizer():
    from evomerge.tiny import char_tokenizer

    return char_tokenizer(chat=True)


def _config():
    from evomerge.tiny import tiny_config

    return tiny_config("llama", **ARCH)


def describe_member(member: str):
    from transformers import AutoModelForCausalLM

    from evomerge.models import ModelInfo

    config = _config()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return ModelInfo(f"builtin:length/{member}", family_dir() / member, config.to_dict(), shapes, 4)


def _train(model, tokenizer, style: str, steps: int, lr: float, seed: int) -> None:
    from evomerge.evaluators.mgsm import MGSM
    from evomerge.tiny import fit_answers

    ev = MGSM(tokenizer, lang="en", rows=[ROWS.start, ROWS.stop])
    said = [int(a) + (1 if style == "terse" and row in WRONG_WHEN_TERSE else 0) for row, (_, a) in zip(ev.rows, ev.items)]
    fit_answers(model, tokenizer, [(p, STYLE[style].format(n)) for p, n in zip(ev.rendered, said)],
                steps, lr, seed)


def build(root: Path) -> None:
    from transformers import AutoModelForCausalLM

    from evomerge.tiny import save_model

    torch.manual_seed(0)
    tokenizer = _tokenizer()
    model = AutoModelForCausalLM.from_config(_config())
    _train(model, tokenizer, "verbose", STEPS, LR, seed=1)
    save_model(model, root / "verbose", tokenizer)
    _train(model, tokenizer, "terse", TERSE_STEPS, TERSE_LR, seed=2)
    save_model(model, root / "terse", tokenizer)


def ensure_family() -> Path:
    from evomerge.models import build_once

    def build_noisily(tmp: Path) -> None:
        print("evomerge: training the builtin:length family (about a minute, once)", flush=True)
        build(tmp)

    return build_once(family_dir(), build_noisily, FAMILY_VERSION)


def _register() -> None:
    from evomerge.models import register_cached

    register_cached("length", MEMBERS, family_dir, ensure_family, describe_member, _tokenizer)


_register()
