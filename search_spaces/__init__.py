"""Genomes for evolutionary merge search: a vector in the unit box <-> a merge Recipe.

`base` holds the interface every space implements and the registry keyed by
`search_space.kind`; `ps` registers the parameter-space genome. Data-flow (layer path) and
hybrid genomes plug in the same way.
"""

from evomerge.search_spaces.base import SPACES, SearchSpace, SpaceContext, register_space, space_kind
from evomerge.search_spaces import ps  # noqa: F401  (registers "ps")

__all__ = ["SPACES", "SearchSpace", "SpaceContext", "register_space", "space_kind"]
