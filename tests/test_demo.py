"""The built-in demo, shortened: the winner beats every source and the uniform merge on held-out data."""

import json
import os
import re
import subprocess
import sys

import pytest
import yaml

from evomerge.archive import front_indices
from evomerge.campaign import CampaignRunner
from evomerge.config import parse_campaign

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, demo_cache):
    cache = demo_cache
    out = tmp_path_factory.mktemp("demo") / "run"
    env = dict(os.environ, EVOMERGE_CACHE=str(cache), HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "evomerge", "demo", "--out", str(out), "--budget", "35", "--quiet"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return cache, out, res.stdout


def test_demo_winner_beats_sources_and_uniform_on_holdout(demo_run):
    cache, out, stdout = demo_run
    summary = json.loads((out / "summary.json").read_text())
    hold = summary["holdout"]
    assert summary["objective"] == "mean_accuracy"
    assert set(hold["sources"]) == {"reverse", "sort", "shift"}
    for name, score in hold["sources"].items():
        assert hold["winner"] > score, (name, hold)
    assert hold["winner"] > hold["uniform"], hold
    assert "held-out scores" in stdout and "uniform" in stdout and "winner" in stdout
    # The data-flow rows: the DFS and PS+DFS winners, scored on the same held-out sets.
    from evomerge.hybrid import final_folder
    from evomerge.view import load_view

    for label in ("dfs", "hybrid"):
        front = load_view(final_folder(out / label)).front
        best = max(front, key=lambda m: m.objectives["mean_accuracy"])
        assert hold[label] == best.holdout["mean_accuracy"]
        assert re.search(rf"^  {label}\s+(\d\.\d{{3}}\s+){{3}}{hold[label]:.3f}$", stdout, re.M), stdout
    # Fitness and held-out examples are disjoint.
    from evomerge.evaluators.synthetic import examples

    for task in ("reverse", "sort", "shift"):
        fit = {p for p, _ in examples(task, "fitness", 100)}
        held = {p for p, _ in examples(task, "holdout", 300)}
        assert not fit & held


def test_nsga2_config_finds_a_front_of_at_least_three(demo_run, tmp_path, monkeypatch):
    cache, _, _ = demo_run
    monkeypatch.setenv("EVOMERGE_CACHE", str(cache))
    data = yaml.safe_load(open(os.path.join(ROOT, "experiments", "demo_nsga2.yaml")))
    runner = CampaignRunner(parse_campaign(data), tmp_path / "nsga2", progress=False)
    outcome = runner.run()
    points = {tuple(sorted(m.objectives.items())) for m in outcome.front}
    assert len(points) >= 3, points
    values = [dict(p) for p in points]
    assert front_indices(runner.campaign.objectives, values) == list(range(len(values)))  # mutually non-dominated
    assert all("reverse_acc" in m.holdout for m in outcome.front)


def test_racing_stops_hopeless_candidates_and_journals_them(demo_cache, tmp_path, monkeypatch):
    from evomerge.journal import Journal
    from evomerge.view import campaign_status, front_members

    monkeypatch.setenv("EVOMERGE_CACHE", str(demo_cache))
    data = yaml.safe_load(open(os.path.join(ROOT, "experiments", "demo.yaml")))
    data.update(budget=35, racing={"stages": [0.25, 0.5], "z": 2.0})
    runner = CampaignRunner(parse_campaign(data), tmp_path / "race", progress=False)
    runner.run()
    journal = Journal(tmp_path / "race")
    rows = journal.candidates()
    full = 300  # three fitness sets of 100
    raced = [r for r in rows if r.status == "raced"]
    done = [r for r in rows if r.status == "done"]
    assert raced, "some candidates should be stopped early"
    assert all(r.examples < full for r in raced) and all(r.examples == full for r in done)
    best = max(r.objectives["mean_accuracy"] for r in done)
    assert all(r.objectives["mean_accuracy"] < best for r in raced)
    assert {m.id for m in front_members(journal, runner.campaign)} <= {r.id for r in done}  # partial scores never make the front
    # Racing's incumbent is fixed per generation: the best full score of earlier generations, journaled.
    for r in rows:
        earlier = [x.objectives["mean_accuracy"] for x in rows if x.status == "done" and x.generation < r.generation]
        assert r.incumbent == (max(earlier) if earlier else None), r
    st = campaign_status(tmp_path / "race")
    assert st["raced"] == len(raced) and st["examples_scored"] == sum(r.examples for r in rows) < full * len(rows)


def test_racing_bound():
    from evomerge.racing import RacingRule

    rule = RacingRule(z=2.0)  # two looks: each at the one-sided level 0.0228 / 2
    assert rule.z_look == pytest.approx(2.2776, abs=1e-3)
    totals = {"a": 101, "b": 101}
    est, ucb = rule.bounds({"a": 5.0, "b": 10.0}, {"a": 25, "b": 25}, totals, {"a": 0.5, "b": 0.5})
    assert est == pytest.approx(0.3)
    qa, qb = 5.5 / 26, 10.5 / 26
    fpc = (101 - 25) / 100
    assert ucb == pytest.approx(0.3 + rule.z_look * (fpc * (0.25 * qa * (1 - qa) / 25 + 0.25 * qb * (1 - qb) / 25)) ** 0.5)
    # More examples, tighter bound; the whole set, no uncertainty left; more looks, a wider bound.
    assert rule.bounds({"a": 20.0}, {"a": 100}, totals, {"a": 1.0})[1] < rule.bounds({"a": 5.0}, {"a": 25}, totals, {"a": 1.0})[1]
    assert rule.bounds({"a": 20.0}, {"a": 101}, totals, {"a": 1.0})[1] == pytest.approx(20 / 101)
    assert RacingRule(stages=[0.1, 0.2, 0.4, 0.8]).z_look > rule.z_look > RacingRule(stages=[0.5]).z_look == pytest.approx(2.0)


def test_racing_visits_a_seeded_random_order_the_same_for_every_candidate():
    from evomerge.racing import RacingRule

    a, b = RacingRule(seed=0), RacingRule(seed=1)
    assert a.order(100, 0) == RacingRule(seed=0).order(100, 0) and sorted(a.order(100, 0)) == list(range(100))
    assert a.order(100, 0) != list(range(100)) and a.order(100, 0) != b.order(100, 0) != a.order(100, 1)
