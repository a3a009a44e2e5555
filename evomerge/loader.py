"""One loader for recipe files in both formats it knows: evomerge's own, and mergekit's YAML.

Kept apart from `recipe.py` and `mergekit_compat.py` so neither imports the other's reader:
data flows file -> (mergekit_compat ->) Recipe, one way.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from evomerge.errors import EvomergeError, yaml_problem
from evomerge.mergekit_compat import from_mergekit, is_mergekit_config
from evomerge.recipe import Recipe


def load_recipe(path: str | Path) -> Recipe:
    """An evomerge recipe, or a mergekit config (told apart by mergekit's `merge_method` key)."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"recipe file {path} does not exist" if not path.exists()
                            else f"recipe {path} is a folder; pass the recipe YAML/JSON file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise EvomergeError(f"{path}: not valid YAML/JSON ({yaml_problem(exc)})") from None
    if is_mergekit_config(data):
        return from_mergekit(data, origin=str(path))
    return Recipe.from_dict(data, origin=str(path))
