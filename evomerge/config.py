"""Campaign config: YAML in, a validated `Campaign` out, with one clear error per bad field.

    name: demo
    seed: 0
    base: builtin:demo/base            # "builtin:demo/..." = the demo family, built and cached locally
    sources: {reverse: builtin:demo/reverse, sort: builtin:demo/sort}
    search_space: {kind: ps, method: task_arithmetic, parameters: {weight: [0.0, 1.0]}, granularity: global}
    optimizer: {name: cma}             # cma | nevergrad:<Name> | nsga2 ; population, sigma0
    budget: 84                         # candidates to evaluate, exactly
    objectives:
      - {name: mean_acc, metrics: {reverse: 0.5, sort: 0.5}, direction: maximize}
    fitness: [{task: synthetic:reverse, split: fitness, n: 100}, ...]
    holdout: [{task: synthetic:reverse, split: holdout, n: 300}, ...]
    holdout_max: 8                     # front members scored on the held-out evaluators
    executor: {kind: local, device: cpu}   # or {kind: ray, address: auto, num_workers: 4, num_gpus_per_worker: 1}
    barrier: true                      # false: no generation barrier (workers refilled at once; see campaign.py)

This module checks the generic fields. The `search_space` block is checked by the space its
`kind` names, the `executor` block by its executor kind, and evaluator specs when pre-flight
builds them: each part validates what it owns. An unknown key anywhere is an error that names
the allowed keys and the closest one.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evomerge.errors import EvomergeError, check_keys, close_match, is_count, is_name, is_number, read_document
from evomerge.recipe import DTYPES

DIRECTIONS = ("maximize", "minimize")
TOP_LEVEL = ("name", "seed", "base", "sources", "search_space", "optimizer", "budget", "objectives", "fitness",
             "holdout", "holdout_max", "executor", "dtype", "racing", "barrier", "bank")
OBJECTIVE_KEYS = ("name", "metrics", "direction", "reference")
MAX_SEED = 2**31 - 2  # pycma seeds with seed + 1 and needs it below 2^32; one bound everywhere
MAX_BUDGET = 10_000_000
RACING_KEYS = ("stages", "z", "seed")


@dataclass
class Objective:
    name: str
    metrics: dict[str, float]  # metric -> weight in the weighted sum
    direction: str = "maximize"
    reference: float | None = None  # hypervolume reference value (None: from the first generation)

    def value(self, metrics: dict[str, float]) -> float:
        return float(sum(w * metrics[m] for m, w in self.metrics.items()))

    def better(self, a: float, b: float) -> bool:
        return a > b if self.direction == "maximize" else a < b


@dataclass
class Campaign:
    name: str
    base: str | None
    sources: dict[str, str]  # display name -> model reference
    search_space: dict  # validated by its kind (search_spaces registry)
    optimizer: dict
    budget: int
    objectives: list[Objective]
    fitness: list[dict]
    holdout: list[dict] = field(default_factory=list)
    executor: dict = field(default_factory=lambda: {"kind": "local", "device": "cpu"})
    seed: int = 0
    dtype: str = "float32"
    racing: dict | None = None  # {stages: [fractions], z: float}; see evomerge.racing
    holdout_max: int = 8
    barrier: bool = True  # False: ask and tell one candidate at a time, keeping every worker busy
    bank: dict = field(default_factory=lambda: {"storage": "auto", "quantize": "none"})  # evomerge.memory_plan
    raw: dict = field(default_factory=dict)  # the config as given: what the journal stores and compares

    @property
    def metric_names(self) -> set[str]:
        return {m for o in self.objectives for m in o.metrics}


def _fail(field_name: str, value: Any, allowed: str) -> EvomergeError:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."  # a 400-digit number is not a message
    return EvomergeError(f"config field '{field_name}': bad value {text}; allowed: {allowed}")


def _need(data: dict, key: str, where: str = "") -> Any:
    if key not in data:
        raise EvomergeError(f"config field '{where}{key}' is missing")
    return data[key]


def _block(data: dict, key: str, default: dict) -> dict:
    if key not in data:
        return dict(default)
    value = data[key]
    if not isinstance(value, dict) or not value:
        raise _fail(key, value, "a non-empty mapping" + (" (or leave the key out for the default)" if default else ""))
    return dict(value)


def _not_json(value: Any, where: str = "") -> str | None:
    """The path of the first value JSON cannot hold (a YAML date, a set), else None."""
    if isinstance(value, dict):
        for k, v in value.items():
            found = _not_json(v, f"{where}.{k}" if where else str(k))
            if found:
                return found
        return None
    if isinstance(value, list):
        for i, v in enumerate(value):
            found = _not_json(v, f"{where}[{i}]")
            if found:
                return found
        return None
    if value is None or isinstance(value, (str, bool, int, float)):
        return None
    return f"{where} ({type(value).__name__} {value!s:.40})"


def as_json(data: dict, origin: str) -> dict:
    """The config as the journal will store it: JSON (keys become strings), or one line naming what is not."""
    bad = _not_json(data)
    if bad:
        raise EvomergeError(f"{origin}: config field {bad} is not a plain value; quote it (YAML read it as a date "
                            "or another type JSON cannot store)")
    return json.loads(json.dumps(data))


def parse_sources(sources: Any) -> dict[str, str]:
    if isinstance(sources, list):
        named: dict[str, str] = {}
        for s in sources:
            if not isinstance(s, str) or not s:
                raise _fail("sources", sources, "a mapping {name: model path} or a list of model paths")
            name = Path(s).name or s
            if name in named:
                raise EvomergeError(f"config field 'sources': two sources are named {name!r} ({named[name]} and {s}); "
                                    "name them yourself: sources: {a: PATH, b: PATH}")
            named[name] = s
        sources = named
    if not isinstance(sources, dict) or not sources:
        raise _fail("sources", sources, "a mapping {name: model path} or a list of model paths, at least one")
    for k, v in sources.items():
        if not isinstance(v, str) or not v:
            raise _fail(f"sources.{k}", v, "a model folder, hub id or builtin:<family>/<member>")
    refs = list(sources.values())
    for i, ref in enumerate(refs):
        if ref in refs[:i]:
            names = [k for k, v in sources.items() if v == ref]
            raise EvomergeError(f"config field 'sources': {names} are the same model ({ref}); each source must "
                                "differ, or its parameters duplicate another's")
    return {str(k): v for k, v in sources.items()}


def parse_optimizer(opt: dict) -> dict:
    from evomerge.optimizers import optimizer_names

    check_keys(opt, ("name", "population", "sigma0"), "optimizer")
    name = opt.get("name", "cma")
    kinds = optimizer_names()
    if not isinstance(name, str) or name.split(":", 1)[0] not in kinds or (name.startswith("nevergrad") and ":" not in name):
        raise _fail("optimizer.name", name, "cma, nsga2, nevergrad:<OptimizerName>" + close_match(name, kinds))
    pop = opt.get("population")
    if pop is not None and not is_count(pop, 2):
        raise _fail("optimizer.population", pop, "an integer >= 2 (or leave it out for the default)")
    sigma = opt.get("sigma0")
    if sigma is not None and not (is_number(sigma) and 0 < sigma <= 1):
        raise _fail("optimizer.sigma0", sigma, "a number in (0, 1]: the initial step in the unit box (default 1/6)")
    return dict(opt, name=name)


def parse_objectives(items: Any) -> list[Objective]:
    if not isinstance(items, list) or not items:
        raise _fail("objectives", items, "a list of at least one {name, metrics, direction}")
    objectives = []
    for i, o in enumerate(items):
        where = f"objectives[{i}]"
        if not isinstance(o, dict) or "name" not in o or "metrics" not in o:
            raise _fail(where, o, "{name: ..., metrics: {metric: weight} or [metrics], direction: maximize|minimize}")
        check_keys(o, OBJECTIVE_KEYS, where)
        metrics = o["metrics"]
        if isinstance(metrics, list) and metrics and all(isinstance(m, str) for m in metrics):
            metrics = {m: 1.0 / len(metrics) for m in metrics}
        if not isinstance(metrics, dict) or not metrics:
            raise _fail(f"{where}.metrics", metrics, "a list of metric names, or {metric: weight}")
        for m, w in metrics.items():
            if not is_number(w):
                raise _fail(f"{where}.metrics.{m}", w, "a finite number (the metric's weight in the sum)")
        direction = o.get("direction", "maximize")
        if direction not in DIRECTIONS:
            raise _fail(f"{where}.direction", direction, ", ".join(DIRECTIONS) + close_match(direction, DIRECTIONS))
        ref = o.get("reference")
        if ref is not None and not is_number(ref):
            raise _fail(f"{where}.reference", ref, "a finite number (the hypervolume reference for this objective)")
        objectives.append(Objective(str(o["name"]), {str(k): float(v) for k, v in metrics.items()}, direction,
                                    float(ref) if ref is not None else None))
    names = [o.name for o in objectives]
    if len(set(names)) != len(names):
        raise _fail("objectives", names, "distinct objective names")
    return objectives


def parse_racing(racing: Any, objectives: list[Objective]) -> dict | None:
    if racing is True:
        racing = {}
    if racing in (None, False):
        return None
    if not isinstance(racing, dict):
        raise _fail("racing", racing, "true, or {stages: [0.25, 0.5], z: 2.0, seed: 0}")
    check_keys(racing, RACING_KEYS, "racing")
    stages = racing.get("stages", [0.25, 0.5])
    if not (isinstance(stages, list) and stages and all(is_number(f) and 0 < f < 1 for f in stages)
            and stages == sorted(stages)):
        raise _fail("racing.stages", stages, "increasing fractions between 0 and 1, e.g. [0.25, 0.5]")
    z = racing.get("z", 2.0)
    if not (is_number(z) and z > 0):
        raise _fail("racing.z", z, "a positive number (2.0: a one-sided ~97.7 % bound)")
    seed = racing.get("seed", 0)
    if not is_count(seed, 0):
        raise _fail("racing.seed", seed, "a non-negative integer (the seed of the order examples are scored in)")
    if len(objectives) != 1 or objectives[0].direction != "maximize" or min(objectives[0].metrics.values()) < 0:
        raise _fail("racing", racing, "one maximized objective with non-negative metric weights")
    return {"stages": [float(f) for f in stages], "z": float(z), "seed": seed}


def parse_evaluator_specs(data: dict, key: str) -> list[dict]:
    specs = data.get(key)
    specs = [] if specs is None else specs
    if not isinstance(specs, list):
        raise _fail(key, specs, "a list of evaluators like {task: synthetic:reverse, split: fitness, n: 100}")
    for i, ev in enumerate(specs):
        if not isinstance(ev, dict) or not isinstance(ev.get("task"), str):
            raise _fail(f"{key}[{i}]", ev, "{task: NAME, split: SPLIT, n: COUNT}")
    return [dict(s) for s in specs]


def parse_campaign(data: Any, origin: str = "config") -> Campaign:
    from evomerge.executors import executor_kind
    from evomerge.search_spaces import space_kind

    if not isinstance(data, dict):
        raise EvomergeError(f"{origin}: expected a mapping at the top level")
    if "merge_method" in data or ("method" in data and "search_space" not in data):
        raise EvomergeError(f"{origin} is a merge recipe, not a campaign config; build it with "
                            f"`evomerge merge {origin} OUT_DIR` (a campaign config has search_space, budget, objectives)")
    unknown = [k for k in data if k not in TOP_LEVEL]
    if unknown:
        raise _fail(unknown[0], data[unknown[0]], f"top-level fields {', '.join(TOP_LEVEL)}{close_match(unknown[0], TOP_LEVEL)}")
    data = as_json(data, origin)  # parse what the journal will store, so a resumed run reads the same config
    raw = copy.deepcopy(data)

    name = data.get("name", "campaign")
    if not isinstance(name, str) or not name:
        raise _fail("name", name, "a non-empty string")
    seed = data.get("seed", 0)
    if not is_count(seed, 0, MAX_SEED):
        raise _fail("seed", seed, f"a non-negative integer up to {MAX_SEED} (the optimizer and DARE's drop are "
                    "seeded from it)")
    base = data.get("base")
    if base is not None and (not isinstance(base, str) or not base):
        raise _fail("base", base, "a model folder, hub id or builtin:<family>/<member>")
    sources = parse_sources(_need(data, "sources"))
    dtype = data.get("dtype", "float32")
    if not is_name(dtype, DTYPES):
        raise _fail("dtype", dtype, ", ".join(DTYPES) + close_match(dtype, DTYPES))

    if "search_space" not in data:
        raise EvomergeError("config field 'search_space' is missing")
    space = _block(data, "search_space", {})
    space = space_kind(space.get("kind", "ps")).validate(space, "search_space")

    optimizer = parse_optimizer(_block(data, "optimizer", {"name": "cma"}))
    budget = _need(data, "budget")
    if not is_count(budget, 1, MAX_BUDGET):
        raise _fail("budget", budget, f"a positive integer up to {MAX_BUDGET:,} (number of candidates)")
    objectives = parse_objectives(_need(data, "objectives"))
    if len(objectives) > 1 and optimizer["name"] == "cma":
        raise _fail("optimizer.name", "cma", "nsga2 (or a nevergrad multi-objective optimizer) for several objectives")

    fitness = parse_evaluator_specs(data, "fitness")
    if not fitness:
        raise _fail("fitness", data.get("fitness"), "a non-empty list of evaluators like {task: synthetic:reverse, split: fitness, n: 100}")
    holdout = parse_evaluator_specs(data, "holdout")
    holdout_max = data.get("holdout_max", 8)
    if not is_count(holdout_max, 1):
        raise _fail("holdout_max", holdout_max, "a positive integer (front members scored on the held-out evaluators)")

    executor = _block(data, "executor", {"kind": "local"})
    executor = executor_kind(executor.get("kind", "local")).validate(executor, "executor")
    barrier = data.get("barrier", True)
    if not isinstance(barrier, bool):
        raise _fail("barrier", barrier, "true (generations, the same front on any executor) or false (no "
                    "generation barrier: every worker kept busy)")

    from evomerge.memory_plan import parse_bank

    bank = parse_bank(data.get("bank"))
    return Campaign(
        name=name,
        base=base,
        sources=sources,
        search_space=space,
        optimizer=optimizer,
        budget=budget,
        objectives=objectives,
        fitness=fitness,
        holdout=holdout,
        executor=executor,
        seed=seed,
        dtype=dtype,
        racing=parse_racing(data.get("racing"), objectives),
        holdout_max=holdout_max,
        barrier=barrier,
        bank=bank,
        raw=raw,
    )


def with_executor(data: dict, override: dict | None) -> dict:
    """The config with its executor block changed by command-line flags (--executor, --address, --num-workers).
    Another kind starts from a fresh block (keeping `retries`); the result is validated like any config."""
    if not override:
        return data
    block = dict(data.get("executor") or {}) if isinstance(data.get("executor"), dict) else {}
    kind = override.get("kind", block.get("kind", "local"))
    if kind != block.get("kind", "local"):
        block = {k: v for k, v in block.items() if k == "retries"}
    block.update(override, kind=kind)
    if kind != "ray" and {"address", "num_workers"} & set(override):
        raise EvomergeError("--address and --num-workers apply to Ray workers; add --executor ray")
    return dict(data, executor=block)


def load_campaign(path: str | Path) -> Campaign:
    return parse_campaign(read_document(path, "config", "campaign YAML file"), str(path))


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two raw configs: 'budget: 40 -> 80'. The `executor` block
    says where candidates run, not what the campaign is, so a campaign may move between executors; so
    does the placement in `bank` (storage, memory sizes), but not `bank.quantize`, which changes scores."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        if key == "executor":
            continue
        if key == "bank" and not prefix:
            a, b = (d.get("bank") if isinstance(d.get("bank"), dict) else {} for d in (old, new))
            if (a.get("quantize") or "none") != (b.get("quantize") or "none"):
                out.append(f"bank.quantize: {json.dumps(a.get('quantize') or 'none')} -> "
                           f"{json.dumps(b.get('quantize') or 'none')}")
            continue
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) \
                and all(isinstance(x, dict) and isinstance(y, dict) for x, y in zip(a, b)):
            for i, (x, y) in enumerate(zip(a, b)):  # stages, evaluator lists: name the entry that changed
                out += config_diff(x, y, f"{prefix}{key}[{i}].")
        elif json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
            out.append(f"{prefix}{key}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return out
