"""Pre-flight: everything about a campaign that can be known without reading a tensor, checked first.

Before a campaign loads a weight or writes its config to a journal, pre-flight resolves the
models (their safetensors headers only), checks every source against the base tensor by tensor,
builds the search space and the optimizer, builds the evaluators (tokenizer and data, no model),
checks that fitness and held-out sets share no example and that the objectives' metrics will
exist, and estimates the memory the bank will need. A mistake anywhere is one line naming the
config field; `evomerge run CONFIG --dry-run` prints the resulting plan and stops there.
"""

from __future__ import annotations

import platform
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evomerge.checkpoint import format_size as _size
from evomerge.config import Campaign
from evomerge.errors import EvomergeError
from evomerge.models import ModelInfo, model_info, resolve_ref
from evomerge.worker import FITNESS, HOLDOUT, WorkerSpec


@dataclass
class Plan:
    campaign: Campaign
    base: str | None  # resolved references: what recipes name
    sources: dict[str, str]
    models: dict[str, ModelInfo]  # config field ("base", "sources.<name>") -> what its headers say
    space: Any  # a SearchSpace
    optimizer: Any  # an Optimizer, fresh
    generation_sizes: list[int]
    worker: WorkerSpec
    evaluators: dict[str, list] | None  # built on the reference tokenizer (None: the model is not built yet)
    tokenizer: Any
    memory: dict[str, int]
    provenance: dict

    @property
    def population(self) -> int:
        return self.optimizer.population


def _field(name: str, exc: EvomergeError) -> EvomergeError:
    text = str(exc)
    return exc if text.startswith("config field") else EvomergeError(f"config field '{name}': {text}")


def generation_sizes(budget: int, population: int) -> list[int]:
    """Candidates per generation: full populations, then what is left of the budget (exactly `budget`)."""
    full, rest = divmod(budget, population)
    return [population] * full + ([rest] if rest else [])


def localize(ref: str, root: Path) -> str:
    """A relative local path as an absolute one under `root`; builtins and hub ids as they are."""
    from evomerge.checkpoint import looks_like_hub_id
    from evomerge.models import BUILTIN

    if ref.startswith(BUILTIN):
        return ref
    path = Path(ref).expanduser()
    if path.is_absolute():
        return str(path)
    if (root / path).exists() or not looks_like_hub_id(ref):
        return str((root / path).resolve())
    return ref


def preflight(campaign: Campaign, build: bool = True, root: Path | None = None) -> Plan:
    """The plan of a campaign, or one line naming what is wrong. `build=False` builds no model
    (a built-in family not on disk yet is described from its config) and reads no tensor.
    Relative model paths resolve under `root` (the directory the campaign started in)."""
    from evomerge.devices import check_device
    from evomerge.optimizers import make_optimizer
    from evomerge.search_spaces import SpaceContext, space_kind

    device = campaign.executor.get("device")
    if device is not None:
        try:
            check_device(device)
        except EvomergeError as exc:
            raise _field("executor.device", exc) from None

    root = Path(root or Path.cwd())
    refs = ({"base": campaign.base} if campaign.base else {}) | {f"sources.{n}": r for n, r in campaign.sources.items()}
    models: dict[str, ModelInfo] = {}
    resolved: dict[str, str] = {}
    for name, ref in refs.items():
        try:
            ref = localize(ref, root)
            resolved[name] = resolve_ref(ref, build=build)
            models[name] = model_info(ref)
        except EvomergeError as exc:
            raise _field(name, exc) from None
    seen: dict[Path, str] = {}
    for name, info in models.items():  # one model under two spellings (../fam/x and fam/x) is one source
        if name == "base":
            continue
        if info.path.resolve() in seen:
            raise EvomergeError(f"config field '{name}': {info.ref} is the same model as "
                                f"'{seen[info.path.resolve()]}'; each source must differ")
        seen[info.path.resolve()] = name

    space_block = campaign.search_space
    method_needs_base = _needs_base(space_block)
    base_info = models.get("base")
    for name, info in models.items():
        if name != "base" and base_info is not None and method_needs_base \
                and info.path.resolve() == base_info.path.resolve():
            raise EvomergeError(f"config field '{name}': {info.ref} is the base model itself; its task vector is "
                                "zero, so its parameters could change nothing: drop it from sources")
    reference = models["base" if base_info is not None else next(iter(models))]

    sources = {n: resolved[f"sources.{n}"] for n in campaign.sources}
    base = resolved.get("base")
    # The space checks that the models fit it (tensor by tensor for merges, layer shapes for paths).
    space = space_kind(space_block["kind"]).build(
        space_block, SpaceContext(sources, base, reference, campaign.seed, campaign.dtype, models))
    reference = models[space.reference_name]
    optimizer = make_optimizer(campaign.optimizer, space.dim, len(campaign.objectives), campaign.seed,
                               space.x0, space.sigma0, campaign.budget)
    if optimizer.population > campaign.budget:
        how = "optimizer.population" if campaign.optimizer.get("population") else \
            f"the default population 4 + floor(3 ln {space.dim}) for {space.dim} coordinate(s)"
        raise EvomergeError(f"config field 'budget': {campaign.budget} is smaller than one generation of "
                            f"{optimizer.population} candidates ({how}); raise the budget or set a smaller "
                            "optimizer.population")

    # In the space's order: a path space puts its lead first (its model is the shell paths run in).
    memory = memory_estimate(campaign, models, space, reference)
    bank = memory["plan"].bank_options() if "plan" in memory else {}
    worker = WorkerSpec(list(space.sources.values()), base, campaign.fitness, campaign.holdout, campaign.dtype,
                        device or "cpu", campaign.racing, dict(campaign.objectives[0].metrics),
                        space_block.get("component"), space.materializer, **bank)
    tokenizer, evaluators = _evaluators(campaign, worker, reference)
    return Plan(
        campaign=campaign, base=base, sources=sources, models=models, space=space, optimizer=optimizer,
        generation_sizes=generation_sizes(campaign.budget, optimizer.population), worker=worker,
        evaluators=evaluators, tokenizer=tokenizer, memory=memory, provenance=provenance(models),
    )


def _needs_base(space_block: dict) -> bool:
    from evomerge.methods import METHODS

    method = METHODS.get(space_block.get("method", ""))
    return bool(method and method.needs_base)


def _evaluators(campaign: Campaign, worker: WorkerSpec, reference: ModelInfo) -> tuple[Any, dict | None]:
    from evomerge.evaluate import load_processor
    from evomerge.worker import build_evaluators

    if reference.built:
        tokenizer = load_processor(reference.path)
    else:
        from evomerge.models import builtin_family

        family, _ = builtin_family(reference.ref)
        tokenizer = family.tokenizer() if family.tokenizer else None
        if tokenizer is None:
            return None, None
    evaluators = build_evaluators(worker, tokenizer)
    _check_disjoint(evaluators)
    _check_metrics(campaign, evaluators)
    return tokenizer, evaluators


def _check_disjoint(evaluators: dict[str, list]) -> None:
    """Fitness must never score (or show as exemplars) an example the campaign holds out."""
    held = [(j, ev.examples_key()) for j, ev in enumerate(evaluators[HOLDOUT])]
    for i, ev in enumerate(evaluators[FITNESS]):
        for what, (key, rows) in (("scores", ev.examples_key()),
                                  ("uses as few-shot exemplars", getattr(ev, "exemplar_key", lambda: (None, set()))())):
            for j, (hkey, hrows) in held:
                if key != hkey or (rows is not None and not rows) or (hrows is not None and not hrows):
                    continue
                shared = None if rows is None or hrows is None else rows & hrows
                if shared is None or shared:
                    detail = "the same examples" if shared is None else \
                        f"{len(shared)} example(s) (rows {min(shared)}-{max(shared)} of {key})"
                    raise EvomergeError(f"config field 'fitness[{i}]' {what} {detail} that holdout[{j}] holds out; "
                                        "fitness and held-out data must not overlap: pick disjoint splits")


def _check_metrics(campaign: Campaign, evaluators: dict[str, list]) -> None:
    declared = [ev.metric_names() for ev in evaluators[FITNESS]]
    if all(names is not None for names in declared):
        produced = set().union(*declared)
        missing = sorted(campaign.metric_names - produced)
        if missing:
            raise EvomergeError(f"config field 'objectives': metric(s) {missing} are not produced by the fitness "
                                f"evaluators (they produce {sorted(produced)}); fix 'objectives' or 'fitness'")
    if campaign.racing:
        refused = [ev.race_refusal for ev in evaluators[FITNESS] if getattr(ev, "race_refusal", None)]
        if refused:
            raise EvomergeError(f"config field 'racing': {refused[0]}")
        unbounded = [ev.identity()["task"] for ev in evaluators[FITNESS] if not getattr(ev, "bounded", False)]
        if unbounded:
            raise EvomergeError(f"config field 'racing': fitness task(s) {unbounded} give no per-example scores "
                                "in [0, 1]; racing needs exact-match style tasks (e.g. synthetic:<task>, mgsm)")
        raced = set().union(*(ev.race_metric_names() for ev in evaluators[FITNESS]))
        missing = sorted(campaign.metric_names - raced)
        if missing:
            raise EvomergeError(f"config field 'racing': the objective uses {missing}, which racing does not "
                                f"score example by example (it scores {sorted(raced)}); drop them from the "
                                "objective or turn racing off")


def memory_estimate(campaign: Campaign, models: dict[str, ModelInfo], space, reference: ModelInfo) -> dict:
    """Bytes the worker will hold, as the search space lays them out, in the campaign's dtype; for a
    bank (`layout`), the memory plan too: where the deltas live, or one line saying what does not fit."""
    import torch

    from evomerge.memory_plan import generation_tokens, kv_cache_bytes, plan_memory
    from evomerge.recipe import DTYPES

    element = torch.empty(0, dtype=DTYPES[campaign.dtype]).element_size()
    memory = space.memory(models, element)
    if "layout" not in memory:
        return memory
    device = campaign.executor.get("device") or "cpu"
    local = campaign.executor["kind"] == "local"
    kv = kv_cache_bytes(reference.config, generation_tokens(campaign.fitness + campaign.holdout), element)
    memory["plan"] = plan_memory(memory["layout"], element, kv, device, campaign.bank,
                                 device_capacity=available_memory(device) if local else None,
                                 host_capacity=available_memory("cpu") if local else None, per_worker=not local)
    return memory


def provenance(models: dict[str, ModelInfo]) -> dict:
    """What the journal keeps to tell, on resume, whether the models or the software changed."""
    import torch
    import transformers

    from evomerge import __version__

    return {
        "models": {name: {"ref": info.ref, "path": str(info.path), "fingerprint": info.fingerprint}
                   for name, info in models.items()},
        "versions": {"evomerge": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }


def check_provenance(stored: dict | None, current: dict) -> list[str]:
    """Refuse a resume over models that changed on disk; return notes about changed software versions."""
    if not stored:
        return []
    for name, now in current["models"].items():
        then = stored.get("models", {}).get(name)
        if then and then.get("fingerprint") and now.get("fingerprint") and then["fingerprint"] != now["fingerprint"]:
            raise EvomergeError(f"config field '{name}': {now['ref']} changed on disk since the campaign started "
                                f"(fingerprint {then['fingerprint']} -> {now['fingerprint']}); its old results would "
                                "mix with new ones: restore the model, or start a new campaign in a new --out folder")
    notes = []
    for pkg, version in current["versions"].items():
        old = stored.get("versions", {}).get(pkg)
        if old and old != version:
            notes.append(f"{pkg} {old} -> {version} since the campaign started; resume checks each generation "
                         "against the journal and stops if the results diverge")
    return notes


# -- the dry-run report ---------------------------------------------------------------------------


def available_memory(device: str) -> int | None:
    try:
        if device.startswith("cuda"):
            import torch

            return int(torch.cuda.mem_get_info(torch.device(device))[0])
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, RuntimeError, ValueError):
        return None
    return None


def describe(plan: Plan) -> list[str]:
    c = plan.campaign
    lines = [f"campaign {c.name!r}: {len(c.sources)} source(s)" + (" + base" if c.base else "") + f", seed {c.seed}"]
    lines.append("models (from safetensors headers; no tensor read):")
    for name, info in plan.models.items():
        state = f"fingerprint {info.fingerprint}" if info.built else "not built yet: built on the first run"
        lines.append(f"  {name:<18s} {info.ref}  [{info.model_type}, {info.numel / 1e6:.2f}M parameters, {state}]")
    space = plan.space
    lines.append(f"genome: {space.dim} coordinate(s); " + "; ".join(space.describe()))
    lines += textwrap.wrap(", ".join(space.names), 100, initial_indent="  ", subsequent_indent="  ")
    sizes = plan.generation_sizes
    tail = f" (the last one partial: {sizes[-1]})" if sizes[-1] != plan.population else ""
    lines.append(f"optimizer: {c.optimizer['name']}, population {plan.population}, sigma0 "
                 f"{c.optimizer.get('sigma0', space.sigma0):.3g}")
    lines.append(f"candidates: {c.budget} in {len(sizes)} generation(s){tail}; held-out scoring of up to "
                 f"{c.holdout_max} front member(s)")
    if plan.evaluators is None:
        lines.append("evaluators: checked when the models are built")
    else:
        for role in (FITNESS, HOLDOUT):
            for i, ev in enumerate(plan.evaluators[role]):
                ident = ev.identity()
                lines.append(f"  {role}[{i}]  {ident.get('task')}  split {ident.get('split')}  n={ident.get('n')}")
    for o in c.objectives:
        terms = " + ".join(f"{w:.3g}*{m}" for m, w in o.metrics.items())
        lines.append(f"objective {o.name} = {terms} ({o.direction})")
    if c.racing:
        lines.append(f"racing: stages {c.racing['stages']}, z {c.racing['z']}")
    ex = c.executor
    where = ", ".join(f"{k} {v}" for k, v in ex.items() if k not in ("kind", "retries") and v is not None)
    lines.append(f"executor: {ex['kind']}" + (f" ({where})" if where else "") + "; "
                 + ("generations with a barrier" if c.barrier else "no generation barrier (asked and told one by one)"))
    m = plan.memory
    device = plan.worker.device
    if "plan" in m:
        return lines + m["plan"].lines(c.dtype)
    if ex["kind"] != "local":  # each worker holds its own bank on its own device, wherever Ray places it
        lines.append(f"memory per worker ({c.dtype}): {m['detail']}; total ~{_size(m['total'])}")
        return lines
    avail = available_memory(device)
    lines.append(f"memory on {device} ({c.dtype}): {m['detail']}; total ~{_size(m['total'])}"
                 + (f" of {_size(avail)} available" if avail else ""))
    if avail is not None and m["total"] > avail:
        lines.append(f"warning: the estimate exceeds the {_size(avail)} available on {device}")
    return lines

