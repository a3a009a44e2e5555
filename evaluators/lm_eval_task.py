"""Any lm-eval task on the in-memory model: lm-eval's HFLM wraps the model object directly.

The numbers are lm-eval's own (same task configs, same metric code); only the model comes from
memory instead of a folder, so a campaign never writes a candidate to disk to score it. Racing
scores random subsets of the task's documents through lm-eval's own `samples` selection, for
metrics that are means of per-document scores in [0, 1] (acc, acc_norm, exact_match).
lm-eval's HFLM already sorts `generate_until` requests by length before batching.
"""

from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def quiet_lm_eval():
    """lm-eval logs warnings about task YAML defaults at every load; a user needs only real errors."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# lm-eval metrics that are a mean of per-document scores in [0, 1]: what racing can bound.
BOUNDED_MEAN = {"acc", "acc_norm", "acc_mutual_info", "exact_match"}


class LMEvalTask:
    """{<task>/<metric>: value} for one lm-eval task (metrics filtered by `metrics`, if given)."""

    def __init__(self, tokenizer, task: str, metrics: list[str] | None = None, limit: int | float | None = None,
                 include_path: str | None = None, num_fewshot: int | None = None, batch_size: int = 8,
                 split: str | None = None):
        try:
            from lm_eval.tasks import TaskManager
        except ImportError:
            raise ValueError("lm-eval tasks need the lm-eval package: pip install 'lm-eval>=0.4.8'") from None
        from evomerge.evaluators import positive

        positive(batch_size, "batch_size")
        positive(num_fewshot, "num_fewshot", 0, optional=True)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, float)) or limit <= 0):
            raise ValueError(f"limit {limit!r}: a positive number of examples (or a fraction of the task)")
        self.tokenizer = tokenizer
        self.task = task
        self.metrics = metrics
        self.limit = limit
        self.num_fewshot = num_fewshot
        self.batch_size = batch_size
        self.include_path = str(Path(include_path).resolve()) if include_path else None
        if include_path and not Path(include_path).is_dir():
            raise ValueError(f"lm-eval include path {include_path} is not a folder of task YAMLs")
        # Local tasks first: indexing lm-eval's own task library takes seconds, a folder of YAMLs milliseconds.
        self.task_manager = TaskManager(include_path=self.include_path, include_defaults=False) if include_path else None
        if self.task_manager is None or task not in self.task_manager.all_tasks:
            self.task_manager = TaskManager(include_path=self.include_path)
        if task not in self.task_manager.all_tasks:
            raise ValueError(f"lm-eval has no task {task!r}" + ("" if include_path else "; local tasks need include_path"))
        self.split = split  # informational: lm-eval tasks fix their own split in the task YAML
        try:  # load the data now: a data set missing from the offline cache is one line before any weight loads
            with quiet_lm_eval():
                loaded = self.task_manager.load([task])["tasks"]
        except Exception as exc:
            raise ValueError(f"lm-eval task {task!r} could not load its data ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); offline, its data set must be "
                             "in the datasets cache (run the task once with network access) or be local "
                             "(a task YAML under include_path with local data files)") from None

        self._racing_setup(loaded.get(task))

    def _racing_setup(self, task_obj) -> None:
        """Racing scores a seeded random subset of the task's documents through lm-eval's `samples`
        argument; it can for metrics whose aggregate is the mean of per-document scores in [0, 1]."""
        from lm_eval.api.metrics import mean

        self.race_metrics: dict[str, tuple[str, str]] = {}  # our metric name -> (lm-eval metric, filter)
        self.race_refusal: str | None = None
        self.n_docs = 0
        if task_obj is None or not hasattr(task_obj, "eval_docs"):  # a group of tasks: no per-document racing
            self.race_refusal = f"lm-eval {self.task!r} is a group of tasks; race its tasks one by one"
            return
        shots = self.num_fewshot if self.num_fewshot is not None else getattr(task_obj.config, "num_fewshot", 0)
        if shots:
            # lm-eval draws each document's exemplars in evaluation order from a generator reset per
            # run, so a document scored within a subset would get other exemplars than in the full run.
            self.race_refusal = (f"lm-eval {self.task!r} is few-shot ({shots}); its exemplars depend on which "
                                 "documents are scored together, so subsets would not score like the full set; "
                                 "use num_fewshot: 0 or turn racing off")
            return
        total = len(task_obj.eval_docs)
        limit = self.limit
        self.n_docs = total if limit is None else min(total, int(limit) if limit >= 1 else math.ceil(total * limit))
        filters = [f.name for f in getattr(task_obj, "_filters", [])] or ["none"]
        for metric, aggregate in getattr(task_obj, "_aggregation_list", {}).items():
            if metric not in BOUNDED_MEAN or aggregate is not mean:
                continue
            for flt in filters:
                key = metric if flt == "none" else f"{metric},{flt}"
                if not self.metrics or metric in self.metrics or key in self.metrics:
                    self.race_metrics[f"{self.task}/{key}"] = (metric, flt)

    @property
    def bounded(self) -> bool:
        return bool(self.race_metrics)

    @property
    def n(self) -> int:
        return self.n_docs

    def race_metric_names(self) -> set[str]:
        return set(self.race_metrics)

    def score_examples(self, model, indices: list[int]) -> dict:
        """Per-document scores of `indices` (positions among the task's evaluated documents)."""
        import torch

        samples = self._evaluate(model, samples={self.task: sorted(indices)}, log_samples=True)["samples"][self.task]
        scores = {}
        for name, (metric, flt) in self.race_metrics.items():
            by_doc = {s["doc_id"]: float(s[metric]) for s in samples if s.get("filter", "none") == flt}
            scores[name] = torch.tensor([by_doc[i] for i in indices])
        return scores

    def examples_key(self) -> tuple[str, None]:
        return f"lm_eval:{self.task}", None  # the task fixes its split: the same task twice is the same data

    def metric_names(self) -> None:
        return None  # lm-eval names its metrics when it runs

    def identity(self) -> dict:
        return {"task": f"lm_eval:{self.task}", "split": self.split or "task default", "n": self.limit or "all",
                "num_fewshot": self.num_fewshot, "include_path": self.include_path}

    def _evaluate(self, model, **kwargs) -> dict:
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        device = str(next(model.parameters()).device)
        lm = HFLM(pretrained=model, tokenizer=self.tokenizer, device=device, batch_size=self.batch_size)
        with quiet_lm_eval():
            return lm_eval.simple_evaluate(model=lm, tasks=[self.task], num_fewshot=self.num_fewshot,
                                           task_manager=self.task_manager, bootstrap_iters=0, verbosity="ERROR",
                                           **kwargs)

    def score(self, model) -> dict[str, float]:
        out = self._evaluate(model, limit=self.limit, log_samples=False)
        metrics = {}
        for key, value in out["results"][self.task].items():
            if not isinstance(value, (int, float)) or key in ("alias", "sample_len") or "_stderr" in key:
                continue
            name = key.split(",")[0]
            if self.metrics and name not in self.metrics and key not in self.metrics:
                continue
            metrics[f"{self.task}/{key.replace(',none', '')}"] = float(value)
        return metrics
