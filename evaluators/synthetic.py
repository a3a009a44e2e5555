"""Synthetic string tasks (copy, reverse, sort, shift) and their exact-match scorer.

They give the built-in demo a model family with distinct skills that trains in seconds on a CPU.
A prompt looks like `r:cadb=` and the answer `bdac` then `</s>`. Exact match needs no
generation: one teacher-forced forward pass is correct exactly when greedy decoding would emit
the answer, so a whole split is scored in one batched pass.

Splits are disjoint by construction: every example is drawn from a seeded generator and
assigned to a split by a hash of its input string, so fitness and held-out never share a prompt.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

import torch

LETTERS = "abcdefghij"
TASKS = {
    "copy": ("c", lambda s: s),
    "reverse": ("r", lambda s: s[::-1]),
    "sort": ("s", lambda s: "".join(sorted(s))),
    "shift": ("h", lambda s: "".join(LETTERS[(LETTERS.index(ch) + 1) % len(LETTERS)] for ch in s)),
}
SPLITS = ("train", "fitness", "holdout")


def _split_of(text: str) -> str:
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % 10
    return "train" if h < 6 else ("fitness" if h < 8 else "holdout")


def examples(task: str, split: str, n: int, seed: int = 0, min_len: int = 6, max_len: int = 9) -> list[tuple[str, str]]:
    """n (prompt, answer) pairs of `task` whose inputs belong to `split`."""
    if task not in TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; choose one of {sorted(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    tag, fn = TASKS[task]
    rng = random.Random(f"{task}/{split}/{seed}")
    out, seen = [], set()
    while len(out) < n:
        s = "".join(rng.choice(LETTERS) for _ in range(rng.randint(min_len, max_len)))
        if s in seen or _split_of(s) != split:
            continue
        seen.add(s)
        out.append((f"{tag}:{s}=", fn(s)))
    return out


@dataclass
class EncodedBatch:
    input_ids: torch.Tensor  # (B, T), right padded
    attention_mask: torch.Tensor
    target_mask: torch.Tensor  # positions whose next-token prediction must match


def encode(tokenizer, pairs: list[tuple[str, str]]) -> EncodedBatch:
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    seqs, answer_spans = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + [eos]
        seqs.append(p + a)
        answer_spans.append((len(p), len(p) + len(a)))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    attn = torch.zeros_like(ids)
    target = torch.zeros_like(ids, dtype=torch.bool)
    for i, (s, (a0, a1)) in enumerate(zip(seqs, answer_spans)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        target[i, a0 - 1 : a1 - 1] = True  # logits at t predict token t+1
    return EncodedBatch(ids, attn, target)


@torch.no_grad()
def exact_match(model, batch: EncodedBatch) -> torch.Tensor:
    """Per-example 1.0/0.0: would greedy decoding reproduce the answer and stop?"""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    pred = logits.argmax(-1)
    nxt = torch.roll(batch.input_ids, -1, dims=1)
    ok = (pred == nxt) | ~batch.target_mask
    return ok.all(dim=1).float()


class SyntheticTask:
    """Scores a model on one synthetic task and split: {task: exact-match accuracy}."""

    def __init__(self, task: str, split: str, n: int, tokenizer, seed: int = 0):
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 100_000:
            raise ValueError(f"n {n!r}: a number of examples from 1 to 100000")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed {seed!r}: an integer")
        self.task, self.split, self.n, self.seed = task, split, n, seed
        self.batch = encode(tokenizer, examples(task, split, n, seed))

    def examples_key(self) -> tuple[str, set[int]]:
        return f"synthetic:{self.task}:{self.split}:{self.seed}", set(range(self.n))

    def metric_names(self) -> set[str]:
        return {self.task}

    def identity(self) -> dict:
        return {"task": f"synthetic:{self.task}", "split": self.split, "n": self.n, "scoring": "teacher-forced exact match"}

    def score(self, model) -> dict[str, float]:
        return {self.task: float(exact_match(model, self.batch).mean())}

    # Racing: per-example scores in [0, 1] on any subset of the examples.
    bounded = True

    def race_metric_names(self) -> set[str]:
        return {self.task}

    def score_examples(self, model, indices: list[int]) -> dict[str, torch.Tensor]:
        b, index = self.batch, torch.tensor(indices, dtype=torch.long)
        part = EncodedBatch(b.input_ids[index], b.attention_mask[index], b.target_mask[index])
        return {self.task: exact_match(model, part)}


@torch.no_grad()
def answer_logprob(model, batch: EncodedBatch) -> torch.Tensor:
    """Per-example mean log-probability of the answer tokens (a smooth, cheap fitness)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    nxt = torch.roll(batch.input_ids, -1, dims=1)
    tok = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) * batch.target_mask
    return tok.sum(1) / batch.target_mask.sum(1)


class SyntheticLogprob(SyntheticTask):
    """{task_logprob: mean answer log-probability} on one synthetic task and split."""

    bounded = False  # log-probabilities are unbounded: no racing

    def identity(self) -> dict:
        return {**super().identity(), "task": f"synthetic-logprob:{self.task}",
                "scoring": "teacher-forced answer log-probability"}

    def metric_names(self) -> set[str]:
        return {f"{self.task}_logprob"}

    def score(self, model) -> dict[str, float]:
        return {f"{self.task}_logprob": float(answer_logprob(model, self.batch).mean())}
