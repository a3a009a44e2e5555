"""The method gene of a parameter space: `method: [a, b, c]` adds a last coordinate cut into equal buckets.

Bucket boundaries, what each bucket's recipe gets, the config errors, a list of one as the plain name,
and a short real campaign whose journal holds several methods and resumes from a kill."""

import os
import re
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import yaml

from evomerge.campaign import CampaignRunner, resume_campaign
from evomerge.config import parse_campaign
from evomerge.errors import EvomergeError
from evomerge.journal import Journal
from evomerge.preflight import preflight
from evomerge.search_spaces.ps import METHOD_GENE, ParameterSpace, method_bucket, method_names
from evomerge.view import campaign_status, front_members
from killing import run_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
THREE = ["ties", "dare_ties", "della"]


def config(fam, space=None, **over):
    cfg = {
        "name": "methods",
        "seed": 0,
        "base": str(fam["base"]),
        "sources": {f"e{i}": str(fam[f"expert{i}"]) for i in range(3)},
        "search_space": {"kind": "ps", "method": THREE, "parameters": {"weight": [0.0, 1.0], "density": [0.1, 1.0]},
                         "granularity": "global", **(space or {})},
        "optimizer": {"name": "cma", "population": 6},
        "budget": 18,
        "objectives": [{"name": "lp", "metrics": ["reverse_logprob", "sort_logprob"], "direction": "maximize"}],
        "fitness": [{"task": "synthetic-logprob:reverse", "split": "fitness", "n": 8},
                    {"task": "synthetic-logprob:sort", "split": "fitness", "n": 8}],
        "holdout": [{"task": "synthetic-logprob:reverse", "split": "holdout", "n": 8}],
    }
    cfg.update(over)
    return cfg


def space_of(cfg) -> ParameterSpace:
    return preflight(parse_campaign(cfg)).space


def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "evomerge", *map(str, args)], capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})), cwd=ROOT)


# -- the buckets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2, 3, 5, 7, 10])
def test_bucket_boundaries_are_left_closed_and_one_is_the_last(k):
    assert method_bucket(0.0, k) == 0
    assert method_bucket(1.0, k) == k - 1
    for i in range(k):
        assert method_bucket(i / k, k) == i  # a boundary opens its bucket ...
        assert method_bucket((i + 0.5) / k, k) == i
        if i:
            assert method_bucket(np.nextafter(i / k, 0.0), k) == i - 1  # ... and closes the one before
    counts = np.bincount([method_bucket(x, k) for x in np.linspace(0, 1, 1000, endpoint=False)], minlength=k)
    assert counts.max() - counts.min() <= 1  # equal widths


def test_method_of_reads_the_last_coordinate_and_clamps(llama_family):
    space = space_of(config(llama_family))
    assert space.dim == 3 * 2 + 1 and space.names[-1] == METHOD_GENE
    x = space.x0.copy()
    for value, name in [(0.0, "ties"), (np.nextafter(1 / 3, 0.0), "ties"), (1 / 3, "dare_ties"), (0.5, "dare_ties"),
                        (2 / 3, "della"), (1.0, "della"), (-0.4, "ties"), (1.7, "della")]:
        x[-1] = value
        assert space.method_of(x).name == name, value
        assert space.decode(x).method == name, value
    # The other coordinates never choose the method.
    x = np.zeros(space.dim)
    x[-1] = 0.9
    assert space.decode(x).method == "della"


# -- what each bucket's recipe gets --------------------------------------------------------------------


def test_decode_gives_each_method_only_the_parameters_it_takes(llama_family):
    cfg = config(llama_family, {"method": ["task_arithmetic", "ties", "della"],
                                "parameters": {"epsilon": [0.0, 0.2], "density": [0.2, 1.0], "weight": [0.0, 2.0]},
                                "fixed": {"rescale": False, "lambda": 0.9}})
    space = space_of(cfg)
    # Layout in the methods' parameter order (weight, density, epsilon), per source, then the method.
    assert space.names == [f"e{i}.{p}@all" for i in range(3) for p in ("weight", "density", "epsilon")] + ["method"]
    x = np.linspace(0.1, 0.9, space.dim - 1).tolist()
    coords = {name: v for name, v in zip(space.names, x)}
    expected = {"weight": lambda v: 2.0 * v, "density": lambda v: 0.2 + 0.8 * v, "epsilon": lambda v: 0.2 * v}
    takes = {"task_arithmetic": ("weight",), "ties": ("weight", "density"), "della": ("weight", "density", "epsilon")}
    shared = {"task_arithmetic": {"lambda": 0.9}, "ties": {"rescale": False, "lambda": 0.9},
              "della": {"rescale": False, "lambda": 0.9}}
    for bucket, method in enumerate(takes):
        recipe = space.decode(x + [(bucket + 0.5) / 3]).to_dict()
        assert recipe["method"] == method and recipe["base"] == str(llama_family["base"])
        assert recipe.get("parameters", {}) == shared[method]  # task_arithmetic takes no rescale
        for i, source in enumerate(recipe["sources"]):
            assert set(source["parameters"]) == set(takes[method]), (method, source)
            for p, value in source["parameters"].items():
                assert value == pytest.approx(expected[p](coords[f"e{i}.{p}@all"]))


def test_groups_and_per_source_fixed_go_only_to_the_methods_that_take_them(llama_family):
    space = space_of(config(llama_family, {"method": ["task_arithmetic", "dare_ties"], "granularity": "groups",
                                           "parameters": {"weight": [0.0, 1.0]}, "fixed": {"density": 0.6}}))
    cells = len(space.cells)
    assert space.dim == 3 * cells + 1
    x = space.x0.copy()
    x[-1] = 0.25
    ta = space.decode(x).to_dict()
    assert ta["method"] == "task_arithmetic" and all(set(s["parameters"]) == {"weight"} for s in ta["sources"])
    assert len(ta["sources"][0]["parameters"]["weight"]) == cells + 1  # one rule per cell + the catch-all
    x[-1] = 0.75
    dare = space.decode(x).to_dict()
    assert dare["method"] == "dare_ties"
    assert all(s["parameters"]["density"] == 0.6 and set(s["parameters"]) == {"weight", "density"}
               for s in dare["sources"])
    assert dare["sources"][0]["parameters"]["weight"] == ta["sources"][0]["parameters"]["weight"]


# -- a list of one is the plain name -------------------------------------------------------------------


def test_a_list_of_one_method_is_the_plain_name(llama_family):
    plain, listed = config(llama_family, {"method": "ties"}), config(llama_family, {"method": ["ties"]})
    assert parse_campaign(listed).search_space == parse_campaign(plain).search_space
    a, b = space_of(plain), space_of(listed)
    assert (a.dim, a.names, a.describe()) == (b.dim, b.names, b.describe())
    assert METHOD_GENE not in b.names and b.dim == 3 * 2
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.random(a.dim)
        assert a.decode(x).to_dict() == b.decode(x).to_dict()
    assert method_names(("ties", "della")) == ["ties", "della"] and method_names("ties") == ["ties"]


# -- bad configs: one line naming the field -------------------------------------------------------------


@pytest.mark.parametrize("space, message", [
    ({"method": []}, "config field 'search_space.method': bad value []; allowed: a method name or a list"),
    ({"method": ["ties", "della", "ties"]}, "config field 'search_space.method[2]': 'ties' is listed twice"),
    ({"method": ["ties", "dare_ties_"]},
     "config field 'search_space.method[1]': bad value 'dare_ties_'; allowed: linear, task_arithmetic"),
    ({"method": ["ties", "dare_ties_"]}, "; did you mean 'dare_ties'?"),
    ({"method": ["ties", 3]}, "config field 'search_space.method[1]': bad value 3; allowed: linear"),
    ({"method": ["linear", "task_arithmetic"]},
     "config field 'search_space.parameters.density': none of linear, task_arithmetic has a per-source parameter "
     "'density' to search"),
    ({"method": ["ties", "della"], "parameters": {"weight": [0, 1], "epsilon": [0.1, 0.9]}},
     "config field 'search_space.parameters.epsilon': range [0.1, 0.9] leaves della's allowed [0.0, 0.5]"),
    ({"method": ["linear", "task_arithmetic"], "parameters": {"weight": [0, 1]}, "fixed": {"rescale": True}},
     "config field 'search_space.fixed.rescale' is unknown for every one of linear, task_arithmetic"),
    ({"method": ["ties", "slerp"], "parameters": {"weight": [0, 1]}},
     "config field 'search_space': slerp needs 't'; search it under parameters or set it under fixed"),
])
def test_bad_method_lists_are_one_line_errors(space, message, llama_family):
    with pytest.raises(EvomergeError) as err:
        parse_campaign(config(llama_family, space))
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_a_listed_method_that_needs_a_base_without_one_is_refused(llama_family):
    cfg = config(llama_family, {"method": ["linear", "ties"], "parameters": {"weight": [0, 1]}})
    cfg.pop("base")
    with pytest.raises(EvomergeError) as err:
        preflight(parse_campaign(cfg), build=False)
    text = str(err.value)
    assert "config field 'base' is missing: method 'ties' merges task vectors relative to a base model" in text
    assert "listed in search_space.method: drop it there, or add a base" in text and "\n" not in text
    # A list of base-free methods builds without a base.
    cfg["search_space"]["method"] = ["linear", "nuslerp"]
    cfg["sources"] = {k: cfg["sources"][k] for k in ("e0", "e1")}
    space = preflight(parse_campaign(cfg), build=False).space
    assert [m.name for m in space.methods] == ["linear", "nuslerp"] and space.names[-1] == METHOD_GENE


def test_a_listed_method_that_cannot_take_the_sources_is_named(llama_family):
    cfg = config(llama_family, {"method": ["ties", "nuslerp"], "parameters": {"weight": [0, 1]}})
    with pytest.raises(EvomergeError, match=r"method 'nuslerp' takes 2 source\(s\) besides the base, got 3 \(listed "
                                            r"in search_space.method: drop it there, or change the sources\)"):
        preflight(parse_campaign(cfg), build=False)


# -- the CLI's dry run ------------------------------------------------------------------------------------


def test_dry_run_describes_the_method_coordinate(llama_family, tmp_path, capsys):
    from evomerge.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config(llama_family)))
    assert main(["run", str(path), "--out", str(tmp_path / "d"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("genome: 7 coordinate(s); parameter space: method searched over [ties, dare_ties, della] (coordinate "
            "'method': 3 equal buckets of [0, 1]); weight in [0, 1], density in [0.1, 1]") in out
    assert re.search(r"e2\.density@all,\s+method\n", out)  # the coordinate names end with the method's
    assert "Traceback" not in out and not (tmp_path / "d").exists()
    # A bad list stops the dry run with exit 2 and one line on stderr.
    path.write_text(yaml.safe_dump(config(llama_family, {"method": ["ties", "dare_tie"]})))
    assert main(["run", str(path), "--out", str(tmp_path / "d"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evomerge: error: config field 'search_space.method[1]': bad value 'dare_tie'")
    assert err.rstrip().endswith("did you mean 'dare_ties'?") and err.count("\n") == 1


def test_the_shipped_demo_methods_config_dry_runs(tmp_path):
    res = cli("run", os.path.join(ROOT, "experiments", "demo_methods.yaml"), "--out", tmp_path / "d", "--dry-run",
              env={"EVOMERGE_CACHE": str(tmp_path / "cache")})
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stdout + res.stderr
    assert "method searched over [ties, dare_ties, della] (coordinate 'method': 3 equal buckets" in res.stdout
    assert "genome: 7 coordinate(s)" in res.stdout and "dry run: nothing was loaded or written" in res.stdout
    assert not (tmp_path / "cache").exists() and not (tmp_path / "d").exists()


# -- a real campaign -----------------------------------------------------------------------------------


def _rows(folder):
    con = sqlite3.connect(folder / "journal.sqlite")
    rows = con.execute("SELECT generation, slot, genome, recipe, status, objectives, metrics FROM candidates "
                       "ORDER BY generation, slot").fetchall()
    con.close()
    return rows


@pytest.fixture
def one_thread(monkeypatch):
    """One torch thread here and in child processes: the tiny model gains nothing from two, and on cores shared
    with other work two threads waiting on each other make the campaign many times slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    yield
    torch.set_num_threads(before)


def test_a_campaign_searches_the_method_and_resumes_after_a_kill(llama_family, tmp_path, one_thread):
    cfg = config(llama_family)
    reference = tmp_path / "reference"
    CampaignRunner(parse_campaign(cfg), reference, progress=False).run()

    journal = Journal(reference)
    camp = parse_campaign(journal.get("config"))
    assert camp.search_space["method"] == tuple(THREE)
    space = space_of(journal.get("config"))  # the stored config builds the same space
    rows = journal.candidates("done")
    assert len(rows) == 18
    methods = [r.recipe["method"] for r in rows]
    assert set(methods) == set(THREE), methods  # every bucket was sampled (seed 0: all three in generation 0)
    for r in rows:  # each recipe is the one its genome's bucket names, with weight and density per source
        assert r.recipe["method"] == space.method_of(r.genome).name
        assert r.recipe == space.decode(r.genome).to_dict()
        assert all(set(s["parameters"]) == {"weight", "density"} for s in r.recipe["sources"])
        assert np.isfinite(r.objectives["lp"])
    front = front_members(journal, camp)
    journal.close()
    assert front and all(m.recipe["method"] in THREE and m.holdout for m in front)
    st = campaign_status(reference)
    assert st["done"] and st["evaluated"] == 18 and st["failed"] == 0

    # Killed after the first candidates, `evomerge resume` ends exactly where the uninterrupted run did.
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    killed = tmp_path / "killed"
    _, seen = run_until(config_path, killed, killed / "journal.sqlite", at_least=4, timeout=120)
    assert 4 <= seen < 18, "the kill must land mid-campaign"
    resume_campaign(killed, progress=False)  # what `evomerge resume` runs: the config comes from the journal
    assert _rows(killed) == _rows(reference)
    assert campaign_status(killed)["done"]
