"""Newer merge methods that do not fit the `reference + sum c_i * keep_i * delta_i` shape.

DELLA (della, della_linear), SCE, NuSLERP, Multi-SLERP and the Karcher mean. Each is a *direct*
method: `merge_direct` sees whole tensors and returns the merged one. Their parameter names,
defaults and edge cases follow mergekit 0.1.5, so the same YAML means the same merge in both
tools (and `to_mergekit` can export them); the code here is written from the methods' definitions.
Where mergekit would crash or write NaNs, these refuse with one line instead (see MethodInputError).

Importing `evomerge.methods` registers them (its last line imports this module).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evomerge.errors import CandidateError, EvomergeError
from evomerge.methods import MergeMethod, Param, register


class MethodInputError(EvomergeError, CandidateError):
    """Parameters a method cannot merge with (della's density +- epsilon outside (0, 1), ...).

    An EvomergeError, so `evomerge merge` prints it as one line; and a CandidateError, so inside a
    campaign the candidate that drew such parameters is penalized and the search goes on.
    """


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """Per-source scalars shaped to broadcast over a stack of tensors like `like` (n, *shape)."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))


def sign_agreement(stack: torch.Tensor) -> torch.Tensor:
    """TIES' sign election by summed mass: True where an entry's sign is the sign of the column sum.

    A zero sum elects +; a zero entry (pruned, or untouched) agrees with neither sign, so it counts
    in no divisor.
    """
    elected = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(stack.dtype)
    return stack.sign() == elected


# ---------------------------------------------------------------------------------------------
# DELLA: magnitude-ranked random pruning (MagPrune), then task arithmetic, optionally with TIES'
# sign election. https://arxiv.org/abs/2406.11617


def magprune_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probability per element: density - epsilon for the smallest |delta| of its row, rising
    linearly with the magnitude rank to density + epsilon for the largest (the mean stays density).

    Ranks run along dim 1, the row of a matrix (as mergekit ranks them); a vector is one row. A
    stable sort breaks ties by position, so every device ranks alike. A row of one element has no
    rank spread and keeps with probability `density` (mergekit divides 0 by 0 there).
    """
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    order = rows.abs().argsort(dim=1, stable=True)
    # The inverse permutation (each element's rank) by a scatter, not a second sort.
    positions = torch.arange(rows.shape[1], device=rows.device, dtype=work).expand(rows.shape[0], -1)
    rank = torch.empty(rows.shape, dtype=work, device=rows.device).scatter_(1, order, positions)
    width = rows.shape[1]
    spread = rank / (width - 1) if width > 1 else torch.full_like(rank, 0.5)
    return ((density - epsilon) + spread * (2 * epsilon)).reshape(delta.shape)


def l1_restored(full: torch.Tensor, kept: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """`kept` rescaled to the L1 norm of `full` (the whole tensor's), so pruning keeps the delta's mass.

    When either norm is below eps there is nothing meaningful to restore, and `kept` stays as is.
    """
    before, after = full.abs().sum(), kept.abs().sum()
    if before < eps or after < eps:
        return kept
    return kept * (before / after)


def magprune(delta: torch.Tensor, density: float, epsilon: float, rescale: bool, seed: int) -> torch.Tensor:
    """One source's DELLA-pruned delta, its random draws from a CPU generator seeded with `seed`.

    The uniform draws are made on the CPU and moved, so CPU and CUDA keep the same elements; one
    draw per element, compared with that element's probability (u < p has probability p).
    """
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise MethodInputError(
            f"della: density {density:g} +- epsilon {epsilon:g} leaves (0, 1); each element's keep probability "
            f"must lie strictly inside it: use epsilon < {min(density, 1 - density):g} for this density (or density 1)")
    prob = magprune_probabilities(delta, density, epsilon)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    draw = torch.rand(tuple(delta.shape), generator=gen, dtype=torch.float32).to(delta.device)
    kept = delta * (draw < prob)
    return l1_restored(delta, kept) if rescale else kept


@dataclass(frozen=True)
class Della(MergeMethod):
    consensus: bool = False

    def merge_direct(self, reference, sources, shared, per_source, seeds):
        pruned = [magprune(s - reference, float(p["density"]), float(p["epsilon"]), bool(shared["rescale"]), seed)
                  for s, p, seed in zip(sources, per_source, seeds)]
        stack = torch.stack(pruned)
        weights = _column([float(p["weight"]) for p in per_source], stack)
        stack = stack * weights
        if self.consensus:
            agree = sign_agreement(stack)
            mixed = (stack * agree).sum(0)
            divisor = (weights * agree).sum(0)
            divisor[divisor == 0] = 1  # no source agrees here: the sum is 0 anyway
        else:
            mixed = stack.sum(0)
            divisor = weights.sum(0)
            divisor[divisor.abs() < 1e-8] = 1  # weights that cancel: leave the sum unnormalized
        if shared["normalize"]:
            mixed = mixed / divisor
        lam = float(shared["lambda"])
        if lam != 1:
            mixed = mixed * lam
        return reference + mixed

    def ignored_parameters(self, n_sources, shared):
        # One source, normalized: w * d / w = d whatever w is (with or without the sign election).
        return {"weight"} if n_sources == 1 and shared.get("normalize", False) else set()


# ---------------------------------------------------------------------------------------------
# SCE: Select the elements where the task vectors vary most, Calculate each vector's weight from
# its energy, Erase minority signs. https://arxiv.org/abs/2408.07990


def variance_selection(task_vectors: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask (shape of one task vector) of the `fraction` of elements with the largest variance across
    sources, counted among the elements that vary at all (where all sources agree nothing is chosen)."""
    shape = task_vectors.shape[1:]
    if fraction >= 1:
        return torch.ones(shape, dtype=task_vectors.dtype, device=task_vectors.device)
    if fraction <= 0:
        return torch.zeros(shape, dtype=task_vectors.dtype, device=task_vectors.device)
    spread = task_vectors.var(dim=0, unbiased=False)
    k = int(torch.count_nonzero(spread) * fraction)  # the count times the fraction, as mergekit rounds it
    mask = torch.zeros(spread.numel(), dtype=task_vectors.dtype, device=task_vectors.device)
    if k > 0:
        mask[spread.reshape(-1).topk(k).indices] = 1
    return mask.reshape(shape)


def energy_weights(task_vectors: torch.Tensor) -> torch.Tensor:
    """Each task vector's mean squared entry, as shares of their total; equal shares when the total
    is negligible (< 1e-6: every vector is about zero, none should dominate by rounding noise)."""
    energy = task_vectors.square().reshape(task_vectors.shape[0], -1).mean(dim=1)
    total = float(energy.sum())
    if abs(total) < 1e-6:
        return torch.full_like(energy, 1.0 / energy.numel())
    return energy / total


@dataclass(frozen=True)
class Sce(MergeMethod):
    def merge_direct(self, reference, sources, shared, per_source, seeds):
        tvs = torch.stack([s - reference for s in sources])
        tvs = tvs * variance_selection(tvs, float(shared["select_topk"]))
        weights = energy_weights(tvs).reshape(-1, *([1] * (tvs.dim() - 1))) * sign_agreement(tvs)
        # Weighted mean of the agreeing entries; the floor keeps all-disagreeing elements at 0.
        return reference + (tvs * weights).sum(0) / weights.sum(0).clamp(min=1e-6)


# ---------------------------------------------------------------------------------------------
# NuSLERP: SLERP of two tensors (or of their task vectors, given a base) with t from two weights,
# over the whole tensor, each row, or each column.


def slerp_vectors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """SLERP between the vectors along the last dim of a and b; the angle comes from the unit vectors
    but the coefficients apply to a and b as they are, so lengths interpolate too.

    Pairs that are colinear to working precision (1 - cos^2 <= 1e-16) take the straight line; the
    other branch is still evaluated at a harmless angle (pi/2), so no NaN is ever formed.
    """
    unit_a = a / a.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    unit_b = b / b.norm(dim=-1, keepdim=True).clamp(min=1e-7)
    cos = (unit_a * unit_b).sum(-1, keepdim=True).clamp(-1, 1)
    colinear = (1 - cos.square()) <= 1e-16
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    arc = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * a + t * b, arc)


def nuslerp(t: float, a: torch.Tensor, b: torch.Tensor, row_wise: bool, flatten: bool) -> torch.Tensor:
    """`flatten`: one SLERP of the whole tensors (row_wise is then moot). Otherwise one per vector
    along the last dim, or with `row_wise` along dim 0 (mergekit's naming: each column of a matrix)."""
    if flatten or a.dim() < 1:
        return slerp_vectors(t, a.reshape(-1), b.reshape(-1)).reshape(a.shape)
    if row_wise:
        return slerp_vectors(t, a.transpose(0, -1), b.transpose(0, -1)).transpose(0, -1)
    return slerp_vectors(t, a, b)


@dataclass(frozen=True)
class NuSlerp(MergeMethod):
    def merge_direct(self, reference, sources, shared, per_source, seeds):
        w0, w1 = (float(p["weight"]) for p in per_source)
        total = w0 + w1
        t = 0.5 if abs(total) < 1e-6 else w1 / total  # weights that cancel: the midpoint
        row_wise, flatten = bool(shared["nuslerp_row_wise"]), bool(shared["nuslerp_flatten"])
        if reference is None:
            return nuslerp(t, sources[0], sources[1], row_wise, flatten)
        return reference + nuslerp(t, sources[0] - reference, sources[1] - reference, row_wise, flatten)


# ---------------------------------------------------------------------------------------------
# Multi-SLERP: a weighted mean of many tensors on the hypersphere, through the tangent space at
# their weighted Euclidean mean direction. https://goddard.blog/posts/multislerp-wow-what-a-cool-idea


def multislerp(points: torch.Tensor, weights: torch.Tensor, eps: float) -> torch.Tensor:
    """Barycentric interpolation of the rows of `points` (n, d) on the sphere, rescaled to their
    weighted mean norm. Returns None where the weighted mean direction vanishes (antipodal inputs)."""
    norms = points.norm(dim=-1, keepdim=True)
    units = points / (norms + eps)
    mean = (units * weights[:, None]).sum(0)
    mean_norm = mean.norm()
    if mean_norm < eps:
        return None
    mean = mean / mean_norm
    # Log map (first order): each unit vector's component orthogonal to the mean direction.
    tangents = units - (units * mean).sum(-1, keepdim=True) * mean
    step = (tangents * weights[:, None]).sum(0)
    length = step.norm() + eps
    # Exp map back onto the sphere, then to the weighted mean length.
    on_sphere = mean * torch.cos(length) + step * (torch.sin(length) / length)
    return on_sphere * (norms.squeeze(-1) * weights).sum()


@dataclass(frozen=True)
class MultiSlerp(MergeMethod):
    def merge_direct(self, reference, sources, shared, per_source, seeds):
        if len(sources) == 1:
            return sources[0]  # nothing to interpolate: the source itself (base or not, as mergekit)
        stack = torch.stack(sources)
        if reference is not None:
            stack = stack - reference
        weights = torch.tensor([float(p["weight"]) for p in per_source], dtype=stack.dtype, device=stack.device)
        if shared["normalize_weights"]:
            total = weights.sum()
            if total == 0:
                raise MethodInputError(f"multislerp: the weights {[float(p['weight']) for p in per_source]} sum to 0, "
                                       "so normalize_weights cannot scale them to sum 1; change a weight")
            weights = weights / total
        eps = float(shared["eps"])
        merged = multislerp(stack.reshape(len(sources), -1), weights, eps)
        if merged is None:
            if len(sources) != 2:
                raise MethodInputError("multislerp: the weighted mean direction of the inputs is zero (antipodal "
                                       "tensors whose weights balance out); change the weights")
            merged = stack[0] * weights[0] + stack[1] * weights[1]  # two antipodes: the straight line
        merged = merged.reshape(stack.shape[1:])
        return merged if reference is None else merged + reference

    def ignored_parameters(self, n_sources, shared):
        return {"weight"} if n_sources == 1 else set()  # one source is returned as it is


# ---------------------------------------------------------------------------------------------
# Karcher mean: the point on the unit sphere minimizing the summed squared geodesic distances to
# the inputs' directions (Riemannian gradient descent), scaled to the inputs' mean norm.


def karcher_mean(points: list[torch.Tensor], max_iter: int, tol: float) -> torch.Tensor:
    """Equal-weight Karcher mean of whole tensors (each one point). Inputs with norm <= tol have no
    direction: they are left out of the direction but still count (as 0) in the mean norm."""
    if len(points) == 1:
        return points[0]
    share = 1.0 / len(points)
    norms = [p.norm() for p in points]
    units = [p / n if n.item() != 0.0 else torch.zeros_like(p) for p, n in zip(points, norms)]
    live = [u for u, n in zip(units, norms) if n.item() > tol]
    if not live:
        return torch.zeros_like(points[0])
    alpha = 1.0 / len(live)
    # Start from the normalized Euclidean mean of the directions (or any input, if that vanishes).
    mean = sum(alpha * u for u in live)
    mean_norm = mean.norm()
    mean = live[0].clone() if mean_norm.item() < tol else mean / mean_norm
    for _ in range(max_iter):
        # Riemannian gradient step: the mean of the log maps of the inputs at the current mean.
        step = torch.zeros_like(mean)
        for u in live:
            cos = torch.clamp((mean * u).sum(), -1.0, 1.0)
            angle = torch.arccos(cos)
            if angle.item() < tol:
                continue  # already there: its log map is 0 (and angle/sin(angle) is 0/0)
            step = step + alpha * (angle / torch.sin(angle)) * (u - cos * mean)
        length = step.norm()
        if length.item() < tol:
            break
        mean = torch.cos(length) * mean + torch.sin(length) * (step / length)  # exp map
        renorm = mean.norm()
        if renorm.item() > tol:
            mean = mean / renorm  # undo the drift off the sphere that rounding causes
    return sum(share * n for n in norms) * mean


@dataclass(frozen=True)
class Karcher(MergeMethod):
    def merge_direct(self, reference, sources, shared, per_source, seeds):
        steps = shared["max_iter"]
        if float(steps) != int(steps):
            raise MethodInputError(f"karcher: max_iter {steps} is not a whole number of iterations")
        # mergekit treats a base model as one more input of the mean, listed after the models.
        points = list(sources) + ([reference] if reference is not None else [])
        return karcher_mean(points, int(steps), float(shared["tol"]))


# ---------------------------------------------------------------------------------------------


def _della(name: str, consensus: bool, normalize: bool) -> Della:
    return Della(
        name,
        {"weight": Param(None, -10.0, 10.0), "density": Param(1.0, 0.0, 1.0), "epsilon": Param(0.15, 0.0, 0.5)},
        {"normalize": Param(normalize, kind=bool), "rescale": Param(True, kind=bool), "lambda": Param(1.0, -10.0, 10.0)},
        reference="https://arxiv.org/abs/2406.11617", direct=True, consensus=consensus,
    )


for _m in (
    _della("della", consensus=True, normalize=True),
    _della("della_linear", consensus=False, normalize=False),
    Sce("sce", {}, {"select_topk": Param(1.0, 0.0, 1.0)}, reference="https://arxiv.org/abs/2408.07990", direct=True),
    NuSlerp("nuslerp", {"weight": Param(None, -10.0, 10.0)},
            {"nuslerp_flatten": Param(True, kind=bool), "nuslerp_row_wise": Param(False, kind=bool)},
            needs_base=False, min_sources=2, max_sources=2, reference="https://en.wikipedia.org/wiki/Slerp",
            direct=True),
    MultiSlerp("multislerp", {"weight": Param(None, -10.0, 10.0)},
               {"normalize_weights": Param(True, kind=bool), "eps": Param(1e-8, 0.0, 1.0)}, needs_base=False,
               reference="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea", direct=True),
    Karcher("karcher", {}, {"max_iter": Param(10, 0, 1000, kind=int), "tol": Param(1e-5, 0.0, 1.0)},
            needs_base=False, reference="https://en.wikipedia.org/wiki/Fr%C3%A9chet_mean", direct=True),
):
    register(_m)

del _m
