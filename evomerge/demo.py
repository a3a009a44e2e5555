"""The built-in demo: a tiny model family trained locally, then a real merge campaign over it.

The family (cached under $EVOMERGE_CACHE or ~/.cache/evomerge): a 4-layer Llama with a character
vocabulary, pre-trained mostly on copying strings with a little of three other skills (reverse,
sort, shift letters), then three experts fine-tuned from it, one per skill, with a small
learning rate and replay of the other tasks so that their task vectors stay small enough to add.
Each expert is best at its own skill; the campaign searches merge weights that keep all three.
Everything runs on CPU in a few minutes; no download.
"""

from __future__ import annotations

import copy
import json
import os
import random
import time
from pathlib import Path

import torch

from evomerge.errors import EvomergeError

FAMILY_VERSION = "demo-v1"
SKILLS = ("reverse", "sort", "shift")
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "experiments" / "demo.yaml"
# Rows the report adds beside the parameter-space winner: a data-flow search and PS+DFS.
DATAFLOW_CONFIGS = {"dfs": DEMO_CONFIG.with_name("demo_dfs.yaml"), "hybrid": DEMO_CONFIG.with_name("demo_hybrid.yaml")}

# Measured on 2 CPU cores: ~40 s for the base, ~15 s per expert.
BASE_STEPS, BASE_LR, BASE_MIX = 800, 3e-3, {"copy": 0.88, "reverse": 0.04, "sort": 0.04, "shift": 0.04}
EXPERT_STEPS, EXPERT_LR = 300, 5e-4
BATCH = 64


def cache_root() -> Path:
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge"))


def family_dir() -> Path:
    return cache_root() / FAMILY_VERSION


MEMBERS = ("base", *SKILLS)
ARCH = dict(hidden=64, layers=4, intermediate=128, heads=4)


def describe_member(member: str):
    """Config and tensor shapes of a family member, from a model on the meta device (nothing trained)."""
    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.models import ModelInfo
    from evomerge.tiny import tiny_config

    config = tiny_config("llama", **ARCH)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return ModelInfo(f"builtin:demo/{member}", family_dir() / member, config.to_dict(), shapes, 4)


def _tokenizer():
    from evomerge.tiny import char_tokenizer

    return char_tokenizer()


def ensure_family(progress: bool = True) -> Path:
    from evomerge.models import build_once

    return build_once(family_dir(), lambda tmp: train_family(tmp, progress=progress), FAMILY_VERSION)


def _register() -> None:
    from evomerge.models import register_cached

    register_cached("demo", MEMBERS, family_dir, ensure_family, describe_member, _tokenizer)


_register()


def _loss(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    nxt = torch.roll(batch.input_ids, -1, 1)
    return torch.nn.functional.cross_entropy(logits[batch.target_mask], nxt[batch.target_mask])


def _train(model, tokenizer, train_sets, mix: dict[str, float], steps: int, lr: float, seed: int, bar=None) -> None:
    from evomerge.evaluators.synthetic import encode

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tasks, weights = list(mix), list(mix.values())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = 50
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * max(0.05, 1 - s / steps))
    model.train()
    for _ in range(steps):
        pairs = [rng.choice(train_sets[rng.choices(tasks, weights)[0]]) for _ in range(BATCH)]
        loss = _loss(model, encode(tokenizer, pairs))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if bar is not None:
            bar.update(1)
    model.eval()


def train_family(root: Path, progress: bool = True) -> dict[str, Path]:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM

    from evomerge.evaluators.synthetic import TASKS, examples
    from evomerge.tiny import char_tokenizer, save_model, tiny_config

    torch.manual_seed(0)
    tokenizer = char_tokenizer()
    train_sets = {t: examples(t, "train", 3000) for t in TASKS}
    base = AutoModelForCausalLM.from_config(tiny_config("llama", **ARCH))
    bar = tqdm(total=BASE_STEPS + EXPERT_STEPS * len(SKILLS), desc="training the demo family", unit="step",
               disable=not progress, dynamic_ncols=True, mininterval=1.0)
    with bar:
        _train(base, tokenizer, train_sets, BASE_MIX, BASE_STEPS, BASE_LR, seed=0, bar=bar)
        paths = {"base": save_model(base, root / "base", tokenizer)}
        for i, skill in enumerate(SKILLS):
            expert = copy.deepcopy(base)
            mix = {"copy": 0.2, **{s: 0.1 for s in SKILLS}}
            mix[skill] = 0.6  # its own skill, with replay of everything else
            _train(expert, tokenizer, train_sets, mix, EXPERT_STEPS, EXPERT_LR, seed=1 + i, bar=bar)
            paths[skill] = save_model(expert, root / skill, tokenizer)
    return paths


# -- the demo campaign and its report --------------------------------------------------------


def run_demo(out: str | Path, budget: int | None = None, config: str | Path | None = None, progress: bool = True) -> dict:
    from evomerge.campaign import CampaignRunner
    from evomerge.config import parse_campaign
    from evomerge.view import winner_of
    from evomerge.errors import read_document

    config_path = Path(config) if config else DEMO_CONFIG
    if not config_path.exists():
        raise EvomergeError(f"demo config {config_path} not found; run from a source checkout (pip install -e .) or pass --config")
    data = read_document(config_path, "demo config", "campaign YAML file")
    if not isinstance(data, dict):
        raise EvomergeError(f"{config_path}: expected a campaign config (a mapping) at the top level")
    if budget is not None:
        data["budget"] = budget
    campaign = parse_campaign(data, str(config_path))
    objective = campaign.objectives[0]
    held = {m for spec in campaign.holdout for m in _spec_metrics(spec)}
    if not set(objective.metrics) <= held:
        raise EvomergeError(f"{config_path}: the demo's report scores models on the held-out evaluators, which must "
                            f"produce the objective's metrics {sorted(objective.metrics)}; add them under holdout")
    start = time.perf_counter()
    ensure_family(progress=progress)
    runner = CampaignRunner(campaign, out, progress=progress)
    outcome = runner.run()
    if not outcome.front:
        raise EvomergeError(f"no candidate of the demo campaign finished; see `evomerge status {out}`")
    winner = winner_of(outcome.front, objective)

    # The campaign scored the baselines on the held-out split, exactly like its front members.
    rows = dict(runner.journal.get("baselines") or {})
    sources = runner.sources
    for name in [*sources, "uniform", "base"]:
        if "error" in rows.get(name, {"error": "not scored"}):
            raise EvomergeError(f"demo baseline {name!r} could not be scored: {rows.get(name, {}).get('error')}")
    rows["winner"] = winner.holdout
    if config is None:  # the built-in demo also searches layer paths, alone and after the PS search
        rows.update(_dataflow_rows(Path(out), objective, progress))
    wall = time.perf_counter() - start

    summary = {
        "objective": objective.name,
        "holdout": {
            "winner": rows["winner"][objective.name],
            "uniform": rows["uniform"][objective.name],
            "sources": {n: rows[n][objective.name] for n in sources},
            "base": rows["base"][objective.name],
            **{k: rows[k][objective.name] for k in DATAFLOW_CONFIGS if k in rows},
        },
        "metrics": rows,
        "winner_id": winner.id,
        "winner_recipe": winner.recipe,
        "evaluated": outcome.evaluated,
        "wall_s": round(wall, 1),
    }
    Path(out, "summary.json").write_text(json.dumps(summary, indent=2))
    print_report(runner.campaign, list(sources), outcome, rows, objective.name, wall)
    return summary


def _dataflow_rows(out: Path, objective, progress: bool) -> dict:
    """Held-out scores of the DFS and PS+DFS winners (their campaigns run in OUT/dfs and OUT/hybrid)."""
    from evomerge.errors import read_document
    from evomerge.hybrid import runner_for
    from evomerge.view import winner_of

    rows = {}
    for label, path in DATAFLOW_CONFIGS.items():
        data = read_document(path, "demo config", "campaign YAML file")
        if progress:
            print(f"\n{label}: {path.name}", flush=True)
        front = runner_for(data, out / label, progress, str(path)).run().front
        best = winner_of(front, objective)
        rows[label] = best.holdout
    return rows


def _spec_metrics(spec: dict) -> set[str]:
    """Metric names a synthetic evaluator spec produces (the demo's report needs them before it runs)."""
    kind, _, name = str(spec.get("task", "")).partition(":")
    return {name} if kind == "synthetic" else ({f"{name}_logprob"} if kind == "synthetic-logprob" else set())


def print_report(campaign, source_names: list[str], outcome, rows: dict, objective: str, wall: float) -> None:
    from evomerge.view import front_lines

    names = list(campaign.objectives[0].metrics)
    print(f"\nafter {outcome.evaluated} candidates, " + "\n".join(front_lines(outcome.front)))
    print(f"\nheld-out scores (split 'holdout', never used for fitness); wall time {wall:.0f} s")
    header = f"  {'model':<10s}" + "".join(f"{n:>10s}" for n in names) + f"{objective:>14s}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name in ["base", *source_names, "uniform", "winner", *(k for k in DATAFLOW_CONFIGS if k in rows)]:
        r = rows[name]
        print(f"  {name:<10s}" + "".join(f"{r[n]:>10.3f}" for n in names) + f"{r[objective]:>14.3f}")
