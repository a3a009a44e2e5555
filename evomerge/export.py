"""Recipes of every kind to model folders: `evomerge merge RECIPE OUT` and `evomerge export DIR OUT`.

A recipe with `path:` is a data-flow recipe (layers of several models, scales folded on export);
anything else is a parameter-space merge (evomerge's or mergekit's YAML). Both write a plain
Hugging Face folder that stock transformers loads without remote code, with the recipe beside
the weights (`evomerge_recipe.yaml`) so the folder says how it was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from evomerge.errors import EvomergeError


def recipe_from_dict(data: Any, origin: str = "recipe"):
    """A Recipe or a PathRecipe, told apart by `path:`."""
    from evomerge.dataflow import PathRecipe, is_path_recipe
    from evomerge.recipe import Recipe

    if is_path_recipe(data):
        return PathRecipe.from_dict(data, origin)
    return Recipe.from_dict(data, origin)


def write_recipe(recipe, out_dir: str | Path, *, device: str = "cpu", shard_size: str | int = "5GB",
                 allow_pickle: bool = False, overwrite: bool = False, progress: bool = False,
                 protect: Iterable = (), extra_files: dict[str, str] | None = None) -> Path:
    from evomerge.dataflow import PathRecipe, export_path
    from evomerge.merge import merge_to_disk

    if isinstance(recipe, PathRecipe):
        return export_path(recipe, out_dir, shard_size=shard_size, overwrite=overwrite, protect=protect,
                           allow_pickle=allow_pickle, extra_files=extra_files)
    return merge_to_disk(recipe, out_dir, device=device, shard_size=shard_size, allow_pickle=allow_pickle,
                         overwrite=overwrite, progress=progress, protect=protect, extra_files=extra_files)


def choose_candidate(folder: str | Path, candidate: int | None = None, best: str | None = None) -> dict:
    """The journal row (as a dict) of `--candidate ID`, or of the best finished candidate on an objective
    (fitness scores: held-out scores never choose a model)."""
    from dataclasses import asdict

    from evomerge.view import front_rows, open_campaign

    journal, campaign = open_campaign(folder)
    try:
        if candidate is not None:
            row = journal.candidate(candidate)
            if row is None:
                raise EvomergeError(f"{folder} has no candidate #{candidate}; see `evomerge front {folder}`")
            if row.status != "done":
                raise EvomergeError(f"candidate #{candidate} of {folder} is {row.status}, not a finished model; "
                                    f"export a front member (see `evomerge front {folder}`)")
            return asdict(row)
        names = [o.name for o in campaign.objectives]
        objective = next((o for o in campaign.objectives if o.name == (best or names[0])), None)
        if objective is None:
            raise EvomergeError(f"--best {best!r}: the campaign's objectives are {', '.join(names)}")
        front = [row for row, _ in front_rows(journal, campaign)]  # holds the best on every objective
        if not front:
            raise EvomergeError(f"{folder} has no finished candidate yet; continue it with `evomerge resume {folder}`")
        sign = 1.0 if objective.direction == "maximize" else -1.0
        return asdict(max(front, key=lambda r: sign * r.objectives[objective.name]))  # the earliest of ties
    finally:
        journal.close()


def export_candidate(folder: str | Path, out_dir: str | Path, candidate: int | None = None, best: str | None = None,
                     overwrite: bool = False, shard_size: str | int = "5GB") -> tuple[Path, dict]:
    import json

    row = choose_candidate(folder, candidate, best)
    recipe = recipe_from_dict(row["recipe"], f"candidate #{row['id']}")
    scores = {"candidate": row["id"], "objectives": row["objectives"], "metrics": row["metrics"],
              "identity": row["identity"], "holdout": row["holdout"]}
    out = write_recipe(recipe, out_dir, overwrite=overwrite, shard_size=shard_size,
                       protect=[folder], extra_files={"evomerge_scores.json": json.dumps(scores, indent=2) + "\n"})
    return out, row
