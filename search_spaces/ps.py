"""Parameter-space genome: per source, each searched parameter, per cell (global or per layer group
[x tensor family]) is one coordinate in [0, 1], mapped linearly onto the parameter's range.

The optimizer only ever sees the unit box; the default start is the box centre with step 1/6 —
the settings of Sakana's EvoLLM-JP parameter-space search.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from evomerge.architecture import classify
from evomerge.checkpoint import Checkpoint
from evomerge.methods import get_method
from evomerge.recipe import Recipe

BLOCK_FAMILIES = ("attention", "mlp", "norm")


@dataclass(frozen=True)
class Cell:
    group: str | None  # None: every tensor
    family: str | None = None

    @property
    def label(self) -> str:
        if self.group is None:
            return "all"
        return self.group + (f"/{self.family}" if self.family else "")


def layer_cells(base_path: str, granularity: str, families: bool) -> list[Cell]:
    """The cells a genome spans: one for 'global', else each layer group the model has, in order."""
    if granularity == "global":
        return [Cell(None)]
    ck = Checkpoint(base_path)
    cells: list[Cell] = []
    for name in ck.names():
        role = classify(name, ck.model_type)
        fam = role.family if families and role.block is not None and role.family in BLOCK_FAMILIES else None
        cell = Cell(role.group, fam)
        if cell not in cells:
            cells.append(cell)

    def order(c: Cell) -> tuple:
        g = c.group or ""
        rank = {"embeddings": -2, "final_norm": 10**6, "lm_head": 10**6 + 1, "other": 10**6 + 2}
        block = int(g.split(".")[1]) if g.startswith("block.") else rank.get(g, -1)
        return (block, BLOCK_FAMILIES.index(c.family) if c.family in BLOCK_FAMILIES else -1)

    return sorted(cells, key=order)


class ParameterSpace:
    """decode(x) -> Recipe for x in [0, 1]^dim."""

    def __init__(
        self,
        method: str,
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
        self.method = get_method(method)
        self.sources = sources
        self.base = base
        self.parameters = parameters
        self.cells = cells
        self.fixed = dict(fixed or {})
        self.seed = seed
        self.dtype = dtype
        self.names = [
            f"{src}.{p}@{cell.label}" for src in sources for p in parameters for cell in cells
        ]

    @classmethod
    def from_config(cls, space: dict, sources: dict[str, str], base: str | None, seed: int, dtype: str) -> "ParameterSpace":
        cells = layer_cells(base or next(iter(sources.values())), space["granularity"], bool(space.get("families")))
        return cls(space["method"], sources, base, space["parameters"], cells, space.get("fixed"), seed, dtype,
                   space.get("component"))

    @property
    def dim(self) -> int:
        return len(self.names)

    @property
    def x0(self) -> np.ndarray:
        return np.full(self.dim, 0.5)

    sigma0 = 1.0 / 6.0

    def decode(self, x) -> Recipe:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        if x.shape != (self.dim,):
            raise ValueError(f"genome has {x.shape} coordinates, the space has {self.dim}")
        shared = {k: v for k, v in self.fixed.items() if k in self.method.shared_params}
        per_source_fixed = {k: v for k, v in self.fixed.items() if k in self.method.source_params}
        sources = []
        i = 0
        for ref in self.sources.values():
            params = dict(per_source_fixed)
            for p, (lo, hi) in self.parameters.items():
                values = [lo + float(x[i + k]) * (hi - lo) for k in range(len(self.cells))]
                i += len(self.cells)
                if self.cells[0].group is None:
                    params[p] = values[0]
                else:
                    rules = [_rule(c, v) for c, v in zip(self.cells, values)]
                    rules.append({"value": float(np.mean(values))})  # tensors outside every cell
                    params[p] = rules
            sources.append({"model": ref, "parameters": params})
        recipe = {"method": self.method.name, "sources": sources, "parameters": shared, "seed": self.seed,
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
