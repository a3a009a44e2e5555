"""Merge methods: small objects over pure tensor functions, behind a registry.

Every method here is written in one shape,

    merged = a * reference + sum_i c_i * keep_i * delta_i      (optionally with TIES sign election)

where delta_i = source_i - reference. What differs between methods is how the per-source
coefficients c_i, the keep masks and the reference coefficient a are derived, and each method
object carries exactly that: `plan()` turns resolved parameters into coefficients and keeps, a
`Sparsifier` turns a density into a threshold on a per-element key, and `tensor_stats()` asks
for the per-tensor facts it needs (norms, cosines). A new method is one class and one
`register()` call; nothing else in the engine names methods.

Splitting the work that way is what makes the in-memory materializer fast: the per-tensor facts
(magnitude sketches, norms and dot products) are computed once per source, DARE's drop is a hash
computed in the pass itself, and each candidate needs a few scalar look-ups plus one fused pass
over memory (`combine`, or the compiled kernel in kernels.py).

`merge_tensor` runs a whole method on whole tensors from scratch, exactly; the `SourceBank` runs
the same objects on cached facts and chunks. Both give the same bits, except that the bank
thresholds large tensors' magnitudes from a sketch (see `SketchOrder`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Protocol

import torch

from evomerge.errors import EvomergeError

# ---------------------------------------------------------------------------------------------
# Keep rules. A keep mask is a range over a per-element key, so any density costs one comparison
# per element and the bank stores nothing element-sized beside the deltas:
#  - magnitude sparsifiers (TIES, breadcrumbs) order elements by (|delta|, index), the index
#    breaking ties the way a stable sort would; a density is a range of ranks, turned into bounds
#    on that pair by an order statistic: exact by selection (no sort), or from a small sketch;
#  - DARE keeps element j when a counter-based hash of (seed, source position, tensor, j) falls
#    below a level: computed where it is used, identical on every device, nested across densities.

FIELD_LEVELS = 1 << 16  # DARE's drop field resolution: densities are honoured to 1/65536
SKETCH_SIZE = 1 << 16  # magnitudes sampled per large tensor and source for approximate thresholds
_M32 = 0xFFFFFFFF
# Odd multipliers below 2^31: x (< 2^32) * c stays below 2^63, so plain int64 arithmetic never
# overflows and eager CPU, CUDA and compiled kernels all agree bit for bit.
_MUL = (0x7FEB352D, 0x2C1B3C6D)


def tensor_seed(seed: int, position: int, tensor: str) -> int:
    """A stable 63-bit seed per (recipe seed, source position in the recipe, tensor name).

    Not the source's path: a recipe must rebuild bit-identically after its models are moved.
    """
    h = hashlib.blake2b(f"{seed}\0{position}\0{tensor}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


def field_words(seed: int) -> tuple[int, int]:
    """The two 32-bit words of a tensor seed that key DARE's hash."""
    return seed & _M32, (seed >> 32) & _M32


def _mix(x: torch.Tensor) -> torch.Tensor:
    x = x ^ (x >> 16)
    x = (x * _MUL[0]) & _M32
    x = x ^ (x >> 15)
    x = (x * _MUL[1]) & _M32
    return x ^ (x >> 16)


def drop_field(index: torch.Tensor, words: tuple[int, int] | torch.Tensor) -> torch.Tensor:
    """DARE's per-element value in [0, 2^16) for flat element indices `index` (int64, < 2^32).

    Element j survives density d when field[j] < round(d * 2^16): one field serves every density.
    """
    x = _mix((index & _M32) ^ words[0])
    return _mix(x ^ words[1]) >> 16


def element_index(start: int, like: torch.Tensor) -> torch.Tensor:
    """Flat indices of a chunk of a tensor whose first element has flat index `start`."""
    return torch.arange(start, start + like.numel(), device=like.device, dtype=torch.int64).reshape(like.shape)


@dataclass(frozen=True)
class Keep:
    """Which elements of a delta survive, and the factor applied to survivors.

    kind "all" keeps everything, "none" nothing, "ranks" the elements whose magnitude rank lies in
    [lo, hi) (resolved per tensor by an order statistic into a "range"), "range" the elements whose
    key lies in [lo, hi): for magnitudes the key is the pair (|delta|, index), compared
    lexicographically against (lo, lo_index) and (hi, hi_index); for DARE it is the drop field.
    """

    kind: str
    lo: float = 0
    hi: float = 0
    scale: float = 1.0
    lo_index: int = 0
    hi_index: int = 0

    @property
    def needs_index(self) -> bool:
        return bool(self.lo_index or self.hi_index)

    def mask(self, key: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Keys are never negative, so a lower bound of 0 (with no index part) keeps everything."""
        masks = []
        if self.lo > 0 or self.lo_index:
            masks.append(key >= self.lo if not self.lo_index else (key > self.lo) | ((key == self.lo) & (index >= self.lo_index)))
        if self.hi != math.inf:
            masks.append(key < self.hi if not self.hi_index else (key < self.hi) | ((key == self.hi) & (index < self.hi_index)))
        if not masks:
            return torch.ones_like(key, dtype=torch.bool)
        return masks[0] & masks[1] if len(masks) == 2 else masks[0]

    def with_scale(self, scale: float) -> "Keep":
        return Keep(self.kind, self.lo, self.hi, scale, self.lo_index, self.hi_index)


KEEP_ALL = Keep("all")
KEEP_NONE = Keep("none")


def sorted_sample(magnitude: torch.Tensor, seed: int) -> torch.Tensor:
    """SKETCH_SIZE elements of a flat tensor drawn with replacement (CPU generator: the same picks on
    every device), sorted ascending."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    picks = torch.randint(0, magnitude.numel(), (SKETCH_SIZE,), generator=gen).to(magnitude.device)
    return magnitude[picks].sort().values


class ExactOrder:
    """Exact order statistics of (|delta|, index) by selection (kthvalue): no sort, nothing cached."""

    def __init__(self, delta: torch.Tensor):
        self.magnitude = delta.reshape(-1).abs().float()
        self._sample: torch.Tensor | None = None

    def at(self, rank: int) -> tuple[float, int]:
        """(value, index) of the element of this rank in ascending (|delta|, index) order."""
        m = self.magnitude
        if rank >= m.numel():
            return math.inf, 0
        if rank <= 0:
            return 0.0, 0
        value, below = self._select(rank)
        if rank == below:  # the first of its equals: the value alone is the bound
            return float(value), 0
        return float(value), int(torch.nonzero(m == value)[rank - below, 0])

    def _select(self, rank: int) -> tuple[torch.Tensor, int]:
        """The value of this rank and the count of smaller elements. A large tensor is bracketed by a
        sample first (the rank's value lies between two sample quantiles with overwhelming
        probability), so the selection runs on the few elements in between: two passes over the
        tensor instead of a full kthvalue. Exact either way; a bracket that misses falls back."""
        m = self.magnitude
        n = m.numel()
        if n > 4 * SKETCH_SIZE:
            if self._sample is None:
                self._sample = sorted_sample(m, n)
            q = rank / n
            margin = 8 * math.sqrt(q * (1 - q) / SKETCH_SIZE) + 8 / SKETCH_SIZE
            lo_i, hi_i = math.floor((q - margin) * SKETCH_SIZE), math.ceil((q + margin) * SKETCH_SIZE)
            lo = self._sample[lo_i] if lo_i >= 0 else None
            hi = self._sample[hi_i] if hi_i < SKETCH_SIZE else None
            below_lo = int((m < lo).sum()) if lo is not None else 0
            inside = m if lo is None and hi is None else m[((m >= lo) if lo is not None else True)
                                                           & ((m <= hi) if hi is not None else True)]
            r = rank - below_lo
            if 0 <= r < inside.numel():
                value = inside.kthvalue(r + 1).values
                return value, below_lo + int((inside < value).sum())
        value = m.kthvalue(rank + 1).values
        return value, int((m < value).sum())


class SketchOrder:
    """Approximate order statistics from SKETCH_SIZE magnitudes sampled once (256 KiB per tensor).

    The kept fraction of a density d is off by about sqrt(d (1 - d) / SKETCH_SIZE) (0.2 % at 0.5):
    a search needs thresholds that move with the density, not the exact k-th element.
    """

    def __init__(self, delta: torch.Tensor, seed: int):
        # Kept in host memory: a threshold look-up is then a Python read, never a device sync.
        self.sample = sorted_sample(delta.reshape(-1).abs().float(), seed).cpu()
        self.n = delta.numel()

    def at(self, rank: int) -> tuple[float, int]:
        if rank >= self.n:
            return math.inf, 0
        if rank <= 0:
            return 0.0, 0
        return float(self.sample[min(SKETCH_SIZE - 1, round(rank / self.n * SKETCH_SIZE))]), 0

    @property
    def nbytes(self) -> int:
        return self.sample.numel() * self.sample.element_size()


def resolve_keep(keep: Keep, order: ExactOrder | SketchOrder | None) -> Keep:
    """A rank range turned into bounds on (|delta|, index); other keeps pass through."""
    if keep.kind != "ranks":
        return keep
    (lo, lo_index), (hi, hi_index) = order.at(int(keep.lo)), order.at(int(keep.hi))
    return Keep("range", lo, hi, keep.scale, lo_index, hi_index)


def keep_mask(key_kind: str, keep: Keep, delta: torch.Tensor, start: int = 0, words: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """The keep mask of one chunk of a delta whose first element has flat index `start`."""
    index = element_index(start, delta) if key_kind == "field" or keep.needs_index else None
    key = drop_field(index, words) if key_kind == "field" else delta.abs().float()
    return keep.mask(key, index)


class Sparsifier:
    """Turns a source's density into a Keep over one kind of per-element key."""

    key: str  # "magnitude" (ranked by |delta|) or "field" (DARE's hashed field)

    def keep(self, n: int, params: dict, shared: dict) -> Keep:
        raise NotImplementedError


class MagnitudeSparsifier(Sparsifier):
    """TIES: keep the k = max(1, floor(density * n)) largest magnitudes."""

    key = "magnitude"

    def keep(self, n: int, params: dict, shared: dict) -> Keep:
        density = float(params["density"])
        if density >= 1:
            return KEEP_ALL
        if density <= 0 or n == 0:
            return KEEP_NONE
        k = max(1, int(density * n))
        return Keep("ranks", n - k, n)


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
        return Keep("ranks", n_bottom, n_bottom + target)


class RandomSparsifier(Sparsifier):
    """DARE: keep each element with probability `density`; rescale survivors by 1/density."""

    key = "field"

    def keep(self, n: int, params: dict, shared: dict) -> Keep:
        density = float(params["density"])
        if density >= 1:
            return KEEP_ALL
        level = round(density * FIELD_LEVELS)
        if level <= 0:
            return KEEP_NONE
        scale = FIELD_LEVELS / level if shared["rescale"] else 1.0
        return Keep("range", 0, level, scale)


# ---------------------------------------------------------------------------------------------
# The one fused kernel every method ends in.


def combine(
    reference: torch.Tensor,
    deltas: list[torch.Tensor | None],
    coefficients: list[float | torch.Tensor],
    keeps: list[Keep],
    masks: list[torch.Tensor | None],
    *,
    ref_coefficient: float | torch.Tensor = 1.0,
    consensus: bool = False,
    normalize: bool = False,
    weights: list[float] | None = None,
    lam: float = 1.0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """a*reference + lam * sum_i c_i * keep_i(delta_i) [/ divisor], computed in float32 or float64.

    `masks[i]` is source i's keep mask (see `keep_mask`) where its keep is a range.
    With `consensus` (TIES), each element keeps only the contributions whose sign agrees with the
    sign of their sum; `normalize` then divides by the sum of the agreeing sources' `weights`.
    Without consensus, `normalize` divides by the sum of all weights. A `None` delta (a source that
    is the reference itself) contributes nothing but still counts in that sum.
    """
    work = torch.float64 if reference.dtype == torch.float64 else torch.float32
    if not consensus and all(m is None for m in masks) and all(isinstance(c, float) for c in coefficients) \
            and isinstance(ref_coefficient, float):
        # Task arithmetic, linear, rescaled DARE at density 1: accumulate in place, one pass per delta.
        total = float(sum(weights or coefficients))
        scale = lam / total if normalize and abs(total) >= 1e-8 else lam
        acc = out if out is not None and out.dtype == work else torch.empty(reference.shape, dtype=work,
                                                                            device=reference.device)
        if ref_coefficient == 1.0:
            acc.copy_(reference)
        else:
            torch.mul(reference.to(work), ref_coefficient, out=acc)
        for delta, coef, keep in zip(deltas, coefficients, keeps):
            if keep.kind != "none" and delta is not None and coef * keep.scale != 0.0:
                acc.add_(delta, alpha=coef * keep.scale * scale)
        if out is not None and acc is not out:
            out.copy_(acc)
            return out
        return acc
    terms = []
    used_weights = []
    for delta, coef, keep, mask, w in zip(deltas, coefficients, keeps, masks, weights or coefficients):
        if keep.kind == "none" or delta is None:
            continue
        term = delta.to(work) * coef if not isinstance(coef, float) or coef != 1.0 else delta.to(work)
        if keep.kind != "all":
            term = term * mask
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
        """The per-element key this method's keep masks read ("magnitude", "field"), if any."""
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


def resolved_keeps(plan: TensorPlan, deltas: list[torch.Tensor | None],
                   orders: list["ExactOrder | SketchOrder | None"]) -> list[Keep]:
    """The plan's keeps for one tensor: rank ranges resolved by each delta's order statistic, and
    the L1-restoring factor filled in where the method asks for it."""
    keeps = [resolve_keep(k, o) for k, o in zip(plan.keeps, orders)]
    if not plan.l1_rescale:
        return keeps
    return [k.with_scale(l1_rescale_factor(d, k)) if d is not None else k for k, d in zip(keeps, deltas)]


def l1_rescale_factor(delta: torch.Tensor, keep: Keep) -> float:
    """Factor that restores a sparsified delta's L1 norm (magnitude sparsifiers with rescale)."""
    if keep.kind in ("all", "none"):
        return 1.0
    magnitude = delta.abs().float()
    before = float(magnitude.sum())
    after = float((magnitude * keep_mask("magnitude", keep, delta)).sum())
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
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Merge one tensor from scratch, exactly (the reference; the bank caches facts and may use sketches).

    `has_base`: False when `reference` is not a base model but the first source standing in for
    one (base-free recipes); direct methods then see no reference. The arithmetic runs in float32
    (float64 for float64 inputs) and rounds once, to `out_dtype` (default: the reference's)."""
    out_dtype = out_dtype or reference.dtype
    method = get_method(method) if isinstance(method, str) else method
    work = torch.float64 if reference.dtype == torch.float64 else torch.float32
    ref = reference.to(work)
    if method.direct:
        seeds = [tensor_seed(seed, pos, tensor_name) for pos in range(len(sources))]
        return method.merge_direct(ref if has_base else None, [s.to(work) for s in sources], shared, per_source,
                                   seeds).to(out_dtype)
    deltas = [s.to(work) - ref for s in sources]
    plan = tensor_plan(method, ref.numel(), shared, per_source, _DirectFacts(ref, sources, deltas), ref.shape)
    keeps = resolved_keeps(plan, deltas, [ExactOrder(d) if k.kind == "ranks" else None for k, d in zip(plan.keeps, deltas)])
    words = [field_words(tensor_seed(seed, pos, tensor_name)) for pos in range(len(deltas))]
    out = torch.empty(ref.shape, dtype=out_dtype, device=ref.device)
    # Chunks of whole rows, so the many element-wise passes of a merge stay in cache (same numbers).
    for rows, start in row_spans(ref.shape, 1 << 18):
        parts = [d[rows] for d in deltas]
        masks = [keep_mask(method.element_key, k, d, start, w) if k.kind == "range" else None
                 for k, d, w in zip(keeps, parts, words)]
        combine(
            ref[rows], parts, [c[rows] if isinstance(c, torch.Tensor) else c for c in plan.coefficients], keeps, masks,
            ref_coefficient=plan.ref_coefficient, consensus=plan.consensus,
            normalize=plan.normalize, weights=plan.weights, lam=plan.lam, out=out[rows],
        )
    return out


def row_spans(shape: torch.Size | tuple, chunk: int) -> list[tuple[slice, int]]:
    """(row range, flat index of its first element) covering a tensor in pieces of about `chunk`
    elements; rows stay whole, so per-row coefficients line up with their rows."""
    if len(shape) == 0:
        return [(slice(None), 0)]
    rows = shape[0]
    row_numel = math.prod(shape[1:])
    step = max(1, chunk // max(1, row_numel))
    return [(slice(s, min(rows, s + step)), s * row_numel) for s in range(0, rows, step)]
from evomerge import methods_recent  # noqa: E402,F401  (registers the newer methods)
