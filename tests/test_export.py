"""Export of campaign winners: Hugging Face folders with a model card, a mergekit config that mergekit
rebuilds, the journal's baselines, `--front`, `inspect` and `status --watch`."""

import json
import os
import pty
import subprocess
import sys
import time

import pytest
import torch
import yaml

from evomerge.campaign import CampaignRunner
from evomerge.checkpoint import Checkpoint
from evomerge.config import parse_campaign
from evomerge.evaluate import evaluate_folder
from evomerge.view import load_view
from test_campaign import evomerge_cli, tiny_config, write_config

mergekit = pytest.importorskip("mergekit")


def run_mergekit_file(config_file, out):
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    config = yaml.safe_load(config_file.read_text())
    run_merge(MergeConfiguration.model_validate(config), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, lazy_unpickle=False, quiet=True))
    return Checkpoint(out)


def assert_same_weights(a: Checkpoint, b: Checkpoint, atol=1e-5):
    assert sorted(a.names()) == sorted(b.names())
    for n in a.names():
        assert torch.allclose(a.get(n), b.get(n), atol=atol, rtol=0), n


@pytest.fixture(scope="module")
def campaign(llama_family, tmp_path_factory):
    """A finished PS campaign with per-block, per-family coefficients (mergekit must get each one right)."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_config(llama_family, budget=16)
    cfg["search_space"]["families"] = True
    folder = tmp / "camp"
    CampaignRunner(parse_campaign(cfg), folder, progress=False).run()
    return folder, cfg


def test_export_is_a_hub_folder_whose_card_mergekit_config_and_scores_check_out(campaign, llama_family, tmp_path):
    from huggingface_hub import ModelCard
    from transformers import AutoModelForCausalLM

    folder, cfg = campaign
    view = load_view(folder)
    best = max(view.front, key=lambda m: m.objectives["lp"])
    out = tmp_path / "winner"
    res = evomerge_cli("export", folder, out, "--best")
    assert res.returncode == 0, res.stderr
    assert f"candidate #{best.id}" in res.stdout

    # Stock transformers loads it, and it scores what the campaign archived on the held-out split.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    for metric, task in (("reverse_logprob", "reverse"), ("sort_logprob", "sort")):
        report = evaluate_folder(out, {"task": f"synthetic-logprob:{task}", "split": "holdout", "n": 48})
        assert report["metrics"][metric] == pytest.approx(best.holdout[metric], abs=1e-6)

    # The card's metadata, as the Hub reads it.
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["base_model"] == [str(llama_family[f"expert{i}"]) for i in range(3)]
    assert {"merge", "evomerge", "ties"} <= set(data["tags"])
    assert data["library_name"] == "transformers"
    results = data["model-index"][0]["results"]
    by_split = {(r["dataset"]["split"], r["metrics"][0]["type"]): r for r in results}
    assert set(by_split) == {(s, m) for s in ("fitness", "holdout") for m in ("reverse_logprob", "sort_logprob")}
    held = by_split[("holdout", "reverse_logprob")]
    assert held["dataset"]["args"]["num_examples"] == 48
    assert held["metrics"][0]["value"] == pytest.approx(best.holdout["reverse_logprob"], abs=1e-6)
    assert held["metrics"][0]["args"]["scoring"] == "teacher-forced answer log-probability"
    assert by_split[("fitness", "sort_logprob")]["metrics"][0]["value"] == pytest.approx(best.metrics["sort_logprob"],
                                                                                         abs=1e-6)

    # The prose: sources, search, and the held-out table with the journal's baselines in it.
    text = card.text
    assert "`cma`" in text and "budget 16 candidates" in text and "`ps`" in text
    from evomerge.journal import Journal

    journal = Journal(folder, create=False)
    baselines = journal.get("baselines")
    journal.close()
    assert set(baselines) == {"e0", "e1", "e2", "uniform", "base"}
    assert f"| source `e1` | {baselines['e1']['reverse_logprob']:.4f} |" in text
    assert f"| uniform | {baselines['uniform']['reverse_logprob']:.4f} |" in text
    assert f"| **this model** (#{best.id}) | {best.holdout['reverse_logprob']:.4f} |" in text
    # A baseline is the source itself: scoring the source folder gives the same number.
    alone = evaluate_folder(llama_family["expert1"], {"task": "synthetic-logprob:reverse", "split": "holdout", "n": 48})
    assert baselines["e1"]["reverse_logprob"] == pytest.approx(alone["metrics"]["reverse_logprob"], abs=1e-6)

    # mergekit rebuilds the same weights from the exported config (per-block, per-family rules).
    mk_config = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert mk_config["merge_method"] == "ties"
    assert any(isinstance(m.get("parameters", {}).get("density"), list) for m in mk_config["models"])
    assert_same_weights(Checkpoint(out), run_mergekit_file(out / "mergekit_config.yml", tmp_path / "mk"))

    scores = json.loads((out / "evomerge_scores.json").read_text())
    assert scores["candidate"] == best.id and scores["holdout_identity"][0]["metrics"] == ["reverse_logprob"]


@pytest.mark.parametrize("case", ["linear_gradient_filter", "ties_gradient_filter", "breadcrumbs_ties",
                                  "dare_linear_density1", "model_stock", "slerp"])
def test_to_mergekit_round_trips_through_mergekit(case, llama_family, tmp_path):
    """evomerge recipe -> mergekit config -> mergekit's merge == evomerge's merge of the recipe."""
    from evomerge.merge import merge_to_disk
    from evomerge.mergekit_compat import from_mergekit, to_mergekit
    from test_mergekit_crosscheck import CASES

    fam = llama_family
    if case == "slerp":
        given = {"merge_method": "slerp", "base_model": str(fam["base"]), "dtype": "float32",
                 "models": [{"model": str(fam["base"])}, {"model": str(fam["expert1"])}],
                 "parameters": {"t": [{"filter": "self_attn", "value": [0.2, 0.9]}, {"value": 0.6}]}}
    else:
        given = CASES[case](fam)
    recipe = from_mergekit(given)
    merge_to_disk(recipe, tmp_path / "evo")
    written = tmp_path / "mk.yml"
    written.write_text(yaml.safe_dump(to_mergekit(recipe)))
    assert_same_weights(Checkpoint(tmp_path / "evo"), run_mergekit_file(written, tmp_path / "mk"))


def test_to_mergekit_refuses_what_mergekit_cannot_express(llama_family):
    from evomerge.errors import EvomergeError
    from evomerge.mergekit_compat import _as_setting, to_mergekit
    from evomerge.recipe import Recipe

    fam = llama_family
    component = Recipe.from_dict({"method": "linear", "base": str(fam["base"]), "component": {"model.layers.": "model.layers."},
                                  "sources": [{"model": str(fam["expert0"]), "parameters": {"weight": 1.0}}]})
    with pytest.raises(EvomergeError, match="component merge"):
        to_mergekit(component)
    # Names that are substrings of each other still resolve to their own values (longest first).
    values = {"a.b": 1.0, "a.b.c": 2.0, "x.a.b": 3.0, "a.bb": 1.0}
    rules = _as_setting(values)
    for name, want in values.items():
        assert next(r for r in rules if "filter" not in r or r["filter"] in name)["value"] == want


def test_export_front_writes_one_card_per_member_and_dare_says_its_drop_differs(llama_family, tmp_path):
    cfg = tiny_config(llama_family, budget=16, optimizer={"name": "nsga2", "population": 8})
    cfg["search_space"] = {"kind": "ps", "method": "dare_ties", "parameters": {"weight": [0.0, 1.0], "density": [0.3, 1.0]},
                           "granularity": "global"}
    # A second objective that does not follow the first (a time drawn per candidate) makes a front of several.
    cfg["fitness"] = [{"task": "synthetic-logprob:reverse", "split": "fitness", "n": 48},
                      {"task": "simulate", "seconds": 0.001, "spread": 1.0}]
    cfg["objectives"] = [{"name": "rev", "metrics": ["reverse_logprob"], "direction": "maximize"},
                         {"name": "sim", "metrics": ["simulated_seconds"], "direction": "minimize"}]
    cfg.pop("holdout")
    res = evomerge_cli("run", write_config(tmp_path, cfg), "--out", tmp_path / "run", "--quiet")
    assert res.returncode == 0, res.stderr
    front = load_view(tmp_path / "run").front
    assert len(front) >= 2
    res = evomerge_cli("export", tmp_path / "run", tmp_path / "front", "--front")
    assert res.returncode == 0, res.stderr
    assert sorted(p.name for p in (tmp_path / "front").iterdir()) == sorted(f"candidate-{m.id}" for m in front)
    for m in front:
        folder = tmp_path / "front" / f"candidate-{m.id}"
        card = (folder / "README.md").read_text()
        assert f"candidate #{m.id}" in card and "in expectation, not element for element" in card
        assert yaml.safe_load((folder / "mergekit_config.yml").read_text())["merge_method"] == "dare_ties"
        assert json.loads((folder / "evomerge_scores.json").read_text())["objectives"] == m.objectives
    # Again without --overwrite: refused before anything is written.
    res = evomerge_cli("export", tmp_path / "run", tmp_path / "front", "--front")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "--overwrite" in res.stderr


def test_inspect_shows_scores_with_what_measured_them(campaign):
    folder, _ = campaign
    best = max(load_view(folder).front, key=lambda m: m.objectives["lp"])
    res = evomerge_cli("inspect", folder, best.id)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.startswith(f"candidate #{best.id} (generation {best.generation}")
    assert f"reverse_logprob = {best.metrics['reverse_logprob']:.6g}   (synthetic-logprob:reverse [split fitness, n=48]" in out
    assert f"reverse_logprob = {best.holdout['reverse_logprob']:.6g}   (synthetic-logprob:reverse [split holdout, n=48]" in out
    assert "timings: materialize" in out and "method: ties" in out
    res = evomerge_cli("inspect", folder, best.id, "--json")
    assert json.loads(res.stdout)["recipe"] == best.recipe
    res = evomerge_cli("inspect", folder, 999)
    assert res.returncode == 2 and "no candidate #999 (ids run 1-16)" in res.stderr


def _slow_config(fam, budget):
    cfg = tiny_config(fam, budget=budget, optimizer={"name": "cma", "population": 4})
    cfg["objectives"] = [{"name": "sim", "metrics": ["simulated_seconds"], "direction": "minimize"}]
    cfg["fitness"] = [{"task": "simulate", "seconds": 0.3, "spread": 0.0}]
    cfg.pop("holdout")
    return cfg


def test_status_watch_follows_a_running_campaign_to_its_end(llama_family, tmp_path):
    config = write_config(tmp_path, _slow_config(llama_family, 8))
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    runner = subprocess.Popen([sys.executable, "-m", "evomerge", "run", config, "--out", tmp_path / "run", "--quiet"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 60
        while time.time() < deadline:  # the journal, with the config in it, appears after pre-flight
            try:
                if load_view(tmp_path / "run").budget:
                    break
            except Exception:
                time.sleep(0.1)
        watch = evomerge_cli("status", tmp_path / "run", "--watch", "--interval", "0.1", timeout=120)
    finally:
        runner.wait(timeout=120)
    assert runner.returncode == 0, runner.stderr.read()
    assert watch.returncode == 0, watch.stderr
    lines = watch.stdout.strip().splitlines()
    counts = [int(ln.split(": ")[1].split("/")[0]) for ln in lines]
    assert len(lines) >= 3 and counts == sorted(counts) and counts[-1] == 8, lines
    assert lines[-1].split(" | ")[0].endswith("done")
    assert "runner: pid" in watch.stdout  # while it ran, the watcher saw who ran it


def test_status_watch_on_a_terminal_draws_a_panel_and_ends_when_done(campaign):
    folder, _ = campaign
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "evomerge", "status", str(folder), "--watch"],
                            stdout=follower, stderr=follower, env=dict(os.environ, HF_HUB_OFFLINE="1", TERM="xterm"))
    os.close(follower)
    proc.wait(timeout=60)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    text = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0
    assert "16/16 candidates evaluated" in text and "best lp" in text and "━" in text  # rich's bar


def test_export_push_to_hub_uploads_the_folder_and_never_shows_the_token(campaign, tmp_path):
    from hub_standin import HubStandIn

    folder, _ = campaign
    secret = "hf_ExportPushSecret0123456789"
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN")}
    with HubStandIn() as hub:
        env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_TOKEN=secret)
        res = subprocess.run([sys.executable, "-m", "evomerge", "export", str(folder), str(tmp_path / "out"), "--best",
                              "--push-to-hub", "me/tiny-merge", "--private"], capture_output=True, text=True, env=env,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        assert secret not in res.stdout + res.stderr
        assert "pushed to " in res.stdout and not hub.unknown
        assert hub.repos["me/tiny-merge"]["private"] is True
        arrived = hub.files["me/tiny-merge"]
        local = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir() if p.is_file()}
        assert {"README.md", "model.safetensors", "mergekit_config.yml", "evomerge_recipe.yaml"} <= set(arrived)
        assert all(arrived[name] == data for name, data in local.items() if name in arrived)
        assert b"base_model:" in arrived["README.md"]
        assert ".evomerge-output" not in arrived  # evomerge's own bookkeeping stays local
