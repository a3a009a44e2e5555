"""Data-flow-space genome (EvoLLM-JP's DFS): which layer of which model runs next, and at what scale.

Lay out the M layers of the models in order (the lead model first) and repeat the sequence r
times: T = M x r slots. One coordinate per slot says whether the slot is on the path (> 0.5 in
the unit box, i.e. > 0 once centred as in the paper); the path is the sequence of slots that are
on. A scale matrix W scales the hidden state passed from layer i to layer j.

    search_space:
      kind: dfs
      lead: ja             # embeddings, final norm, head and tokenizer come from this source (default: the first)
      repeats: 3           # r
      fix_ends: true       # the path starts with the lead's first layer and ends with its last (the paper's default)
      scales: full         # full: W is M x M (the paper); pairs: one scale per (model, model) pair; none
      scale_range: [0.5, 2.0]   # searched on a log scale; the box centre is 1.0

Why `pairs` when M is large: the scale a transition needs corrects the mismatch between two
models' residual-stream statistics, which is mostly a property of the model pair, not of the
layer pair. Two 32-layer models give a full W of 4,096 coordinates beside 192 slot bits (CMA-ES
learns a covariance over all of them); pairs gives 4. The default is full up to M = 32, pairs above.

The start point follows the lead's own layers (its model exactly, all scales 1). A genome with
no slot on (possible only without fix_ends) decodes to the single slot with the largest value,
so every genome is a model.
"""

from __future__ import annotations

import math

import numpy as np

from evomerge.dataflow import PathRecipe, Step, check_path_models
from evomerge.errors import EvomergeError, check_keys, close_match, is_count, is_number
from evomerge.search_spaces.base import SpaceContext, register_space

KEYS = ("kind", "lead", "repeats", "fix_ends", "scales", "scale_range")
SCALES = ("full", "pairs", "none")
FULL_UP_TO = 32  # layers in the layout; beyond this the default W is `pairs`
ON, OFF = 0.75, 0.25  # start values of slots on and off the lead's own path (sigma0 1/6 flips ~7 % of them)


@register_space("dfs")
class DataFlowSpace:
    kind = "dfs"
    materializer = "path"

    def __init__(self, sources: dict[str, str], layers: dict[str, int], lead: str, repeats: int, fix_ends: bool,
                 scales: str, scale_range: tuple[float, float], dtype: str = "float32"):
        self.sources = {lead: sources[lead], **{k: v for k, v in sources.items() if k != lead}}
        self.lead = lead
        self.repeats = repeats
        self.fix_ends = fix_ends
        self.scales = scales
        self.lo, self.hi = scale_range
        self.dtype = dtype
        self.layout = [(name, i) for name in self.sources for i in range(layers[name])]  # M (model, layer)
        self.lead_layers = layers[lead]
        self.index = {slot: g for g, slot in enumerate(self.layout)}
        self.models = list(self.sources)
        m = len(self.layout)
        self.names = [f"on@{rep}:{name}.{i}" for rep in range(repeats) for name, i in self.layout]
        if scales == "full":
            self.names += [f"scale@{a}.{i}->{b}.{j}" for a, i in self.layout for b, j in self.layout]
        elif scales == "pairs":
            self.names += [f"scale@{a}->{b}" for a in self.models for b in self.models]
        self.slots = m * repeats

    # -- the registered kind ------------------------------------------------------------------

    @classmethod
    def validate(cls, block: dict, where: str = "search_space") -> dict:
        check_keys(block, KEYS, where)
        repeats = block.get("repeats", 1)
        if not is_count(repeats, 1, 64):
            raise EvomergeError(f"config field '{where}.repeats': bad value {repeats!r}; allowed: an integer from 1 "
                                "to 64 (how many times the layer layout repeats; the paper used 3)")
        fix_ends = block.get("fix_ends", True)
        if not isinstance(fix_ends, bool):
            raise EvomergeError(f"config field '{where}.fix_ends': bad value {fix_ends!r}; allowed: true, false")
        scales = block.get("scales", "auto")
        if scales != "auto" and not (isinstance(scales, str) and scales in SCALES):
            raise EvomergeError(f"config field '{where}.scales': bad value {scales!r}; allowed: auto, "
                                f"{', '.join(SCALES)}{close_match(scales, SCALES)}")
        rng = block.get("scale_range", [0.5, 2.0])
        ok = isinstance(rng, list) and len(rng) == 2 and all(is_number(v) for v in rng) and 0 < rng[0] <= 1 <= rng[1] \
            and rng[0] < rng[1]
        if not ok:
            raise EvomergeError(f"config field '{where}.scale_range': bad value {rng!r}; allowed: [low, high] with "
                                "0 < low <= 1 <= high, low < high (searched on a log scale around 1)")
        lead = block.get("lead")
        if lead is not None and not isinstance(lead, str):
            raise EvomergeError(f"config field '{where}.lead': bad value {lead!r}; allowed: a source name")
        out = dict(block, kind="dfs", repeats=repeats, fix_ends=fix_ends, scales=scales, scale_range=rng)
        return out

    @classmethod
    def build(cls, block: dict, ctx: SpaceContext) -> "DataFlowSpace":
        if ctx.base is not None:
            raise EvomergeError("config field 'base': a dfs search space runs layers of the sources and never "
                                "reads a base model; drop base (or search parameters with kind: ps)")
        lead = block.get("lead") or next(iter(ctx.sources))
        if lead not in ctx.sources:
            raise EvomergeError(f"config field 'search_space.lead': {lead!r} is not a source "
                                f"({', '.join(ctx.sources)}){close_match(lead, ctx.sources)}")
        configs = {name: ctx.models[f"sources.{name}"].config for name in ctx.sources}
        try:
            check_path_models(configs, lead, "config field 'sources'")
        except EvomergeError as exc:
            raise EvomergeError(str(exc)) from None
        layers = {name: int(cfg.get("num_hidden_layers", 0)) for name, cfg in configs.items()}
        if layers[lead] < (2 if block["fix_ends"] else 1):
            raise EvomergeError(f"config field 'search_space.fix_ends': {lead} has {layers[lead]} layer(s); fixed "
                                "ends need a first and a last layer: set fix_ends: false")
        m = sum(layers.values())
        scales = block["scales"]
        if scales == "auto":
            scales = "full" if m <= FULL_UP_TO else "pairs"
        return cls(ctx.sources, layers, lead, block["repeats"], block["fix_ends"], scales,
                   tuple(block["scale_range"]), ctx.dtype)

    # -- the SearchSpace interface ------------------------------------------------------------

    @property
    def reference_name(self) -> str:
        return f"sources.{self.lead}"

    @property
    def dim(self) -> int:
        return len(self.names)

    def _scale_x(self, scale: float) -> float:
        return math.log(scale / self.lo) / math.log(self.hi / self.lo)

    @property
    def x0(self) -> np.ndarray:
        x = np.full(self.dim, self._scale_x(1.0))
        x[: self.slots] = OFF
        own = range(1, self.lead_layers - 1) if self.fix_ends else range(self.lead_layers)
        for i in own:
            x[self.index[(self.lead, i)]] = ON  # the lead's layers in the first repeat
        return x

    sigma0 = 1.0 / 6.0

    def describe(self) -> list[str]:
        m = len(self.layout)
        w = {"full": f"W {m} x {m}", "pairs": f"W per model pair ({len(self.models)} x {len(self.models)})",
             "none": "no scales"}[self.scales]
        return [f"data-flow space: lead {self.lead}; {m} layers x {self.repeats} repeat(s) = {self.slots} slots; {w}; "
                f"scales in [{self.lo:g}, {self.hi:g}]" + ("; ends fixed to the lead" if self.fix_ends else "")]

    def memory(self, models: dict, element: int) -> dict:
        """Every source model resident once; candidates share their weights (KV cache not counted)."""
        total = sum(models[f"sources.{name}"].numel for name in self.sources) * element
        return {"total": total, "detail": f"{len(self.sources)} source model(s) resident, shared by every path"}

    def baselines(self) -> dict[str, dict]:
        """The lead model alone: a path runs in the lead's shell, so no other source is itself in this space."""
        path = [Step(self.lead, i) for i in range(self.lead_layers)]
        return {self.lead: PathRecipe({self.lead: self.sources[self.lead]}, path, self.lead, self.dtype).to_dict()}

    def decode(self, x) -> PathRecipe:
        x = np.clip(np.asarray(x, dtype=float), 0.0, 1.0)
        if x.shape != (self.dim,):
            raise ValueError(f"genome has {x.shape} coordinates, the space has {self.dim}")
        m = len(self.layout)
        on = [t for t in range(self.slots) if x[t] > 0.5]
        chosen = [self.layout[t % m] for t in on]
        if self.fix_ends:
            chosen = [(self.lead, 0), *chosen, (self.lead, self.lead_layers - 1)]
        elif not chosen:
            chosen = [self.layout[int(np.argmax(x[: self.slots])) % m]]
        steps = [Step(chosen[0][0], chosen[0][1])]
        for prev, cur in zip(chosen, chosen[1:]):
            steps.append(Step(cur[0], cur[1], self._scale(x, prev, cur)))
        return PathRecipe(dict(self.sources), steps, self.lead, self.dtype)

    def _scale(self, x: np.ndarray, prev: tuple[str, int], cur: tuple[str, int]) -> float:
        if self.scales == "none":
            return 1.0
        if self.scales == "full":
            m = len(self.layout)
            k = self.slots + self.index[prev] * m + self.index[cur]
        else:
            n = len(self.models)
            k = self.slots + self.models.index(prev[0]) * n + self.models.index(cur[0])
        scale = self.lo * (self.hi / self.lo) ** float(x[k])
        return round(scale, 6) if abs(scale - 1.0) > 1e-9 else 1.0
