"""The Pareto archive: non-dominated candidates, hypervolume, best per objective (pymoo does the math)."""

from __future__ import annotations

import numpy as np

from evomerge.config import Objective


def to_minimization(objectives: list[Objective], values: list[dict]) -> np.ndarray:
    """Rows of objective values, negated where maximized, so that smaller is better everywhere."""
    signs = np.array([-1.0 if o.direction == "maximize" else 1.0 for o in objectives])
    return np.array([[v[o.name] for o in objectives] for v in values], dtype=float).reshape(-1, len(objectives)) * signs


def front_indices(objectives: list[Objective], values: list[dict]) -> list[int]:
    """Indices of the non-dominated entries (duplicates of a front point all stay)."""
    if not values:
        return []
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    F = to_minimization(objectives, values)
    return sorted(int(i) for i in NonDominatedSorting().do(F, only_non_dominated_front=True))


def reference_point(objectives: list[Objective], values: list[dict]) -> np.ndarray:
    """Per objective, in minimization space: 0 for maximized scores (accuracies are >= 0), else the
    worst value seen, so hypervolume grows as the front improves."""
    F = to_minimization(objectives, values)
    ref = []
    for j, o in enumerate(objectives):
        if o.direction == "maximize":
            ref.append(max(0.0, float(F[:, j].max())) if len(F) else 0.0)
        else:
            ref.append(float(F[:, j].max()) * 1.1 + 1e-12 if len(F) else 1.0)
    return np.array(ref)


def hypervolume(objectives: list[Objective], values: list[dict], ref: np.ndarray | None = None) -> float:
    if not values:
        return 0.0
    from pymoo.indicators.hv import HV

    F = to_minimization(objectives, values)
    ref = reference_point(objectives, values) if ref is None else ref
    inside = F[(F < ref).all(axis=1)]
    if len(inside) == 0:
        return 0.0
    return float(HV(ref_point=ref)(inside))


def best_per_objective(objectives: list[Objective], values: list[dict]) -> dict[str, int]:
    F = to_minimization(objectives, values)
    return {o.name: int(np.argmin(F[:, j])) for j, o in enumerate(objectives)} if len(F) else {}
