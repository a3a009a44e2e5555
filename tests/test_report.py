"""`evomerge plot` and `evomerge report`: what they draw and show is what the journal holds."""

import base64
import re
import statistics

import numpy as np
import pytest
from PIL import Image

from evomerge.campaign import CampaignRunner
from evomerge.config import parse_campaign
from evomerge.journal import Journal
from evomerge.plots import make_plots, read_plot_data
from evomerge.report import write_report
from evomerge.view import load_view
from test_campaign import evomerge_cli, tiny_config
from test_dataflow import dfs_config


@pytest.fixture(scope="module")
def two_objectives(llama_family, tmp_path_factory):
    """NSGA-II over per-group TIES coefficients, a fitness objective against a drawn time, some failures."""
    cfg = tiny_config(llama_family, budget=24, optimizer={"name": "nsga2", "population": 8})
    cfg["search_space"]["families"] = True
    cfg["fitness"] = [{"task": "synthetic-logprob:reverse", "split": "fitness", "n": 24},
                      {"task": "simulate", "seconds": 0.001, "spread": 1.0, "fail_rate": 0.15}]
    cfg["holdout"] = [{"task": "synthetic-logprob:reverse", "split": "holdout", "n": 24},
                      {"task": "simulate", "seconds": 0.001, "spread": 1.0, "seed": 1}]
    cfg["objectives"] = [{"name": "rev", "metrics": ["reverse_logprob"], "direction": "maximize"},
                         {"name": "sim", "metrics": ["simulated_seconds"], "direction": "minimize"}]
    folder = tmp_path_factory.mktemp("report") / "camp"
    CampaignRunner(parse_campaign(cfg), folder, progress=False).run()
    return folder


def rows_of(folder):
    journal = Journal(folder, create=False)
    try:
        return journal.candidates(), journal.checkpoints(), journal.get("baselines")
    finally:
        journal.close()


def assert_drawn(png):
    with Image.open(png) as image:
        assert image.size[0] > 400 and image.size[1] > 250
        assert np.asarray(image.convert("L")).std() > 10  # not a blank canvas


def test_plots_carry_exactly_the_journal_numbers(two_objectives):
    folder = two_objectives
    written = {p.stem: p for p in make_plots(folder)}
    assert set(written) == {"fitness", "front", "hypervolume", "coefficients"}  # no path: a PS campaign
    assert all(p.parent == folder / "plots" for p in written.values())
    rows, checkpoints, baselines = rows_of(folder)
    done = [r for r in rows if r.status == "done"]
    failed = [r for r in rows if r.status == "failed"]
    assert failed and done, "the fixture must have failures to leave out"

    fitness = read_plot_data(written["fitness"])["objectives"]
    for name, pick in (("rev", max), ("sim", min)):
        generations = sorted({r.generation for r in done})
        assert fitness[name]["generation"] == generations
        for g, best, median in zip(generations, fitness[name]["best"], fitness[name]["median"]):
            values = [r.objectives[name] for r in done if r.generation == g]
            assert best == pick(values) and median == statistics.median(values)

    hv = read_plot_data(written["hypervolume"])
    assert hv["hypervolume"] == [c["hypervolume"] for c in checkpoints]

    view = load_view(folder)
    front = read_plot_data(written["front"])
    assert [m["id"] for m in front["front"]] == [m.id for m in view.front] and len(view.front) >= 2
    assert sorted(p["id"] for p in front["points"]) == sorted(r.id for r in done)
    for drawn, member in zip(front["front"], view.front):
        assert drawn["fitness"] == member.objectives
        assert drawn["holdout"] == {k: member.holdout[k] for k in ("rev", "sim") if k in member.holdout}
    assert any(m["holdout"] for m in front["front"])

    coefficients = read_plot_data(written["coefficients"])
    winner = max(view.front, key=lambda m: m.objectives["rev"])
    assert coefficients["candidate"] == winner.id
    for source, recipe_source in zip(["e0", "e1", "e2"], winner.recipe["sources"]):
        for p in ("weight", "density"):
            rules = [r for r in recipe_source["parameters"][p] if "group" in r]
            drawn = coefficients["parameters"][p][source]
            assert drawn["values"] == [r["value"] for r in rules]
            assert drawn["cells"] == [r["group"] + (f"/{r['family']}" if r.get("family") else "") for r in rules]
    assert "block.2/mlp" in coefficients["parameters"]["weight"]["e0"]["cells"]
    for png in written.values():
        assert_drawn(png)


def test_dfs_path_plot_draws_the_winning_path(llama_family, tmp_path):
    cfg = dfs_config(llama_family)
    CampaignRunner(parse_campaign(cfg), tmp_path / "dfs", progress=False).run()
    res = evomerge_cli("plot", tmp_path / "dfs", "--out", tmp_path / "pics")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "pics").iterdir()) == ["fitness.png", "front.png", "hypervolume.png",
                                                                     "path.png"]
    best = max(load_view(tmp_path / "dfs").front, key=lambda m: m.objectives["lp"])
    drawn = read_plot_data(tmp_path / "pics" / "path.png")
    assert drawn["candidate"] == best.id
    assert drawn["steps"] == [{"model": s["model"], "layer": s["layer"], "scale": s.get("scale", 1.0)}
                              for s in best.recipe["path"]]
    assert_drawn(tmp_path / "pics" / "path.png")


def test_report_is_one_self_contained_page_with_the_campaigns_facts(two_objectives, tmp_path):
    folder = two_objectives
    res = evomerge_cli("report", folder, "--out", tmp_path / "r.html")
    assert res.returncode == 0, res.stderr
    page = (tmp_path / "r.html").read_text()
    # Nothing to fetch: no scripts, no links, no external images.
    assert not re.search(r"https?://|<script|<link|src=\"(?!data:image/png;base64,)", page)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")

    # Each embedded image is the plot `evomerge plot` draws, with the same numbers in it.
    reference = {p.stem: read_plot_data(p) for p in make_plots(folder, tmp_path / "plots")}
    embedded = re.findall(r'alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert sorted(name for name, _ in embedded) == sorted(reference)
    for name, data in embedded:
        png = tmp_path / f"{name}.png"
        png.write_bytes(base64.b64decode(data))
        assert read_plot_data(png) == reference[name]

    view = load_view(folder)
    rows, _, baselines = rows_of(folder)
    assert "tiny" in page and "nsga2" in page  # the name and the config
    for m in view.front:  # the front table, with its values
        assert f"<td>#{m.id}</td><td>{m.generation}</td><td>{m.objectives['rev']:.4f}</td>" in page
    assert f"<td>uniform</td><td>{baselines['uniform']['reverse_logprob']:.4f}</td>" in page
    winner = max(view.front, key=lambda m: m.objectives["rev"])
    assert f"Winner: candidate #{winner.id}" in page and "method: ties" in page
    failed = [r for r in rows if r.status == "failed"]
    section = page[page.index("<h3>Failures</h3>"):page.index("<h3>Config</h3>")]
    for r in failed:
        assert f"<td>#{r.id}</td>" in section and "simulated failure" in section
    assert "per candidate" in page and "session started" in page and "local" in page
    assert_drawn(png)
