"""SourceBank: load the sources once, then materialize any recipe over them in place, fast.

The bank keeps the reference weights (the base, or the first source for base-free methods) and
one task vector (delta = source - reference) per source, resident on the chosen device. Facts a
method needs about a delta that do not depend on the candidate (magnitude ranks for TIES and
breadcrumbs, DARE's random field for a seed, norms for SLERP, cosines for Model Stock) are
computed on first use and cached. Materializing a candidate is then a few scalar look-ups per
tensor and one pass over memory in cache-sized chunks, written straight into a preallocated
target: no disk I/O and no allocation of a whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from evomerge.architecture import TensorRole, classify, count_blocks
from evomerge.checkpoint import Checkpoint
from evomerge.errors import EvomergeError
from evomerge.kernels import compiled_masked_combine, mark_broken
from evomerge.methods import (
    MergeMethod,
    combine,
    drop_field,
    magnitude_rank,
    pairwise_cosines,
    rescaled_keeps,
    tensor_plan,
    tensor_seed,
)
from evomerge.recipe import DTYPES, Recipe

# Chunks keep the working set of a tensor's many operands in CPU cache between passes.
EAGER_CHUNK = 1 << 18
FUSED_CHUNK = 1 << 20
AUTO_COMPILE_PARAMS = 20_000_000  # below this, compiling (~30 s once) costs more than it saves


@dataclass
class BankTensor:
    name: str
    role: TensorRole
    reference: torch.Tensor
    deltas: list[torch.Tensor | None]  # None: the source *is* the reference (zero delta)
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
    ):
        """`compile`: fuse sparsified merges with torch.compile (None: when the model is large).
        `component`: merge only base tensors under these prefixes (see Recipe.component)."""
        self.component = dict(component) if component else None
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
        self.device = torch.device(device)
        self.sources = list(dict.fromkeys(str(s) for s in sources))
        self.base = str(base) if base is not None else None
        reference_ref = self.base or self.sources[0]
        ref_ckpt = Checkpoint(reference_ref, allow_pickle=allow_pickle)
        self.reference_path = ref_ckpt.path
        self.config = ref_ckpt.config
        self.model_type = ref_ckpt.model_type
        source_ckpts = [Checkpoint(s, allow_pickle=allow_pickle) for s in self.sources]
        names = ref_ckpt.names()
        merged_names = [n for n in names if component_source_name(n, self.component) is not None]
        if not merged_names:
            raise EvomergeError(f"component {self.component} matches no tensor of {reference_ref}; "
                                f"its tensors start like {names[0]!r}")
        self.num_blocks = count_blocks(merged_names, self.model_type)
        self.tensors: dict[str, BankTensor] = {}
        self._keys: dict[tuple, torch.Tensor] = {}  # per-element keys: magnitude ranks, drop fields
        self._facts: dict[tuple, object] = {}  # per-tensor facts: norms, cosines
        ref_shapes = ref_ckpt.shapes()
        check_compatible(reference_ref, ref_shapes,
                         {s: (ref_shapes if ck.path == self.reference_path else ck.shapes())
                          for s, ck in zip(self.sources, source_ckpts)}, self.model_type, self.component)
        it = names
        if progress:
            from tqdm import tqdm

            it = tqdm(names, desc="loading sources", unit="tensor")
        for name in it:
            ref = ref_ckpt.get(name, self.dtype, self.device)
            src_name = component_source_name(name, self.component)
            deltas: list[torch.Tensor | None] = []
            for ck in source_ckpts if src_name is not None else ():
                if ck.path == self.reference_path:  # the base itself: a zero delta, whatever the mapping
                    deltas.append(None)
                else:
                    deltas.append(ck.get(src_name, self.dtype, self.device).sub_(ref))
            self.tensors[name] = BankTensor(name, classify(name, self.model_type), ref, deltas, src_name is not None)
        self.num_params = sum(bt.reference.numel() for bt in self.tensors.values())
        self.compile = compile if compile is not None else self.num_params >= AUTO_COMPILE_PARAMS

    # -- cached per-source facts --------------------------------------------------------------

    def _delta(self, bt: BankTensor, i: int) -> torch.Tensor:
        """The delta, materialized as zeros only where a method must inspect it (ranks, cosines)."""
        d = bt.deltas[i]
        if d is None:
            d = torch.zeros_like(bt.reference)
            bt.deltas[i] = d
        return d

    def _element_key(self, kind: str, bt: BankTensor, i: int, position: int, seed: int) -> torch.Tensor:
        """A sparsifier's per-element key for source i (at `position` in the recipe): computed once."""
        if kind == "rank":
            key = ("rank", bt.name, i)
            if key not in self._keys:
                self._keys[key] = magnitude_rank(self._delta(bt, i))
            return self._keys[key]
        # DARE's field depends on the recipe's seed and the source's position, not on which source
        key = ("field", bt.name, position)
        if self._facts.get(("field_seed",) + key[1:]) != seed or key not in self._keys:
            self._keys[key] = drop_field(bt.reference.shape, tensor_seed(seed, position, bt.name)).to(self.device)
            self._facts[("field_seed",) + key[1:]] = seed
        return self._keys[key]

    def facts(self, bt: BankTensor, idx: list[int]) -> "BankFacts":
        return BankFacts(self, bt, idx)

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
        with torch.no_grad():
            for name, bt in self.tensors.items():
                dest = target.get(name)
                if dest is None:
                    continue
                self._materialize_tensor(recipe, method, idx, bt, dest)
        return target

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

    def _materialize_tensor(self, recipe: Recipe, method: MergeMethod, idx: list[int], bt: BankTensor, dest: torch.Tensor) -> None:
        if dest.shape != bt.reference.shape:
            raise EvomergeError(f"target tensor {bt.name} has shape {tuple(dest.shape)}, expected {tuple(bt.reference.shape)}")
        if not bt.merged:
            dest.copy_(bt.reference)
            return
        shared, per_source = recipe.resolve(bt.role, bt.name, self.num_blocks)
        if method.direct:
            self._direct(recipe, method, idx, bt, dest, shared, per_source)
            return
        plan = tensor_plan(method, bt.reference.numel(), shared, per_source, self.facts(bt, idx), bt.reference.shape)
        deltas = [bt.deltas[i] for i in idx]
        keys: list[torch.Tensor | None] = [None] * len(idx)
        for j, (i, keep) in enumerate(zip(idx, plan.keeps)):
            if deltas[j] is not None and keep.kind == "range":
                keys[j] = self._element_key(method.element_key, bt, i, j, recipe.seed)
        keeps = rescaled_keeps(plan, deltas, keys)
        if self._fused(method, bt, idx, plan, keeps, recipe.seed, dest):
            return
        self._eager(bt, plan, keeps, deltas, keys, dest)

    def _direct(self, recipe, method, idx, bt, dest, shared, per_source) -> None:
        """A direct method sees whole source tensors, rebuilt from the reference and the deltas."""
        work = torch.float64 if bt.reference.dtype == torch.float64 else torch.float32
        ref = bt.reference.to(work)
        sources = [ref if bt.deltas[i] is None else ref + bt.deltas[i].to(work) for i in idx]
        seeds = [tensor_seed(recipe.seed, j, bt.name) for j in range(len(idx))]
        dest.copy_(method.merge_direct(ref if recipe.base is not None else None, sources, shared, per_source, seeds))

    def _spans(self, ref: torch.Tensor, chunk: int) -> list[slice]:
        """Row ranges of about `chunk` elements; rows stay whole so per-row coefficients align."""
        if ref.dim() == 0 or self.device.type != "cpu":
            return [slice(None)]
        rows = ref.shape[0]
        step = max(1, chunk // max(1, ref.numel() // max(rows, 1)))
        return [slice(s, min(rows, s + step)) for s in range(0, rows, step)]

    def _eager(self, bt, plan, keeps, deltas, keys, dest) -> None:
        for sl in self._spans(bt.reference, EAGER_CHUNK):
            combine(
                bt.reference[sl],
                [d[sl] if d is not None else None for d in deltas],
                [c[sl] if isinstance(c, torch.Tensor) else c for c in plan.coefficients],
                keeps,
                [k[sl] if k is not None else None for k in keys],
                ref_coefficient=plan.ref_coefficient,
                consensus=plan.consensus,
                normalize=plan.normalize,
                weights=plan.weights,
                lam=plan.lam,
                out=dest[sl],
            )

    def _fused(self, method, bt, idx, plan, keeps, seed, dest) -> bool:
        """Run a sparsified merge through the compiled kernel; False when it does not apply."""
        sparsifier = method.sparsifier
        if not self.compile or sparsifier is None or plan.ref_coefficient != 1.0:
            return False
        if any(bt.deltas[i] is None for i in idx) or any(isinstance(c, torch.Tensor) for c in plan.coefficients):
            return False
        kernel = compiled_masked_combine()
        if kernel is None:
            return False
        full = sparsifier.full_range(bt.reference.numel())
        keys = [self._element_key(sparsifier.key, bt, i, j, seed) for j, i in enumerate(idx)]
        bounds = [keep.bounds(full) for keep in keeps]
        dev = self.device
        weights = plan.weights or [float(c) for c in plan.coefficients]
        total = float(sum(weights))
        args = dict(
            lo=torch.tensor([b[0] for b in bounds], dtype=torch.int64, device=dev),
            hi=torch.tensor([b[1] for b in bounds], dtype=torch.int64, device=dev),
            coef=torch.tensor([float(c) * k.scale for c, k in zip(plan.coefficients, keeps)], device=dev),
            weights=torch.tensor(weights, device=dev),
            lam=torch.tensor(float(plan.lam), device=dev),
            weight_sum=torch.tensor(total if abs(total) >= 1e-8 else 1.0, device=dev),
            consensus=plan.consensus,
            normalize=plan.normalize,
        )
        deltas = [bt.deltas[i] for i in idx]
        try:
            for sl in self._spans(bt.reference, FUSED_CHUNK):
                kernel(bt.reference[sl], [d[sl] for d in deltas], [k[sl] for k in keys], out=dest[sl], **args)
        except Exception as exc:  # no compiler / backend here: remember, and use eager from now on
            mark_broken(exc)
            return False
        return True

    def memory_bytes(self) -> int:
        total = 0
        for bt in self.tensors.values():
            total += bt.reference.numel() * bt.reference.element_size()
            total += sum(d.numel() * d.element_size() for d in bt.deltas if d is not None)
        total += sum(k.numel() * k.element_size() for k in self._keys.values())
        return total


class BankFacts:
    """The TensorFacts of one bank tensor for the recipe's sources, cached across candidates."""

    def __init__(self, bank: SourceBank, bt: BankTensor, idx: list[int]):
        self.bank, self.bt, self.idx = bank, bt, idx

    def norms_and_dot(self, position: int) -> tuple[float, float, float]:
        i = self.idx[position]
        key = ("norms", self.bt.name, i)
        if key not in self.bank._facts:
            ref = self.bt.reference
            other = ref + self.bank._delta(self.bt, i)
            self.bank._facts[key] = (ref.norm().item(), other.norm().item(), (ref * other).sum().item())
        return self.bank._facts[key]

    def cosines(self, rowwise: bool) -> torch.Tensor:
        key = ("cos", self.bt.name, tuple(self.idx), rowwise)
        if key not in self.bank._facts:
            self.bank._facts[key] = pairwise_cosines([self.bank._delta(self.bt, i) for i in self.idx], rowwise)
        return self.bank._facts[key]
