"""Recipes of every kind to model folders: `evomerge merge RECIPE OUT` and `evomerge export DIR OUT`.

A recipe with `path:` is a data-flow recipe (layers of several models, scales folded on export);
anything else is a parameter-space merge (evomerge's or mergekit's YAML). Both write a plain
Hugging Face folder that stock transformers loads without remote code, with the recipe beside
the weights (`evomerge_recipe.yaml`) so the folder says how it was made.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from evomerge.errors import EvomergeError

if TYPE_CHECKING:
    from evomerge.config import Campaign


def recipe_from_dict(data: Any, origin: str = "recipe"):
    """A Recipe or a PathRecipe, told apart by `path:`."""
    from evomerge.dataflow import PathRecipe, is_path_recipe
    from evomerge.recipe import Recipe

    if is_path_recipe(data):
        return PathRecipe.from_dict(data, origin)
    return Recipe.from_dict(data, origin)


def write_recipe(recipe, out_dir: str | Path, *, device: str = "cpu", shard_size: str | int = "5GB",
                 allow_pickle: bool = False, overwrite: bool = False, progress: bool = False,
                 protect: Iterable = (), extra_files: dict[str, str] | None = None, exact: bool = True) -> Path:
    """`exact=False`: merge through a SourceBank, as a campaign scored the candidate (export)."""
    from evomerge.dataflow import PathRecipe, export_path
    from evomerge.merge import merge_to_disk

    if isinstance(recipe, PathRecipe):
        return export_path(recipe, out_dir, shard_size=shard_size, overwrite=overwrite, protect=protect,
                           allow_pickle=allow_pickle, extra_files=extra_files)
    return merge_to_disk(recipe, out_dir, device=device, shard_size=shard_size, allow_pickle=allow_pickle,
                         overwrite=overwrite, progress=progress, protect=protect, extra_files=extra_files,
                         exact=exact)


def choose_candidates(folder: str | Path, candidate: int | None = None, best: str | None = None,
                      front: bool = False) -> tuple[list[dict], "Campaign", dict]:
    """The journal rows (as dicts) to export, the campaign, and the journal facts a card cites.

    `--candidate ID`; `--best [OBJECTIVE]`: the best finished candidate by fitness (held-out scores
    never choose a model); `--front`: every distinct point of the Pareto front.
    """
    from dataclasses import asdict

    from evomerge.view import front_rows, open_campaign, winner_of

    journal, campaign = open_campaign(folder)
    try:
        meta = {k: journal.get(k) for k in ("baselines", "holdout_identity")}
        if candidate is not None:
            row = journal.candidate(candidate)
            if row is None:
                raise EvomergeError(f"{folder} has no candidate #{candidate}; see `evomerge front {folder}`")
            if row.status != "done":
                raise EvomergeError(f"candidate #{candidate} of {folder} is {row.status}, not a finished model; "
                                    f"export a front member (see `evomerge front {folder}`)")
            return [asdict(row)], campaign, meta
        names = [o.name for o in campaign.objectives]
        objective = next((o for o in campaign.objectives if o.name == (best or names[0])), None)
        if objective is None:
            raise EvomergeError(f"--best {best!r}: the campaign's objectives are {', '.join(names)}")
        rows = [row for row, _ in front_rows(journal, campaign)]  # holds the best on every objective
        if not rows:
            raise EvomergeError(f"{folder} has no finished candidate yet; continue it with `evomerge resume {folder}`")
        if front:
            return [asdict(r) for r in rows], campaign, meta
        return [asdict(winner_of(rows, objective))], campaign, meta
    finally:
        journal.close()


def choose_candidate(folder: str | Path, candidate: int | None = None, best: str | None = None) -> dict:
    """The one row `--candidate ID` or `--best [OBJECTIVE]` names."""
    return choose_candidates(folder, candidate, best)[0][0]


def mergekit_files(recipe) -> tuple[dict[str, str], str]:
    """({"mergekit_config.yml": text} or {}, the card's sentence about it)."""
    import yaml

    from evomerge.dataflow import PathRecipe
    from evomerge.mergekit_compat import to_mergekit

    if isinstance(recipe, PathRecipe):
        return {}, ("A data-flow recipe (a layer path with scales) has no mergekit form; `evomerge_recipe.yaml` "
                    "rebuilds it, and the exported folder is a stock architecture with the scales folded in.")
    try:
        config = to_mergekit(recipe)
    except EvomergeError as exc:
        return {}, f"No mergekit config: {exc}."
    note = ("`mergekit_config.yml` rebuilds the same weights with mergekit 0.1.5 (`mergekit-yaml mergekit_config.yml "
            "OUT`): every coefficient is written per layer group as mergekit resolves it.")
    if recipe.merge_method.element_key == "field":
        note += (" DARE drops elements at random, and mergekit draws its drop with its own random generator: its "
                 "merge equals this one in expectation, not element for element.")
    header = "# mergekit config rebuilding this model (evomerge export); run: mergekit-yaml mergekit_config.yml OUT\n"
    return {"mergekit_config.yml": header + yaml.safe_dump(config, sort_keys=False)}, note


def export_candidates(folder: str | Path, out_dir: str | Path, candidate: int | None = None, best: str | None = None,
                      front: bool = False, overwrite: bool = False, shard_size: str | int = "5GB",
                      progress: bool = False) -> list[tuple[Path, dict]]:
    """Write each chosen candidate as a Hugging Face folder: weights, config, tokenizer, the model card
    (README.md), the recipe, its scores and, for parameter-space recipes, a mergekit config.

    With `front`, OUT holds one folder per front member (`candidate-<id>`). Every destination is
    checked before anything is written, so a mistake costs no merge.
    """
    import json

    from evomerge.card import model_card
    from evomerge.checkpoint import check_output_folder, parse_size

    parse_size(shard_size)
    rows, campaign, meta = choose_candidates(folder, candidate, best, front)
    out = Path(out_dir)
    targets = [out / f"candidate-{row['id']}" for row in rows] if front else [out]
    if front and out.exists() and not out.is_dir():
        raise EvomergeError(f"--front writes one folder per front member into {out}, which is a file; "
                            "pick a folder")
    for target in targets:
        check_output_folder(target, overwrite, protect=[folder])
    written = []
    for row, target in zip(rows, targets):
        recipe = recipe_from_dict(row["recipe"], f"candidate #{row['id']}")
        scores = {"candidate": row["id"], "objectives": row["objectives"], "metrics": row["metrics"],
                  "identity": row["identity"], "holdout": row["holdout"],
                  "holdout_identity": meta.get("holdout_identity")}
        extra, note = mergekit_files(recipe)
        extra["evomerge_scores.json"] = json.dumps(scores, indent=2) + "\n"
        extra["README.md"] = model_card(row, campaign, meta, target.name, note)
        if progress and len(rows) > 1:
            print(f"candidate #{row['id']} -> {target}", flush=True)
        # exact=False: the weights the campaign scored, thresholds and all (see evomerge.merge)
        written.append((write_recipe(recipe, target, overwrite=overwrite, shard_size=shard_size, protect=[folder],
                                     extra_files=extra, exact=False), row))
    return written
