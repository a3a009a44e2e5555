"""SourceBank: load the sources once, then materialize any recipe over them in place, fast.

The bank keeps the reference weights (the base, or the first source for base-free methods) and
one task vector (delta = source - reference) per source, and nothing else element-sized: per
tensor facts a method needs that do not depend on the candidate (a magnitude sketch for TIES and
breadcrumbs thresholds, norms for SLERP, cosines for Model Stock) are small and cached; DARE's
drop is hashed in the pass itself. Materializing a candidate is a few scalar look-ups per tensor
and one pass over memory in cache-sized chunks, written straight into a preallocated target.

Where the deltas live (`storage`): "device" keeps them beside the reference on the compute
device; "host" keeps them in (pinned) host RAM and streams each tensor's deltas to the device
just ahead of its merge, the copy of the next tensor overlapping the merge of this one, so a
bank larger than the device still runs. `quantize=8` stores deltas as int8 with one scale per
row (a quarter of float32, half of bfloat16; lossy: opt in).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Iterator, Mapping

import torch

from evomerge.architecture import TensorRole, classify, count_blocks
from evomerge.checkpoint import Checkpoint
from evomerge.errors import EvomergeError
from evomerge.kernels import compiled_masked_combine, mark_broken
from evomerge.methods import (
    FIELD_LEVELS,
    SKETCH_SIZE,
    ExactOrder,
    MergeMethod,
    SketchOrder,
    combine,
    field_words,
    keep_mask,
    merge_tensor,
    pairwise_cosines,
    resolved_keeps,
    row_spans,
    tensor_plan,
    tensor_seed,
)
from evomerge.recipe import DTYPES, Recipe

# Chunks keep the working set of a tensor's many operands in CPU cache between passes.
EAGER_CHUNK = 1 << 18
FUSED_CHUNK = 1 << 20
AUTO_COMPILE_PARAMS = 20_000_000  # below this, compiling (~30 s once) costs more than it saves


STORAGES = ("device", "host")


@dataclass
class QuantizedDelta:
    """A delta as int8 with one float32 scale per row (absmax / 127): error at most half a step."""

    values: torch.Tensor
    scales: torch.Tensor  # (rows, 1, ...): broadcasts over each row

    @classmethod
    def of(cls, delta: torch.Tensor) -> "QuantizedDelta":
        rows = delta.reshape(delta.shape[0], -1).float()
        scales = (rows.abs().amax(1, keepdim=True) / 127).clamp(min=1e-30)
        values = (rows / scales).round_().clamp_(-127, 127).to(torch.int8).reshape(delta.shape)
        return cls(values, scales.reshape(-1, *([1] * (delta.dim() - 1))))

    def into(self, out: torch.Tensor) -> torch.Tensor:
        values, scales = self.values.to(out.device, non_blocking=True), self.scales.to(out.device, non_blocking=True)
        return torch.mul(values, scales, out=out) if out.dtype == torch.float32 else out.copy_(values * scales)

    def pin_memory(self) -> "QuantizedDelta":
        return QuantizedDelta(self.values.pin_memory(), self.scales.pin_memory())

    @property
    def nbytes(self) -> int:
        return self.values.numel() + self.scales.numel() * 4


Delta = torch.Tensor | QuantizedDelta | None  # None: the source *is* the reference (zero delta)


def _nbytes(t: torch.Tensor | QuantizedDelta | None) -> int:
    if t is None:
        return 0
    return t.nbytes if isinstance(t, QuantizedDelta) else t.numel() * t.element_size()


@dataclass
class BankTensor:
    name: str
    role: TensorRole
    reference: torch.Tensor
    deltas: list[Delta]
    merged: bool = True  # False: outside a component merge, kept from the base bit for bit


def component_source_name(name: str, component: dict[str, str] | None) -> str | None:
    """The source tensor a base tensor reads in a component merge (None: not merged)."""
    if component is None:
        return name
    for target_prefix, source_prefix in component.items():
        if name.startswith(target_prefix):
            return source_prefix + name[len(target_prefix):]
    return None


def merged_roles(names: Iterable[str], model_type: str, component: dict[str, str] | None) -> list[tuple[str, TensorRole]]:
    """(name, role) of the tensors a merge touches: all of them, or those a component map selects."""
    return [(n, classify(n, model_type)) for n in names if component_source_name(n, component) is not None]


def _normalized(name: str) -> str:
    """A checkpoint/module name with wrapper segments removed, so on-disk and in-memory names meet.

    transformers 5 loads some checkpoints under other names than it saves (LLaVA's
    `language_model.model.layers.0...` on disk is `model.language_model.layers.0...` in memory).
    """
    parts = [p for p in name.split(".") if p != "model"]
    if parts[:2] == ["language_model", "lm_head"]:
        parts = parts[1:]
    return ".".join(parts)


def check_compatible(reference: str, ref_shapes: Mapping[str, tuple], sources: Mapping[str, Mapping[str, tuple]],
                     model_type: str, component: dict[str, str] | None = None) -> None:
    """Fail before reading any weights: every source must have the reference's tensors and shapes.

    `sources` maps a label to that source's shapes (from safetensors headers); a label whose
    shapes are the reference's own object is the reference itself and is skipped.
    """
    for src, shapes in sources.items():
        if shapes is ref_shapes:
            continue
        for base_name, shape in ref_shapes.items():
            name = component_source_name(base_name, component)
            if name is None:
                continue
            if name not in shapes:
                raise EvomergeError(
                    f"tensor {name!r} is in {reference} but missing from source {src}; "
                    "all sources must share the base's architecture"
                )
            other = tuple(shapes[name])
            if other == tuple(shape):
                continue
            role = classify(name, model_type)
            if role.family in ("embedding", "head") and other[1:] == tuple(shape)[1:]:
                raise EvomergeError(
                    f"vocabulary size mismatch in {name}: {src} has {other[0]} rows, {reference} has "
                    f"{shape[0]}; resize the source's embeddings to the base tokenizer "
                    "(model.resize_token_embeddings) or merge models that share a tokenizer"
                )
            raise EvomergeError(
                f"shape mismatch in {name}: {src} has {other}, {reference} has {tuple(shape)}; "
                "sources must share the base's architecture and sizes"
            )


@dataclass
class SourceFiles:
    """The checkpoints of a merge, checked against each other from their headers alone."""

    reference: Checkpoint
    sources: list[Checkpoint]
    merged: dict[str, str]  # reference tensor name -> the sources' name for it (merged tensors only)
    num_blocks: int


def open_sources(reference_ref: str, source_refs: Iterable[str], component: dict[str, str] | None,
                 allow_pickle: bool = False) -> SourceFiles:
    """Open the reference and the sources and check they merge: shapes, vocabularies, a component
    that matches something. One line naming the culprit otherwise; no tensor is read."""
    source_refs = list(source_refs)
    ref = Checkpoint(reference_ref, allow_pickle=allow_pickle)
    sources = [Checkpoint(s, allow_pickle=allow_pickle) for s in source_refs]
    names = ref.names()
    merged = {n: m for n in names if (m := component_source_name(n, component)) is not None}
    if not merged:
        raise EvomergeError(f"component {component} matches no tensor of {reference_ref}; "
                            f"its tensors start like {names[0]!r}")
    shapes = ref.shapes()
    check_compatible(reference_ref, shapes, {s: (shapes if ck.path == ref.path else ck.shapes())
                                             for s, ck in zip(source_refs, sources)}, ref.model_type, component)
    return SourceFiles(ref, sources, merged, count_blocks(list(merged), ref.model_type))


class SourceBank:
    """Sources loaded once; `materialize(recipe)` builds candidates from them in memory."""

    def __init__(
        self,
        sources: Iterable[str],
        base: str | None = None,
        *,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        allow_pickle: bool = False,
        progress: bool = False,
        compile: bool | None = None,
        component: dict[str, str] | None = None,
        storage: str = "device",
        quantize: int | None = None,
    ):
        """`compile`: fuse sparsified merges with torch.compile (None: when the model is large).
        `component`: merge only base tensors under these prefixes (see Recipe.component).
        `storage`: "device" or "host" (deltas in host RAM, streamed per tensor); `quantize`: None or 8."""
        self._configure(sources, base, dtype, device, component, storage, quantize)
        files = open_sources(self.base or self.sources[0], self.sources, self.component, allow_pickle)
        ref_ckpt, source_ckpts, names = files.reference, files.sources, files.reference.names()
        self.reference_path = ref_ckpt.path
        self.config = ref_ckpt.config
        self.model_type = ref_ckpt.model_type
        self.num_blocks = files.num_blocks
        it = names
        if progress:
            from tqdm import tqdm

            it = tqdm(names, desc="loading sources", unit="tensor")
        where = self.store_device
        for name in it:
            src_name = files.merged.get(name)
            self._add(name, ref_ckpt.get(name, self.dtype, where),
                      [None if ck.path == self.reference_path else (lambda ck=ck: ck.get(src_name, self.dtype, where))
                       for ck in (source_ckpts if src_name is not None else ())], src_name is not None)
        self._finish(compile)

    @classmethod
    def from_tensors(
        cls,
        reference: Mapping[str, torch.Tensor],
        sources: list[Mapping[str, torch.Tensor]],
        *,
        model_type: str = "llama",
        config: dict | None = None,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
        compile: bool | None = None,
        storage: str = "device",
        quantize: int | None = None,
        base: bool = True,
    ) -> "SourceBank":
        """A bank over tensors already in memory (benchmarks): sources are named source0, source1, ...
        and the reference "base" (with `base=False` the reference is source0 itself)."""
        bank = cls.__new__(cls)
        labels = [f"source{i}" for i in range(len(sources))]
        bank._configure(labels, "base" if base else None, dtype, device, None, storage, quantize)
        bank.reference_path, bank.config, bank.model_type = None, dict(config or {}), model_type
        bank.num_blocks = count_blocks(list(reference), model_type)
        for name, ref in reference.items():
            bank._add(name, ref.to(bank.store_device, bank.dtype),
                      [None if (not base and i == 0) else (lambda s=s: s[name].to(bank.store_device, bank.dtype))
                       for i, s in enumerate(sources)], True)
        bank._finish(compile)
        return bank

    def _configure(self, sources, base, dtype, device, component, storage, quantize) -> None:
        if storage not in STORAGES:
            raise EvomergeError(f"bank storage {storage!r}: choose one of {', '.join(STORAGES)}")
        if quantize not in (None, 8):
            raise EvomergeError(f"bank quantize {quantize!r}: choose none or 8 (int8 deltas with per-row scales)")
        self.component = dict(component) if component else None
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.device = torch.device(device)
        self.storage, self.quantize = storage, quantize
        self.store_device = self.device if storage == "device" else torch.device("cpu")
        self.sources = list(dict.fromkeys(str(s) for s in sources))
        self.base = str(base) if base is not None else None
        self.tensors: dict[str, BankTensor] = {}
        self._facts: dict[tuple, object] = {}  # per-tensor facts: sketches, norms, cosines

    def _add(self, name: str, ref: torch.Tensor, loaders: list, merged: bool) -> None:
        """One tensor: its reference and, per source, the delta as this bank stores it."""
        pin = self.storage == "host" and self.device.type == "cuda"
        deltas: list[Delta] = []
        for load in loaders:
            if load is None:  # the base itself: a zero delta, whatever the mapping
                deltas.append(None)
                continue
            delta: Delta = load().sub_(ref)
            if self.quantize and delta.dim() > 1:
                delta = QuantizedDelta.of(delta)
            deltas.append(delta.pin_memory() if pin else delta)
        self.tensors[name] = BankTensor(name, classify(name, self.model_type), ref.to(self.device), deltas, merged)

    def _finish(self, compile: bool | None) -> None:
        self.num_params = sum(bt.reference.numel() for bt in self.tensors.values())
        self.compile = compile if compile is not None else self.num_params >= AUTO_COMPILE_PARAMS
        streamed = self.storage == "host" or any(isinstance(d, QuantizedDelta) for bt in self.tensors.values()
                                                 for d in bt.deltas)
        self._stager = _Stager(self) if streamed else None

    # -- cached per-tensor facts --------------------------------------------------------------

    def _order(self, bt: BankTensor, i: int, delta: torch.Tensor) -> ExactOrder | SketchOrder:
        """Magnitude order statistics of source i's delta: exact for small tensors, else a sketch."""
        if delta.numel() <= SKETCH_SIZE:
            return ExactOrder(delta)
        key = ("sketch", bt.name, i)
        if key not in self._facts:
            self._facts[key] = SketchOrder(delta, tensor_seed(0, i, bt.name))
        return self._facts[key]

    # -- materialization ----------------------------------------------------------------------

    def source_indices(self, recipe: Recipe) -> list[int]:
        if recipe.base != self.base and recipe.merge_method.needs_base:
            raise EvomergeError(f"recipe base {recipe.base!r} differs from the bank's base {self.base!r}; build a bank for it")
        if (recipe.component or None) != self.component:
            raise EvomergeError(f"recipe component {recipe.component} differs from the bank's {self.component}; build a bank for it")
        out = []
        for s in recipe.sources:
            if s.model not in self.sources:
                raise EvomergeError(f"recipe source {s.model!r} is not loaded in this bank; loaded: {self.sources}")
            out.append(self.sources.index(s.model))
        return out

    def new_target(self, dtype: str | torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """A preallocated set of output tensors to materialize into again and again."""
        dt = DTYPES[dtype] if isinstance(dtype, str) else (dtype or self.dtype)
        return {n: torch.empty_like(bt.reference, dtype=dt) for n, bt in self.tensors.items()}

    def materialize(
        self,
        recipe: Recipe,
        out: Mapping[str, torch.Tensor] | torch.nn.Module | None = None,
    ) -> Mapping[str, torch.Tensor]:
        """Build the recipe's merged tensors into `out` (a name -> tensor map or a model) in place."""
        method = recipe.merge_method
        idx = self.source_indices(recipe)
        target = self._target_map(out, recipe)
        work = [(bt, target[name]) for name, bt in self.tensors.items() if name in target]
        with torch.no_grad():
            for bt, dest, deltas in self._with_deltas(work, idx):
                self._materialize_tensor(recipe, method, idx, bt, dest, deltas)
        return target

    def _with_deltas(self, work: list, idx: list[int]) -> Iterator[tuple[BankTensor, torch.Tensor, list]]:
        """(tensor, destination, the recipe's deltas on the compute device), tensor after tensor."""
        if self._stager is None:
            for bt, dest in work:
                yield bt, dest, [bt.deltas[i] for i in idx] if bt.merged else []
            return
        yield from self._stager.stream(work, idx)

    def _target_map(self, out, recipe: Recipe) -> Mapping[str, torch.Tensor]:
        if out is None:
            return self.new_target(recipe.out_dtype or recipe.dtype)
        if isinstance(out, torch.nn.Module):
            state = out.state_dict(keep_vars=True)
            by_norm = {_normalized(k): k for k in state}
            keys = {n: n if n in state else by_norm.get(_normalized(n)) for n in self.tensors}
            missing = [n for n, k in keys.items() if k is None]
            if missing:
                raise EvomergeError(
                    f"target model has no tensor {missing[0]!r} (and {len(missing) - 1} more); "
                    "build the target from the base's config"
                )
            seen: set[int] = set()
            target = {}
            for n in self.tensors:
                t = state[keys[n]].data
                if t.data_ptr() in seen:  # tied weights: write once
                    continue
                seen.add(t.data_ptr())
                target[n] = t
            return target
        return out

    def _materialize_tensor(self, recipe: Recipe, method: MergeMethod, idx: list[int], bt: BankTensor,
                            dest: torch.Tensor, deltas: list[torch.Tensor | None]) -> None:
        if dest.shape != bt.reference.shape:
            raise EvomergeError(f"target tensor {bt.name} has shape {tuple(dest.shape)}, expected {tuple(bt.reference.shape)}")
        if not bt.merged:
            dest.copy_(bt.reference)
            return
        shared, per_source = recipe.resolve(bt.role, bt.name, self.num_blocks)
        if method.direct:
            self._direct(recipe, method, bt, dest, deltas, shared, per_source)
            return
        plan = tensor_plan(method, bt.reference.numel(), shared, per_source, BankFacts(self, bt, idx, deltas),
                           bt.reference.shape)
        orders = [self._order(bt, i, d) if d is not None and k.kind == "ranks" else None
                  for i, d, k in zip(idx, deltas, plan.keeps)]
        keeps = resolved_keeps(plan, deltas, orders)
        words = [field_words(tensor_seed(recipe.seed, j, bt.name)) for j in range(len(idx))]
        if self._fused(method, bt, plan, keeps, deltas, words, dest):
            return
        self._eager(method, bt, plan, keeps, deltas, words, dest)

    def _direct(self, recipe, method, bt, dest, deltas, shared, per_source) -> None:
        """A direct method sees whole source tensors, rebuilt from the reference and the deltas."""
        ref = bt.reference.to(torch.float64 if bt.reference.dtype == torch.float64 else torch.float32)
        sources = [ref if d is None else ref + d.to(ref.dtype) for d in deltas]
        dest.copy_(merge_tensor(method, ref, sources, shared, per_source, seed=recipe.seed, tensor_name=bt.name,
                                has_base=recipe.base is not None))

    def _spans(self, ref: torch.Tensor, chunk: int) -> list[tuple[slice, int]]:
        """Cache-sized row ranges on a CPU; a device runs each tensor whole."""
        if self.device.type != "cpu":
            return [(slice(None), 0)]
        return row_spans(ref.shape, chunk)

    def _eager(self, method, bt, plan, keeps, deltas, words, dest) -> None:
        kind = method.element_key
        for sl, start in self._spans(bt.reference, EAGER_CHUNK):
            parts = [d[sl] if d is not None else None for d in deltas]
            masks = [keep_mask(kind, k, d, start, w) if d is not None and k.kind == "range" else None
                     for k, d, w in zip(keeps, parts, words)]
            combine(
                bt.reference[sl],
                parts,
                [c[sl] if isinstance(c, torch.Tensor) else c for c in plan.coefficients],
                keeps,
                masks,
                ref_coefficient=plan.ref_coefficient,
                consensus=plan.consensus,
                normalize=plan.normalize,
                weights=plan.weights,
                lam=plan.lam,
                out=dest[sl],
            )

    def _fused(self, method, bt, plan, keeps, deltas, words, dest) -> bool:
        """Run a sparsified merge through the compiled kernel; False when it does not apply."""
        kind = method.element_key or "none"
        if not self.compile or not isinstance(plan.ref_coefficient, float):
            return False
        if any(d is None for d in deltas) or any(isinstance(c, torch.Tensor) for c in plan.coefficients):
            return False
        if any(k.kind == "ranks" or k.needs_index for k in keeps):  # exact ties need the index: eager
            return False
        kernel = compiled_masked_combine()
        if kernel is None:
            return False
        dev = self.device
        everything = {"all": (0.0, math.inf, FIELD_LEVELS), "none": (math.inf, math.inf, 0)}
        bounds = [everything[k.kind] if k.kind in everything else (k.lo, k.hi, int(k.hi) if kind == "field" else 0) for k in keeps]
        weights = plan.weights or [float(c) for c in plan.coefficients]
        total = float(sum(weights))
        args = dict(
            ref_coef=torch.tensor(float(plan.ref_coefficient), device=dev),
            lo=torch.tensor([b[0] for b in bounds], dtype=torch.float32, device=dev),
            hi=torch.tensor([b[1] for b in bounds], dtype=torch.float32, device=dev),
            level=torch.tensor([b[2] for b in bounds], dtype=torch.int64, device=dev),
            words=torch.tensor(words, dtype=torch.int64, device=dev),
            coef=torch.tensor([float(c) * k.scale for c, k in zip(plan.coefficients, keeps)], device=dev),
            weights=torch.tensor(weights, device=dev),
            lam=torch.tensor(float(plan.lam), device=dev),
            weight_sum=torch.tensor(total if abs(total) >= 1e-8 else 1.0, device=dev),
            key_kind=kind,
            consensus=plan.consensus,
            normalize=plan.normalize,
        )
        try:
            for sl, start in self._spans(bt.reference, FUSED_CHUNK):
                kernel(bt.reference[sl], [d[sl] for d in deltas], out=dest[sl],
                       start=torch.tensor(start, dtype=torch.int64, device=dev), **args)
        except Exception as exc:  # no compiler / backend here: remember, and use eager from now on
            mark_broken(exc)
            return False
        return True

    def memory_bytes(self) -> int:
        """Bytes the bank holds: reference, deltas, cached facts and staging buffers."""
        total = sum(_nbytes(bt.reference) + sum(_nbytes(d) for d in bt.deltas) for bt in self.tensors.values())
        total += sum(_nbytes(v) if isinstance(v, torch.Tensor) else getattr(v, "nbytes", 0) for v in self._facts.values())
        return total + (self._stager.nbytes if self._stager else 0)

    def device_bytes(self) -> int:
        """The part of `memory_bytes` on the compute device (all of it unless storage is host)."""
        if self.storage == "device":
            return self.memory_bytes()
        refs = sum(_nbytes(bt.reference) for bt in self.tensors.values())
        return refs + (self._stager.nbytes if self._stager else 0)


class _Stager:
    """Brings each tensor's stored deltas to the compute device as plain tensors, into two reused
    buffer sets (this tensor's and the next one's). On CUDA the next tensor's copy (and int8
    dequantization) runs on a side stream while this one merges; elsewhere it is done in turn."""

    def __init__(self, bank: SourceBank):
        biggest = max(bt.reference.numel() for bt in bank.tensors.values())
        self.slots = [[torch.empty(biggest, dtype=bank.dtype, device=bank.device) for _ in bank.sources] for _ in range(2)]
        self.side = torch.cuda.Stream(bank.device) if bank.device.type == "cuda" else None
        self.released: list = [None, None]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(b) for slot in self.slots for b in slot)

    def _stage(self, slot: int, bt: BankTensor, idx: list[int]) -> list[torch.Tensor | None]:
        out: list[torch.Tensor | None] = []
        if not bt.merged:  # outside a component: copied from the reference, no deltas stored
            return out
        for j, i in enumerate(idx):
            d = bt.deltas[i]
            if d is None:
                out.append(None)
                continue
            buf = self.slots[slot][j][: bt.reference.numel()].view(bt.reference.shape)
            out.append(d.into(buf) if isinstance(d, QuantizedDelta) else buf.copy_(d, non_blocking=True))
        return out

    def _issue(self, k: int, bt: BankTensor, idx: list[int]):
        slot = k % 2
        if self.side is None:
            return self._stage(slot, bt, idx), None
        if self.released[slot] is not None:  # the merge that last read this slot must be done with it
            self.side.wait_event(self.released[slot])
        with torch.cuda.stream(self.side):
            deltas = self._stage(slot, bt, idx)
            ready = torch.cuda.Event()
            ready.record(self.side)
        return deltas, ready

    def stream(self, work: list, idx: list[int]) -> Iterator[tuple[BankTensor, torch.Tensor, list]]:
        upcoming = self._issue(0, work[0][0], idx) if work else None
        for k, (bt, dest) in enumerate(work):
            deltas, ready = upcoming
            if ready is not None:
                torch.cuda.current_stream().wait_event(ready)
            if k + 1 < len(work):
                upcoming = self._issue(k + 1, work[k + 1][0], idx)
            yield bt, dest, deltas
            if self.side is not None:
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream())
                self.released[k % 2] = done


class BankFacts:
    """The TensorFacts of one bank tensor for the recipe's sources, cached across candidates."""

    def __init__(self, bank: SourceBank, bt: BankTensor, idx: list[int], deltas: list[torch.Tensor | None]):
        self.bank, self.bt, self.idx, self.deltas = bank, bt, idx, deltas

    def _delta(self, position: int) -> torch.Tensor:
        d = self.deltas[position]
        return torch.zeros_like(self.bt.reference) if d is None else d

    def norms_and_dot(self, position: int) -> tuple[float, float, float]:
        key = ("norms", self.bt.name, self.idx[position])
        if key not in self.bank._facts:
            ref = self.bt.reference
            other = ref + self._delta(position)
            self.bank._facts[key] = (ref.norm().item(), other.norm().item(), (ref * other).sum().item())
        return self.bank._facts[key]

    def cosines(self, rowwise: bool) -> torch.Tensor:
        key = ("cos", self.bt.name, tuple(self.idx), rowwise)
        if key not in self.bank._facts:
            self.bank._facts[key] = pairwise_cosines([self._delta(j) for j in range(len(self.idx))], rowwise)
        return self.bank._facts[key]
