"""Campaign integrity (issue 8): one runner per folder, exact budgets, racing's incumbent, MGSM
exemplars, honest fronts and hypervolume, pre-flight and dry runs, provenance, error kinds,
ignored parameters, stale temporaries — and exact resume after SIGKILL on every path."""

import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file

from evomerge.campaign import CampaignRunner
from evomerge.config import Objective, parse_campaign
from evomerge.errors import EvomergeError
from evomerge.journal import Journal
from evomerge.view import campaign_status, front_members

from killing import run_until  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cfg(fam, **over):
    """A fast campaign on the random tiny Llama family (log-probabilities: finite, distinct)."""
    data = {
        "name": "integrity",
        "seed": 5,
        "base": str(fam["base"]),
        "sources": {f"e{i}": str(fam[f"expert{i}"]) for i in range(3)},
        "search_space": {"kind": "ps", "method": "task_arithmetic", "parameters": {"weight": [0.0, 1.0]}},
        "optimizer": {"name": "cma", "population": 7},
        "budget": 10,
        "objectives": [{"name": "lp", "metrics": ["reverse_logprob", "sort_logprob"]}],
        "fitness": [{"task": "synthetic-logprob:reverse", "split": "fitness", "n": 16},
                    {"task": "synthetic-logprob:sort", "split": "fitness", "n": 16}],
        "holdout": [{"task": "synthetic-logprob:reverse", "split": "holdout", "n": 16},
                    {"task": "synthetic-logprob:sort", "split": "holdout", "n": 16}],
    }
    data.update(over)
    return data


TWO_OBJECTIVES = [{"name": "rev", "metrics": {"reverse_logprob": 1.0}},
                  {"name": "srt", "metrics": {"sort_logprob": 1.0}}]


def run(data, folder, **kw):
    return CampaignRunner(parse_campaign(data), folder, progress=False, **kw).run()


def cli(*args, env=None, **kw):
    env = dict(os.environ, HF_HUB_OFFLINE="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", "evomerge", *map(str, args)], capture_output=True, text=True,
                          env=env, **kw)


def write(tmp_path, data, name="campaign.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))
    return p


# -- 1. one campaign, one runner -----------------------------------------------------------------


def test_a_second_runner_is_refused_with_the_holder_named(llama_family, tmp_path):
    from evomerge.lock import CampaignLock

    folder = tmp_path / "c"
    folder.mkdir()
    lock = CampaignLock(folder).acquire()
    try:
        res = cli("run", write(tmp_path, cfg(llama_family)), "--out", folder, "--quiet")
    finally:
        lock.release()
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"is in use by pid {os.getpid()} on {socket.gethostname()}, running since" in lines[0]
    assert not Journal.exists(folder)  # the refused runner wrote nothing


def test_a_lock_left_by_a_killed_runner_is_taken_over_with_a_message(tmp_path, capfd):
    from evomerge.lock import CampaignLock

    code = ("import os, signal, sys; from evomerge.lock import CampaignLock; "
            f"CampaignLock({str(tmp_path)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)")
    dead = subprocess.run([sys.executable, "-c", code])
    assert dead.returncode == -signal.SIGKILL
    holder = json.loads((tmp_path / "campaign.lock").read_text())
    lock = CampaignLock(tmp_path).acquire()
    lock.release()
    err = capfd.readouterr().err
    assert f"taking over the lock of pid {holder['pid']} on {holder['host']}" in err and "no longer running" in err
    assert (tmp_path / "campaign.lock").read_text() == ""  # a clean release leaves nobody to take over from


# -- 2. exact budget; the 1-D genome ---------------------------------------------------------------


@pytest.mark.parametrize("optimizer", ["cma", "nsga2", "nevergrad:TwoPointsDE"])
def test_budget_is_exact_when_not_a_multiple_of_the_population(optimizer, llama_family, tmp_path):
    data = cfg(llama_family, optimizer={"name": optimizer, "population": 7}, budget=10)
    if optimizer == "nsga2":
        data["objectives"] = TWO_OBJECTIVES
    run(data, tmp_path / "b")
    rows = Journal(tmp_path / "b").candidates()
    assert len(rows) == 10 and all(r.status == "done" for r in rows)
    assert sorted({r.generation for r in rows}) == [0, 1]
    assert sum(r.generation == 1 for r in rows) == 3  # the last generation is partial
    assert campaign_status(tmp_path / "b")["generations"] == 2


def test_population_larger_than_the_budget_is_refused(llama_family, tmp_path):
    with pytest.raises(EvomergeError, match=r"config field 'budget': 8 is smaller than one generation of 12 "):
        run(cfg(llama_family, optimizer={"name": "cma", "population": 12}, budget=8), tmp_path / "p")
    assert not Journal.exists(tmp_path / "p")


def test_one_dimensional_genome_runs_and_resumes(llama_family, tmp_path):
    """pycma cannot run 1-D problems; the campaign pads the search and still evaluates one coordinate."""
    data = cfg(llama_family, sources={"e0": str(llama_family["expert0"])}, budget=15,
               optimizer={"name": "cma", "population": 5})
    out = run(data, tmp_path / "one")
    rows = Journal(tmp_path / "one").candidates()
    assert len(rows) == 15 and all(len(r.genome) == 1 for r in rows) and len({r.genome[0] for r in rows}) == 15
    again = cli("resume", tmp_path / "one", "--quiet")
    assert again.returncode == 0, again.stderr
    assert [m.id for m in out.front] == [m.id for m in front_members(Journal(tmp_path / "one"), parse_campaign(data))]


# -- 3. racing's incumbent: journaled per candidate (tests/test_demo.py), exact after SIGKILL (below) --


# -- exact resume after SIGKILL: racing, NSGA-II, partial last generation ---------------------------


def _kill_midway(config_path, folder, at_least):
    return run_until(config_path, folder, folder / "journal.sqlite", at_least, "status != 'pending'")[1]


def _snapshot(folder):
    con = sqlite3.connect(folder / "journal.sqlite")
    rows = con.execute("SELECT generation, slot, genome, status, objectives, metrics, incumbent, examples, id, attempts, "
                       "finished FROM candidates ORDER BY generation, slot").fetchall()
    con.close()
    return rows


@pytest.mark.parametrize("case", ["nsga2-partial", "racing-partial"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(case, llama_family, demo_cache, tmp_path, monkeypatch):
    if case == "nsga2-partial":
        data = cfg(llama_family, optimizer={"name": "nsga2", "population": 8}, budget=44, objectives=TWO_OBJECTIVES,
                   search_space={"kind": "ps", "method": "ties", "granularity": "groups",
                                 "parameters": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}})
    else:
        monkeypatch.setenv("EVOMERGE_CACHE", str(demo_cache))
        data = yaml.safe_load(open(os.path.join(ROOT, "experiments", "demo.yaml")))
        data.update(budget=40, racing={"stages": [0.25, 0.5], "z": 1.0})
    config_path = write(tmp_path, data)
    run(data, tmp_path / "reference")
    reference = _snapshot(tmp_path / "reference")

    killed = tmp_path / "killed"
    before_kill = _kill_midway(config_path, killed, at_least=len(reference) // 3)
    assert len(reference) // 3 <= before_kill < len(reference), "the kill must land mid-campaign"
    before = {r[8]: r for r in _snapshot(killed) if r[3] != "pending"}
    res = cli("resume", killed, "--quiet")
    assert res.returncode == 0, res.stderr
    assert "taking over the lock of pid" in res.stderr
    after = _snapshot(killed)
    # Every candidate: same genome, status, objectives, metrics, racing incumbent and examples as uninterrupted.
    assert [r[:8] for r in after] == [r[:8] for r in reference]
    if case == "racing-partial":
        assert any(r[3] == "raced" for r in reference)
    for r in after:  # nothing finished before the kill was evaluated again
        if r[8] in before:
            assert r == before[r[8]] and r[9] == 1
    st = campaign_status(killed)
    assert st["done"] and st["evaluated"] == data["budget"]
    assert st["hypervolume"] == campaign_status(tmp_path / "reference")["hypervolume"]


# -- 4. MGSM exemplars never come from held-out rows -------------------------------------------------


def test_mgsm_exemplars_come_from_the_evaluated_split_and_are_recorded(llama_family):
    from evomerge.evaluate import load_processor
    from evomerge.evaluators.mgsm import MGSM

    tok = load_processor(llama_family["base"])
    search = MGSM(tok, lang="ja", split="search", shots=4)
    assert search.shot_rows == [96, 97, 98, 99] and search.rows == list(range(96))
    assert search.identity()["shot_rows"] == [96, 97, 98, 99] and search.identity()["n"] == 96
    held = MGSM(tok, lang="ja", split="holdout", shots=2)
    assert held.shot_rows == [248, 249] and min(held.rows) == 100
    explicit = MGSM(tok, lang="en", split="holdout", shots=3, shot_rows="0-9")
    assert explicit.shot_rows == [7, 8, 9] and explicit.n == 150


@pytest.mark.parametrize("fitness, message", [
    ({"task": "mgsm", "lang": "ja", "split": "search", "shots": 2, "shot_rows": "120-121"},
     r"fitness\[0\]' uses as few-shot exemplars 2 example\(s\) \(rows 120-121 of mgsm\) that holdout\[0\] holds out"),
    ({"task": "mgsm", "lang": "en", "split": "all"},
     r"fitness\[0\]' scores 150 example\(s\) \(rows 100-249 of mgsm\) that holdout\[0\] holds out"),
    ({"task": "synthetic-logprob:reverse", "split": "holdout", "n": 16},
     r"fitness\[0\]' scores 16 example\(s\) .* that holdout\[0\] holds out"),
])
def test_fitness_that_touches_held_out_examples_is_refused(fitness, message, llama_family, tmp_path):
    holdout = [{"task": "mgsm", "lang": "ja", "split": "holdout"}] if fitness["task"] == "mgsm" else \
        [{"task": "synthetic-logprob:reverse", "split": "holdout", "n": 16}]
    metric = "mgsm_" + fitness.get("lang", "") if fitness["task"] == "mgsm" else "reverse_logprob"
    data = cfg(llama_family, fitness=[fitness], holdout=holdout, objectives=[{"name": "a", "metrics": [metric]}])
    with pytest.raises(EvomergeError, match=message):
        run(data, tmp_path / "m")
    assert not Journal.exists(tmp_path / "m")


# -- 7. fronts of ties; held-out scoring capped and spread ------------------------------------------


def test_front_collapses_ties_and_spread_keeps_the_extremes():
    from evomerge.archive import front, spread

    objs = [Objective("a", {"a": 1.0}), Objective("b", {"b": 1.0})]
    pts = [{"a": 0.0, "b": 0.0}] * 5 + [{"a": 1.0, "b": 0.0}, {"a": 1.0, "b": 0.0}]
    points = front(objs, pts)
    assert [(p.index, p.duplicates) for p in points] == [(5, [6])]
    line = [{"a": i / 9, "b": 1 - i / 9} for i in range(10)]
    picked = spread(objs, line, 4)
    assert len(picked) == 4 and 0 in picked and 9 in picked


def test_a_front_of_ties_is_one_point_scored_once(llama_family, tmp_path):
    """A random tiny model scores 0 exact match on every candidate: one front point, the rest duplicates."""
    data = cfg(llama_family, budget=14, objectives=[{"name": "acc", "metrics": ["reverse"]}],
               fitness=[{"task": "synthetic:reverse", "split": "fitness", "n": 8}],
               holdout=[{"task": "synthetic:reverse", "split": "holdout", "n": 8}])
    out = run(data, tmp_path / "t")
    assert len(out.front) == 1 and out.front[0].id == 1 and out.front[0].duplicates == list(range(2, 15))
    rows = Journal(tmp_path / "t").candidates()
    assert sum(r.holdout is not None for r in rows) == 1
    res = cli("front", tmp_path / "t")
    assert "front: 1 point(s)" in res.stdout and "ties: #2, #3" in res.stdout


def test_held_out_scoring_is_capped_at_holdout_max(llama_family, tmp_path):
    data = cfg(llama_family, optimizer={"name": "nsga2", "population": 8}, budget=32, objectives=TWO_OBJECTIVES,
               holdout_max=2, search_space={"kind": "ps", "method": "task_arithmetic", "granularity": "groups",
                                             "parameters": {"weight": [0.0, 1.0]}})
    out = run(data, tmp_path / "h")
    scored = [m for m in out.front if m.holdout]
    assert len(out.front) > 2 and len(scored) == 2
    best_rev = max(out.front, key=lambda m: m.objectives["rev"])
    best_srt = max(out.front, key=lambda m: m.objectives["srt"])
    assert {m.id for m in scored} == {best_rev.id, best_srt.id}  # the two extremes of the front


# -- 8. hypervolume against a fixed, journaled reference --------------------------------------------


def test_hypervolume_reference_is_fixed_and_values_never_decrease(llama_family, tmp_path):
    from evomerge.archive import hypervolume, reference_point

    objs = [Objective("a", {"a": 1.0}), Objective("b", {"b": 1.0})]
    first = [{"a": 0.5, "b": 0.5}, {"a": 0.3, "b": 0.6}]
    ref = reference_point(objs, first)
    assert ref == pytest.approx({"a": 0.28, "b": 0.49})
    before = hypervolume(objs, first, ref)
    assert hypervolume(objs, first + [{"a": 0.0, "b": 0.0}], ref) == before  # worse points change nothing
    assert hypervolume(objs, first + [{"a": 0.6, "b": 0.6}], ref) > before
    assert reference_point([Objective("a", {"a": 1.0}, reference=-1.0)], first) == {"a": -1.0}

    data = cfg(llama_family, optimizer={"name": "nsga2", "population": 6}, budget=30, objectives=TWO_OBJECTIVES)
    run(data, tmp_path / "hv")
    st = campaign_status(tmp_path / "hv")
    hv = st["hypervolume"]
    assert len(hv) == st["generations"] == 5
    assert all(b >= a for a, b in zip(hv, hv[1:])) and hv[-1] > 0
    assert set(st["hv_reference"]) == {"rev", "srt"}
    text = cli("status", tmp_path / "hv").stdout
    assert text.count(",") >= 4 and "reference rev=" in text  # every generation's value, not the last 8


# -- 10. pre-flight: no tensor is read before every check passed; the dry run -----------------------


def _no_tensor_reads(monkeypatch):
    from evomerge import checkpoint

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was read")

    monkeypatch.setattr(checkpoint.Checkpoint, "get", refuse)
    monkeypatch.setattr(checkpoint, "safe_open", refuse)


def test_bad_evaluator_fails_before_any_tensor_is_read_and_stores_no_config(llama_family, tmp_path, monkeypatch):
    _no_tensor_reads(monkeypatch)
    bad = cfg(llama_family, fitness=[{"task": "synthetic-logprob:reverse", "split": "fitness", "n": 16, "lang": "ja"}])
    with pytest.raises(EvomergeError, match=r"config field 'fitness\[0\]': unknown key\(s\) \['lang'\]"):
        run(bad, tmp_path / "s")
    assert not Journal.exists(tmp_path / "s")
    missing = cfg(llama_family, sources={"e0": str(tmp_path / "nope")})
    with pytest.raises(EvomergeError, match=r"config field 'sources.e0': model path .*nope' does not exist"):
        run(missing, tmp_path / "s")
    monkeypatch.undo()
    # The corrected config starts in the same folder: nothing of the failed starts was stored.
    run(cfg(llama_family, budget=7), tmp_path / "s")
    assert campaign_status(tmp_path / "s")["evaluated"] == 7


def test_dry_run_prints_the_plan_without_reading_a_tensor(llama_family, tmp_path, monkeypatch, capsys):
    from evomerge.cli import main

    _no_tensor_reads(monkeypatch)
    data = cfg(llama_family, search_space={"kind": "ps", "method": "ties", "granularity": "groups", "families": True,
                                           "parameters": {"weight": [0.0, 1.0], "density": [0.1, 1.0]}}, budget=50)
    assert main(["run", str(write(tmp_path, data)), "--out", str(tmp_path / "d"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    # 4 blocks x 3 families + embeddings, final norm, head = 15 cells; x 2 parameters x 3 sources
    assert "genome: 90 coordinate(s)" in out and "e0.weight@block.0/attention" in out and "e2.density@lm_head" in out
    assert "candidates: 50 in 8 generation(s) (the last one partial: 1)" in out
    assert "fitness[0]  synthetic-logprob:reverse  split fitness  n=16" in out
    assert "memory plan (float32): storage device, float32 deltas" in out
    assert "on cpu: reference" in out and "deltas" in out and "evaluation model" in out
    assert not (tmp_path / "d").exists()


def test_dry_run_over_an_unbuilt_builtin_family_builds_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    res = cli("run", os.path.join(ROOT, "experiments", "demo.yaml"), "--out", tmp_path / "d", "--dry-run",
              env={"EVOMERGE_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert "not built yet" in res.stdout and "genome: 3 coordinate(s)" in res.stdout
    assert not (tmp_path / "cache").exists() and not (tmp_path / "d").exists()


# -- 11. provenance ----------------------------------------------------------------------------------


def test_resume_refuses_a_source_that_changed_on_disk(llama_family, tmp_path):
    fam = {k: shutil.copytree(v, tmp_path / "fam" / k) for k, v in llama_family.items()}
    data = cfg(fam, budget=7)
    run(data, tmp_path / "pv")
    prov = Journal(tmp_path / "pv").get("provenance")
    assert set(prov["models"]) == {"base", "sources.e0", "sources.e1", "sources.e2"}
    assert all(len(m["fingerprint"]) == 16 for m in prov["models"].values())
    assert set(prov["versions"]) >= {"torch", "transformers", "evomerge"}
    # The same weights saved again (a fine-tune re-run, a re-download of another revision) ...
    from evomerge.checkpoint import Checkpoint

    state = {n: t + 0.01 for n, t in Checkpoint(fam["expert1"]).iter_tensors()}
    for f in fam["expert1"].glob("*.safetensors*"):
        f.unlink()
    save_file(state, str(fam["expert1"] / "model.safetensors"))
    res = cli("resume", tmp_path / "pv")
    assert res.returncode == 2
    assert "config field 'sources.e1':" in res.stderr and "changed on disk since the campaign started" in res.stderr


# -- 13. parameters that cannot change the merge are refused ----------------------------------------


@pytest.mark.parametrize("space, message", [
    ({"kind": "ps", "method": "task_arithmetic", "parameters": {"weight": [0, 1], "density": [0.1, 1]}},
     r"task_arithmetic has no per-source parameter 'density' to search"),
    ({"kind": "ps", "method": "task_arithmetic", "parameters": {"weight": [0, 1]}, "fixed": {"density": 0.5}},
     r"'search_space.fixed.density' is unknown for task_arithmetic"),
    ({"kind": "ps", "method": "ties", "parameters": {"weight": [0, 1]}, "fixed": {"weight": 0.5}},
     r"'weight' is also searched"),
    ({"kind": "ps", "method": "ties", "parameters": {"weight": [0, 1]}, "granularity": "global", "families": True},
     r"families': true has no effect with granularity 'global'"),
])
def test_parameters_with_no_effect_are_refused(space, message, llama_family, tmp_path):
    with pytest.raises(EvomergeError, match=message):
        run(cfg(llama_family, search_space=space), tmp_path / "x")


def test_weight_of_a_single_normalized_source_is_refused(llama_family, tmp_path):
    data = cfg(llama_family, sources={"e0": str(llama_family["expert0"])},
               search_space={"kind": "ps", "method": "linear", "parameters": {"weight": [0, 1]}})
    with pytest.raises(EvomergeError, match=r"\['weight'\] cannot change a linear merge of 1 source"):
        run(data, tmp_path / "x")


# -- 14. stale temporaries of a dead writer ----------------------------------------------------------


def test_stale_temporary_of_a_dead_writer_is_removed_and_nothing_else(tmp_path):
    from evomerge.checkpoint import OUTPUT_MARKER, WRITER_MARKER, write_model

    dead = subprocess.Popen(["true"])
    dead.wait()
    out = tmp_path / "model"
    folders = {name: tmp_path / f".model.tmp-{name}" for name in ("dead", "live", "foreign")}
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"half written")
    for name, pid in (("dead", dead.pid), ("live", os.getpid())):
        (folders[name] / WRITER_MARKER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    write_model(out, {"w": torch.ones(2)}, {"model_type": "llama"})
    assert not folders["dead"].exists()
    assert folders["live"].exists() and folders["foreign"].exists()  # a live writer's, and one evomerge did not mark
    assert (out / OUTPUT_MARKER).is_file()


# -- the seams: registries, packaging, a light CLI ---------------------------------------------------


@pytest.mark.slow  # 25 s: every shipped config through pre-flight; `pytest -m slow` runs it
def test_every_campaign_config_in_experiments_dry_runs_and_recipes_are_sent_to_merge(tmp_path):
    env = {"EVOMERGE_CACHE": str(tmp_path / "cache")}
    for path in sorted(os.listdir(os.path.join(ROOT, "experiments"))):
        full = os.path.join(ROOT, "experiments", path)
        if os.path.isdir(full):  # experiments/paper: GPU-cluster setups over hub models (tests/test_dataflow.py)
            continue
        res = cli("run", full, "--out", tmp_path / path, "--dry-run", env=env, cwd=ROOT)
        data = yaml.safe_load(open(full))
        if "search_space" in data or "stages" in data:
            assert res.returncode == 0, (path, res.stderr)
            assert "genome:" in res.stdout and "dry run: nothing was loaded or written" in res.stdout
        else:
            assert res.returncode == 2 and "is a merge recipe, not a campaign config" in res.stderr, res.stderr
    assert not (tmp_path / "cache").exists()


def test_fixed_rules_that_match_no_tensor_are_refused(llama_family, tmp_path):
    space = {"kind": "ps", "method": "ties", "parameters": {"weight": [0, 1]},
             "fixed": {"density": [{"group": "block.9", "value": 0.5}, {"value": 0.7}]}}
    with pytest.raises(EvomergeError, match=r"rule \{'group': 'block.9'\} matches no tensor"):
        run(cfg(llama_family, search_space=space), tmp_path / "x")


def test_spaces_and_executors_plug_in_by_registration():
    from evomerge.executors import EXECUTORS, executor_kind
    from evomerge.search_spaces import SPACES, register_space, space_kind

    assert set(SPACES) >= {"ps", "dfs"} and set(EXECUTORS) >= {"local"}
    with pytest.raises(EvomergeError, match=r"'search_space.kind': bad value 'pss'; allowed: dfs, ps; did you mean 'ps'\?"):
        space_kind("pss")
    with pytest.raises(EvomergeError, match=r"'executor.kind': bad value 'rey'; allowed: local"):
        executor_kind("rey")

    @register_space("toy-for-test")
    class Toy:
        @classmethod
        def validate(cls, block, where):
            return dict(block)

    try:
        assert space_kind("toy-for-test") is Toy and Toy.kind == "toy-for-test"
    finally:
        SPACES.pop("toy-for-test")


def test_cli_imports_no_torch_and_packages_install_under_evomerge(tmp_path):
    code = ("import sys, evomerge.cli, evomerge; assert 'torch' not in sys.modules, 'torch imported'; "
            "import evomerge.evaluators.mgsm, evomerge.search_spaces.ps; "
            "import importlib.util as u; print(u.find_spec('evaluators'), u.find_spec('search_spaces'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["None", "None"]  # no generic top-level names in site-packages


# -- review follow-ups ------------------------------------------------------------------------------


def test_a_start_with_no_finished_candidate_takes_a_corrected_config(llama_family, tmp_path, capfd):
    CampaignRunner(parse_campaign(cfg(llama_family, budget=7)), tmp_path / "s", progress=False).lock.release()
    assert Journal(tmp_path / "s").get("config")["budget"] == 7  # stored, but nothing evaluated
    run(cfg(llama_family, budget=8), tmp_path / "s")
    assert "held a campaign with no finished candidate; starting it over with the new config (budget: 7 -> 8)" \
        in capfd.readouterr().err
    assert campaign_status(tmp_path / "s")["evaluated"] == 8
    with pytest.raises(EvomergeError, match="holds a campaign with a different config"):
        run(cfg(llama_family, budget=9), tmp_path / "s")  # once something finished, the config is fixed


def test_relative_model_paths_resolve_where_the_campaign_started(llama_family, tmp_path, monkeypatch):
    fam = {k: shutil.copytree(v, tmp_path / "start" / "fam" / k) for k, v in llama_family.items()}
    data = cfg(fam, budget=7)
    data["base"] = "fam/base"
    data["sources"] = {f"e{i}": f"fam/expert{i}" for i in range(3)}
    monkeypatch.chdir(tmp_path / "start")
    run(data, tmp_path / "rel")
    recipe = Journal(tmp_path / "rel").candidates()[0].recipe
    assert recipe["base"] == str(fam["base"].resolve())  # recipes name absolute paths
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "fam").mkdir(parents=True)  # a different (empty) fam/ here must not be picked up
    res = cli("resume", tmp_path / "rel", "--quiet", cwd=elsewhere)
    assert res.returncode == 0, res.stderr


def test_weights_swapped_for_others_of_the_same_shapes_are_caught(llama_family, tmp_path):
    fam = {k: shutil.copytree(v, tmp_path / "fam" / k) for k, v in llama_family.items()}
    run(cfg(fam, budget=7), tmp_path / "sw")
    for shard in fam["expert2"].glob("model-*.safetensors"):  # same names, sizes and headers, other bytes
        shutil.copy(shard, fam["expert1"] / shard.name)
    res = cli("resume", tmp_path / "sw")
    assert res.returncode == 2 and "'sources.e1'" in res.stderr and "changed on disk" in res.stderr


@pytest.mark.parametrize("content", ["[1]", "5", '{"heartbeat": "x", "host": "other"}', '{"since": "yesterday"}', "\x00\x01"])
def test_a_damaged_lock_file_is_taken_over_not_a_crash(content, tmp_path):
    from evomerge.lock import CampaignLock

    (tmp_path / "campaign.lock").write_text(content)
    lock = CampaignLock(tmp_path).acquire()
    lock.release()


def test_family_cells_are_never_shadowed_by_a_group_cell():
    from evomerge.recipe import Recipe
    from evomerge.architecture import classify
    from evomerge.search_spaces.ps import ParameterSpace, layer_cells

    names = ["backbone.blocks.0.attn.q.weight", "backbone.blocks.0.ffn.w1.weight", "backbone.blocks.0.gate.weight"]
    cells = layer_cells(names, "some_new_arch", "groups", True)
    assert [c.label for c in cells] == ["block.0/attention", "block.0/mlp", "block.0/other"]
    space = ParameterSpace("task_arithmetic", {"a": "A"}, "B", {"weight": [0.0, 1.0]}, cells)
    recipe = Recipe.from_dict(space.decode([0.1, 0.5, 0.9]).to_dict())
    got = [recipe.resolve(classify(n, "some_new_arch"), n, 1)[1][0]["weight"] for n in names]
    assert got == pytest.approx([0.1, 0.5, 0.9])  # every coordinate reaches its tensors


def test_nested_rules_that_match_nothing_fall_through_to_the_next_rule():
    from evomerge.architecture import TensorRole
    from evomerge.recipe import Recipe

    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": "B", "sources": [{"model": "A", "parameters": {
        "weight": [{"family": "mlp", "value": [{"group": "block.9", "value": 0.9}]}, {"value": 0.25}]}}]})
    _, per_source = recipe.resolve(TensorRole("block.0", "mlp", 0), "layers.0.mlp.up.weight", 4)
    assert per_source[0]["weight"] == 0.25


def test_mergekit_models_as_plain_paths_are_read(llama_family, tmp_path):
    from evomerge.mergekit_compat import from_mergekit

    recipe = from_mergekit({"merge_method": "linear", "models": [str(llama_family["expert0"]), str(llama_family["expert1"])],
                            "parameters": {"weight": 0.5}})
    assert [s.model for s in recipe.sources] == [str(llama_family["expert0"]), str(llama_family["expert1"])]


def test_vqa_items_with_an_unreadable_image_are_refused_when_built(tmp_path):
    from evomerge.evaluators.vqa import read_items

    (tmp_path / "not_an_image.png").write_text("hello")
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps({"image": "not_an_image.png", "question": "what?", "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"q.jsonl:1: image .*not_an_image.png cannot be opened"):
        read_items(path)
