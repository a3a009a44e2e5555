"""Merge to disk: recipe (evomerge or mergekit YAML) -> SourceBank -> tensors -> HF model folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from evomerge.bank import SourceBank, merged_roles
from evomerge.checkpoint import Checkpoint, check_output_folder, parse_size, resolve_model_path, write_model
from evomerge.devices import check_device
from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe, unmatched_selectors


def output_config(bank: SourceBank, out_dtype: str) -> dict:
    config = dict(bank.config)
    # transformers 5 writes "dtype"; older releases read "torch_dtype".
    config["dtype"] = out_dtype
    config["torch_dtype"] = out_dtype
    return config


def check_recipe_against_model(recipe: Recipe, allow_pickle: bool = False) -> None:
    """Rules whose selectors match no tensor of the reference model are errors (from headers only)."""
    ckpt = Checkpoint(recipe.base or recipe.sources[0].model, allow_pickle=allow_pickle)
    problem = unmatched_selectors(recipe, merged_roles(ckpt.names(), ckpt.model_type, recipe.component))
    if problem:
        raise EvomergeError(problem)


def merge_to_disk(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    shard_size: str | int = "5GB",
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    protect: Iterable[str | os.PathLike] = (),
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Materialize the recipe and write a model folder that `from_pretrained` loads.

    Everything that can be checked before reading a tensor is checked first (device, shard size,
    the output folder, the rule selectors, the sources' headers), so a mistake costs no merge.
    `protect`: paths `--overwrite` must never replace (the recipe file); the models always are.
    """
    check_device(device)
    parse_size(shard_size)
    models = [s.model for s in recipe.sources] + [m for m in (recipe.base, recipe.tokenizer_source) if m]
    check_output_folder(out_dir, overwrite, protect=[*protect, *models])
    check_recipe_against_model(recipe, allow_pickle)
    bank = SourceBank(
        [s.model for s in recipe.sources], recipe.base, dtype=recipe.dtype, device=device,
        allow_pickle=allow_pickle, progress=progress, component=recipe.component,
    )
    out_dtype = recipe.out_dtype or recipe.dtype
    tensors = bank.materialize(recipe, bank.new_target(out_dtype))
    tokenizer_ref = recipe.tokenizer_source or recipe.base or recipe.sources[0].model
    return write_model(
        out_dir,
        tensors,
        output_config(bank, out_dtype),
        config_source=bank.reference_path,
        tokenizer_source=resolve_model_path(tokenizer_ref),
        shard_size=shard_size,
        extra_files={"evomerge_recipe.yaml": recipe.to_yaml(), **(extra_files or {})},
        overwrite=overwrite,
        protect=[*protect, *models],
    )
