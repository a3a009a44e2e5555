"""The Pareto archive: non-dominated candidates, hypervolume, best per objective (pymoo does the math).

Fronts are honest about ties: candidates with identical objective vectors are one front point,
represented by the earliest, with the others listed as its duplicates. Hypervolume is measured
against one reference point per campaign (from the config, or derived once from the first
generation and journaled), so values are comparable across generations and never decrease.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from evomerge.config import Objective


def to_minimization(objectives: list[Objective], values: list[dict]) -> np.ndarray:
    """Rows of objective values, negated where maximized, so that smaller is better everywhere."""
    signs = np.array([-1.0 if o.direction == "maximize" else 1.0 for o in objectives])
    return np.array([[v[o.name] for o in objectives] for v in values], dtype=float).reshape(-1, len(objectives)) * signs


@dataclass
class FrontPoint:
    index: int  # the earliest candidate with these objective values
    duplicates: list[int] = field(default_factory=list)  # later candidates with identical values


def front(objectives: list[Objective], values: list[dict]) -> list[FrontPoint]:
    """The non-dominated points of `values` (in candidate order), identical vectors collapsed."""
    if not values:
        return []
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = to_minimization(objectives, values)
    points: dict[tuple, FrontPoint] = {}
    for i in sorted(int(i) for i in NonDominatedSorting().do(F, only_non_dominated_front=True)):
        key = tuple(F[i])
        if key in points:
            points[key].duplicates.append(i)
        else:
            points[key] = FrontPoint(i)
    return list(points.values())


def front_indices(objectives: list[Objective], values: list[dict]) -> list[int]:
    """Indices of the distinct non-dominated entries (the earliest of each set of ties)."""
    return [p.index for p in front(objectives, values)]


def spread(objectives: list[Objective], values: list[dict], k: int) -> list[int]:
    """Up to k positions into `values` (front points), spread evenly along the front, extremes included."""
    n = len(values)
    if n <= k:
        return list(range(n))
    F = to_minimization(objectives, values)
    order = sorted(range(n), key=lambda i: tuple(F[i]))
    picks = [order[round(j * (n - 1) / (k - 1))] for j in range(k)] if k > 1 else [order[0]]
    return sorted(dict.fromkeys(picks))


def reference_point(objectives: list[Objective], first: list[dict]) -> dict[str, float]:
    """The hypervolume reference, in each objective's own units.

    An objective's `reference` from the config wins. Otherwise: the worst value of the first
    generation that has results, moved a tenth of that generation's spread further out (a tenth
    of its magnitude when every value was equal, or 1 when they were all 0).
    """
    out = {}
    for o in objectives:
        if o.reference is not None:
            out[o.name] = o.reference
            continue
        vals = [v[o.name] for v in first]
        worst = min(vals) if o.direction == "maximize" else max(vals)
        span = max(vals) - min(vals)
        margin = 0.1 * span if span > 0 else (0.1 * abs(worst) if worst != 0 else 1.0)
        out[o.name] = worst - margin if o.direction == "maximize" else worst + margin
    return out


def hypervolume(objectives: list[Objective], values: list[dict], reference: dict[str, float]) -> float:
    """Volume dominated by `values` and bounded by `reference`; points not better than it add nothing."""
    if not values:
        return 0.0
    from pymoo.indicators.hv import HV

    F = to_minimization(objectives, values)
    ref = to_minimization(objectives, [reference])[0]
    inside = F[(F < ref).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(HV(ref_point=ref)(inside))


def best_per_objective(objectives: list[Objective], values: list[dict]) -> dict[str, int]:
    F = to_minimization(objectives, values)
    return {o.name: int(np.argmin(F[:, j])) for j, o in enumerate(objectives)} if len(F) else {}


def finite(values: dict) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values.values())
