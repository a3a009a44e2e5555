"""Merge to disk: recipe (evomerge or mergekit YAML) -> SourceBank -> tensors -> HF model folder."""

from __future__ import annotations

from pathlib import Path

from evomerge.bank import SourceBank
from evomerge.checkpoint import resolve_model_path, write_model
from evomerge.recipe import Recipe


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
        extra_files={"evomerge_recipe.yaml": recipe.to_yaml()},
        overwrite=overwrite,
    )
