"""The worker: a materializer (recipe -> model in memory) and the evaluators. Materialize, score, report.

A worker knows nothing of optimizers or journals: it takes a `Task` (a recipe, the role it is
scored for, and racing's incumbent as plain data) and returns a `Result`. Executors decide where
workers live (in this process, in Ray actors); the campaign decides what results mean.

Failures come in two kinds, and the Result says which:
- `candidate`: the candidate failed on its own (its scores are NaN or infinite, or an evaluator
  raised CandidateError). The campaign journals it as failed and tells the optimizer a penalty.
- `infrastructure`: anything else (out of memory, a bad config reaching the worker, a bug). It
  says nothing about the candidate, so it is never told to the optimizer: the campaign retries
  it, then stops with the error. `retryable` is False for errors retrying cannot fix.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from evomerge.errors import CandidateError, EvomergeError, one_line
from evomerge.recipe import Recipe

FITNESS, HOLDOUT = "fitness", "holdout"  # the roles an evaluation plays


@dataclass
class Task:
    """One candidate to score: small and plain, so it can travel to a remote worker."""

    cid: int
    recipe: dict
    role: str = FITNESS
    incumbent: float | None = None  # racing: the best full objective before this candidate's generation


@dataclass
class Result:
    cid: int
    role: str
    metrics: dict[str, float] | None
    identity: list[dict] | None
    error: str | None = None
    error_kind: str | None = None  # None | "candidate" | "infrastructure"
    retryable: bool = True
    materialize_s: float = 0.0
    eval_s: float = 0.0
    examples: int | None = None  # examples scored (racing may stop early)
    raced: bool = False  # stopped early by racing: metrics are partial means


@dataclass
class WorkerSpec:
    """Everything a worker needs to build itself (models come from disk or the HF cache)."""

    sources: list[str]
    base: str | None
    fitness: list[dict]
    holdout: list[dict] = field(default_factory=list)
    dtype: str = "float32"
    device: str = "cpu"
    racing: dict | None = None
    race_weights: dict[str, float] = field(default_factory=dict)
    component: dict | None = None
    materializer: str = "merge"  # how recipes become models: "merge" (a SourceBank) or "path" (layer paths)
    storage: str = "device"  # where the bank's deltas live (evomerge.memory_plan chooses)
    quantize: int | None = None  # 8: int8 deltas


class MergeMaterializer:
    """Parameter-space recipes: a SourceBank writes each candidate into one preallocated model."""

    def __init__(self, spec: WorkerSpec, tokenizer=None):
        from evomerge.bank import SourceBank
        from evomerge.evaluate import new_model_and_processor

        self.bank = SourceBank(spec.sources, spec.base, dtype=spec.dtype, device=spec.device, component=spec.component,
                               storage=spec.storage, quantize=spec.quantize)
        self.model, self.tokenizer = new_model_and_processor(self.bank.reference_path, self.bank.dtype, tokenizer)
        self.model = self.model.to(spec.device).eval()

    @classmethod
    def create(cls, spec: WorkerSpec, tokenizer=None) -> "MergeMaterializer":
        return cls(spec, tokenizer)

    def materialize(self, recipe: dict) -> torch.nn.Module:
        self.bank.materialize(Recipe.from_dict(recipe), self.model)
        return self.model


# Where each kind lives; imported on first use so a merge-only worker never imports the others.
MATERIALIZERS = {"merge": "evomerge.worker:MergeMaterializer", "path": "evomerge.dataflow:PathMaterializer"}


def materializer_kind(name: str):
    import importlib

    if name not in MATERIALIZERS:
        raise EvomergeError(f"unknown materializer {name!r}; known: {', '.join(MATERIALIZERS)}")
    module, _, attr = MATERIALIZERS[name].partition(":")
    return getattr(importlib.import_module(module), attr)


class Worker:
    """Materialize a recipe into one preallocated model and score it: no disk I/O per candidate."""

    def __init__(self, spec: WorkerSpec, evaluators: dict[str, list] | None = None, tokenizer=None):
        from evomerge.racing import RacingRule

        self.spec = spec
        self.materializer = materializer_kind(spec.materializer).create(spec, tokenizer)
        self.model, self.tokenizer = None, self.materializer.tokenizer
        self.evaluators = evaluators or build_evaluators(spec, self.tokenizer)
        self.racing = RacingRule(**spec.racing) if spec.racing else None

    def run(self, task: Task) -> Result:
        from evomerge.racing import race

        t0 = time.perf_counter()
        t1 = t0
        evaluators = self.evaluators[task.role]
        try:
            self.model = self.materializer.materialize(task.recipe)
            t1 = time.perf_counter()
            raced = False
            if self.racing is not None and task.role == FITNESS:
                metrics, examples, raced = race(evaluators, self.model, self.spec.race_weights, task.incumbent,
                                                self.racing)
                produced = [sorted((ev.metric_names() or set()) & set(metrics)) for ev in evaluators]
            else:
                metrics, produced = {}, []
                with torch.no_grad():
                    for ev in evaluators:
                        scores = ev.score(self.model)
                        metrics.update(scores)
                        produced.append(sorted(scores))
                examples = sum(getattr(ev, "n", 0) for ev in evaluators)
            bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
            if bad:
                raise CandidateError(f"non-finite scores {bad}: the merged model's outputs are not finite")
        except CandidateError as exc:
            return Result(task.cid, task.role, None, None, str(exc), "candidate", False, t1 - t0,
                          time.perf_counter() - t1)
        except EvomergeError as exc:  # a setup mistake: the same on every retry
            return Result(task.cid, task.role, None, None, str(exc), "infrastructure", False, t1 - t0,
                          time.perf_counter() - t1)
        except Exception as exc:  # out of memory, a lost device, a bug: nothing to do with the candidate
            return Result(task.cid, task.role, None, None, one_line(exc), "infrastructure", True, t1 - t0,
                          time.perf_counter() - t1)
        t2 = time.perf_counter()
        # Each identity names the metrics it measured, so a card or a report can say which task,
        # split, n and generation settings stand behind every number.
        identity = [{**ev.identity(), "metrics": names} for ev, names in zip(evaluators, produced)]
        return Result(task.cid, task.role, metrics, identity, None, None, True, t1 - t0, t2 - t1, examples, raced)


def build_evaluators(spec: WorkerSpec, tokenizer) -> dict[str, list]:
    from evomerge.evaluators import build_evaluator

    return {
        FITNESS: [build_evaluator(s, tokenizer, f"fitness[{i}]") for i, s in enumerate(spec.fitness)],
        HOLDOUT: [build_evaluator(s, tokenizer, f"holdout[{i}]") for i, s in enumerate(spec.holdout)],
    }
