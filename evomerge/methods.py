"""Merge methods: small objects over pure tensor functions, behind a registry.

Every method here is written in one shape,

    merged = a * reference + sum_i c_i * keep_i * delta_i      (optionally with TIES sign election)

where delta_i = source_i - reference. What differs between methods is how the per-source
coefficients c_i, the keep masks and the reference coefficient a are derived, and each method
object carries exactly that: `plan()` turns resolved parameters into coefficients and keeps, a
`Sparsifier` turns a density into a threshold on a per-element key, and `tensor_stats()` asks
for the per-tensor facts it needs (norms, cosines). A new method is one class and one
`register()` call; nothing else in the engine names methods.

Splitting the work that way is what makes the in-memory materializer fast: the expensive facts
(magnitude ranks, DARE random fields, norms and dot products) are computed once per source, and
each candidate needs a few scalar look-ups plus one fused pass over memory (`combine`).

`merge_tensor` runs a whole method on whole tensors from scratch; the `SourceBank` runs the
same objects on cached keys and chunks. Both give the same bits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from evomerge.errors import EvomergeError

# ---------------------------------------------------------------------------------------------
# Per-element keys: computed once per tensor and source, reused by every candidate. A keep mask
# is a range of key values, so any density is one comparison per element, never a sort.

FIELD_LEVELS = 1 << 16  # DARE's drop field resolution: densities are honoured to 1/65536
FIELD_RANGE = (-(FIELD_LEVELS // 2), FIELD_LEVELS // 2)


def magnitude_rank(delta: torch.Tensor) -> torch.Tensor:
    """Rank of each element's |delta| in ascending order (int32), so top-k is `rank >= n - k`."""
    flat = delta.reshape(-1).abs().float()
    order = torch.argsort(flat, stable=True)
    rank = torch.empty_like(order, dtype=torch.int32)
    rank[order] = torch.arange(flat.numel(), dtype=torch.int32, device=flat.device)
    return rank.reshape(delta.shape)


def tensor_seed(seed: int, position: int, tensor: str) -> int:
    """A stable 63-bit seed per (recipe seed, source position in the recipe, tensor name).

    Not the source's path: a recipe must rebuild bit-identically after its models are moved.
    """
    h = hashlib.blake2b(f"{seed}\0{position}\0{tensor}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def drop_field(shape: torch.Size | tuple[int, ...], seed: int) -> torch.Tensor:
    """Uniform noise in [-2^15, 2^15) (one value per element) from a CPU generator, so CPU and
    CUDA agree. Stored as int32: compiled kernels vectorize int32 loads, not int16 ones.

    DARE keeps element j when field[j] < threshold(density); one field serves every density,
    and the kept sets are nested: raising the density only adds elements.
    """
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(FIELD_RANGE[0], FIELD_RANGE[1], tuple(shape), generator=gen, dtype=torch.int32)


@dataclass(frozen=True)
class Keep:
    """Which elements of a delta survive, and the factor applied to survivors.

    kind "all" keeps everything, "none" nothing, "range" the elements whose key (a magnitude
    rank or a drop-field value) lies in [lo, hi).
    """

    kind: str
    lo: int = 0
    hi: int = 0
    scale: float = 1.0

    def mask(self, key: torch.Tensor) -> torch.Tensor:
        if self.lo <= 0:  # lo is the floor of the key's range (rank 0, or the field's minimum): one comparison
            return key < self.hi
        return (key >= self.lo) & (key < self.hi)

    def bounds(self, full: tuple[int, int]) -> tuple[int, int]:
        """[lo, hi) in key space, given the range that covers every element."""
        if self.kind == "all":
            return full
        if self.kind == "none":
            return full[0], full[0]
        return self.lo, self.hi

    def with_scale(self, scale: float) -> "Keep":
        return Keep(self.kind, self.lo, self.hi, scale)


KEEP_ALL = Keep("all")
KEEP_NONE = Keep("none")


class Sparsifier:
    """Turns a source's density into a Keep over one kind of per-element key."""

    key: str  # "rank" (magnitude rank) or "field" (DARE's random field)

    def full_range(self, n: int) -> tuple[int, int]:
        raise NotImplementedError

    def keep(self, n: int, params: dict, shared: dict) -> Keep:
        raise NotImplementedError


class MagnitudeSparsifier(Sparsifier):
    """TIES: keep the k = max(1, floor(density * n)) largest magnitudes."""

    key = "rank"

    def full_range(self, n: int) -> tuple[int, int]:
        return 0, n

    def keep(self, n: int, params: dict, shared: dict) -> Keep:
        density = float(params["density"])
        if density >= 1:
            return KEEP_ALL
        if density <= 0 or n == 0:
            return KEEP_NONE
        k = max(1, int(density * n))
        return Keep("range", n - k, n)


class OutlierSparsifier(MagnitudeSparsifier):
    """Breadcrumbs: drop the top `gamma` fraction as outliers, then the smallest, keeping `density`."""

    def keep(self, n: int, params: dict, shared: dict) -> Keep:
        density, gamma = float(params["density"]), float(params["gamma"])
        if density >= 1:
            return KEEP_ALL
        target = int(density * n)
        if target <= 0:
            return KEEP_NONE
        n_bottom = max(0, n - target - int(gamma * n))
        return Keep("range", n_bottom, n_bottom + target)


class RandomSparsifier(Sparsifier):
    """DARE: keep each element with probability `density`; rescale survivors by 1/density."""

    key = "field"

    def full_range(self, n: int) -> tuple[int, int]:
        return FIELD_RANGE

    def keep(self, n: int, params: dict, shared: dict) -> Keep:
        density = float(params["density"])
        if density >= 1:
            return KEEP_ALL
        level = round(density * FIELD_LEVELS)
        if level <= 0:
            return KEEP_NONE
        scale = FIELD_LEVELS / level if shared["rescale"] else 1.0
        return Keep("range", FIELD_RANGE[0], level + FIELD_RANGE[0], scale)


# ---------------------------------------------------------------------------------------------
# The one fused kernel every method ends in.


def combine(
    reference: torch.Tensor,
    deltas: list[torch.Tensor | None],
    coefficients: list[float | torch.Tensor],
    keeps: list[Keep],
    keys: list[torch.Tensor | None],
    *,
    ref_coefficient: float | torch.Tensor = 1.0,
    consensus: bool = False,
    normalize: bool = False,
    weights: list[float] | None = None,
    lam: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """a*reference + lam * sum_i c_i * keep_i(delta_i) [/ divisor], computed in float32 or float64.

    With `consensus` (TIES), each element keeps only the contributions whose sign agrees with the
    sign of their sum; `normalize` then divides by the sum of the agreeing sources' `weights`.
    Without consensus, `normalize` divides by the sum of all weights. A `None` delta (a source that
    is the reference itself) contributes nothing but still counts in that sum.
    """
    work = torch.float64 if reference.dtype == torch.float64 else torch.float32
    terms = []
    used_weights = []
    for delta, coef, keep, key, w in zip(deltas, coefficients, keeps, keys, weights or coefficients):
        if keep.kind == "none" or delta is None:
            continue
        term = delta.to(work) * coef if not isinstance(coef, float) or coef != 1.0 else delta.to(work)
        if keep.kind != "all":
            term = term * keep.mask(key)
        if keep.scale != 1.0:
            term = term * keep.scale
        terms.append(term)
        used_weights.append(w)
    plain = isinstance(ref_coefficient, float) and ref_coefficient == 1.0
    result = reference.to(work) if plain else reference.to(work) * ref_coefficient
    if not terms:
        mixed = None
    elif consensus:
        stack = torch.stack(terms)
        majority = torch.where(stack.sum(0) >= 0, 1.0, -1.0).to(work)
        agree = stack.sign() == majority
        mixed = (stack * agree).sum(0)
        if normalize:
            w = torch.tensor(used_weights, dtype=work, device=stack.device).reshape(-1, *([1] * (stack.dim() - 1)))
            divisor = (w * agree).sum(0)
            divisor[divisor == 0] = 1
            mixed = mixed / divisor
    else:
        mixed = terms[0]
        for t in terms[1:]:
            mixed = mixed + t
        if normalize:
            total = float(sum(weights or coefficients))
            if abs(total) >= 1e-8:
                mixed = mixed / total
    if mixed is not None:
        result = result + (mixed * lam if lam != 1.0 else mixed)
    if out is not None:
        out.copy_(result)
        return out
    return result


# ---------------------------------------------------------------------------------------------
# Per-tensor statistics some methods need, and where they come from.


class TensorFacts(Protocol):
    """Per-tensor facts about the recipe's sources (the bank caches them; `merge_tensor` computes them)."""

    def norms_and_dot(self, position: int) -> tuple[float, float, float]:
        """(|reference|, |source|, reference . source) for the source at `position` in the recipe."""
        ...

    def cosines(self, rowwise: bool) -> torch.Tensor:
        """Cosines between every pair of the recipe's task vectors (rowwise: per pair and row)."""
        ...


def slerp_coefficients(ref_norm: float, other_norm: float, dot_raw: float, t: float) -> tuple[float, float]:
    """SLERP weights (on reference, on other) from norms and the raw dot product of the two tensors.

    Nearly colinear pairs (|cos| > 0.9995) fall back to linear interpolation.
    """
    eps = 1e-8
    na = float(ref_norm) if float(ref_norm) > eps else 1.0
    nb = float(other_norm) if float(other_norm) > eps else 1.0
    dot = max(-1.0, min(1.0, float(dot_raw) / (na * nb)))
    if abs(dot) > 0.9995:
        return 1.0 - t, t
    theta = math.acos(dot)
    s = math.sin(theta)
    return math.sin((1 - t) * theta) / s, math.sin(t * theta) / s


def model_stock_ratio(cos_pairs: torch.Tensor, count: int) -> torch.Tensor:
    """Model Stock's interpolation ratio t = k cos / (1 + (k-1) cos), from mean pairwise cosines."""
    cos = cos_pairs.mean(0)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < 1e-6
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


def pairwise_cosines(deltas: list[torch.Tensor], rowwise: bool) -> torch.Tensor:
    """Cosines between every pair of task vectors: one per pair (rowwise: one per pair and row)."""
    flat = [d.reshape(d.shape[0], -1) if rowwise and d.dim() > 1 else d.reshape(1, -1) for d in deltas]
    out = []
    for i, a in enumerate(flat):
        for b in flat[i + 1 :]:
            norm = a.norm(dim=-1) * b.norm(dim=-1)
            out.append(((a * b).sum(-1) / norm.clamp(min=1e-6)).clamp(-1, 1))
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# The methods.


@dataclass(frozen=True)
class Param:
    default: float | bool | None  # None: required
    low: float | None = None
    high: float | None = None
    kind: type = float


@dataclass
class TensorPlan:
    """Everything `combine` needs for one tensor, apart from the tensors themselves."""

    coefficients: list[float | torch.Tensor]
    keeps: list[Keep]
    ref_coefficient: float | torch.Tensor = 1.0
    consensus: bool = False
    normalize: bool = False
    weights: list[float] | None = None
    lam: float = 1.0
    l1_rescale: bool = False  # magnitude sparsifiers: survivors rescaled to the delta's L1 norm


@dataclass(frozen=True)
class MergeMethod:
    """What a method takes, and how its parameters become a TensorPlan. Subclasses fill `plan`."""

    name: str
    source_params: dict[str, Param]  # per source (and per group / family)
    shared_params: dict[str, Param]  # per tensor (per group / family), not per source
    needs_base: bool = True
    min_sources: int = 1
    max_sources: int | None = None
    reference: str = ""
    sparsifier: Sparsifier | None = field(default=None, compare=False)
    # A direct method is a function of whole source tensors (SLERP of many, Karcher means, ...),
    # outside the reference + sum(c * keep * delta) shape: it implements `merge_direct` instead of `plan`.
    direct: bool = False

    @property
    def params(self) -> dict[str, Param]:
        return {**self.shared_params, **self.source_params}

    @property
    def element_key(self) -> str | None:
        """The per-element key this method's keep masks read ("rank", "field"), if any."""
        return self.sparsifier.key if self.sparsifier else None

    def tensor_stats(self, facts: TensorFacts, shared: dict, shape: torch.Size, n_sources: int) -> dict:
        """Per-tensor facts `plan` needs, asked from `facts` (cached by the bank)."""
        return {}

    def plan(self, n: int, shared: dict, per_source: list[dict], stats: dict) -> TensorPlan:
        raise NotImplementedError

    def ignored_parameters(self, n_sources: int, shared: dict) -> set[str]:
        """Parameters that cannot change the result in this setting (a search over them is wasted)."""
        return set()

    def merge_direct(self, reference: torch.Tensor | None, sources: list[torch.Tensor], shared: dict,
                     per_source: list[dict], seeds: list[int]) -> torch.Tensor:
        """Direct methods only: the merged tensor from whole tensors in float32 (float64 stays float64).

        `reference` is the base (None when the recipe has none); `seeds[i]` is a stable seed for the
        source at position i and this tensor (for random methods), from `tensor_seed`.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class Linear(MergeMethod):
    def plan(self, n, shared, per_source, stats):
        weights = [float(p["weight"]) for p in per_source]
        total = sum(weights)
        if shared["normalize"] and abs(total) >= 1e-8:
            # sum w_i (ref + d_i) / W = ref + sum (w_i/W) d_i
            return TensorPlan([w / total for w in weights], [KEEP_ALL] * len(weights))
        return TensorPlan(weights, [KEEP_ALL] * len(weights), ref_coefficient=total)

    def ignored_parameters(self, n_sources, shared):
        return {"weight"} if n_sources == 1 and shared.get("normalize", True) else set()


@dataclass(frozen=True)
class TaskVectors(MergeMethod):
    """Generalized task arithmetic: weighted task vectors, optionally sparsified and sign-elected."""

    consensus: bool = False

    def plan(self, n, shared, per_source, stats):
        weights = [float(p["weight"]) for p in per_source]
        sparse = self.sparsifier
        keeps = [sparse.keep(n, p, shared) if sparse else KEEP_ALL for p in per_source]
        return TensorPlan(
            weights,
            keeps,
            consensus=self.consensus,
            normalize=bool(shared["normalize"]),
            weights=weights,
            lam=float(shared["lambda"]),
            l1_rescale=bool(shared.get("rescale")) and isinstance(sparse, MagnitudeSparsifier),
        )

    def ignored_parameters(self, n_sources, shared):
        # One source, normalized: w * d / w = d whatever w is.
        return {"weight"} if n_sources == 1 and shared.get("normalize", False) else set()


@dataclass(frozen=True)
class Slerp(MergeMethod):
    def tensor_stats(self, facts, shared, shape, n_sources):
        return {"slerp": facts.norms_and_dot(0)}

    def plan(self, n, shared, per_source, stats):
        ca, cb = slerp_coefficients(*stats["slerp"], float(shared["t"]))
        # ca*ref + cb*(ref + d) = (ca + cb)*ref + cb*d
        return TensorPlan([cb], [KEEP_ALL], ref_coefficient=ca + cb)


@dataclass(frozen=True)
class ModelStock(MergeMethod):
    def tensor_stats(self, facts, shared, shape, n_sources):
        rowwise = bool(shared.get("filter_wise")) and len(shape) > 1
        ratio = model_stock_ratio(facts.cosines(rowwise), n_sources)
        # a float, or (filter-wise) a column that broadcasts over each row
        return {"ratio": float(ratio) if ratio.numel() == 1 else ratio.reshape(-1, *([1] * (len(shape) - 1)))}

    def plan(self, n, shared, per_source, stats):
        k = len(per_source)
        ratio = stats["ratio"]
        # base + t * mean(d_i)
        return TensorPlan([ratio / k] * k, [KEEP_ALL] * k)


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def _task_vectors(name: str, reference: str, sparsifier: Sparsifier | None = None, consensus: bool = False,
                  normalize: bool = False, rescale: bool | None = None, extra: dict | None = None) -> TaskVectors:
    """A task-vector method; `density` and `rescale` exist only where a sparsifier uses them."""
    source = {"weight": Param(None, -10.0, 10.0)}
    shared = {"normalize": Param(normalize, kind=bool), "lambda": Param(1.0, -10.0, 10.0)}
    if sparsifier is not None:
        source["density"] = Param(1.0, 0.0, 1.0)
        shared["rescale"] = Param(bool(rescale), kind=bool)
    source.update(extra or {})
    return TaskVectors(name, source, shared, reference=reference, sparsifier=sparsifier, consensus=consensus)


for _m in (
    Linear("linear", {"weight": Param(None, -10.0, 10.0)}, {"normalize": Param(True, kind=bool)}, needs_base=False,
           reference="https://arxiv.org/abs/2203.05482"),
    _task_vectors("task_arithmetic", "https://arxiv.org/abs/2212.04089"),
    _task_vectors("ties", "https://arxiv.org/abs/2306.01708", MagnitudeSparsifier(), consensus=True, normalize=True,
                  rescale=False),
    _task_vectors("dare_ties", "https://arxiv.org/abs/2311.03099", RandomSparsifier(), consensus=True, rescale=True),
    _task_vectors("dare_linear", "https://arxiv.org/abs/2311.03099", RandomSparsifier(), rescale=True),
    _task_vectors("breadcrumbs", "https://arxiv.org/abs/2312.06795", OutlierSparsifier(), rescale=False,
                  extra={"gamma": Param(0.01, 0.0, 1.0)}),
    _task_vectors("breadcrumbs_ties", "https://arxiv.org/abs/2312.06795", OutlierSparsifier(), consensus=True,
                  rescale=False, extra={"gamma": Param(0.01, 0.0, 1.0)}),
    Slerp("slerp", {}, {"t": Param(None, 0.0, 1.0)}, min_sources=1, max_sources=1,
          reference="https://en.wikipedia.org/wiki/Slerp"),
    ModelStock("model_stock", {}, {"filter_wise": Param(False, kind=bool)}, min_sources=2,
               reference="https://arxiv.org/abs/2403.19522"),
):
    register(_m)


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except (KeyError, TypeError):  # TypeError: a list or mapping where a name belongs
        from evomerge.errors import close_match

        raise EvomergeError(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}"
                            f"{close_match(name, METHODS)}") from None


def tensor_plan(method: MergeMethod, n: int, shared: dict, per_source: list[dict], facts: TensorFacts,
                shape: torch.Size) -> TensorPlan:
    """The method's plan for one tensor of n elements, with the per-tensor facts it asks for."""
    return method.plan(n, shared, per_source, method.tensor_stats(facts, shared, shape, len(per_source)))


def rescaled_keeps(plan: TensorPlan, deltas: list[torch.Tensor | None], keys: list[torch.Tensor | None]) -> list[Keep]:
    """The plan's keeps, with the L1-restoring factor filled in where the method asks for it."""
    if not plan.l1_rescale:
        return plan.keeps
    return [k.with_scale(l1_rescale_factor(d, k, key)) if d is not None else k
            for k, d, key in zip(plan.keeps, deltas, keys)]


def l1_rescale_factor(delta: torch.Tensor, keep: Keep, key: torch.Tensor | None) -> float:
    """Factor that restores a sparsified delta's L1 norm (magnitude sparsifiers with rescale)."""
    if keep.kind in ("all", "none"):
        return 1.0
    before = float(delta.abs().sum())
    after = float((delta * keep.mask(key)).abs().sum())
    if before < 1e-7 or after < 1e-7:
        return 1.0
    return before / after


class _DirectFacts:
    """TensorFacts computed on the spot from whole tensors (the reference path)."""

    def __init__(self, ref: torch.Tensor, sources: list[torch.Tensor], deltas: list[torch.Tensor]):
        self.ref, self.sources, self.deltas = ref, sources, deltas

    def norms_and_dot(self, position: int) -> tuple[float, float, float]:
        other = self.sources[position].to(self.ref.dtype)
        return float(self.ref.norm()), float(other.norm()), float((self.ref * other).sum())

    def cosines(self, rowwise: bool) -> torch.Tensor:
        return pairwise_cosines(self.deltas, rowwise)


def element_key(kind: str, delta: torch.Tensor, seed: int, position: int, tensor_name: str) -> torch.Tensor:
    """The per-element key a sparsifier reads: magnitude rank or DARE's drop field."""
    if kind == "rank":
        return magnitude_rank(delta)
    return drop_field(delta.shape, tensor_seed(seed, position, tensor_name))


def merge_tensor(
    method: MergeMethod | str,
    reference: torch.Tensor,
    sources: list[torch.Tensor],
    shared: dict,
    per_source: list[dict],
    *,
    seed: int = 0,
    tensor_name: str = "",
    has_base: bool = True,
) -> torch.Tensor:
    """Merge one tensor from scratch (reference implementation; the bank reuses its cached keys).

    `has_base`: False when `reference` is not a base model but the first source standing in for
    one (base-free recipes); direct methods then see no reference."""
    method = get_method(method) if isinstance(method, str) else method
    work = torch.float64 if reference.dtype == torch.float64 else torch.float32
    ref = reference.to(work)
    if method.direct:
        seeds = [tensor_seed(seed, pos, tensor_name) for pos in range(len(sources))]
        return method.merge_direct(ref if has_base else None, [s.to(work) for s in sources], shared, per_source, seeds).to(reference.dtype)
    deltas = [s.to(work) - ref for s in sources]
    plan = tensor_plan(method, ref.numel(), shared, per_source, _DirectFacts(ref, sources, deltas), ref.shape)
    keys: list[torch.Tensor | None] = [None] * len(deltas)
    if method.element_key:
        keys = [element_key(method.element_key, d, seed, pos, tensor_name) for pos, d in enumerate(deltas)]
    return combine(
        ref, deltas, plan.coefficients, rescaled_keeps(plan, deltas, keys), keys,
        ref_coefficient=plan.ref_coefficient, consensus=plan.consensus,
        normalize=plan.normalize, weights=plan.weights, lam=plan.lam,
    ).to(reference.dtype)
