"""Parameter-space genome: per source, each searched parameter, per cell (global or per layer group
[x tensor family]) is one coordinate in [0, 1], mapped linearly onto the parameter's range.

The optimizer only ever sees the unit box; the default start is the box centre with step 1/6 —
the settings of Sakana's EvoLLM-JP parameter-space search.

    search_space:
      kind: ps
      method: dare_ties                      # any registered merge method
      parameters: {weight: [0, 1], density: [0.1, 1]}   # searched per-source parameters and ranges
      granularity: groups                    # global | groups (one value per layer group)
      families: true                         # with groups: blocks split into attention / mlp / norm
      fixed: {normalize: false}              # parameters held constant (shared or per source)
      component: {"language_model.": ""}     # optional: merge only part of the base (see Recipe)

`method` may also be a list of distinct methods (`method: [ties, dare_ties, task_arithmetic]`): the
search then chooses the method too. The genome gains one last coordinate, `method`, and [0, 1] is
cut into K equal-width buckets, x in [i/K, (i+1)/K) choosing the i-th method (x = 1 the last).
Buckets, not a categorical variable, because CMA-ES and nevergrad's optimizers search a continuous
box: a bucket is a region of that box like any other, so the method moves with the rest of the
genome and no optimizer needs to know about categories. A searched parameter must be taken by at
least one listed method; each candidate's recipe gives its method only the searched and fixed
parameters that method takes (a task_arithmetic candidate gets no `density`), so the coordinates of
the others are simply unread for that candidate. A list of one method is the plain name: the same
genome (no `method` coordinate) and the same recipes.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass

import numpy as np

from evomerge.bank import check_compatible, component_source_name, merged_roles
from evomerge.checkpoint import format_size as _size
from evomerge.errors import EvomergeError, check_keys, close_match, is_number
from evomerge.methods import METHODS, MergeMethod, get_method
from evomerge.recipe import Recipe, check_setting, unmatched_selectors
from evomerge.search_spaces.base import SpaceContext, register_space

BLOCK_FAMILIES = ("attention", "mlp", "norm")
GRANULARITIES = ("global", "groups")
KEYS = ("kind", "method", "parameters", "granularity", "families", "fixed", "component")
METHOD_GENE = "method"  # the name of the coordinate that chooses the method, when several are listed


def method_bucket(x: float, k: int) -> int:
    """The bucket of x among k equal-width buckets of [0, 1]: x in [i/k, (i+1)/k) -> i; x = 1 -> k - 1.

    The boundaries are i/k as Python computes them, so x = i/k lands in bucket i exactly."""
    return bisect.bisect_right([i / k for i in range(1, k)], float(x))


def method_names(value, where: str = "search_space") -> list[str]:
    """The registered methods a `method:` value names: one name, or a list of distinct names."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise EvomergeError(f"config field '{where}.method': bad value []; allowed: a method name or a list of "
                                f"distinct ones, e.g. [ties, dare_ties]; methods: {', '.join(METHODS)}")
        for i, name in enumerate(value):
            if not isinstance(name, str) or name not in METHODS:
                hint = close_match(name, METHODS) if isinstance(name, str) else ""
                raise EvomergeError(f"config field '{where}.method[{i}]': bad value {name!r}; allowed: "
                                    f"{', '.join(METHODS)}{hint}")
            if name in value[:i]:
                raise EvomergeError(f"config field '{where}.method[{i}]': {name!r} is listed twice; each method "
                                    "is one bucket of the method coordinate: list it once")
        return list(value)
    if not isinstance(value, str) or value not in METHODS:
        raise EvomergeError(f"config field '{where}.method': bad value {value!r}; allowed: {', '.join(METHODS)}"
                            f"{close_match(value, METHODS)}")
    return [value]


def _searchable(method: MergeMethod) -> list[str]:
    """The per-source parameters of a method that a genome coordinate can hold (numbers, not flags)."""
    return [k for k, spec in method.source_params.items() if spec.kind is float]


@dataclass(frozen=True)
class Cell:
    group: str | None  # None: every tensor
    family: str | None = None

    @property
    def label(self) -> str:
        if self.group is None:
            return "all"
        return self.group + (f"/{self.family}" if self.family else "")


def layer_cells(names: list[str], model_type: str, granularity: str, families: bool,
                component: dict | None = None) -> list[Cell]:
    """The cells a genome spans: one for 'global', else each layer group of the merged tensors, in order."""
    if granularity == "global":
        return [Cell(None)]
    cells: list[Cell] = []
    for _, role in merged_roles(names, model_type, component):  # unmerged tensors get no coordinate
        # With families, every block tensor gets a family cell ("other" for the unclassified), so no
        # group-wide cell can shadow the family cells of its block.
        fam = (role.family if role.family in BLOCK_FAMILIES else "other") if families and role.block is not None else None
        cell = Cell(role.group, fam)
        if cell not in cells:
            cells.append(cell)

    def order(c: Cell) -> tuple:
        g = c.group or ""
        rank = {"embeddings": -2, "final_norm": 10**6, "lm_head": 10**6 + 1, "other": 10**6 + 2}
        block = int(g.split(".")[1]) if g.startswith("block.") else rank.get(g, -1)
        return (block, (*BLOCK_FAMILIES, "other").index(c.family) if c.family else -1)

    return sorted(cells, key=order)


@register_space("ps")
class ParameterSpace:
    """decode(x) -> Recipe for x in [0, 1]^dim."""

    kind = "ps"
    materializer = "merge"

    def __init__(
        self,
        method: str | list[str] | tuple[str, ...],
        sources: dict[str, str],
        base: str | None,
        parameters: dict[str, list[float]],
        cells: list[Cell],
        fixed: dict | None = None,
        seed: int = 0,
        dtype: str = "float32",
        component: dict | None = None,
    ):
        self.component = component
        # Several methods: the genome's last coordinate chooses one per candidate (see the module doc).
        self.methods = tuple(get_method(m) for m in ([method] if isinstance(method, str) else method))
        # The one method that answers for the space where a single one is asked (memory(): whether the
        # bank holds per-element keys): the only one, else the first listed that sparsifies, else the first.
        self.method = next((m for m in self.methods if m.element_key), self.methods[0])
        self.sources = sources
        self.base = base
        self.parameters = parameters
        self.cells = cells
        self.fixed = dict(fixed or {})
        self.seed = seed
        self.dtype = dtype
        self.names = [f"{src}.{p}@{cell.label}" for src in sources for p in parameters for cell in cells]
        if len(self.methods) > 1:
            self.names.append(METHOD_GENE)

    # -- the registered kind: config block in, space out -------------------------------------

    @classmethod
    def validate(cls, block: dict, where: str = "search_space") -> dict:
        """The block with defaults filled in, or one line naming the bad field."""
        check_keys(block, KEYS, where)
        names = method_names(block.get("method", "task_arithmetic"), where)
        methods = [get_method(n) for n in names]
        several = len(methods) > 1
        listed = ", ".join(names)
        gran = block.get("granularity", "global")
        if not isinstance(gran, str) or gran not in GRANULARITIES:
            raise EvomergeError(f"config field '{where}.granularity': bad value {gran!r}; allowed: "
                                f"{', '.join(GRANULARITIES)}{close_match(gran, GRANULARITIES)}")
        families = block.get("families", False)
        if not isinstance(families, bool):
            raise EvomergeError(f"config field '{where}.families': bad value {families!r}; allowed: true, false")
        if families and gran != "groups":
            raise EvomergeError(f"config field '{where}.families': true has no effect with granularity {gran!r}; "
                                "set granularity: groups, or drop families")
        params = block.get("parameters", {"weight": [0.0, 1.0]})
        if not isinstance(params, dict) or not params:
            raise EvomergeError(f"config field '{where}.parameters': bad value {params!r}; allowed: a mapping "
                                "{parameter: [low, high]}, e.g. {weight: [0, 1], density: [0.1, 1]}")
        searchable = list(dict.fromkeys(k for m in methods for k in _searchable(m)))
        for p, rng in params.items():
            if p not in searchable:
                who = f"none of {listed} has a" if several else f"{listed} has no"
                raise EvomergeError(f"config field '{where}.parameters.{p}': {who} per-source "
                                    f"parameter {p!r} to search; per-source parameters of {listed}: "
                                    f"{', '.join(searchable) or 'none'}{close_match(p, searchable)}")
            ok = isinstance(rng, list) and len(rng) == 2 and all(is_number(v) for v in rng) and rng[0] < rng[1]
            if not ok:
                raise EvomergeError(f"config field '{where}.parameters.{p}': bad value {rng!r}; allowed: a range "
                                    "[low, high] with low < high (finite numbers)")
            for method in methods:  # every method that takes it must take the whole range
                spec = method.source_params.get(p)
                if spec is not None and ((spec.low is not None and rng[0] < spec.low)
                                         or (spec.high is not None and rng[1] > spec.high)):
                    raise EvomergeError(f"config field '{where}.parameters.{p}': range {rng} leaves {method.name}'s "
                                        f"allowed [{spec.low}, {spec.high}]")
        # The genome's layout follows the methods' parameter order, not the order keys were written in.
        params = {k: params[k] for k in searchable if k in params}
        fixed = block.get("fixed", {})
        fixed = {} if fixed is None else fixed
        if not isinstance(fixed, dict):
            raise EvomergeError(f"config field '{where}.fixed': bad value {fixed!r}; allowed: a mapping of "
                                "parameters held constant, e.g. {normalize: false}")
        allowed = list(dict.fromkeys(k for m in methods for k in m.params))
        for k, v in fixed.items():
            if k not in allowed:
                raise EvomergeError(f"config field '{where}.fixed.{k}' is unknown for "
                                    f"{'every one of ' if several else ''}{listed}; allowed: "
                                    f"{', '.join(allowed) or 'none'}{close_match(k, allowed)}")
            if k in params:
                raise EvomergeError(f"config field '{where}.fixed.{k}': {k!r} is also searched under "
                                    f"{where}.parameters; keep it in one of the two")
            for method in methods:  # only the methods that take it get it, each within its own range
                if k in method.params:
                    check_setting(v, method.params[k], f"config field '{where}.fixed.{k}'"
                                  + (f" (for {method.name})" if several else ""))
        for method in methods:
            for k, spec in method.params.items():
                if spec.default is None and k not in params and k not in fixed:
                    raise EvomergeError(f"config field '{where}': {method.name} needs {k!r}; search it under "
                                        f"parameters or set it under fixed")
        component = block.get("component")
        if component is not None and not (isinstance(component, dict) and component
                                          and all(isinstance(a, str) and isinstance(b, str) for a, b in component.items())):
            raise EvomergeError(f"config field '{where}.component': bad value {component!r}; allowed: a mapping "
                                "of base-name prefixes to source-name prefixes, e.g. {'language_model.': ''}")
        # One method stays its name (a list of one is the plain string: same genome, same journal); several
        # are a tuple, hashable like a name (callers look `method` up in METHODS; a tuple finds none).
        out = dict(block, kind="ps", method=tuple(names) if several else names[0], granularity=gran,
                   families=families, parameters=params, fixed=fixed)
        if component is None:
            out.pop("component", None)
        return out

    @classmethod
    def build(cls, block: dict, ctx: SpaceContext) -> "ParameterSpace":
        methods = [get_method(n) for n in method_names(block["method"])]
        several = len(methods) > 1
        # With several methods, a listed method the campaign cannot run is a config error naming it: dropping
        # it silently would leave a bucket of the method coordinate that means something else.
        listed = " (listed in search_space.method: drop it there, or" if several else ""
        n = len(ctx.sources)
        # A searched parameter is idle when every listed method that takes it ignores it here: it can change
        # no candidate. One that some method reads stays searched (the others leave it unread).
        ignored: dict[str, set[str]] = {}
        for method in methods:
            shared_fixed = {k: v for k, v in block["fixed"].items() if k in method.shared_params}
            shared = {k: spec.default for k, spec in method.shared_params.items()} | shared_fixed
            ignored[method.name] = method.ignored_parameters(n, shared)
        idle = {p for p in block["parameters"]
                if all(p in ignored[m.name] for m in methods if p in m.source_params)}
        if idle and not several:
            raise EvomergeError(f"config field 'search_space.parameters': {sorted(idle)} cannot change a "
                                f"{methods[0].name} merge of {n} source(s) with {shared}; "
                                "searching them wastes the budget: fix them, or add sources")
        if idle:
            takers = [m.name for m in methods if idle & set(m.source_params)]
            raise EvomergeError(f"config field 'search_space.parameters': {sorted(idle)} cannot change a merge of "
                                f"{n} source(s) by any listed method that takes them ({', '.join(takers)}); "
                                "searching them wastes the budget: fix them, or add sources")
        for method in methods:
            if method.needs_base and ctx.base is None:
                raise EvomergeError(f"config field 'base' is missing: method {method.name!r} merges task vectors "
                                    "relative to a base model" + (f"{listed} add a base)" if several else ""))
            if n < method.min_sources or (method.max_sources is not None and n > method.max_sources):
                raise EvomergeError(f"config field 'sources': method {method.name!r} takes "
                                    f"{method.min_sources}{'' if method.max_sources == method.min_sources else '+'} "
                                    f"source(s) besides the base, got {n}"
                                    + (f"{listed} change the sources)" if several else ""))
        base_info = ctx.models.get("base")
        if several and base_info is not None and all(m.needs_base for m in methods):
            # Pre-flight refuses a source that is the base for one method; a list is checked here. (With a
            # base-free method such as linear in the list, that source still counts for its candidates.)
            for name, info in ctx.models.items():
                if name != "base" and info.path.resolve() == base_info.path.resolve():
                    raise EvomergeError(f"config field '{name}': {info.ref} is the base model itself; its task "
                                        "vector is zero, so its parameters could change nothing: drop it from sources")
        reference, component = ctx.reference, block.get("component")
        ref_path = reference.path.resolve()
        check_compatible(reference.ref, reference.shapes,
                         {info.ref: (reference.shapes if info.path.resolve() == ref_path else info.shapes)
                          for info in ctx.models.values() if info is not reference},
                         reference.model_type, component)
        cells = layer_cells(list(reference.shapes), reference.model_type, block["granularity"],
                            bool(block.get("families")), component)
        space = cls(block["method"], ctx.sources, ctx.base, block["parameters"], cells, block["fixed"], ctx.seed,
                    ctx.dtype, component)
        # Rules the config writes (under `fixed`) must match tensors of the model, like a recipe's: checked in
        # the recipe of each method (the centre of its bucket), as each takes its own part of `fixed`.
        roles = merged_roles(reference.shapes, reference.model_type, component)
        for i in range(len(space.methods)):
            x = space.x0.copy()
            if several:
                x[-1] = (i + 0.5) / len(space.methods)
            problem = unmatched_selectors(space.decode(x), roles)
            if problem:
                raise EvomergeError(f"config field 'search_space': {problem}")
        return space

    def memory(self, models: dict, element: int) -> dict:
        """The bank (reference + one task vector per other source + magnitude sketches for methods that
        sparsify by magnitude) and the model being evaluated, in the campaign's dtype; `layout` feeds the
        memory plan (evomerge.memory_plan), which adds the KV cache and chooses where the deltas live."""
        from evomerge.memory_plan import layout_of

        reference = models[self.reference_name]
        merged = {n for n in reference.shapes if component_source_name(n, self.component) is not None}
        ref_path = reference.path.resolve()
        deltas = sum(1 for name, info in models.items() if name != "base" and info.path.resolve() != ref_path)
        sketched = any(m.element_key == "magnitude" for m in self.methods)
        layout = layout_of(reference.shapes, merged, deltas, sketched, reference.numel)
        bank = (layout.reference + deltas * layout.merged) * element
        model = layout.model * element
        return {"total": bank + model, "layout": layout,
                "detail": f"bank {_size(bank)} (reference {_size(layout.reference * element)} + task vectors "
                          f"{_size(deltas * layout.merged * element)}), evaluation model {_size(model)}"}

    # -- the SearchSpace interface ------------------------------------------------------------

    @property
    def reference_name(self) -> str:
        return "base" if self.base is not None else f"sources.{next(iter(self.sources))}"

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def x0(self) -> np.ndarray:
        return np.full(self.dim, 0.5)

    sigma0 = 1.0 / 6.0

    def describe(self) -> list[str]:
        def takers(p: str) -> str:  # with several methods, a parameter not all of them take names its takers
            names = [m.name for m in self.methods if p in m.source_params]
            return "" if len(names) == len(self.methods) else f" ({', '.join(names)} only)"

        params = ", ".join(f"{p} in [{lo:g}, {hi:g}]{takers(p)}" for p, (lo, hi) in self.parameters.items())
        where = "one value for all tensors" if self.cells[0].group is None else f"{len(self.cells)} cells"
        if len(self.methods) == 1:
            method = self.method.name
        else:
            method = (f"method searched over [{', '.join(m.name for m in self.methods)}] (coordinate "
                      f"'{METHOD_GENE}': {len(self.methods)} equal buckets of [0, 1])")
        return [f"parameter space: {method}; {params}; per source x {where}",
                f"fixed: {self.fixed or 'nothing'}"]

    def method_of(self, x) -> MergeMethod:
        """The method a genome chooses: the bucket its last coordinate falls in (the only one, if one is listed)."""
        if len(self.methods) == 1:
            return self.methods[0]
        return self.methods[method_bucket(min(max(float(x[-1]), 0.0), 1.0), len(self.methods))]

    def baselines(self) -> dict[str, dict]:
        def linear(refs: list[str]) -> dict:  # normalized: the mean of the sources
            recipe = {"method": "linear", "sources": [{"model": r, "parameters": {"weight": 1.0}} for r in refs],
                      "dtype": self.dtype}
            if self.component:  # a component merge keeps the rest of the base as it is
                recipe.update(base=self.base, component=self.component)
            return recipe

        out = {name: linear([ref]) for name, ref in self.sources.items()}
        if len(self.sources) > 1:
            out["uniform"] = linear(list(self.sources.values()))
        if self.base:
            out["base"] = {"method": "task_arithmetic", "base": self.base, "dtype": self.dtype,
                           "sources": [{"model": r, "parameters": {"weight": 0.0}} for r in self.sources.values()],
                           **({"component": self.component} if self.component else {})}
        return out

    def decode(self, x) -> Recipe:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        if x.shape != (self.dim,):
            raise ValueError(f"genome has {x.shape} coordinates, the space has {self.dim}")
        method = self.method_of(x)
        # The method gets only what it takes: the coordinates of parameters it lacks go unread.
        shared = {k: v for k, v in self.fixed.items() if k in method.shared_params}
        per_source_fixed = {k: v for k, v in self.fixed.items() if k in method.source_params}
        sources = []
        i = 0
        for ref in self.sources.values():
            params = dict(per_source_fixed)
            for p, (lo, hi) in self.parameters.items():
                values = [lo + float(x[i + k]) * (hi - lo) for k in range(len(self.cells))]
                i += len(self.cells)
                if p not in method.source_params:
                    continue
                if self.cells[0].group is None:
                    params[p] = values[0]
                else:
                    rules = [_rule(c, v) for c, v in zip(self.cells, values)]
                    rules.append({"value": float(np.mean(values))})  # tensors outside every cell
                    params[p] = rules
            sources.append({"model": ref, "parameters": params})
        recipe = {"method": method.name, "sources": sources, "parameters": shared, "seed": self.seed,
                  "dtype": self.dtype}
        if self.base:
            recipe["base"] = self.base
        if self.component:
            recipe["component"] = self.component
        return Recipe.from_dict(recipe)


def _rule(cell: Cell, value: float) -> dict:
    rule: dict = {"group": cell.group}
    if cell.family:
        rule["family"] = cell.family
    rule["value"] = value
    return rule

