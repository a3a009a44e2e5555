"""The Recipe: a plain, serializable description of one merge, and how its parameters resolve.

    method: dare_ties
    base: ./models/base
    sources:
      - model: ./models/math
        parameters: {weight: 0.6, density: 0.5}
      - model: ./models/code
        parameters:
          weight: [0.2, 0.8]            # a gradient over blocks (embeddings and head take the first value)
          density:
            - {family: attention, value: 0.4}
            - {group: block.0, value: 0.9}
            - {value: 0.6}              # rules are tried in order; the first match wins
    parameters: {normalize: false}      # shared parameters, and defaults for per-source ones
    seed: 0
    dtype: float32                      # compute dtype
    out_dtype: bfloat16                 # written dtype (defaults to dtype)

A parameter value is a number, a list of numbers (a gradient across blocks: block i of L takes
the list interpolated at i/(L-1); embeddings, final norm and head take position 0), or a list of
rules, each with `value` and any of `group` (e.g. "embeddings", "block.3", "lm_head"),
`family` ("attention", "mlp", "norm", "embedding", "head") and `filter` (a substring of the
tensor name). A source's own setting beats the recipe-wide one, which beats the method default.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

import torch
import yaml

from evomerge.architecture import FAMILIES, TensorRole
from evomerge.errors import EvomergeError, close_match, is_count, is_number
from evomerge.methods import MergeMethod, Param, get_method

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
_RULE_KEYS = {"value", "group", "family", "filter"}
_GROUP = re.compile(r"^(embeddings|block\.\d+|final_norm|lm_head|other)$")
FIELDS = ("method", "sources", "base", "parameters", "seed", "dtype", "out_dtype", "tokenizer_source", "component")


@dataclass
class Source:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    method: str
    sources: list[Source]
    base: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = "float32"
    out_dtype: str | None = None
    tokenizer_source: str | None = None  # a model path; defaults to the base (else the first source)
    # Component merge: {base-name prefix: source-name prefix}. Only base tensors under one of these
    # prefixes are merged (reading the sources' tensors under the mapped names); all other base tensors
    # are kept bit for bit. EvoVLM-JP: {"language_model.": ""} merges a standalone LLM into LLaVA's
    # language model and leaves the vision tower and projector untouched.
    component: dict[str, str] | None = None

    # -- serialization ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: v for k, v in d.items() if v not in (None, {}, [])}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict, origin: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise EvomergeError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
        unknown = [k for k in data if k not in FIELDS]
        if unknown:
            raise EvomergeError(f"{origin}: unknown field(s) {sorted(map(str, unknown))}; allowed: {sorted(FIELDS)}"
                                f"{close_match(unknown[0], FIELDS)}")
        if "method" not in data:
            raise EvomergeError(f"{origin}: missing field 'method'")
        sources = data.get("sources")
        if not isinstance(sources, list) or not sources:
            raise EvomergeError(f"{origin}: 'sources' must be a non-empty list of {{model: PATH, parameters: {{...}}}}")
        parsed = []
        for i, s in enumerate(sources):
            if isinstance(s, str):
                s = {"model": s}
            if not isinstance(s, dict) or not isinstance(s.get("model"), str):
                raise EvomergeError(f"{origin}: sources[{i}] needs a 'model' path")
            extra = set(s) - {"model", "parameters"}
            if extra:
                raise EvomergeError(f"{origin}: sources[{i}] has unknown field(s) {sorted(extra)}; allowed: model, parameters")
            parsed.append(Source(s["model"], _mapping(s.get("parameters"), f"{origin}: sources[{i}].parameters")))
        seed = data.get("seed", 0)
        if not is_count(seed, 0, 2**31 - 2):
            raise EvomergeError(f"{origin}: seed {str(seed)[:40]!r} is not a non-negative integer below 2^31 - 1; "
                                "write e.g. seed: 0")
        for key in ("base", "tokenizer_source", "dtype", "out_dtype"):
            if data.get(key) is not None and not isinstance(data[key], str):
                raise EvomergeError(f"{origin}: {key} must be a string, got {data[key]!r}")
        recipe = cls(
            method=str(data["method"]),
            sources=parsed,
            base=data.get("base"),
            parameters=_mapping(data.get("parameters"), f"{origin}: parameters"),
            seed=seed,
            dtype=data.get("dtype") or "float32",
            out_dtype=data.get("out_dtype") or None,
            tokenizer_source=data.get("tokenizer_source") or None,
            component=_mapping(data.get("component"), f"{origin}: component") or None,
        )
        if "component" in data and data["component"] is not None and not recipe.component:
            raise EvomergeError(f"{origin}: 'component' is empty; map base-name prefixes to source-name prefixes, "
                                "e.g. {'language_model.': ''}, or drop it")
        recipe.validate(origin)
        return recipe

    # -- validation ---------------------------------------------------------------------------

    @property
    def merge_method(self) -> MergeMethod:
        return get_method(self.method)

    def validate(self, origin: str = "recipe") -> None:
        method = self.merge_method
        for key, val in (("dtype", self.dtype), ("out_dtype", self.out_dtype)):
            if val is not None and val not in DTYPES:
                raise EvomergeError(f"{origin}: {key} {val!r} is not supported; choose one of {list(DTYPES)}")
        if self.component is not None:
            if not self.base:
                raise EvomergeError(f"{origin}: 'component' maps sources into a base model; set 'base'")
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.component.items()):
                raise EvomergeError(f"{origin}: 'component' must map base-name prefixes to source-name prefixes, "
                                    "e.g. {'language_model.': ''}")
        if method.needs_base and not self.base:
            raise EvomergeError(f"{origin}: method {method.name!r} needs a 'base' model")
        n = len(self.sources)
        if n < method.min_sources or (method.max_sources is not None and n > method.max_sources):
            want = f"exactly {method.min_sources}" if method.max_sources == method.min_sources else f"at least {method.min_sources}"
            raise EvomergeError(f"{origin}: method {method.name!r} takes {want} source(s) besides the base, got {n}")
        allowed_src = set(method.source_params)
        allowed_shared = set(method.shared_params) | allowed_src
        for key, setting in self.parameters.items():
            if key not in allowed_shared:
                raise EvomergeError(f"{origin}: parameter {key!r} does not apply to {method.name!r}; allowed: {sorted(allowed_shared)}")
            check_setting(setting, (method.shared_params | method.source_params)[key], f"{origin}: parameters.{key}")
        for i, s in enumerate(self.sources):
            for key, setting in s.parameters.items():
                if key not in allowed_src:
                    raise EvomergeError(
                        f"{origin}: sources[{i}].parameters.{key} does not apply to {method.name!r}; "
                        f"per-source parameters: {sorted(allowed_src) or 'none'}"
                    )
                check_setting(setting, method.source_params[key], f"{origin}: sources[{i}].parameters.{key}")
            for key, spec in method.source_params.items():
                if spec.default is None and key not in s.parameters and key not in self.parameters:
                    raise EvomergeError(f"{origin}: sources[{i}] ({s.model}) has no {key!r}; set it on the source or under parameters")
        for key, spec in method.shared_params.items():
            if spec.default is None and key not in self.parameters:
                raise EvomergeError(f"{origin}: method {method.name!r} needs parameters.{key}")

    # -- resolution ---------------------------------------------------------------------------

    def resolve(self, role: TensorRole, name: str, num_blocks: int) -> tuple[dict, list[dict]]:
        """(shared parameters, per-source parameters) for one tensor."""
        method = self.merge_method
        t = role.block / (num_blocks - 1) if role.block is not None and num_blocks > 1 else (1.0 if role.block is not None else 0.0)
        shared = {k: _resolve([self.parameters], k, spec, role, name, t) for k, spec in method.shared_params.items()}
        per_source = [
            {k: _resolve([s.parameters, self.parameters], k, spec, role, name, t) for k, spec in method.source_params.items()}
            for s in self.sources
        ]
        return shared, per_source


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise EvomergeError(f"{where} must be a mapping like {{weight: 0.5}}, got a {type(value).__name__}: {value!r}")
    return dict(value)


def _is_scalar(v: Any) -> bool:
    return isinstance(v, (int, float, bool)) and not isinstance(v, str)


def check_setting(setting: Any, spec: Param, where: str) -> None:
    """A parameter setting (number, gradient or rules) is well formed, finite and in range."""
    def check_scalar(v: Any) -> None:
        if spec.kind is bool:
            if not isinstance(v, bool):
                raise EvomergeError(f"{where}: expected true or false, got {v!r}")
            return
        if not _is_scalar(v) or isinstance(v, bool):
            raise EvomergeError(f"{where}: expected a number, got {v!r}")
        if not is_number(v):
            raise EvomergeError(f"{where}: {str(v)[:40]} is not a finite number; give a value in [{spec.low}, {spec.high}]")
        if (spec.low is not None and v < spec.low) or (spec.high is not None and v > spec.high):
            raise EvomergeError(f"{where}: {v} is out of range; allowed [{spec.low}, {spec.high}]")

    if isinstance(setting, list):
        if not setting:
            raise EvomergeError(f"{where}: empty list; give a number, a gradient [a, b, ...] or rules")
        if all(isinstance(r, dict) for r in setting):
            for r in setting:
                bad = set(r) - _RULE_KEYS
                if bad or "value" not in r:
                    raise EvomergeError(f"{where}: rule {r} needs 'value' and only {sorted(_RULE_KEYS)}")
                _check_selectors(r, where)
                check_setting(r["value"], spec, where)
            return
        for v in setting:
            check_scalar(v)
        return
    if isinstance(setting, dict):
        check_setting([setting], spec, where)
        return
    check_scalar(setting)


def _check_selectors(rule: dict, where: str) -> None:
    """Selectors are spelled as evomerge knows them (whether they match a tensor is checked against the model)."""
    family, group, flt = rule.get("family"), rule.get("group"), rule.get("filter")
    if family is not None and family not in FAMILIES:
        raise EvomergeError(f"{where}: rule family {family!r} does not exist; families: {', '.join(FAMILIES)}"
                            f"{close_match(family, FAMILIES)}")
    if group is not None and not (isinstance(group, str) and _GROUP.match(group)):
        raise EvomergeError(f"{where}: rule group {group!r} does not exist; groups are embeddings, block.<i>, "
                            "final_norm, lm_head")
    if flt is not None and not isinstance(flt, str):
        raise EvomergeError(f"{where}: rule filter {flt!r} must be a substring of tensor names")


def _rules(setting: Any) -> list[dict]:
    if isinstance(setting, dict):
        return [setting]
    if isinstance(setting, list) and setting and all(isinstance(r, dict) for r in setting):
        return setting
    return []


def _matches(rule: dict, role: TensorRole, name: str) -> bool:
    if "group" in rule and rule["group"] != role.group:
        return False
    if "family" in rule and rule["family"] != role.family:
        return False
    if "filter" in rule and rule["filter"] not in ("*", None) and rule["filter"] not in name:
        return False
    return True


def unmatched_selectors(recipe: Recipe, tensors: Iterable[tuple[str, TensorRole]]) -> str | None:
    """A description of the first rule whose selectors match no tensor of the model, else None.

    A rule that matches nothing is a typo (`family: attn`, `group: block.99`) that would
    otherwise be ignored in silence.
    """
    tensors = list(tensors)
    scopes = [("parameters", recipe.parameters)] + [(f"sources[{i}].parameters", s.parameters)
                                                     for i, s in enumerate(recipe.sources)]
    for where, params in scopes:
        for key, setting in params.items():
            for rule in _rules(setting):
                if len(set(rule) & {"group", "family", "filter"}) == 0:
                    continue
                if not any(_matches(rule, role, name) for name, role in tensors):
                    groups = list(dict.fromkeys(role.group for _, role in tensors))
                    selector = {k: v for k, v in rule.items() if k != "value"}
                    return (f"{where}.{key}: rule {selector} matches no tensor of the model "
                            f"(groups: {_span(groups)}); fix the selector or drop the rule")
    return None


def _span(groups: list[str]) -> str:
    """'embeddings, block.0-31, final_norm, lm_head' (in model order)."""
    blocks = [g for g in groups if g.startswith("block.")]
    order = ["embeddings"] + ([f"block.0-{len(blocks) - 1}"] if blocks else []) + ["final_norm", "lm_head", "other"]
    return ", ".join(g for g in order if g in groups or g.startswith("block."))


def _evaluate(setting: Any, role: TensorRole, name: str, t: float) -> Any:
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if setting and all(isinstance(r, dict) for r in setting):
            for r in setting:
                if _matches(r, role, name):
                    value = _evaluate(r["value"], role, name, t)
                    if value is not None:  # nested rules that match nothing fall through to the next rule
                        return value
            return None
        if any(isinstance(v, bool) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        i0 = int(scaled)
        i1 = min(len(setting) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * setting[i0] + frac * setting[i1]
    return setting


def _resolve(scopes: list[dict], key: str, spec: Param, role: TensorRole, name: str, t: float) -> Any:
    for scope in scopes:
        if key in scope:
            value = _evaluate(scope[key], role, name, t)
            if value is not None:
                return value
    if spec.default is None:
        raise EvomergeError(f"parameter {key!r} has no value for tensor {name}; add a rule without a selector as a default")
    return spec.default
