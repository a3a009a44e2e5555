"""Task scorers that turn a materialized model into metrics.

One protocol: an evaluator is built from a spec and a tokenizer (or processor), then
`score(model) -> {metric: value}` scores the in-memory model, and `identity()` says what was
measured — task, split, number of examples, generation settings — which the journal stores with
every score. `examples_key()` names the data and rows scored (a campaign refuses fitness and
held-out sets that share examples), `metric_names()` the metrics it will produce (None when only
a run can tell), so a campaign checks its objectives before loading any weight. Specs, as a
campaign config or `evomerge eval` writes them:

    {task: "synthetic:reverse", split: fitness, n: 100}           # exact match, teacher-forced
    {task: "synthetic-logprob:sort", split: fitness, n: 64}       # mean answer log-probability
    {task: "mgsm", lang: ja, split: search, shots: 0, max_new_tokens: 256, language_check: true}
    {task: "mgsm", lang: ja, jsonl: my_gsm8k_ja.jsonl}            # user fitness set
    {task: "mgsm", lang: ja, hf: {path: my/gsm8k-ja, split: test}, chat_template: auto, system: "..."}
    {task: "lm_eval:arc_easy", limit: 100, include_path: tasks/, metrics: [acc]}
    {task: "perplexity", path: corpus.jsonl, field: text}
    {task: "vqa", path: questions.jsonl, lang: ja}                # LLaVA-family models, ROUGE-L
    {task: "vqa", easy_vqa: {split: test, start: 0, n: 64}}       # images shipped by easy-vqa
    {task: "simulate", seconds: 0.5, spread: 0.8, fail_rate: 0.1} # benchmarks and executor tests
"""

from __future__ import annotations

from typing import Any, Protocol

from evomerge.errors import EvomergeError, close_match, is_count


def positive(value, name: str, low: int = 1, optional: bool = False, high: int | None = None) -> None:
    """A ValueError naming the setting unless `value` is an int in [low, high] (or None when optional)."""
    if optional and value is None:
        return
    if not is_count(value, low, high):
        raise ValueError(f"{name} {value!r}: an integer >= {low}" + (f" and <= {high}" if high else ""))


class Evaluator(Protocol):
    def identity(self) -> dict: ...

    def score(self, model: Any) -> dict[str, float]: ...

    def examples_key(self) -> tuple[str, set[int] | None]: ...

    def metric_names(self) -> set[str] | None: ...


_KEYS = {
    "synthetic": {"task", "split", "n", "seed"},
    "mgsm": {"task", "lang", "split", "rows", "shots", "shot_rows", "jsonl", "hf", "language_check", "language_threshold",
             "limit", "max_new_tokens", "batch_size", "stop", "chat_template", "system", "prompt", "answer_prefix"},
    "lm_eval": {"task", "metrics", "limit", "include_path", "num_fewshot", "batch_size", "split"},
    "perplexity": {"task", "path", "field", "max_length", "batch_size", "limit", "split"},
    "vqa": {"task", "path", "easy_vqa", "lang", "split", "limit", "max_new_tokens", "batch_size", "images"},
    "simulate": {"task", "seconds", "spread", "fail_rate", "seed", "split"},
}
# Spec keys `evomerge eval` has a flag for (--data sets path/jsonl).
EVAL_FLAGS = {"lang", "split", "limit", "n", "seed", "include_path", "shots", "num_fewshot", "max_new_tokens",
              "batch_size", "language_check", "chat_template", "system", "prompt"}
TASKS = ("synthetic:<copy|reverse|sort|shift>", "synthetic-logprob:<task>", "mgsm[:<lang>]", "lm_eval:<task>",
         "perplexity", "vqa", "simulate")


def build_evaluator(spec: dict, tokenizer, where: str = "fitness") -> Evaluator:
    task = str(spec.get("task", ""))
    kind, _, name = task.partition(":")
    family = "synthetic" if kind in ("synthetic", "synthetic-logprob") else kind
    if family not in _KEYS:
        raise EvomergeError(f"config field '{where}.task': bad value {task!r}; allowed: {', '.join(TASKS)}"
                            f"{close_match(kind, _KEYS)}")
    unknown = set(spec) - _KEYS[family]
    if unknown and where == "eval":  # `evomerge eval` builds the spec from its flags: speak of flags
        flags = sorted(f"--{k.replace('_', '-')}" for k in _KEYS[family] & EVAL_FLAGS)
        raise EvomergeError(f"flag(s) {', '.join('--' + k.replace('_', '-') for k in sorted(unknown))} do not apply "
                            f"to {family} tasks; its flags: {', '.join(flags)}")
    if unknown:
        raise EvomergeError(f"config field '{where}': unknown key(s) {sorted(unknown)} for {family}; "
                            f"allowed: {sorted(_KEYS[family])}{close_match(sorted(unknown)[0], _KEYS[family])}")
    args = {k: v for k, v in spec.items() if k != "task"}
    try:
        if family == "synthetic":
            from evomerge.evaluators.synthetic import TASKS as SYNTHETIC, SyntheticLogprob, SyntheticTask

            if name not in SYNTHETIC:
                raise EvomergeError(f"config field '{where}.task': bad value {task!r}; allowed tasks: {', '.join(SYNTHETIC)}"
                                    f"{close_match(name, SYNTHETIC)}")
            cls = SyntheticTask if kind == "synthetic" else SyntheticLogprob
            return cls(name, str(args.get("split", "fitness")), args.get("n", 100), tokenizer, args.get("seed", 0))
        if family == "mgsm":
            from evomerge.evaluators.mgsm import MGSM

            if name:
                args.setdefault("lang", name)
            return MGSM(tokenizer, **args)
        if family == "lm_eval":
            from evomerge.evaluators.lm_eval_task import LMEvalTask

            if not name:
                raise EvomergeError(f"config field '{where}.task': write lm_eval:<task name>, e.g. lm_eval:arc_easy")
            return LMEvalTask(tokenizer, name, **args)
        if family == "perplexity":
            from evomerge.evaluators.perplexity import Perplexity

            if "path" not in args:
                raise EvomergeError(f"config field '{where}.path' is missing: the text or JSONL file to score")
            args.pop("split", None)
            return Perplexity(tokenizer, **args)
        if family == "simulate":
            from evomerge.evaluators.simulate import Simulate

            return Simulate(**args)
        from evomerge.evaluators.vqa import VQA

        if "path" not in args and "easy_vqa" not in args:
            raise EvomergeError(f"config field '{where}.path' is missing: the VQA JSONL file "
                                "(or easy_vqa: {split: test, start: 0, n: 50})")
        return VQA(tokenizer, **args)
    except (ValueError, TypeError, OSError) as exc:
        raise EvomergeError(f"config field '{where}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
