"""Merge methods: small pure functions on tensors behind a registry.

Every method here is written in one shape,

    merged = a * reference + sum_i c_i * keep_i * delta_i      (optionally with TIES sign election)

where delta_i = source_i - reference. What differs between methods is how the per-source
coefficients c_i, the keep masks and the reference coefficient a are derived. Splitting the
work that way is what makes the in-memory materializer fast: the expensive per-tensor facts
(magnitude ranks, DARE random fields, norms and dot products) are computed once per source
(`*_aid` functions below), and each candidate only needs a few scalar look-ups plus one fused
pass over memory (`combine`).

`merge_tensor` runs a whole method on whole tensors from scratch; the `SourceBank` runs the
same functions on cached aids and chunks. Both give the same bits.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
import torch

from evomerge.errors import EvomergeError

# ---------------------------------------------------------------------------------------------
# Per-source aids: computed once per tensor and source, reused by every candidate.

FIELD_LEVELS = 1 << 16  # DARE's drop field resolution: densities are honoured to 1/65536


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
    return torch.randint(-(FIELD_LEVELS // 2), FIELD_LEVELS // 2, tuple(shape), generator=gen, dtype=torch.int32)


# ---------------------------------------------------------------------------------------------
# Keep masks: scalar thresholds from a density, then one comparison per element.


@dataclass(frozen=True)
class Keep:
    """Which elements of a delta survive sparsification, and the factor applied to survivors."""

    kind: str  # "all" | "none" | "rank" | "field"
    lo: int = 0  # rank kind: keep lo <= rank < hi ; field kind: keep field < hi
    hi: int = 0
    scale: float = 1.0

    def mask(self, aid: torch.Tensor) -> torch.Tensor:
        if self.kind == "rank":
            if self.lo <= 0:
                return aid < self.hi
            return (aid >= self.lo) & (aid < self.hi)
        return aid < self.hi


def keep_magnitude(n: int, density: float) -> Keep:
    """TIES: keep the k = max(1, floor(density * n)) largest magnitudes."""
    if density >= 1:
        return Keep("all")
    if density <= 0 or n == 0:
        return Keep("none")
    k = max(1, int(density * n))
    return Keep("rank", n - k, n)


def keep_outliers(n: int, density: float, gamma: float) -> Keep:
    """Breadcrumbs: drop the top `gamma` fraction as outliers, then the smallest, keeping `density`."""
    if density >= 1:
        return Keep("all")
    target = int(density * n)
    n_top = int(gamma * n)
    n_bottom = max(0, n - target - n_top)
    if target <= 0:
        return Keep("none")
    return Keep("rank", n_bottom, n_bottom + target)


def keep_random(density: float, rescale: bool) -> Keep:
    """DARE: keep each element with probability `density`; rescale survivors by 1/density."""
    if density >= 1:
        return Keep("all")
    level = round(density * FIELD_LEVELS)
    if level <= 0:
        return Keep("none")
    scale = FIELD_LEVELS / level if rescale else 1.0
    return Keep("field", 0, level - FIELD_LEVELS // 2, scale)


# ---------------------------------------------------------------------------------------------
# The one fused kernel every method ends in.


def combine(
    reference: torch.Tensor,
    deltas: list[torch.Tensor | None],
    coefficients: list[float | torch.Tensor],
    keeps: list[Keep],
    aids: list[torch.Tensor | None],
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
    for delta, coef, keep, aid, w in zip(deltas, coefficients, keeps, aids, weights or coefficients):
        if keep.kind == "none" or delta is None:
            continue
        term = delta.to(work) * coef if not isinstance(coef, float) or coef != 1.0 else delta.to(work)
        if keep.kind != "all":
            term = term * keep.mask(aid)
        if keep.scale != 1.0:
            term = term * keep.scale
        terms.append(term)
        used_weights.append(w)
    result = reference.to(work) * ref_coefficient if not (isinstance(ref_coefficient, float) and ref_coefficient == 1.0) else reference.to(work)
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
# Per-tensor statistics that some methods need (computed once per tensor by the bank).


def slerp_coefficients(
    ref_norm: torch.Tensor, other_norm: torch.Tensor, dot_raw: torch.Tensor, t: float
) -> tuple[float, float]:
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
# The registry: what each method takes and how its parameters become coefficients and keeps.


@dataclass(frozen=True)
class Param:
    default: float | bool | None  # None: required
    low: float | None = None
    high: float | None = None
    kind: type = float


@dataclass(frozen=True)
class MergeMethod:
    name: str
    source_params: dict[str, Param]  # per source (and per group / family)
    shared_params: dict[str, Param]  # per tensor (per group / family), not per source
    needs_base: bool = True
    sparsify: str | None = None  # None | "magnitude" | "random" | "outliers"
    consensus: bool = False
    min_sources: int = 1
    max_sources: int | None = None
    reference: str = ""
    aids: tuple[str, ...] = field(default=())  # "rank", "field", "slerp", "cosine", "cosine_rows"


def _gta(name, sparsify, consensus, normalize, rescale, ref, extra=None):
    params = {"weight": Param(None, -10.0, 10.0), "density": Param(1.0, 0.0, 1.0)}
    params.update(extra or {})
    aid = {"magnitude": ("rank",), "outliers": ("rank",), "random": ("field",), None: ()}[sparsify]
    return MergeMethod(
        name,
        params,
        {"normalize": Param(normalize, kind=bool), "rescale": Param(rescale, kind=bool), "lambda": Param(1.0, -10.0, 10.0)},
        sparsify=sparsify,
        consensus=consensus,
        reference=ref,
        aids=aid,
    )


METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


for _m in (
    MergeMethod(
        "linear",
        {"weight": Param(None, -10.0, 10.0)},
        {"normalize": Param(True, kind=bool)},
        needs_base=False,
        reference="https://arxiv.org/abs/2203.05482",
    ),
    _gta("task_arithmetic", None, False, False, False, "https://arxiv.org/abs/2212.04089"),
    _gta("ties", "magnitude", True, True, False, "https://arxiv.org/abs/2306.01708"),
    _gta("dare_ties", "random", True, False, True, "https://arxiv.org/abs/2311.03099"),
    _gta("dare_linear", "random", False, False, True, "https://arxiv.org/abs/2311.03099"),
    _gta("breadcrumbs", "outliers", False, False, False, "https://arxiv.org/abs/2312.06795",
         {"gamma": Param(0.01, 0.0, 1.0)}),
    _gta("breadcrumbs_ties", "outliers", True, False, False, "https://arxiv.org/abs/2312.06795",
         {"gamma": Param(0.01, 0.0, 1.0)}),
    MergeMethod(
        "slerp", {}, {"t": Param(None, 0.0, 1.0)}, min_sources=1, max_sources=1,
        reference="https://en.wikipedia.org/wiki/Slerp", aids=("slerp",),
    ),
    MergeMethod(
        "model_stock", {}, {"filter_wise": Param(False, kind=bool)}, min_sources=2,
        reference="https://arxiv.org/abs/2403.19522", aids=("cosine",),
    ),
):
    register(_m)


def get_method(name: str) -> MergeMethod:
    try:
        return METHODS[name]
    except KeyError:
        raise EvomergeError(f"unknown merge method {name!r}; choose one of: {', '.join(METHODS)}") from None


# ---------------------------------------------------------------------------------------------
# From resolved parameters to the arguments of `combine`.


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


def plan_tensor(
    method: MergeMethod,
    n: int,
    shared: dict,
    per_source: list[dict],
    stats: dict | None = None,
) -> TensorPlan:
    """Coefficients and keep masks for one tensor of n elements, given its resolved parameters.

    `stats` carries per-tensor statistics: {"slerp": (ref_norm, other_norm, dot)} or
    {"ratio": model-stock ratio (scalar or per-row column)}.
    """
    if method.name == "linear":
        weights = [float(p["weight"]) for p in per_source]
        total = sum(weights)
        if shared["normalize"] and abs(total) >= 1e-8:
            # sum w_i (ref + d_i) / W = ref + sum (w_i/W) d_i
            return TensorPlan([w / total for w in weights], [Keep("all")] * len(weights))
        return TensorPlan(weights, [Keep("all")] * len(weights), ref_coefficient=total)
    if method.name == "slerp":
        ca, cb = slerp_coefficients(*stats["slerp"], float(shared["t"]))
        # ca*ref + cb*(ref + d) = (ca + cb)*ref + cb*d
        return TensorPlan([cb], [Keep("all")], ref_coefficient=ca + cb)
    if method.name == "model_stock":
        ratio = stats["ratio"]
        k = len(per_source)
        # base + t * mean(d_i)
        return TensorPlan([ratio / k] * k, [Keep("all")] * k)
    # generalized task arithmetic family
    weights = [float(p["weight"]) for p in per_source]
    keeps = []
    for p in per_source:
        d = float(p["density"])
        if method.sparsify == "magnitude":
            keeps.append(keep_magnitude(n, d))
        elif method.sparsify == "outliers":
            keeps.append(keep_outliers(n, d, float(p["gamma"])))
        elif method.sparsify == "random":
            keeps.append(keep_random(d, bool(shared["rescale"])))
        else:
            keeps.append(Keep("all"))
    return TensorPlan(
        weights,
        keeps,
        consensus=method.consensus,
        normalize=bool(shared["normalize"]),
        weights=weights,
        lam=float(shared["lambda"]),
        l1_rescale=bool(shared["rescale"]) and method.sparsify in ("magnitude", "outliers"),
    )


def ratio_stat(cos_pairs: torch.Tensor, count: int, shape: torch.Size) -> float | torch.Tensor:
    """Model Stock's ratio as `plan_tensor` wants it: a float, or a column for per-row (filter-wise) cosines."""
    ratio = model_stock_ratio(cos_pairs, count)
    if ratio.numel() == 1:
        return float(ratio)
    return ratio.reshape(-1, *([1] * (len(shape) - 1)))


def rescaled_keeps(plan: TensorPlan, deltas: list[torch.Tensor | None], aids: list[torch.Tensor | None]) -> list[Keep]:
    """The plan's keeps, with the L1-restoring factor filled in where the method asks for it."""
    if not plan.l1_rescale:
        return plan.keeps
    return [
        Keep(k.kind, k.lo, k.hi, l1_rescale_factor(d, k, a)) if d is not None else k
        for k, d, a in zip(plan.keeps, deltas, aids)
    ]


def l1_rescale_factor(delta: torch.Tensor, keep: Keep, aid: torch.Tensor | None) -> float:
    """Factor that restores a sparsified delta's L1 norm (magnitude sparsifiers with rescale)."""
    if keep.kind in ("all", "none"):
        return 1.0
    before = float(delta.abs().sum())
    after = float((delta * keep.mask(aid)).abs().sum())
    if before < 1e-7 or after < 1e-7:
        return 1.0
    return before / after


def merge_tensor(
    method: MergeMethod | str,
    reference: torch.Tensor,
    sources: list[torch.Tensor],
    shared: dict,
    per_source: list[dict],
    *,
    seed: int = 0,
    tensor_name: str = "",
) -> torch.Tensor:
    """Merge one tensor from scratch (reference implementation; the bank reuses its aids)."""
    method = get_method(method) if isinstance(method, str) else method
    work = torch.float64 if reference.dtype == torch.float64 else torch.float32
    ref = reference.to(work)
    deltas = [s.to(work) - ref for s in sources]
    aids: list[torch.Tensor | None] = [None] * len(deltas)
    stats: dict = {}
    if "rank" in method.aids:
        aids = [magnitude_rank(d) for d in deltas]
    if "field" in method.aids:
        aids = [drop_field(d.shape, tensor_seed(seed, pos, tensor_name)) for pos, d in enumerate(deltas)]
    if "slerp" in method.aids:
        stats["slerp"] = (ref.norm(), sources[0].to(work).norm(), (ref * sources[0].to(work)).sum())
    if "cosine" in method.aids:
        rowwise = bool(shared.get("filter_wise")) and ref.dim() > 1
        stats["ratio"] = ratio_stat(pairwise_cosines(deltas, rowwise), len(deltas), ref.shape)
    plan = plan_tensor(method, ref.numel(), shared, per_source, stats)
    return combine(
        ref, deltas, plan.coefficients, rescaled_keeps(plan, deltas, aids), aids,
        ref_coefficient=plan.ref_coefficient, consensus=plan.consensus,
        normalize=plan.normalize, weights=plan.weights, lam=plan.lam,
    ).to(reference.dtype)

