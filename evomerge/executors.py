"""Executors: where candidates are materialized and scored.

The interface is submit / collect: the driver submits candidates and takes results as they
finish, in any order. `LocalExecutor` (the default) works in-process on one device; a Ray
executor with GPU actors implements the same two calls.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Iterator

import torch

from evomerge.recipe import Recipe


@dataclass
class Result:
    cid: int
    metrics: dict[str, float] | None
    identity: list[dict] | None
    error: str | None
    materialize_s: float
    eval_s: float
    examples: int | None = None  # examples scored (racing may stop early)
    raced: bool = False  # stopped early by racing: metrics are partial means


class Executor:
    def submit(self, cid: int, recipe: Recipe, split: str = "fitness", incumbent: float | None = None) -> None:
        raise NotImplementedError

    def collect(self) -> Iterator[Result]:
        """Yield results as candidates finish, until nothing submitted is left."""
        raise NotImplementedError

    def close(self) -> None:
        """Release workers and memory."""


class Worker:
    """A SourceBank, one preallocated model and the evaluators: materialize + score, no disk I/O."""

    def __init__(self, sources: list[str], base: str | None, fitness: list[dict], holdout: list[dict],
                 dtype: str = "float32", device: str = "cpu", racing=None, race_weights: dict | None = None,
                 component: dict | None = None):
        from evaluators import build_evaluator
        from evomerge.bank import SourceBank
        from evomerge.evaluate import new_model_and_processor

        self.bank = SourceBank(sources, base, dtype=dtype, device=device, component=component)
        model, self.tokenizer = new_model_and_processor(self.bank.reference_path, self.bank.dtype)
        self.model = model.to(device).eval()
        self.evaluators = {
            "fitness": [build_evaluator(s, self.tokenizer, f"fitness[{i}]") for i, s in enumerate(fitness)],
            "holdout": [build_evaluator(s, self.tokenizer, f"holdout[{i}]") for i, s in enumerate(holdout)],
        }
        self.racing = racing
        self.race_weights = race_weights or {}

    def run(self, cid: int, recipe: Recipe, split: str, incumbent: float | None = None) -> Result:
        from evomerge.racing import race

        t0 = time.perf_counter()
        evaluators = self.evaluators[split]
        raced = False
        try:
            self.bank.materialize(recipe, self.model)
            t1 = time.perf_counter()
            metrics: dict[str, float] = {}
            if self.racing is not None and split == "fitness":
                metrics, examples, raced = race(evaluators, self.model, self.race_weights, incumbent, self.racing)
            else:
                with torch.no_grad():
                    for ev in evaluators:
                        metrics.update(ev.score(self.model))
                examples = sum(getattr(ev, "n", 0) for ev in evaluators)
            t2 = time.perf_counter()
        except Exception as exc:  # a candidate that fails on its own is recorded, not fatal
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            return Result(cid, None, None, detail, time.perf_counter() - t0, 0.0)
        return Result(cid, metrics, [ev.identity() for ev in evaluators], None, t1 - t0, t2 - t1, examples, raced)


class LocalExecutor(Executor):
    """In-process, one candidate at a time, on the campaign's device (CPU by default)."""

    def __init__(self, worker: Worker):
        self.worker = worker
        self.queue: deque = deque()

    def submit(self, cid: int, recipe: Recipe, split: str = "fitness", incumbent: float | None = None) -> None:
        self.queue.append((cid, recipe, split, incumbent))

    def collect(self) -> Iterator[Result]:
        while self.queue:
            cid, recipe, split, incumbent = self.queue.popleft()
            yield self.worker.run(cid, recipe, split, incumbent)
