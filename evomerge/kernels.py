"""The fused kernel for task-vector merges (TIES, DARE, breadcrumbs, task arithmetic, linear),
compiled once per campaign.

Eager PyTorch runs `methods.combine` as ~20 separate passes over each tensor; for masked methods
that is 10-20x the memory bound. The same arithmetic written element-wise and handed to
`torch.compile` becomes one loop that reads each operand once (C++ on CPU, Triton on CUDA).

TIES's sign election needs no stacking: with T_i the weighted, masked deltas and P the sum of
their positive parts, the agreeing sum is P where sum(T) >= 0 and sum(T) - P elsewhere; the
divisor is likewise the weight of the positive or the negative contributors.

Keep masks are computed in the loop too: a magnitude threshold compares |delta|, DARE's drop
hashes the element index, so no per-element key is read from memory.

Every per-candidate number (thresholds, coefficients, hash words) arrives as a tensor, so a new candidate
never triggers a recompile; only the number of sources and the two flags shape the kernel.
"""

from __future__ import annotations

import os
import warnings

import torch

from evomerge.methods import drop_field


def masked_combine(
    ref: torch.Tensor,
    deltas: list[torch.Tensor],
    ref_coef: torch.Tensor,  # () float: the reference's coefficient (1 for task vectors)
    lo: torch.Tensor,  # (S,) float: magnitude keys keep lo[i] <= |delta_i| < hi[i]
    hi: torch.Tensor,
    level: torch.Tensor,  # (S,) int64: field keys keep drop_field(j) < level[i]
    words: torch.Tensor,  # (S, 2) int64: each source's hash words (field keys)
    start: torch.Tensor,  # () int64: flat index of this chunk's first element (field keys)
    coef: torch.Tensor,  # (S,) float: weight x rescale factor
    weights: torch.Tensor,  # (S,) float: the weights that TIES's divisor sums
    lam: torch.Tensor,  # () float
    weight_sum: torch.Tensor,  # () float: the divisor without consensus
    out: torch.Tensor,
    key_kind: str,  # "magnitude", "field", or "none" (every element kept)
    consensus: bool,
    normalize: bool,
) -> None:
    terms = []
    if key_kind == "field":
        index = (torch.arange(ref.numel(), device=ref.device, dtype=torch.int64) + start).reshape(ref.shape)
    for i in range(len(deltas)):
        d = deltas[i].float()
        if key_kind == "none":
            terms.append(d * coef[i])
            continue
        if key_kind == "field":
            keep = drop_field(index, (words[i, 0], words[i, 1])) < level[i]
        else:
            m = d.abs()
            keep = (m >= lo[i]) & (m < hi[i])
        terms.append(torch.where(keep, d * coef[i], 0.0))
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    if consensus:
        positive_part = terms[0].clamp(min=0)
        for t in terms[1:]:
            positive_part = positive_part + t.clamp(min=0)
        positive = total >= 0
        mixed = torch.where(positive, positive_part, total - positive_part)
        if normalize:
            w_pos = (terms[0] > 0) * weights[0]
            w_neg = (terms[0] < 0) * weights[0]
            for i in range(1, len(terms)):
                w_pos = w_pos + (terms[i] > 0) * weights[i]
                w_neg = w_neg + (terms[i] < 0) * weights[i]
            divisor = torch.where(positive, w_pos, w_neg)
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = total
        if normalize:
            mixed = mixed / weight_sum
    out.copy_(ref.float() * ref_coef + mixed * lam)


_compiled = None
_broken = False


def compiled_masked_combine():
    """The compiled kernel, or None when compilation is disabled or unavailable here."""
    global _compiled
    if _broken or os.environ.get("EVOMERGE_COMPILE", "1") == "0":
        return None
    if _compiled is None:
        _compiled = torch.compile(masked_combine, dynamic=True)
    return _compiled


def mark_broken(exc: BaseException) -> None:
    """Compilation failed (no C++ compiler, no Triton): fall back to eager for this process."""
    global _broken
    _broken = True
    warnings.warn(f"torch.compile unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:200]}); "
                  "using the eager merge path (correct, slower)", RuntimeWarning, stacklevel=2)
