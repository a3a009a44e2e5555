"""Task scorers that turn a materialized model into metrics.

An evaluator is built from a spec such as `{task: synthetic:reverse, split: fitness, n: 100}` and
offers `score(model) -> {metric: value}` and `identity() -> {task, split, n, ...}` (what the
journal stores beside the score). MGSM, lm-eval tasks, VQA and perplexity land with issue 4.
"""

from __future__ import annotations

from evomerge.errors import EvomergeError

TASK_KINDS = ("synthetic", "synthetic-logprob")


def build_evaluator(spec: dict, tokenizer, where: str = "fitness"):
    from evaluators.synthetic import TASKS, SyntheticLogprob, SyntheticTask

    task = str(spec.get("task", ""))
    kind, _, name = task.partition(":")
    if kind not in TASK_KINDS:
        raise EvomergeError(f"config field '{where}.task': bad value {task!r}; allowed: "
                            + ", ".join(f"{k}:<{'|'.join(TASKS)}>" for k in TASK_KINDS))
    if name not in TASKS:
        raise EvomergeError(f"config field '{where}.task': bad value {task!r}; allowed tasks: {', '.join(TASKS)}")
    cls = SyntheticTask if kind == "synthetic" else SyntheticLogprob
    try:
        return cls(name, str(spec.get("split", "fitness")), int(spec.get("n", 100)), tokenizer, int(spec.get("seed", 0)))
    except ValueError as exc:
        raise EvomergeError(f"config field '{where}': {exc}") from None
