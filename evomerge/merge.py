"""Merge to disk: recipe (evomerge or mergekit YAML) -> SourceBank -> tensors -> HF model folder."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from evomerge.bank import SourceBank
from evomerge.checkpoint import resolve_model_path, write_model
from evomerge.errors import EvomergeError
from evomerge.mergekit_compat import from_mergekit, is_mergekit_config
from evomerge.recipe import Recipe


def load_recipe(path: str | Path) -> Recipe:
    """An evomerge recipe or a mergekit config, told apart by mergekit's `merge_method` key."""
    path = Path(path)
    if not path.is_file():
        raise EvomergeError(f"recipe file {path} does not exist")
    try:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise EvomergeError(f"{path}: not valid YAML/JSON ({str(exc).splitlines()[0]})") from None
    if is_mergekit_config(data):
        return from_mergekit(data, origin=str(path))
    return Recipe.from_dict(data, origin=str(path))


def output_config(bank: SourceBank, out_dtype: str) -> dict:
    config = dict(bank.config)
    # transformers 5 writes "dtype"; older releases read "torch_dtype".
    config["dtype"] = out_dtype
    config["torch_dtype"] = out_dtype
    return config


def merge_to_disk(
    recipe: Recipe,
    out_dir: str | Path,
    *,
    device: str = "cpu",
    shard_size: str | int = "5GB",
    allow_pickle: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> Path:
    """Materialize the recipe and write a model folder that `from_pretrained` loads."""
    bank = SourceBank(
        [s.model for s in recipe.sources], recipe.base, dtype=recipe.dtype, device=device,
        allow_pickle=allow_pickle, progress=progress,
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
        extra_files={"evomerge_recipe.yaml": recipe.to_yaml()},
        overwrite=overwrite,
    )
