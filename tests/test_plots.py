"""`make_plots` and `write_report` draw and show exactly what the journal holds.

Each PNG carries the numbers it draws (text chunk "evomerge"); these tests recompute those numbers
from the journal of real tiny campaigns and compare, then check the pictures are real pictures and
the report is one self-contained page showing the same facts.
"""

import base64
import html
import io
import json
import re
import shutil
import sqlite3
import statistics

import numpy as np
import pytest
from PIL import Image

from evomerge.campaign import CampaignRunner
from evomerge.config import parse_campaign
from evomerge.errors import EvomergeError
from evomerge.hybrid import StagedRunner
from evomerge.journal import Journal
from evomerge.plots import DPI, make_plots, read_plot_data, size_of
from evomerge.report import write_report
from evomerge.view import load_view
from test_campaign import tiny_config
from test_dataflow import dfs_config, staged_config

GROUPS = ["embeddings", "block.0", "block.1", "block.2", "block.3", "final_norm", "lm_head"]  # 4-layer llama


def shorter(cfg, n=24):
    for ev in cfg["fitness"] + cfg["holdout"]:
        if "n" in ev:
            ev["n"] = n
    return cfg


@pytest.fixture(scope="module")
def ps_camp(llama_family, tmp_path_factory):
    """One objective, TIES per layer group and tensor family, a held-out set, and real failures."""
    cfg = shorter(tiny_config(llama_family, budget=16, optimizer={"name": "cma", "population": 8}))
    cfg["search_space"]["families"] = True
    cfg["fitness"].append({"task": "simulate", "seconds": 0.001, "fail_rate": 0.2})
    folder = tmp_path_factory.mktemp("plots") / "ps"
    CampaignRunner(parse_campaign(cfg), folder, progress=False).run()
    return folder


@pytest.fixture(scope="module")
def mo_camp(llama_family, tmp_path_factory):
    """NSGA-II, two maximized objectives."""
    cfg = shorter(tiny_config(llama_family, budget=16, optimizer={"name": "nsga2", "population": 8}))
    cfg["objectives"] = [{"name": "rev", "metrics": ["reverse_logprob"], "direction": "maximize"},
                         {"name": "sort", "metrics": ["sort_logprob"], "direction": "maximize"}]
    folder = tmp_path_factory.mktemp("plots") / "mo"
    CampaignRunner(parse_campaign(cfg), folder, progress=False).run()
    return folder


@pytest.fixture(scope="module")
def staged_camp(llama_family, tmp_path_factory):
    """PS (global weights) then DFS led by the PS winner."""
    folder = tmp_path_factory.mktemp("plots") / "hy"
    StagedRunner(staged_config(llama_family), folder, progress=False).run()
    return folder


def journal_facts(folder):
    journal = Journal(folder, create=False)
    try:
        return journal.candidates(), journal.checkpoints(), journal.get("baselines") or {}
    finally:
        journal.close()


def assert_picture(png, name, data):
    """Exactly the size its data calls for, and a drawing, not a blank canvas."""
    w, h = size_of(name, data)
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.size == (round(w * DPI), round(h * DPI))
        gray = np.asarray(image.convert("L"), dtype=float)
        colors = len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])
    assert gray.std() > 10 and (gray < 128).mean() > 0.005 and colors > 20


def winner(folder, objective):
    view = load_view(folder)
    return max(view.front, key=lambda m: m.objectives[objective])


def copy_campaign(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("plots", "report.html"))
    return dst


# -- plots -----------------------------------------------------------------------------------------


def test_ps_plots_carry_exactly_the_journal_numbers(ps_camp):
    written = make_plots(ps_camp)
    assert [p.name for p in written] == ["fitness.png", "front.png", "hypervolume.png", "coefficients.png"]
    assert all(p.parent == ps_camp / "plots" for p in written)  # the default folder
    data = {p.stem: read_plot_data(p) for p in written}
    assert all(d["kind"] == name for name, d in data.items())
    rows, checkpoints, baselines = journal_facts(ps_camp)
    done = [r for r in rows if r.status == "done"]
    failed = [r for r in rows if r.status == "failed"]
    assert done and failed and all("simulated failure" in r.error for r in failed)

    # fitness: best and median of the finished candidates of each generation; failures left out, counted.
    fit = data["fitness"]["objectives"]["lp"]
    generations = sorted({r.generation for r in done})
    assert fit["generation"] == generations and len(generations) >= 2
    for k, g in enumerate(generations):
        values = [r.objectives["lp"] for r in done if r.generation == g]
        assert fit["best"][k] == max(values) and fit["median"][k] == statistics.median(values)
        assert fit["values"][k] == values and fit["done"][k] == len(values)
        assert fit["failed"][k] == sum(r.generation == g for r in failed)
    assert fit["best_so_far"] == [max(fit["best"][:k + 1]) for k in range(len(generations))]
    assert data["fitness"]["raced"] == []

    # hypervolume: the checkpoints, generation by generation.
    hv = data["hypervolume"]
    assert hv["generation"] == [c["generation"] for c in checkpoints]
    assert hv["hypervolume"] == [c["hypervolume"] for c in checkpoints]
    assert hv["evaluated"] == [c["evaluated"] for c in checkpoints]

    # coefficients: the winner's rules, per parameter, source and cell, in model order.
    best = winner(ps_camp, "lp")
    coef = data["coefficients"]
    assert coef["candidate"] == best.id and coef["method"] == "ties"
    assert coef["groups"] == GROUPS and coef["families"] == ["attention", "mlp", "norm"]
    assert set(coef["parameters"]) == {"weight", "density"}
    for source, recipe_source in zip(["e0", "e1", "e2"], best.recipe["sources"]):
        for p in ("weight", "density"):
            rules = recipe_source["parameters"][p]
            assert "group" not in rules[-1]  # the catch-all is not a cell
            drawn = coef["parameters"][p][source]
            assert drawn["values"] == [r["value"] for r in rules[:-1]]
            assert drawn["cells"] == [r["group"] + (f"/{r['family']}" if "family" in r else "") for r in rules[:-1]]
    assert coef["parameters"]["weight"]["e1"]["cells"][:4] == ["embeddings", "block.0/attention", "block.0/mlp",
                                                               "block.0/norm"]

    # front, one objective: fitness against held-out of the scored candidates, and the baselines.
    front = data["front"]
    view = load_view(ps_camp)
    assert [m["id"] for m in front["front"]] == [m.id for m in view.front]
    held = [r for r in done if r.holdout and "lp" in r.holdout]
    assert held
    assert front["holdout_points"] == [{"id": r.id, "fitness": {"lp": r.objectives["lp"]},
                                        "holdout": {"lp": r.holdout["lp"]}, "front": r.id in {m.id for m in view.front}}
                                       for r in held]
    assert set(baselines) == {"e0", "e1", "e2", "uniform", "base"}
    assert front["baselines"] == {name: {"lp": s["lp"]} for name, s in baselines.items()}
    assert sorted(p["id"] for p in front["points"]) == [r.id for r in done]

    for p in written:
        assert_picture(p, p.stem, data[p.stem])
    assert not list((ps_camp / "plots").glob(".*"))  # no temporary file left behind


def test_raced_candidates_are_marked_and_left_out_of_best_and_median(ps_camp, tmp_path):
    folder = copy_campaign(ps_camp, tmp_path / "raced")
    rows, _, _ = journal_facts(folder)
    best = winner(folder, "lp").id
    gen0 = [r for r in rows if r.status == "done" and r.generation == 0 and r.id != best]
    raced = [gen0[0].id, gen0[-1].id]
    con = sqlite3.connect(folder / "journal.sqlite")
    con.executemany("UPDATE candidates SET status = 'raced' WHERE id = ?", [(i,) for i in raced])
    con.commit()
    con.close()

    data = {p.stem: read_plot_data(p) for p in make_plots(folder, tmp_path / "out")}
    fit = data["fitness"]
    assert [r["id"] for r in fit["raced"]] == raced
    assert all(r["generation"] == 0 and r["objectives"] == next(x.objectives for x in rows if x.id == r["id"])
               for r in fit["raced"])
    kept = [r.objectives["lp"] for r in rows if r.status == "done" and r.generation == 0 and r.id not in raced]
    lp = fit["objectives"]["lp"]
    assert lp["median"][0] == statistics.median(kept) and lp["best"][0] == max(kept) and lp["raced"][0] == 2
    assert lp["values"][0] == kept
    assert not {p["id"] for p in data["front"]["points"]} & set(raced)


def test_nothing_to_draw_is_not_drawn(ps_camp, tmp_path):
    # One objective and no held-out score anywhere: front.png would show nothing fitness.png does not.
    folder = copy_campaign(ps_camp, tmp_path / "noholdout")
    con = sqlite3.connect(folder / "journal.sqlite")
    con.execute("UPDATE candidates SET holdout = NULL")
    con.execute("DELETE FROM meta WHERE key = 'baselines'")
    con.commit()
    con.close()
    assert [p.name for p in make_plots(folder)] == ["fitness.png", "hypervolume.png", "coefficients.png"]
    # No finished candidate at all: nothing, and no folder made for nothing.
    con = sqlite3.connect(folder / "journal.sqlite")
    con.execute("UPDATE candidates SET status = 'failed', error = 'x'")
    con.execute("UPDATE checkpoints SET hypervolume = NULL")
    con.commit()
    con.close()
    assert make_plots(folder, tmp_path / "empty") == []
    assert not (tmp_path / "empty").exists()


def test_two_objective_front_lists_the_front_and_its_held_out_scores(mo_camp, tmp_path):
    written = {p.stem: p for p in make_plots(mo_camp, tmp_path / "pics")}
    assert set(written) == {"fitness", "front", "hypervolume", "coefficients"}
    front = read_plot_data(written["front"])
    view = load_view(mo_camp)
    rows, checkpoints, baselines = journal_facts(mo_camp)
    assert front["objectives"] == ["rev", "sort"] and front["directions"] == ["maximize", "maximize"]
    assert [m["id"] for m in front["front"]] == [m.id for m in view.front] and len(view.front) >= 2
    for drawn, member in zip(front["front"], view.front):
        assert drawn["fitness"] == {"rev": member.objectives["rev"], "sort": member.objectives["sort"]}
        assert drawn["holdout"] == {k: member.holdout[k] for k in ("rev", "sort") if k in member.holdout}
        assert drawn["duplicates"] == member.duplicates and drawn["generation"] == member.generation
    assert sum(bool(m["holdout"]) for m in front["front"]) >= 2  # held-out points to draw beside fitness
    assert [p["id"] for p in front["points"]] == [r.id for r in rows if r.status == "done"]
    assert front["baselines"]["uniform"] == {"rev": baselines["uniform"]["rev"], "sort": baselines["uniform"]["sort"]}
    # Nothing on the front is dominated by a finished candidate.
    for m in front["front"]:
        f = m["fitness"]
        assert not any(p["rev"] >= f["rev"] and p["sort"] >= f["sort"] and (p["rev"], p["sort"]) != (f["rev"], f["sort"])
                       for p in front["points"])
    fit = read_plot_data(written["fitness"])["objectives"]
    assert set(fit) == {"rev", "sort"}
    assert read_plot_data(written["hypervolume"])["hypervolume"] == [c["hypervolume"] for c in checkpoints]
    for name, p in written.items():
        assert_picture(p, name, read_plot_data(p))


def test_dfs_path_plot_is_the_winning_path(llama_family, tmp_path):
    CampaignRunner(parse_campaign(dfs_config(llama_family)), tmp_path / "dfs", progress=False).run()
    written = {p.stem: p for p in make_plots(tmp_path / "dfs")}
    assert set(written) == {"fitness", "front", "hypervolume", "path"}  # no coefficients: not a PS campaign
    best = winner(tmp_path / "dfs", "lp")
    drawn = read_plot_data(written["path"])
    assert drawn["candidate"] == best.id and drawn["lead"] == best.recipe["lead"]
    assert drawn["models"] == list(best.recipe["models"]) == ["a", "b"]
    assert drawn["steps"] == [{"model": s["model"], "layer": s["layer"], "scale": s.get("scale", 1.0)}
                              for s in best.recipe["path"]]
    assert len(drawn["steps"]) >= 2
    assert_picture(written["path"], "path", drawn)


def test_a_staged_campaign_is_plotted_stage_by_stage(staged_camp, tmp_path):
    written = make_plots(staged_camp, tmp_path / "out")
    by_stage = {}
    for p in written:
        by_stage.setdefault(p.parent.name, []).append(p.name)
        assert p.parent.parent == tmp_path / "out"
    assert by_stage == {"ps": ["fitness.png", "front.png", "hypervolume.png", "coefficients.png"],
                        "dfs": ["fitness.png", "front.png", "hypervolume.png", "path.png"]}
    # The PS stage searched one weight per source: bars of exactly the recipe's weights.
    coef = read_plot_data(tmp_path / "out" / "ps" / "coefficients.png")
    best = winner(staged_camp / "ps", "lp")
    assert coef["groups"] == ["all"] and coef["candidate"] == best.id
    assert coef["parameters"]["weight"] == {name: {"cells": ["all"], "values": [s["parameters"]["weight"]]}
                                            for name, s in zip(["e0", "e1", "e2"], best.recipe["sources"])}
    assert_picture(tmp_path / "out" / "ps" / "coefficients.png", "coefficients", coef)
    path = read_plot_data(tmp_path / "out" / "dfs" / "path.png")
    best = winner(staged_camp / "dfs", "lp")
    assert path["lead"] == "merged" and path["steps"] == [
        {"model": s["model"], "layer": s["layer"], "scale": s.get("scale", 1.0)} for s in best.recipe["path"]]
    # Default: DIR/plots/<stage>/.
    assert {p.relative_to(staged_camp).parts[:2] for p in make_plots(staged_camp)} == {("plots", "ps"), ("plots", "dfs")}


# -- the report ------------------------------------------------------------------------------------


def embedded_plots(page: str) -> list[tuple[str, dict, bytes]]:
    out = []
    for name, data in re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page):
        raw = base64.b64decode(data, validate=True)
        assert raw.startswith(b"\x89PNG\r\n\x1a\n")
        with Image.open(io.BytesIO(raw)) as image:
            image.load()
            out.append((name, json.loads(image.text["evomerge"]), raw))
    return out


def assert_self_contained(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:image/png;base64,", page)
    assert not re.search(r"https?://|ftp://|<script|<link|<iframe|<object|<embed|@import|url\(", text, re.I)
    assert not re.search(r"(src|href|action)=\"(?!data:image/png;base64,\")", text)


def test_report_is_one_self_contained_page_of_the_campaigns_facts(ps_camp, tmp_path):
    folder = copy_campaign(ps_camp, tmp_path / "camp")
    # A pending candidate whose last attempt failed for a reason not its own, with markup in its error.
    journal = Journal(folder, create=False)
    pending = journal.add_pending(99, 0, [0.5], {"method": "ties", "sources": []})
    journal.record_infrastructure_error(pending, "worker lost <b>&</b> gone")
    journal.close()

    out = write_report(folder)
    assert out == folder / "report.html"
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    assert not list(folder.glob(".report.html*"))  # written through a temporary file, none left

    # Each plot, embedded, is the PNG make_plots writes, with the same numbers in it.
    reference = {p.stem: read_plot_data(p) for p in make_plots(folder, tmp_path / "plots")}
    embedded = embedded_plots(page)
    assert [name for name, _, _ in embedded] == list(reference) == ["fitness", "front", "hypervolume", "coefficients"]
    for name, data, raw in embedded:
        assert data == reference[name]
        png = tmp_path / f"embedded-{name}.png"
        png.write_bytes(raw)
        assert_picture(png, name, data)

    view = load_view(folder)
    rows, _, baselines = journal_facts(folder)
    best = max(view.front, key=lambda m: m.objectives["lp"])
    assert "<h2>tiny</h2>" in page and "<td>campaign</td><td>tiny</td>" in page
    assert f"<td>status</td><td>{view.evaluated}/16 candidates evaluated, done</td>" in page
    assert f"<td>front size</td><td>{len(view.front)}</td>" in page
    assert f"<td>best lp (maximize)</td><td>{view.best['lp']:.4f}</td>" in page
    # the front table: id, generation, objective, held-out
    for m in view.front:
        assert (f"<td>#{m.id}</td><td>{m.generation}</td><td>{m.objectives['lp']:.4f}</td>"
                f"<td>reverse_logprob={m.holdout['reverse_logprob']:.4f}") in page
    # the held-out table: base, the sources, uniform, then the winner; metrics then the objective
    table = page[page.index("<h3>Held-out"):page.index("<h3>Pareto front</h3>")]
    assert "<th>model</th><th>reverse_logprob</th><th>sort_logprob</th><th>lp</th>" in table
    names = re.findall(r"<tr(?: class=\"win\")?><td>([^<]+)</td>", table)
    assert names == ["base", "e0", "e1", "e2", "uniform", f"front #{best.id} (winner)"]
    for name, s in baselines.items():
        assert (f"<td>{name}</td><td>{s['reverse_logprob']:.4f}</td><td>{s['sort_logprob']:.4f}</td>"
                f"<td>{s['lp']:.4f}</td>") in table
    # the winner's recipe, as YAML (escaped)
    assert f"Winner: candidate #{best.id}" in page
    assert "method: ties" in page and f"- model: {best.recipe['sources'][0]['model']}" in page
    assert f"value: {best.recipe['sources'][2]['parameters']['density'][5]['value']}" in page
    # the config, escaped YAML
    config = page[page.index("<h3>Config</h3>"):]
    assert "name: tiny" in config and "fail_rate: 0.2" in config and "optimizer:" in config
    # timings
    timings = page[page.index("<h3>Timings</h3>"):page.index("<h3>Failures</h3>")]
    materialize = [r.materialize_s for r in rows if r.materialize_s is not None]
    assert f"<td>materialize (s)</td><td>{len(materialize)}</td>" in timings
    assert "<th>session started</th>" in timings and "<td>local</td>" in timings
    # failures: every failed candidate's error, and the infrastructure error, escaped
    failures = page[page.index("<h3>Failures</h3>"):page.index("<h3>Config</h3>")]
    failed = [r for r in rows if r.status == "failed"]
    assert failed
    for r in failed:
        assert f"<td>#{r.id}</td><td>{r.generation}</td><td>candidate</td><td>{html.escape(r.error)}</td>" in failures
    assert f"<td>#{pending}</td>" in failures and "worker lost &lt;b&gt;&amp;&lt;/b&gt; gone" in failures
    assert "<b>&" not in page


def test_report_of_a_staged_campaign_has_a_section_per_stage(staged_camp, tmp_path):
    out = write_report(staged_camp, tmp_path / "sub" / "r.html")
    page = out.read_text(encoding="utf-8")
    assert_self_contained(page)
    sections = page.split('<section class="stage">')[1:]
    assert len(sections) == 2
    assert sections[0].startswith("<h2>stage ps: hy/ps</h2>") and sections[1].startswith("<h2>stage dfs: hy/dfs</h2>")
    assert [n for n, _, _ in embedded_plots(sections[0])] == ["fitness", "front", "hypervolume", "coefficients"]
    assert [n for n, _, _ in embedded_plots(sections[1])] == ["fitness", "front", "hypervolume", "path"]
    for stage, section in zip(("ps", "dfs"), sections):
        view = load_view(staged_camp / stage)
        best = max(view.front, key=lambda m: m.objectives["lp"])
        assert f"Winner: candidate #{best.id}" in section
        assert f"<td>#{best.id}</td><td>{best.generation}</td><td>{best.objectives['lp']:.4f}</td>" in section
    path = dict((n, d) for n, d, _ in embedded_plots(sections[1]))["path"]
    assert path == read_plot_data(make_plots(staged_camp, tmp_path / "p")[-1])


# -- errors a user can cause -----------------------------------------------------------------------


def one_line(exc) -> str:
    text = str(exc.value)
    assert text and "\n" not in text and "Traceback" not in text
    return text


def test_a_folder_without_a_journal_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for call in (lambda: make_plots(tmp_path / "empty"), lambda: write_report(tmp_path / "empty"),
                 lambda: make_plots(tmp_path / "missing"), lambda: write_report(tmp_path / "missing")):
        with pytest.raises(EvomergeError) as exc:
            call()
        assert "holds no campaign journal" in one_line(exc)
    assert list((tmp_path / "empty").iterdir()) == []  # nothing written for nothing
    assert not (tmp_path / "missing").exists()


def test_an_output_that_cannot_be_written_is_one_line(ps_camp, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(EvomergeError) as exc:
        make_plots(ps_camp, blocker)
    assert "cannot write plots to" in one_line(exc)
    with pytest.raises(EvomergeError) as exc:
        make_plots(ps_camp, blocker / "sub")
    assert "cannot write plots to" in one_line(exc)
    with pytest.raises(EvomergeError) as exc:
        write_report(ps_camp, blocker / "report.html")
    assert "cannot write" in one_line(exc)
    with pytest.raises(EvomergeError) as exc:
        write_report(ps_camp, tmp_path)  # a folder, not a file
    assert "cannot write" in one_line(exc)
    with pytest.raises(EvomergeError) as exc:
        read_plot_data(blocker)
    one_line(exc)
