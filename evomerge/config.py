"""Campaign config: YAML in, a validated `Campaign` out, with one clear error per bad field.

    name: demo
    seed: 0
    base: builtin:demo/base            # "builtin:demo/..." = the demo family, built and cached locally
    sources: {reverse: builtin:demo/reverse, sort: builtin:demo/sort}
    search_space: {kind: ps, method: task_arithmetic, parameters: {weight: [0.0, 1.0]}, granularity: global}
    optimizer: {name: cma}             # cma | nevergrad:<Name> | nsga2 ; population, sigma0
    budget: 84                         # candidates to evaluate
    objectives:
      - {name: mean_acc, metrics: {reverse: 0.5, sort: 0.5}, direction: maximize}
    fitness: [{task: synthetic:reverse, split: fitness, n: 100}, ...]
    holdout: [{task: synthetic:reverse, split: holdout, n: 300}, ...]
    executor: {kind: local, device: cpu}
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from evomerge.errors import EvomergeError
from evomerge.methods import METHODS

GRANULARITIES = ("global", "groups")
DIRECTIONS = ("maximize", "minimize")
EXECUTORS = ("local",)
TOP_LEVEL = ("name", "seed", "base", "sources", "search_space", "optimizer", "budget", "objectives", "fitness",
             "holdout", "executor", "dtype", "racing")


@dataclass
class Objective:
    name: str
    metrics: dict[str, float]  # metric -> weight in the weighted sum
    direction: str = "maximize"

    def value(self, metrics: dict[str, float]) -> float:
        return float(sum(w * metrics[m] for m, w in self.metrics.items()))


@dataclass
class Campaign:
    name: str
    base: str | None
    sources: dict[str, str]  # display name -> model reference
    search_space: dict
    optimizer: dict
    budget: int
    objectives: list[Objective]
    fitness: list[dict]
    holdout: list[dict] = field(default_factory=list)
    executor: dict = field(default_factory=lambda: {"kind": "local", "device": "cpu"})
    seed: int = 0
    dtype: str = "float32"
    racing: dict | None = None  # {stages: [fractions], z: float}; see evomerge.racing
    raw: dict = field(default_factory=dict)  # the config as given: what the journal stores and compares

    @property
    def metric_names(self) -> set[str]:
        return {m for o in self.objectives for m in o.metrics}


def _fail(field_name: str, value: Any, allowed: str) -> EvomergeError:
    return EvomergeError(f"config field '{field_name}': bad value {value!r}; allowed: {allowed}")


def _need(data: dict, key: str, where: str = "") -> Any:
    if key not in data:
        raise EvomergeError(f"config field '{where}{key}' is missing")
    return data[key]


def parse_campaign(data: Any, origin: str = "config") -> Campaign:
    if not isinstance(data, dict):
        raise EvomergeError(f"{origin}: expected a mapping at the top level")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise _fail(unknown[0], data[unknown[0]], f"top-level fields {', '.join(TOP_LEVEL)}")
    raw = copy.deepcopy(data)

    sources = _need(data, "sources")
    if isinstance(sources, list):
        sources = {Path(str(s)).name: str(s) for s in sources}
    if not isinstance(sources, dict) or not sources:
        raise _fail("sources", sources, "a mapping {name: model path} or a list of model paths, at least one")

    space = dict(_need(data, "search_space"))
    kind = space.get("kind", "ps")
    if kind != "ps":
        raise _fail("search_space.kind", kind, "ps (data-flow spaces come later)")
    method = space.get("method", "task_arithmetic")
    if method not in METHODS:
        raise _fail("search_space.method", method, ", ".join(METHODS))
    gran = space.get("granularity", "global")
    if gran not in GRANULARITIES:
        raise _fail("search_space.granularity", gran, ", ".join(GRANULARITIES))
    params = space.get("parameters") or {"weight": [0.0, 1.0]}
    searchable = set(METHODS[method].source_params)
    for p, rng in params.items():
        if p not in searchable:
            raise _fail(f"search_space.parameters.{p}", rng, f"per-source parameters of {method}: {sorted(searchable) or 'none'}")
        if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(v, (int, float)) for v in rng) and rng[0] < rng[1]):
            raise _fail(f"search_space.parameters.{p}", rng, "a range [low, high] with low < high")
    space.update(kind=kind, method=method, granularity=gran, parameters=params)
    space.setdefault("families", False)
    space.setdefault("fixed", {})

    opt = dict(data.get("optimizer") or {"name": "cma"})
    name = str(opt.get("name", "cma"))
    if not (name in ("cma", "nsga2") or name.startswith("nevergrad:")):
        raise _fail("optimizer.name", name, "cma, nsga2, nevergrad:<OptimizerName>")
    opt["name"] = name
    pop = opt.get("population")
    if pop is not None and (not isinstance(pop, int) or pop < 2):
        raise _fail("optimizer.population", pop, "an integer >= 2 (or leave it out for the default)")

    budget = _need(data, "budget")
    if not isinstance(budget, int) or budget < 1:
        raise _fail("budget", budget, "a positive integer (number of candidates)")

    objectives = []
    for i, o in enumerate(_need(data, "objectives")):
        if not isinstance(o, dict) or "name" not in o or "metrics" not in o:
            raise _fail(f"objectives[{i}]", o, "{name: ..., metrics: {metric: weight} or [metrics], direction: maximize|minimize}")
        metrics = o["metrics"]
        if isinstance(metrics, list):
            metrics = {m: 1.0 / len(metrics) for m in metrics}
        direction = o.get("direction", "maximize")
        if direction not in DIRECTIONS:
            raise _fail(f"objectives[{i}].direction", direction, ", ".join(DIRECTIONS))
        objectives.append(Objective(str(o["name"]), {str(k): float(v) for k, v in metrics.items()}, direction))
    if not objectives:
        raise _fail("objectives", [], "at least one objective")
    if len(objectives) > 1 and name == "cma":
        raise _fail("optimizer.name", name, "nsga2 (or a nevergrad multi-objective optimizer) for several objectives")

    fitness = data.get("fitness") or []
    if not fitness:
        raise _fail("fitness", fitness, "a non-empty list of evaluators like {task: synthetic:reverse, split: fitness, n: 100}")
    for key in ("fitness", "holdout"):
        for i, ev in enumerate(data.get(key) or []):
            if not isinstance(ev, dict) or "task" not in ev:
                raise _fail(f"{key}[{i}]", ev, "{task: NAME, split: SPLIT, n: COUNT}")

    executor = dict(data.get("executor") or {"kind": "local"})
    if executor.get("kind", "local") not in EXECUTORS:
        raise _fail("executor.kind", executor.get("kind"), ", ".join(EXECUTORS))
    executor.setdefault("kind", "local")
    executor.setdefault("device", "cpu")

    racing = data.get("racing")
    if racing is True:
        racing = {}
    if racing not in (None, False):
        if not isinstance(racing, dict) or set(racing) - {"stages", "z"}:
            raise _fail("racing", racing, "true, or {stages: [0.25, 0.5], z: 2.0}")
        stages = racing.get("stages", [0.25, 0.5])
        if not (isinstance(stages, list) and stages and all(isinstance(f, (int, float)) and 0 < f < 1 for f in stages)
                and stages == sorted(stages)):
            raise _fail("racing.stages", stages, "increasing fractions between 0 and 1, e.g. [0.25, 0.5]")
        if len(objectives) != 1 or objectives[0].direction != "maximize" or min(objectives[0].metrics.values()) < 0:
            raise _fail("racing", racing, "one maximized objective with non-negative metric weights")
        racing = {"stages": [float(f) for f in stages], "z": float(racing.get("z", 2.0))}
    else:
        racing = None

    return Campaign(
        name=str(data.get("name", "campaign")),
        base=str(data["base"]) if data.get("base") else None,
        sources={str(k): str(v) for k, v in sources.items()},
        search_space=space,
        optimizer=opt,
        budget=budget,
        objectives=objectives,
        fitness=list(fitness),
        holdout=list(data.get("holdout") or []),
        executor=executor,
        seed=int(data.get("seed", 0)),
        dtype=str(data.get("dtype", "float32")),
        racing=racing,
        raw=raw,
    )


def load_campaign(path: str | Path) -> Campaign:
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise EvomergeError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_campaign(data, str(path))


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two raw configs: 'budget: 40 -> 80'."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{key}.")
        elif json.dumps(a, sort_keys=True) != json.dumps(b, sort_keys=True):
            out.append(f"{prefix}{key}: {json.dumps(a)} -> {json.dumps(b)}")
    return out
