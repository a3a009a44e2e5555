"""The built-in demo, shortened: the winner beats every source and the uniform merge on held-out data."""

import json
import os
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
    # Fitness and held-out examples are disjoint.
    from evaluators.synthetic import examples

    for task in ("reverse", "sort", "shift"):
        fit = {p for p, _ in examples(task, "fitness", 100)}
        held = {p for p, _ in examples(task, "holdout", 300)}
        assert not fit & held


def test_nsga2_config_finds_a_front_of_at_least_three(demo_run, tmp_path):
    cache, _, _ = demo_run
    old = os.environ.get("EVOMERGE_CACHE")
    os.environ["EVOMERGE_CACHE"] = str(cache)
    try:
        data = yaml.safe_load(open(os.path.join(ROOT, "experiments", "demo_nsga2.yaml")))
        runner = CampaignRunner(parse_campaign(data), tmp_path / "nsga2", progress=False)
        outcome = runner.run()
    finally:
        if old is None:
            os.environ.pop("EVOMERGE_CACHE")
        else:
            os.environ["EVOMERGE_CACHE"] = old
    points = {tuple(sorted(m["objectives"].items())) for m in outcome.front}
    assert len(points) >= 3, points
    values = [dict(p) for p in points]
    assert front_indices(runner.c.objectives, values) == list(range(len(values)))  # mutually non-dominated
    assert all("reverse_acc" in m["holdout"] for m in outcome.front)
