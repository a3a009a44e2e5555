"""Campaign loop: exact resume after SIGKILL, optimizer replay, archive math, config errors, CLI."""

import json
import os
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import yaml

from evomerge.archive import front_indices, hypervolume
from killing import run_until
from evomerge.campaign import CampaignRunner
from evomerge.config import Objective, parse_campaign
from evomerge.errors import EvomergeError
from evomerge.journal import Journal
from evomerge.optimizers import make_optimizer
from evomerge.view import campaign_status, front_members


def tiny_config(fam, **over):
    cfg = {
        "name": "tiny",
        "seed": 3,
        "base": str(fam["base"]),
        "sources": {f"e{i}": str(fam[f"expert{i}"]) for i in range(3)},
        "search_space": {"kind": "ps", "method": "ties", "parameters": {"weight": [0.0, 1.0], "density": [0.1, 1.0]},
                         "granularity": "groups"},
        "optimizer": {"name": "cma", "population": 8},
        "budget": 48,
        "objectives": [{"name": "lp", "metrics": ["reverse_logprob", "sort_logprob"], "direction": "maximize"}],
        "fitness": [{"task": "synthetic-logprob:reverse", "split": "fitness", "n": 48},
                    {"task": "synthetic-logprob:sort", "split": "fitness", "n": 48}],
        "holdout": [{"task": "synthetic-logprob:reverse", "split": "holdout", "n": 48},
                    {"task": "synthetic-logprob:sort", "split": "holdout", "n": 48}],
    }
    cfg.update(over)
    return cfg


def write_config(tmp_path, cfg, name="campaign.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg))
    return p


def front_set(folder):
    j = Journal(folder)
    camp = parse_campaign(j.get("config"))
    members = front_members(j, camp)
    j.close()
    return sorted((tuple(m.recipe["sources"][0]["parameters"]["weight"][0].values()), m.id,
                   round(m.objectives["lp"], 10)) for m in members)


def evomerge_cli(*args, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "evomerge", *map(str, args)], capture_output=True, text=True, env=env, **kw)


def test_sigkill_then_resume_loses_nothing_and_ends_on_the_same_front(llama_family, tmp_path):
    cfg = write_config(tmp_path, tiny_config(llama_family))
    # The reference: one uninterrupted run.
    ref_dir = tmp_path / "uninterrupted"
    CampaignRunner(parse_campaign(yaml.safe_load(cfg.read_text())), ref_dir, progress=False).run()

    killed = tmp_path / "killed"
    db = killed / "journal.sqlite"
    _, done_before = run_until(cfg, killed, db, at_least=13, timeout=120)
    assert 13 <= done_before < 48, "the kill must land mid-campaign"

    con = sqlite3.connect(db)
    before = {r[0]: r[1:] for r in con.execute("SELECT id, genome, metrics, finished FROM candidates WHERE status = 'done'")}
    con.close()
    assert campaign_status(killed)["done"] is False

    res = evomerge_cli("resume", killed, "--quiet")
    assert res.returncode == 0, res.stderr

    con = sqlite3.connect(db)
    after = {r[0]: r[1:] for r in con.execute("SELECT id, genome, metrics, finished FROM candidates WHERE status = 'done'")}
    attempts = dict(con.execute("SELECT id, attempts FROM candidates"))
    con.close()
    # Nothing lost, nothing evaluated again: every result from before the kill is untouched.
    for cid, row in before.items():
        assert after[cid] == row
        assert attempts[cid] == 1
    assert len(after) == 48
    # Same final front as the uninterrupted run, member for member.
    assert front_set(killed) == front_set(ref_dir)
    st = campaign_status(killed)
    assert st["done"] and st["evaluated"] == 48 and st["budget"] == 48


@pytest.mark.parametrize("name", ["cma", "nevergrad:TwoPointsDE", "nsga2"])
def test_optimizer_checkpoint_round_trip_by_replay(name):
    n_obj = 2 if name == "nsga2" else 1

    def losses(x):
        return [float(np.sum((x - 0.3) ** 2)), float(np.sum((x - 0.7) ** 2))][:n_obj]

    spec = {"name": name, "population": 6}
    first = make_optimizer(spec, 4, n_obj, 11, np.full(4, 0.5), 1 / 6, 60)
    history = []
    for _ in range(3):
        xs = first.ask()
        ls = [losses(x) for x in xs]
        first.tell(xs, ls)
        history.append((xs, ls))
    saved = first.checkpoint()
    # A fresh optimizer replaying the journaled asks/tells reaches the same state ...
    second = make_optimizer(spec, 4, n_obj, 11, np.full(4, 0.5), 1 / 6, 60)
    for xs, ls in history:
        again = second.ask()
        assert all(np.array_equal(a, b) for a, b in zip(again, xs))
        np.random.rand(5)  # other code using NumPy's global RNG in between must not matter
        second.tell(again, ls)
    assert second.checkpoint() == saved
    # ... and proposes the same next generation.
    assert all(np.array_equal(a, b) for a, b in zip(first.ask(), second.ask()))
    assert json.loads(json.dumps(saved)) == saved  # JSON, not pickle


def test_front_and_hypervolume_on_hand_made_points():
    objs = [Objective("a", {"a": 1.0}, "maximize"), Objective("b", {"b": 1.0}, "maximize")]
    pts = [{"a": 0.8, "b": 0.2}, {"a": 0.5, "b": 0.5}, {"a": 0.2, "b": 0.8}, {"a": 0.3, "b": 0.3}, {"a": 0.1, "b": 0.1}]
    assert front_indices(objs, pts) == [0, 1, 2]
    # Union of the three boxes down to the origin: .16 + .25 + .16 - .1 - .1 - .04 + .04
    assert hypervolume(objs, pts, {"a": 0.0, "b": 0.0}) == pytest.approx(0.37)
    mixed = [Objective("acc", {"acc": 1.0}, "maximize"), Objective("ppl", {"ppl": 1.0}, "minimize")]
    pts = [{"acc": 0.9, "ppl": 12.0}, {"acc": 0.7, "ppl": 8.0}, {"acc": 0.6, "ppl": 9.0}, {"acc": 0.95, "ppl": 20.0}]
    assert front_indices(mixed, pts) == [0, 1, 3]


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(budget=0), "config field 'budget': bad value 0; allowed: a positive integer"),
    (lambda c: c.update(optimzer={}), "config field 'optimzer': bad value {}; allowed: top-level fields"),
    (lambda c: c["optimizer"].update(name="adam"), "config field 'optimizer.name': bad value 'adam'; allowed: cma, nsga2, nevergrad:<OptimizerName>"),
    (lambda c: c["search_space"].update(method="tie"), "config field 'search_space.method': bad value 'tie'; allowed: linear, task_arithmetic"),
    (lambda c: c["search_space"].update(granularity="layers"), "config field 'search_space.granularity': bad value 'layers'; allowed: global, groups"),
    (lambda c: c["search_space"]["parameters"].update(gamma=[0, 1]), "config field 'search_space.parameters.gamma'"),
    (lambda c: c["search_space"]["parameters"].update(weight=[1, 0]), "a range [low, high] with low < high"),
    (lambda c: c["objectives"][0].update(direction="up"), "config field 'objectives[0].direction': bad value 'up'; allowed: maximize, minimize"),
    (lambda c: c["objectives"].append({"name": "x", "metrics": ["sort_logprob"]}), "config field 'optimizer.name': bad value 'cma'; allowed: nsga2"),
])
def test_config_errors_name_field_value_and_allowed(edit, message, llama_family):
    cfg = tiny_config(llama_family)
    edit(cfg)
    with pytest.raises(EvomergeError) as err:
        parse_campaign(cfg)
    assert message in str(err.value)


def test_unknown_task_and_nevergrad_name_are_clear(llama_family, tmp_path):
    cfg = tiny_config(llama_family, fitness=[{"task": "mgsmx", "split": "fitness"}])
    with pytest.raises(EvomergeError, match=r"config field 'fitness\[0\].task': bad value 'mgsmx'"):
        CampaignRunner(parse_campaign(cfg), tmp_path / "a", progress=False).run()
    cfg = tiny_config(llama_family, optimizer={"name": "nevergrad:NoSuchOpt"})
    with pytest.raises(EvomergeError, match="nevergrad has no such optimizer"):
        CampaignRunner(parse_campaign(cfg), tmp_path / "b", progress=False)


def test_resuming_with_an_edited_config_is_refused(llama_family, tmp_path):
    cfg = tiny_config(llama_family, budget=8)
    CampaignRunner(parse_campaign(cfg), tmp_path / "c", progress=False).run()
    edited = write_config(tmp_path, tiny_config(llama_family, budget=16, seed=4))
    res = evomerge_cli("run", edited, "--out", tmp_path / "c", "--quiet")
    assert res.returncode == 2
    assert "budget: 8 -> 16" in res.stderr and "seed: 3 -> 4" in res.stderr


def test_status_and_front_json(llama_family, tmp_path):
    cfg = write_config(tmp_path, tiny_config(llama_family, budget=16))
    assert evomerge_cli("run", cfg, "--out", tmp_path / "r", "--quiet").returncode == 0
    st = json.loads(evomerge_cli("status", tmp_path / "r", "--json").stdout)
    assert st["evaluated"] == 16 and st["budget"] == 16 and st["done"] is True
    assert len(st["hypervolume"]) == 2 and st["hypervolume"][1] >= st["hypervolume"][0]
    front = json.loads(evomerge_cli("front", tmp_path / "r", "--json").stdout)
    assert front and {"id", "objectives", "holdout", "recipe"} <= set(front[0])
    assert "lp" in front[0]["holdout"] and "reverse_logprob" in front[0]["holdout"]
    # A front member's recipe is a complete, mergeable recipe.
    from evomerge.recipe import Recipe

    assert Recipe.from_dict(front[0]["recipe"]).method == "ties"


def _inject(runner, fail):
    """Wrap the first fitness evaluator: `fail(call_number)` returns an exception to raise, a metric value, or None."""
    evaluator = runner.executor.worker.evaluators["fitness"][0]
    real_score = evaluator.score
    calls = []

    def score(model):
        calls.append(1)
        outcome = fail(len(calls))
        if isinstance(outcome, BaseException):
            raise outcome
        result = real_score(model)
        if outcome is not None:
            result = {k: outcome for k in result}
        return result

    evaluator.score = score
    told = []
    real_tell = runner.optimizer.tell
    runner.optimizer.tell = lambda genomes, losses: (told.extend(losses), real_tell(genomes, losses))
    return told


def test_infrastructure_failure_is_retried_never_told_as_a_penalty(llama_family, tmp_path):
    """Out of memory once: the candidate is evaluated again (attempts 2) and told its real score."""
    import torch

    from evomerge.campaign import PENALTY

    runner = CampaignRunner(parse_campaign(tiny_config(llama_family, budget=8)), tmp_path / "f", progress=False)
    told = _inject(runner, lambda n: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
                   if n == 2 else None)
    runner.run()
    st = campaign_status(tmp_path / "f")
    assert st["failed"] == 0 and st["evaluated"] == 8
    assert PENALTY not in [v for loss in told for v in loss]
    rows = Journal(tmp_path / "f").candidates()
    retried = [r for r in rows if r.attempts == 2]
    assert len(retried) == 1 and retried[0].status == "done"
    assert retried[0].last_error.startswith("torch.OutOfMemoryError: CUDA out of memory")


def test_candidate_failure_is_journaled_and_told_as_a_penalty(llama_family, tmp_path):
    """NaN scores are the candidate's own failure: status failed, a penalty told, the campaign goes on."""
    from evomerge.campaign import PENALTY

    runner = CampaignRunner(parse_campaign(tiny_config(llama_family, budget=8)), tmp_path / "n", progress=False)
    told = _inject(runner, lambda n: float("nan") if n == 3 else None)
    runner.run()
    st = campaign_status(tmp_path / "n")
    assert st["failed"] == 1 and st["evaluated"] == 8
    failed = Journal(tmp_path / "n").candidates("failed")
    assert "non-finite" in failed[0].error and failed[0].metrics is None and failed[0].error_kind == "candidate"
    assert [loss[0] for loss in told].count(PENALTY) == 1
    assert failed[0].id not in {m.id for m in front_members(*__import__("evomerge.view", fromlist=["x"]).open_campaign(tmp_path / "n"))}


def test_repeated_infrastructure_failure_stops_the_campaign_then_resume_finishes(llama_family, tmp_path):
    import torch

    cfg = tiny_config(llama_family, budget=8)
    runner = CampaignRunner(parse_campaign(cfg), tmp_path / "s", progress=False)
    _inject(runner, lambda n: torch.OutOfMemoryError("CUDA out of memory") if n >= 3 else None)
    with pytest.raises(EvomergeError, match=r"candidate #3 failed for a reason not its own .*OutOfMemoryError.* 3 "
                                            r"time\(s\); nothing about it was told.*evomerge resume"):
        runner.run()
    rows = Journal(tmp_path / "s").candidates()
    assert not [r for r in rows if r.status == "failed"]
    stuck = {r.id: r for r in rows if r.status == "pending" and r.last_error}
    assert stuck[3].attempts == 3  # the first to run out of retries
    assert {e["id"] for e in campaign_status(tmp_path / "s")["infrastructure_errors"]} == set(stuck)
    # The cause is fixed (no injection): resume evaluates the stuck candidate and finishes.
    res = evomerge_cli("resume", tmp_path / "s", "--quiet")
    assert res.returncode == 0, res.stderr
    st = campaign_status(tmp_path / "s")
    assert st["evaluated"] == 8 and st["failed"] == 0 and st["done"]


def test_a_bank_larger_than_the_device_streams_with_the_same_results(llama_family, tmp_path):
    """`bank.device_memory` below the resident bank: the memory plan keeps the deltas in host RAM and
    streams them per tensor; the campaign's scores are exactly those of the resident bank."""
    from evomerge.preflight import describe, preflight

    small = tiny_config(llama_family, budget=8, bank={"device_memory": "600KB"})
    plan = preflight(parse_campaign(small))
    assert plan.worker.storage == "host"
    text = "\n".join(describe(plan))
    assert "storage host" in text and "in host RAM: deltas" in text
    assert preflight(parse_campaign(tiny_config(llama_family, budget=8))).worker.storage == "device"
    tight = tiny_config(llama_family, budget=8, bank={"device_memory": "100KB"})
    with pytest.raises(EvomergeError, match=r"memory plan: .* can be used; set bank: \{storage: host, quantize: int8\}"
                                            r"|memory plan: .* can be used; use a larger device"):
        preflight(parse_campaign(tight))
    scores = []
    for name, cfg in (("resident", tiny_config(llama_family, budget=8)), ("streamed", small)):
        CampaignRunner(parse_campaign(cfg), tmp_path / name, progress=False).run()
        j = Journal(tmp_path / name)
        scores.append(sorted(round(m.objectives["lp"], 12) for m in front_members(j, parse_campaign(j.get("config")))))
        j.close()
    assert scores[0] == scores[1] and scores[0]
