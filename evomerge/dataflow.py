"""Data-flow merges: a path a token takes through the layers of several models, and its export.

A path recipe keeps every weight as it is and says which layer runs next:

    models: {ja: ./shisa-gamma-7b, math: ./WizardMath-7B}
    lead: ja                  # embeddings, final norm, head, config and tokenizer come from it
    path:
      - {model: ja, layer: 0}
      - {model: math, layer: 1, scale: 0.9}    # the hidden state entering this layer is scaled by 0.9
      - {model: ja, layer: 1}
    dtype: float32

In memory (`PathBank`), a candidate is a list of thin wrappers over the sources' resident layer
modules: no weight is copied, and building one takes microseconds per layer. Each position in
the path has its own KV-cache slot, so a layer that appears twice caches twice.

On disk (`export_path`), the scales are folded away: in a pre-norm residual network every block
and the final norm read the residual stream through a scale-invariant norm, so scaling the stream
by s before position k equals dividing the output projections (attention out, MLP down) of
positions k onward by s. With several scales the divisor at position k is the product of the
scales up to k. The export is a plain model of len(path) layers that stock transformers loads
without remote code; its logits match the path model's up to the norms' epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from evomerge.errors import EvomergeError, close_match, is_count, is_number

MAX_PATH = 4096
FIELDS = ("models", "lead", "path", "dtype", "out_dtype")


@dataclass(frozen=True)
class PathArch:
    """How a pre-norm architecture with scale-invariant norms lays out its layers."""

    layers: str = "model.layers"  # module path of the layer list (and tensor-name prefix)
    # Tensors that write into the residual stream: folding a scale divides these.
    outputs: tuple[str, ...] = ("self_attn.o_proj.", "mlp.down_proj.")
    # Config keys every model in one path must share (a layer of one must fit the stream of another).
    shape_keys: tuple[str, ...] = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                                   "intermediate_size", "hidden_act", "rms_norm_eps", "attention_bias", "mlp_bias")


# Pre-norm, RMSNorm (scale-invariant), residual: a scale on the stream folds into output projections.
# Not here on purpose: gemma2/gemma3 (a norm after each sub-block makes its output scale-invariant,
# so nothing folds), gpt2 (tested merges only; its layers are `transformer.h`).
ARCHS: dict[str, PathArch] = {t: PathArch() for t in ("llama", "mistral", "qwen2", "qwen3")}


def path_arch(model_type: str, where: str) -> PathArch:
    arch = ARCHS.get(model_type)
    if arch is None:
        raise EvomergeError(f"{where}: model type {model_type!r} cannot take a data-flow (layer path) merge; "
                            f"evomerge folds layer scales only into pre-norm architectures with scale-invariant "
                            f"norms: {', '.join(ARCHS)}")
    return arch


def _get(config: dict, key: str) -> Any:
    if key == "head_dim" and config.get("head_dim") is None:
        heads = config.get("num_attention_heads") or 1
        return config.get("hidden_size", 0) // heads
    if key == "num_key_value_heads" and config.get(key) is None:
        return config.get("num_attention_heads")
    return config.get(key)


def check_path_models(configs: dict[str, dict], lead: str, where: str) -> None:
    """Every model's layers fit the lead's residual stream: same type, widths, heads and norms."""
    lead_cfg = configs[lead]
    arch = path_arch(lead_cfg.get("model_type", "llama"), f"{where} ({lead})")
    for name, cfg in configs.items():
        if cfg.get("model_type") != lead_cfg.get("model_type"):
            raise EvomergeError(f"{where}: {name} is a {cfg.get('model_type')!r} model and {lead} a "
                                f"{lead_cfg.get('model_type')!r} one; a path runs layers of one architecture")
        for key in arch.shape_keys:
            a, b = _get(cfg, key), _get(lead_cfg, key)
            if a != b:
                raise EvomergeError(f"{where}: {name} has {key} {a!r} and {lead} has {b!r}; models in one path "
                                    "must share hidden size, head layout and norms (a layer of one must fit the "
                                    "hidden state of the other)")


# -- the recipe ---------------------------------------------------------------------------------


@dataclass
class Step:
    model: str  # a name under `models`
    layer: int
    scale: float = 1.0


@dataclass
class PathRecipe:
    models: dict[str, str]  # name -> model reference
    path: list[Step]
    lead: str | None = None  # defaults to the first model
    dtype: str = "float32"
    out_dtype: str | None = None

    @property
    def lead_name(self) -> str:
        return self.lead or next(iter(self.models))

    def to_dict(self) -> dict:
        d: dict = {"models": dict(self.models), "lead": self.lead_name,
                   "path": [{"model": s.model, "layer": s.layer, **({"scale": s.scale} if s.scale != 1.0 else {})}
                            for s in self.path],
                   "dtype": self.dtype}
        if self.out_dtype:
            d["out_dtype"] = self.out_dtype
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any, origin: str = "recipe") -> "PathRecipe":
        from evomerge.recipe import DTYPES

        if not isinstance(data, dict):
            raise EvomergeError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
        _known(data, FIELDS, origin)
        models = data.get("models")
        if not isinstance(models, dict) or not models or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in models.items()):
            raise EvomergeError(f"{origin}: 'models' must map names to model folders, e.g. "
                                "{a: ./model-a, b: ./model-b}")
        lead = data.get("lead")
        if lead is not None and lead not in models:
            raise EvomergeError(f"{origin}: lead {lead!r} is not among models ({', '.join(models)})"
                                f"{close_match(lead, list(models))}")
        path = data.get("path")
        if not isinstance(path, list) or not path:
            raise EvomergeError(f"{origin}: 'path' is empty; list the layers a token runs through, e.g. "
                                "[{model: a, layer: 0}, {model: b, layer: 1, scale: 1.0}]")
        if len(path) > MAX_PATH:
            raise EvomergeError(f"{origin}: the path has {len(path)} layers; at most {MAX_PATH}")
        steps = []
        for i, step in enumerate(path):
            where = f"{origin}: path[{i}]"
            if not isinstance(step, dict):
                raise EvomergeError(f"{where} must be a mapping {{model: NAME, layer: INDEX, scale: 1.0}}, got {step!r}")
            _known(step, ("model", "layer", "scale"), where)
            name = step.get("model")
            if name not in models:
                raise EvomergeError(f"{where}.model {name!r} is not among the recipe's models "
                                    f"({', '.join(models)}){close_match(name, list(models))}")
            layer = step.get("layer")
            if not is_count(layer, 0, 1 << 20):
                raise EvomergeError(f"{where}.layer {layer!r} must be a layer index (0, 1, ...)")
            scale = step.get("scale", 1.0)
            if not is_number(scale) or isinstance(scale, bool) or not 0 < scale <= 1e3:
                raise EvomergeError(f"{where}.scale {scale!r} must be a finite number in (0, 1000]")
            steps.append(Step(name, int(layer), float(scale)))
        for key in ("dtype", "out_dtype"):
            value = data.get(key)
            if value is not None and value not in DTYPES:
                raise EvomergeError(f"{origin}: {key} {value!r} is not supported; choose one of {list(DTYPES)}")
        return cls(dict(models), steps, lead, data.get("dtype") or "float32", data.get("out_dtype") or None)

    def check_layers(self, configs: dict[str, dict], origin: str = "recipe") -> None:
        """Models fit one another and every layer index exists (from configs alone)."""
        check_path_models(configs, self.lead_name, origin)
        for i, step in enumerate(self.path):
            n = configs[step.model].get("num_hidden_layers", 0)
            if step.layer >= n:
                raise EvomergeError(f"{origin}: path[{i}] asks for layer {step.layer} of {step.model}, which has "
                                    f"{n} layers (0-{n - 1})")


def _known(block: dict, allowed: tuple[str, ...], where: str) -> None:
    for key in block:
        if key not in allowed:
            raise EvomergeError(f"{where}: unknown field {key!r}; allowed: {', '.join(allowed)}"
                                f"{close_match(key, allowed)}")


def is_path_recipe(data: Any) -> bool:
    return isinstance(data, dict) and "path" in data


# -- in memory: a path over resident layers ------------------------------------------------------


class PathLayer(torch.nn.Module):
    """One position of a path: a shared layer, its own KV-cache slot, and the scale on its input."""

    def __init__(self, layer: torch.nn.Module, index: int, scale: float):
        super().__init__()
        self.layer = layer
        self.index = index
        self.scale = scale
        if hasattr(layer, "attention_type"):  # models that pick a mask per layer read it here
            self.attention_type = layer.attention_type

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        # The attention module writes its keys and values to `layer_idx` of the cache; a layer that
        # appears twice in a path must write to two slots, so the slot is set per call.
        self.layer.self_attn.layer_idx = self.index
        if self.scale != 1.0:
            hidden_states = hidden_states * self.scale
        return self.layer(hidden_states, *args, **kwargs)


def _module(root: torch.nn.Module, dotted: str) -> Any:
    for part in dotted.split("."):
        root = getattr(root, part)
    return root


def _set_module(root: torch.nn.Module, dotted: str, value: torch.nn.Module) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        root = getattr(root, part)
    setattr(root, last, value)


class PathBank:
    """Load each model once; build any path over their layers in place (the lead model is the shell)."""

    def __init__(self, refs: list[str], lead: str, dtype: str = "float32", device: str = "cpu", tokenizer=None):
        from evomerge.checkpoint import read_config, resolve_model_path
        from transformers.utils import logging as hf_logging

        from evomerge.evaluate import load_model

        hf_logging.disable_progress_bar()  # a "Loading weights" bar per source is noise in a campaign
        self.refs = list(dict.fromkeys([lead, *refs]))
        self.lead = lead
        self.dtype = dtype
        configs = {ref: read_config(resolve_model_path(ref)) for ref in self.refs}
        check_path_models(configs, lead, "data-flow sources")
        self.arch = path_arch(configs[lead].get("model_type", "llama"), lead)
        from evomerge.recipe import DTYPES

        self.models: dict[str, torch.nn.Module] = {}
        self.layers: dict[str, list[torch.nn.Module]] = {}
        self.tokenizer = tokenizer
        for ref in self.refs:  # the lead first: its tokenizer is the path's (the others need none)
            model, self.tokenizer = load_model(ref, device, processor=self.tokenizer)
            model = model.to(DTYPES[dtype]).eval()
            self.models[ref] = model
            self.layers[ref] = list(_module(model, self.arch.layers))
        self.model = self.models[lead]
        self.config = self.model.config
        self._lead_types = list(getattr(self.config, "layer_types", None) or [])

    def materialize(self, recipe: PathRecipe) -> torch.nn.Module:
        """The lead model with its layer list replaced by the recipe's path (no weight copied)."""
        missing = [ref for ref in recipe.models.values() if ref not in self.layers]
        if missing:
            raise EvomergeError(f"path recipe names {missing[0]}, which this worker has not loaded (loaded: "
                                f"{', '.join(self.refs)}); a path runs over the campaign's sources only")
        if recipe.models[recipe.lead_name] != self.lead:
            raise EvomergeError(f"path recipe leads with {recipe.models[recipe.lead_name]}, this worker with "
                                f"{self.lead}")
        positions = []
        types = []
        for k, step in enumerate(recipe.path):
            layers = self.layers[recipe.models[step.model]]
            if step.layer >= len(layers):
                raise EvomergeError(f"path[{k}] asks for layer {step.layer} of {step.model}, which has "
                                    f"{len(layers)} layers")
            positions.append(PathLayer(layers[step.layer], k, step.scale))
            if self._lead_types:
                src = self.models[recipe.models[step.model]].config
                types.append((getattr(src, "layer_types", None) or self._lead_types)[step.layer])
        _set_module(self.model, self.arch.layers, torch.nn.ModuleList(positions))
        # The cache and the mask are sized by the config: one slot per position of the path.
        self.config.num_hidden_layers = len(positions)
        if self._lead_types:
            self.config.layer_types = types
        return self.model


# -- on disk: fold the scales, write a plain model --------------------------------------------------


def folded_tensors(recipe: PathRecipe, checkpoints: dict[str, Any], arch: PathArch, dtype: torch.dtype):
    """(name, tensor) of the exported model, in order: the lead's outer tensors, then each position's
    layer with its output projections divided by the product of the scales up to it."""
    prefix = arch.layers + "."
    lead = checkpoints[recipe.models[recipe.lead_name]]
    for name in lead.names():
        if not name.startswith(prefix):
            yield name, lead.get(name, dtype)
    product = 1.0
    for k, step in enumerate(recipe.path):
        product *= step.scale
        ckpt = checkpoints[recipe.models[step.model]]
        own = f"{prefix}{step.layer}."
        for name in ckpt.names():
            if not name.startswith(own):
                continue
            suffix = name[len(own):]
            t = ckpt.get(name, torch.float64 if product != 1.0 else dtype)
            if product != 1.0 and any(suffix.startswith(o) for o in arch.outputs):
                t = t / product
            yield f"{prefix}{k}.{suffix}", t.to(dtype)


def path_config(recipe: PathRecipe, configs: dict[str, dict], out_dtype: str) -> dict:
    config = dict(configs[recipe.lead_name])
    config["num_hidden_layers"] = len(recipe.path)
    if config.get("layer_types"):
        config["layer_types"] = [(configs[s.model].get("layer_types") or config["layer_types"])[s.layer]
                                 for s in recipe.path]
    if config.get("max_window_layers") is not None:  # qwen2: layers from this index on use sliding windows
        config["max_window_layers"] = min(config["max_window_layers"], len(recipe.path))
    config.pop("auto_map", None)  # the export is a stock architecture: nothing to import from the folder
    config["dtype"] = config["torch_dtype"] = out_dtype
    return config


def export_path(recipe: PathRecipe, out_dir: str | Path, *, shard_size: str | int = "5GB", overwrite: bool = False,
                protect=(), allow_pickle: bool = False, extra_files: dict[str, str] | None = None) -> Path:
    """Write the path as a plain model folder (scales folded; `num_hidden_layers` = len(path))."""
    from evomerge.checkpoint import Checkpoint, check_output_folder, parse_size, read_config, resolve_model_path, write_model
    from evomerge.models import resolve_ref
    from evomerge.recipe import DTYPES

    parse_size(shard_size)
    refs = {name: resolve_ref(ref) for name, ref in recipe.models.items()}
    check_output_folder(out_dir, overwrite, protect=[*protect, *refs.values()])
    paths = {ref: resolve_model_path(ref) for ref in set(refs.values())}
    configs = {name: read_config(paths[ref]) for name, ref in refs.items()}
    recipe.check_layers(configs)
    arch = path_arch(configs[recipe.lead_name].get("model_type", "llama"), recipe.lead_name)
    resolved = PathRecipe(refs, recipe.path, recipe.lead_name, recipe.dtype, recipe.out_dtype)
    checkpoints = {ref: Checkpoint(path, allow_pickle=allow_pickle) for ref, path in paths.items()}
    out_dtype = recipe.out_dtype or recipe.dtype
    tensors = dict(folded_tensors(resolved, checkpoints, arch, DTYPES[out_dtype]))
    lead_path = paths[refs[recipe.lead_name]]
    return write_model(out_dir, tensors, path_config(recipe, configs, out_dtype), config_source=lead_path,
                       tokenizer_source=lead_path, shard_size=shard_size,
                       extra_files={"evomerge_recipe.yaml": recipe.to_yaml(), **(extra_files or {})},
                       overwrite=overwrite, protect=[*protect, *refs.values()])


class PathMaterializer:
    """The worker's materializer for path recipes (`materializer: path`): the first source leads."""

    def __init__(self, spec, tokenizer=None):
        self.bank = PathBank(spec.sources, spec.sources[0], spec.dtype, spec.device, tokenizer)
        self.tokenizer = self.bank.tokenizer

    @classmethod
    def create(cls, spec, tokenizer=None) -> "PathMaterializer":
        return cls(spec, tokenizer)

    def materialize(self, recipe: dict) -> torch.nn.Module:
        return self.bank.materialize(PathRecipe.from_dict(recipe))
