"""Merge to disk: recipe (evomerge or mergekit YAML) -> merged tensors -> HF model folder.

Two engines, one set of numbers up to the sparsifying thresholds:
- exact (the default, `evomerge merge`): tensors streamed from disk to disk, one at a time, each
  merged from scratch by `merge_tensor` in float32 (float64 for float64 recipes): exact k-th values,
  no compile, no bank; memory is one shard of output plus one tensor per source.
- the bank (`exact=False`, what `evomerge export` uses): the SourceBank a campaign scored the
  candidate with, so the exported weights are the evaluated ones (TIES thresholds of large tensors
  from the bank's quantile sketch).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import torch

from evomerge.architecture import classify
from evomerge.bank import SourceBank, merged_roles, open_sources
from evomerge.checkpoint import (
    Checkpoint,
    StreamedTensors,
    check_output_folder,
    parse_size,
    resolve_model_path,
    write_model,
)
from evomerge.devices import check_device
from evomerge.errors import EvomergeError
from evomerge.recipe import Recipe, unmatched_selectors


def output_config(source_config: dict, out_dtype: str) -> dict:
    config = dict(source_config)
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
    exact: bool = True,
) -> Path:
    """Materialize the recipe and write a model folder that `from_pretrained` loads.

    Everything that can be checked before reading a tensor is checked first (device, shard size,
    the output folder, the rule selectors, the sources' headers), so a mistake costs no merge.
    `protect`: paths `--overwrite` must never replace (the recipe file); the models always are.
    `exact`: stream tensor by tensor with exact thresholds; False: through a SourceBank, as a
    campaign materializes candidates (see the module docstring).
    """
    check_device(device)
    parse_size(shard_size)
    models = [s.model for s in recipe.sources] + [m for m in (recipe.base, recipe.tokenizer_source) if m]
    check_output_folder(out_dir, overwrite, protect=[*protect, *models])
    check_recipe_against_model(recipe, allow_pickle)
    out_dtype = recipe.out_dtype or recipe.dtype
    if exact:
        tensors, config, reference_path = streamed_merge(recipe, device, allow_pickle, progress)
    else:
        bank = SourceBank(
            [s.model for s in recipe.sources], recipe.base, dtype=recipe.dtype, device=device,
            allow_pickle=allow_pickle, progress=progress, component=recipe.component,
        )
        tensors = bank.materialize(recipe, bank.new_target(out_dtype))
        config, reference_path = bank.config, bank.reference_path
    tokenizer_ref = recipe.tokenizer_source or recipe.base or recipe.sources[0].model
    return write_model(
        out_dir,
        tensors,
        output_config(config, out_dtype),
        config_source=reference_path,
        tokenizer_source=resolve_model_path(tokenizer_ref),
        shard_size=shard_size,
        extra_files={"evomerge_recipe.yaml": recipe.to_yaml(), **(extra_files or {})},
        overwrite=overwrite,
        protect=[*protect, *models],
    )


def streamed_merge(recipe: Recipe, device: str = "cpu", allow_pickle: bool = False,
                   progress: bool = False) -> tuple[StreamedTensors, dict, Path]:
    """The recipe's merged model as a lazy mapping: each tensor read from the sources and merged
    exactly (merge_tensor) when the writer asks for it. Returns (tensors, config, reference folder)."""
    from evomerge.methods import merge_tensor
    from evomerge.recipe import DTYPES

    files = open_sources(recipe.base or recipe.sources[0].model, [s.model for s in recipe.sources],
                         recipe.component, allow_pickle)
    ref, sources, merged, num_blocks = files.reference, files.sources, files.merged, files.num_blocks
    names, shapes = ref.names(), ref.shapes()
    method = recipe.merge_method
    dtype = DTYPES[recipe.dtype]
    out_dtype = DTYPES[recipe.out_dtype or recipe.dtype]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(names), desc="merging", unit="tensor")

    def produce(name: str) -> torch.Tensor:
        reference = ref.get(name, dtype, device)
        if name in merged:
            # Inputs in the recipe's dtype (as mergekit casts them); the arithmetic in float32 or wider.
            inputs = [reference if ck.path == ref.path else ck.get(merged[name], dtype, device) for ck in sources]
            shared, per_source = recipe.resolve(classify(name, ref.model_type), name, num_blocks)
            reference = merge_tensor(method, reference, inputs, shared, per_source, seed=recipe.seed,
                                     tensor_name=name, has_base=recipe.base is not None, out_dtype=out_dtype)
        if bar is not None:
            bar.update()
        return reference.to(out_dtype)

    layout = {n: (tuple(shapes[n]), out_dtype) for n in names}
    return StreamedTensors(layout, produce), ref.config, ref.path
