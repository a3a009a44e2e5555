"""One loader for recipe files in both formats it knows: evomerge's own, and mergekit's YAML.

Kept apart from `recipe.py` and `mergekit_compat.py` so neither imports the other's reader:
data flows file -> (mergekit_compat ->) Recipe, one way.
"""

from __future__ import annotations

from pathlib import Path

from evomerge.errors import EvomergeError, read_document
from evomerge.mergekit_compat import from_mergekit, is_mergekit_config


def load_recipe(path: str | Path):
    """An evomerge recipe (a merge, or a layer path with `path:`), or a mergekit config (told apart by
    mergekit's `merge_method` key)."""
    from evomerge.export import recipe_from_dict

    data = read_document(path, "recipe", "recipe YAML/JSON file", "YAML/JSON")
    if isinstance(data, dict) and ("search_space" in data or "stages" in data):
        raise EvomergeError(f"{path} is a campaign config, not a merge recipe; run it with "
                            f"`evomerge run {path} --out DIR` (a recipe has method and sources)")
    if is_mergekit_config(data):
        return from_mergekit(data, origin=str(path))
    return recipe_from_dict(data, origin=str(path))
