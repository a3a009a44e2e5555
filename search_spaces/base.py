"""The search-space interface, and the registry that maps `search_space.kind` to a space.

A search space turns a point of the unit box [0, 1]^dim into a merge Recipe. The campaign only
ever talks to this interface: it asks the registry for the kind the config names, lets the kind
validate its own config block, builds the space over the campaign's models, and from then on
uses `dim`, `names`, `x0`, `sigma0` and `decode(x)`. A new kind (data-flow, hybrid) is one
class with `@register_space("<kind>")`; nothing in the campaign changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import numpy as np

from evomerge.errors import EvomergeError, close_match
from evomerge.models import ModelInfo
from evomerge.recipe import Recipe


@dataclass
class SpaceContext:
    """What a space is built over: the campaign's models (resolved), seed and dtype."""

    sources: dict[str, str]  # display name -> model path (what recipes name)
    base: str | None
    reference: ModelInfo  # the base, else the first source: tensor names, shapes, model type
    seed: int
    dtype: str
    models: dict[str, ModelInfo] = field(default_factory=dict)  # config field ("base", "sources.<name>") -> info


class SearchSpace(Protocol):
    kind: str
    names: list[str]  # one per coordinate, e.g. "reverse.weight@block.3/mlp"
    materializer: str  # how the worker turns its recipes into models: "merge" or "path"
    reference_name: str  # the model whose config and tokenizer candidates take ("base", "sources.<name>")

    @property
    def dim(self) -> int: ...

    @property
    def x0(self) -> np.ndarray: ...

    @property
    def sigma0(self) -> float: ...

    def decode(self, x) -> Recipe: ...  # or a PathRecipe: anything with to_dict() a worker materializes

    def baselines(self) -> dict[str, dict]:
        """Recipes (as dicts) of what a winner is compared with on the held-out set: each source alone,
        their uniform average, the base; named by the campaign's display names, "uniform" and "base"."""
        ...

    def memory(self, models: dict[str, ModelInfo], element: int) -> dict:
        """Bytes the worker will hold ({"total": ..., "detail": "..."}), for pre-flight and --dry-run."""
        ...

    def describe(self) -> list[str]:
        """A few lines for `--dry-run`: what the coordinates mean."""
        ...


class SpaceKind(Protocol):
    """A registered kind: checks its config block, then builds spaces over models."""

    @classmethod
    def validate(cls, block: dict, where: str) -> dict: ...

    @classmethod
    def build(cls, block: dict, ctx: SpaceContext) -> SearchSpace:
        """The space over the campaign's models; checks the models fit it (from headers, no tensor read)."""
        ...


SPACES: dict[str, type] = {}


def register_space(kind: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        if kind in SPACES:
            raise ValueError(f"search space kind {kind!r} is registered twice")
        cls.kind = kind
        SPACES[kind] = cls
        return cls

    return add


def space_kind(kind: object) -> SpaceKind:
    if not isinstance(kind, str) or kind not in SPACES:
        raise EvomergeError(f"config field 'search_space.kind': bad value {kind!r}; allowed: {', '.join(SPACES)}"
                            f"{close_match(kind, SPACES)}")
    return SPACES[kind]
