"""Map each tensor name to a layer group and a tensor family.

Table-driven: an architecture is a list of (regex, group, family) rows; supporting a new one
means adding rows, not code. A regex's `(?P<block>\\d+)` names the transformer block.

Groups: "embeddings", "block.<i>", "final_norm", "lm_head" (and "other" for anything the table
does not know). Families: "embedding", "attention", "mlp", "norm", "head", "other".
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

# Rows are tried in order; the first match wins.
_LLAMA_LIKE = [
    (r"^(?:model\.)?(?:language_model\.)?(?:model\.)?embed_tokens\.", "embeddings", "embedding"),
    (r"layers\.(?P<block>\d+)\.self_attn\.", "block", "attention"),
    (r"layers\.(?P<block>\d+)\.(?:mlp|block_sparse_moe)\.", "block", "mlp"),
    (r"layers\.(?P<block>\d+)\.[a-z_]*norm[a-z_]*\.", "block", "norm"),
    (r"^(?:model\.)?(?:language_model\.)?(?:model\.)?norm\.", "final_norm", "norm"),
    (r"(?:^|\.)lm_head\.", "lm_head", "head"),
]

_GPT2_LIKE = [
    (r"^(?:transformer\.)?(?:wte|wpe)\.", "embeddings", "embedding"),
    (r"(?:^|\.)h\.(?P<block>\d+)\.attn\.", "block", "attention"),
    (r"(?:^|\.)h\.(?P<block>\d+)\.mlp\.", "block", "mlp"),
    (r"(?:^|\.)h\.(?P<block>\d+)\.ln_\d\.", "block", "norm"),
    (r"^(?:transformer\.)?ln_f\.", "final_norm", "norm"),
    (r"(?:^|\.)lm_head\.", "lm_head", "head"),
]

# Fallback for unknown model types: common spellings of blocks and families.
_GENERIC = [
    (r"(?:embed|wte|wpe|word_embeddings)", "embeddings", "embedding"),
    (r"(?:layers|h|blocks|layer)\.(?P<block>\d+)\..*(?:attn|attention)", "block", "attention"),
    (r"(?:layers|h|blocks|layer)\.(?P<block>\d+)\..*(?:mlp|ffn|feed_forward|experts)", "block", "mlp"),
    (r"(?:layers|h|blocks|layer)\.(?P<block>\d+)\..*(?:norm|ln)", "block", "norm"),
    (r"(?:layers|h|blocks|layer)\.(?P<block>\d+)\.", "block", "other"),
    (r"(?:^|\.)(?:norm|ln_f|final_layer_norm)\.", "final_norm", "norm"),
    (r"(?:lm_head|output)\.", "lm_head", "head"),
]

ARCHITECTURES: dict[str, list[tuple[str, str, str]]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "mixtral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "llava": _LLAMA_LIKE,
    "llava_next": _LLAMA_LIKE,
    "gpt2": _GPT2_LIKE,
}

FAMILIES = ("embedding", "attention", "mlp", "norm", "head", "other")


@dataclass(frozen=True)
class TensorRole:
    group: str  # "embeddings", "block.3", "final_norm", "lm_head", "other"
    family: str
    block: int | None  # block index for block tensors, else None


@lru_cache(maxsize=None)
def _compiled(model_type: str) -> list[tuple[re.Pattern, str, str]]:
    rows = ARCHITECTURES.get(model_type, []) + _GENERIC
    return [(re.compile(p), g, f) for p, g, f in rows]


def classify(name: str, model_type: str = "llama") -> TensorRole:
    """The layer group and tensor family of one tensor name."""
    for pattern, group, family in _compiled(model_type):
        m = pattern.search(name)
        if m:
            block = m.groupdict().get("block")
            if block is not None:
                return TensorRole(f"block.{int(block)}", family, int(block))
            return TensorRole(group, family, None)
    return TensorRole("other", "other", None)


def count_blocks(names: list[str], model_type: str = "llama") -> int:
    blocks = [r.block for r in (classify(n, model_type) for n in names) if r.block is not None]
    return max(blocks) + 1 if blocks else 0
