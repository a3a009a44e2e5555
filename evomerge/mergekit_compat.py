"""Read a mergekit YAML config as an evomerge Recipe (for the methods both tools share).

mergekit's `models:` form maps one to one: per-model `parameters`, global `parameters`, gradient
lists (`weight: [a, b]`) and `filter:` conditionals (first matching entry wins) all mean the same
thing here. The `slices:` form is accepted when it is one slice spanning every layer of every
model, which is the `models:` form spelled longhand; a partial `layer_range` (which would drop or
stack layers: data-flow merging) is refused with one line rather than merged whole in silence.
"""

from __future__ import annotations

from typing import Any

from evomerge.checkpoint import read_config, resolve_model_path
from evomerge.errors import EvomergeError
from evomerge.methods import METHODS
from evomerge.recipe import Recipe

SHARED_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs",
                  "breadcrumbs_ties", "slerp", "model_stock", "della", "della_linear", "sce", "nuslerp", "multislerp",
                  "karcher")
_IGNORED = {"int8_mask"}  # changes mergekit's memory use, not the merged values


def is_mergekit_config(data: Any) -> bool:
    return isinstance(data, dict) and "merge_method" in data


def _ref(model: Any, where: str) -> str:
    if isinstance(model, dict):  # mergekit's expanded ModelReference {model: {path: ...}}
        model = model.get("model", {}).get("path") if isinstance(model.get("model"), dict) else model.get("path")
    if not isinstance(model, str) or not model:
        raise EvomergeError(f"{where}: model {model!r} is not a model path")
    text = model
    if "+" in text:
        raise EvomergeError(f"{where}: {text!r} applies a LoRA (model+lora); merge the adapter into the model first")
    return text


def _layer_count(model: str) -> int | None:
    config = read_config(resolve_model_path(model))
    config = config.get("text_config") or config
    for key in ("num_hidden_layers", "n_layer", "num_layers"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def _check_full_range(source: Any, where: str) -> None:
    """A slice source must span its whole model: a partial range would change the layer count."""
    if not isinstance(source, dict) or "model" not in source:
        raise EvomergeError(f"{where}: needs a 'model' and a 'layer_range'")
    rng = source.get("layer_range")
    if rng is None:
        return
    model = _ref(source["model"], where)
    layers = _layer_count(model)
    if not (isinstance(rng, list) and len(rng) == 2) or layers is None or list(rng) != [0, layers]:
        raise EvomergeError(
            f"{where}: layer_range {rng} of {model} is not its full range [0, {layers}]; evomerge merges whole "
            f"models (a partial range drops or stacks layers, which is data-flow merging): use [0, {layers}] "
            "or the 'models:' form"
        )


def _setting(value: Any, where: str) -> Any:
    """mergekit conditionals [{filter, value}] become evomerge rules; scalars and gradients pass through."""
    if isinstance(value, dict):
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        rules = []
        for v in value:
            if "value" not in v:
                raise EvomergeError(f"{where}: conditional {v} has no 'value'; write {{filter: ..., value: ...}}")
            rule = {"value": _setting(v["value"], where)}
            if v.get("filter") not in (None, "*"):
                rule["filter"] = v["filter"]
            rules.append(rule)
        return rules
    return value


def _params(params: Any, where: str) -> dict:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise EvomergeError(f"{where} must be a mapping like {{weight: 0.5}}, got {params!r}")
    return {k: _setting(v, f"{where}.{k}") for k, v in params.items() if k not in _IGNORED}


def from_mergekit(data: dict, origin: str = "mergekit config") -> Recipe:
    method = data.get("merge_method")
    if not isinstance(method, str) or method not in SHARED_METHODS:
        known = ", ".join(SHARED_METHODS)
        if method in METHODS:
            known = method
        raise EvomergeError(f"{origin}: merge_method {method!r} is not one evomerge shares with mergekit; use one of: {known}")
    base = _ref(data["base_model"], origin) if data.get("base_model") else None
    if data.get("modules"):
        raise EvomergeError(f"{origin}: 'modules' configs are not supported; use 'models:' (or one full-range slice)")
    models = data.get("models")
    if models is None and data.get("slices"):
        slices = data["slices"]
        if not isinstance(slices, list) or len(slices) != 1 or not isinstance(slices[0], dict) \
                or slices[0].get("parameters") or slices[0].get("base_model"):
            raise EvomergeError(
                f"{origin}: several slices stack layers (data-flow merging); evomerge merge takes one "
                "full-range slice or the 'models:' form"
            )
        models = []
        for i, s in enumerate(slices[0].get("sources") or []):
            _check_full_range(s, f"{origin}: slices[0].sources[{i}]")
            models.append({"model": s.get("model"), "parameters": s.get("parameters")})
    if not models:
        raise EvomergeError(f"{origin}: no 'models:' list")
    if not isinstance(models, list):
        raise EvomergeError(f"{origin}: 'models' must be a list of {{model: PATH, parameters: {{...}}}}")
    models = [{"model": m} if isinstance(m, str) else m for m in models]
    for i, m in enumerate(models):
        if not isinstance(m, dict) or "model" not in m:
            raise EvomergeError(f"{origin}: models[{i}] needs a 'model' path")
    for key in ("tokenizer", "chat_template"):
        if data.get(key):
            raise EvomergeError(f"{origin}: '{key}' is not supported; drop it and set tokenizer_source instead")
    tok = data.get("tokenizer_source")
    if tok == "union":
        raise EvomergeError(f"{origin}: tokenizer_source 'union' is not supported; use 'base' or a model path")
    sources = []
    for i, m in enumerate(models):
        ref = _ref(m.get("model"), f"{origin}: models[{i}]")
        if base is not None and ref == base and method != "linear":
            continue  # the base's own parameters are ignored by mergekit for these methods
        sources.append({"model": ref, "parameters": _params(m.get("parameters"), f"{origin}: models[{i}].parameters")})
    recipe = {
        "method": method,
        "base": base,
        "sources": sources,
        "parameters": _params(data.get("parameters"), f"{origin}: parameters"),
        "dtype": data.get("dtype") or "float32",
        "out_dtype": data.get("out_dtype"),
        "tokenizer_source": None if tok in (None, "base") else _ref(tok, origin),
    }
    return Recipe.from_dict(recipe, origin=origin)


# -- evomerge -> mergekit ---------------------------------------------------------------------------


def to_mergekit(recipe: Recipe, allow_pickle: bool = False) -> dict:
    """A mergekit config that rebuilds the recipe's weights (exactly, for the deterministic methods).

    Every parameter is resolved per tensor of the reference model, as the merge resolves it, and
    written as mergekit settings: a constant where it is one, else conditionals on name prefixes
    (a whole block, a family inside a block, one tensor), the most specific first because mergekit
    takes the first filter that is a substring of the tensor's name. The result is checked by
    replaying mergekit's rule against every tensor name before it is returned.
    """
    from evomerge.architecture import count_blocks
    from evomerge.bank import merged_roles
    from evomerge.checkpoint import Checkpoint

    method = recipe.merge_method
    if method.name not in SHARED_METHODS:
        raise EvomergeError(f"method {method.name!r} has no mergekit counterpart; mergekit shares "
                            f"{', '.join(SHARED_METHODS)}")
    if recipe.component:
        raise EvomergeError("a component merge (part of the base replaced) has no mergekit form; mergekit merges "
                            "whole models")
    ckpt = Checkpoint(recipe.base or recipe.sources[0].model, allow_pickle=allow_pickle)
    roles = merged_roles(ckpt.names(), ckpt.model_type, None)
    blocks = count_blocks([n for n, _ in roles], ckpt.model_type)
    resolved = {name: recipe.resolve(role, name, blocks) for name, role in roles}

    def setting(value_of) -> Any:
        return _as_setting({name: value_of(shared, per_source) for name, (shared, per_source) in resolved.items()})

    models = [{"model": s.model, **({"parameters": params} if params else {})}
              for i, s in enumerate(recipe.sources)
              for params in [{k: setting(lambda sh, ps, k=k, i=i: ps[i][k]) for k in method.source_params}]]
    config: dict = {"merge_method": method.name}
    if method.needs_base or (method.direct and recipe.base):  # nuslerp, multislerp, karcher: a base is optional
        config["base_model"] = recipe.base
        if method.name == "slerp":  # mergekit's slerp lists the base among its two models
            models.insert(0, {"model": recipe.base})
    config["models"] = models
    shared = {k: setting(lambda sh, ps, k=k: sh[k]) for k in method.shared_params}
    if shared:
        config["parameters"] = shared
    config["dtype"] = recipe.dtype
    if recipe.out_dtype:
        config["out_dtype"] = recipe.out_dtype
    if recipe.tokenizer_source:
        config["tokenizer_source"] = recipe.tokenizer_source
    return config


def _as_setting(values: dict[str, Any]) -> Any:
    """Per-tensor values -> a constant, or conditionals whose first substring match gives every tensor its value."""
    distinct = list(dict.fromkeys(values.values()))
    if len(distinct) == 1:
        return _plain(distinct[0])
    rules = _prefix_rules(values)
    if _replay(rules, values):
        return rules
    # Whole names, longest first: a name can only be a substring of a longer one, so each tensor
    # meets its own rule before any other that matches it.
    return [{"filter": n, "value": _plain(values[n])} for n in sorted(values, key=len, reverse=True)]


def _prefix_rules(values: dict[str, Any]) -> list[dict]:
    """Rules on dotted-name prefixes: one wherever a subtree's tensors agree on a value that differs from
    the value the enclosing rule gives, ordered deepest first, ending with the most common value."""
    from collections import Counter

    parts = {n: tuple(n.split(".")) for n in values}
    rules: list[tuple[float, str, Any]] = []

    def visit(prefix: tuple, names: list[str], inherited: Any) -> None:
        common = Counter(values[n] for n in names).most_common(1)[0][0]
        dotted = ".".join(prefix)
        if common != inherited:
            rules.append((len(prefix), dotted if names == [dotted] else dotted + ".", common))
        if all(values[n] == common for n in names):
            return
        if dotted in values and values[dotted] != common:  # a tensor named like the prefix of others
            rules.append((len(prefix) + 0.5, dotted, values[dotted]))
        children: dict[tuple, list[str]] = {}
        for n in names:
            if n != dotted:
                children.setdefault(parts[n][:len(prefix) + 1], []).append(n)
        for child, below in children.items():
            visit(child, below, common)

    default = Counter(values.values()).most_common(1)[0][0]
    tops: dict[tuple, list[str]] = {}
    for n in values:
        tops.setdefault(parts[n][:1], []).append(n)
    for top, names in tops.items():
        visit(top, names, default)
    rules.sort(key=lambda r: -r[0])  # stable: deeper (more specific) prefixes first
    return [{"filter": text, "value": _plain(v)} for _, text, v in rules] + [{"value": _plain(default)}]


def _replay(rules: list[dict], values: dict[str, Any]) -> bool:
    """mergekit's resolution (the first rule without a filter or whose filter is in the name) gives each value."""
    for name, want in values.items():
        hit = next(r for r in rules if "filter" not in r or r["filter"] in name)
        if hit["value"] != _plain(want):
            return False
    return True


def _plain(value: Any) -> Any:
    """A YAML-friendly scalar (numpy and torch numbers become Python ones)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return value
    return float(value)
