"""Genomes for evolutionary merge search: a vector in the unit box <-> a merge Recipe.

`base` holds the interface every space implements and the registry keyed by
`search_space.kind`; `ps` registers the parameter-space genome, `dfs` the data-flow (layer
path) genome. A new kind plugs in the same way.
"""

from evomerge.search_spaces.base import SPACES, SearchSpace, SpaceContext, register_space, space_kind
from evomerge.search_spaces import dfs, ps  # noqa: F401  (register "dfs", "ps")

__all__ = ["SPACES", "SearchSpace", "SpaceContext", "register_space", "space_kind"]
