"""Data-flow space: decode, paths over shared layers with their own KV-cache slots, folded exports
that stock transformers loads, DFS campaigns, staged PS+DFS campaigns and their resume, bad input."""

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from evomerge.cli import main
from evomerge.dataflow import PathBank, PathRecipe, Step, export_path
from evomerge.errors import EvomergeError
from evomerge.search_spaces.dfs import DataFlowSpace
from killing import run_until

# The fold is exact but for the RMS norms' epsilon: with eps 1e-12 the logits agree to float32
# rounding (measured 9e-8); with the family's eps 1e-6, to 1e-4 of logits of size 0.5 (these tiny
# random models have a small residual stream, so the epsilon weighs more than in a trained model).
EXACT_ATOL = 1e-6
EPS_RTOL = 1e-3  # of the largest logit
IDS = torch.tensor([[5, 9, 12, 30, 31, 7, 40, 41, 3]])


def recipe(fam, steps, lead="a"):
    return PathRecipe({"a": str(fam["expert0"]), "b": str(fam["expert1"])}, [Step(*s) for s in steps], lead)


def test_decode_start_point_layout_and_scales():
    space = DataFlowSpace({"a": "A", "b": "B"}, {"a": 3, "b": 2}, "a", repeats=2, fix_ends=True, scales="full",
                          scale_range=(0.5, 2.0))
    m = 5
    assert space.slots == m * 2 and space.dim == m * 2 + m * m
    assert space.names[0] == "on@0:a.0" and space.names[m] == "on@1:a.0" and space.names[-1] == "scale@b.1->b.1"
    # The start point is the lead's own model: its layers in order, every scale 1.
    start = space.decode(space.x0)
    assert [(s.model, s.layer, s.scale) for s in start.path] == [("a", 0, 1.0), ("a", 1, 1.0), ("a", 2, 1.0)]
    # Slots on: b.1 in repeat 0, a.1 in repeat 1; a scale on the a.0 -> b.1 transition only.
    x = np.full(space.dim, space._scale_x(1.0))
    x[: space.slots] = 0.2
    x[4] = x[m + 1] = 0.9
    x[space.slots + 0 * m + 4] = 1.0  # W[a.0, b.1] = 2.0
    path = space.decode(x).path
    assert [(s.model, s.layer) for s in path] == [("a", 0), ("b", 1), ("a", 1), ("a", 2)]
    assert [s.scale for s in path] == [1.0, 2.0, 1.0, 1.0]
    # Compact W: one scale per model pair.
    pairs = DataFlowSpace({"a": "A", "b": "B"}, {"a": 3, "b": 2}, "a", 1, False, "pairs", (0.5, 2.0))
    assert pairs.dim == 5 + 4 and pairs.names[-3:] == ["scale@a->b", "scale@b->a", "scale@b->b"]
    x = np.zeros(pairs.dim)
    x[[0, 3]] = 0.9
    x[5 + 1] = 0.0  # a -> b at the low end of the range
    assert [(s.model, s.layer, s.scale) for s in pairs.decode(x).path] == [("a", 0, 1.0), ("b", 0, 0.5)]
    # Without fixed ends a genome with no slot on is the single strongest slot, never an empty path.
    x = np.zeros(pairs.dim)
    x[2] = 0.4
    assert [(s.model, s.layer) for s in pairs.decode(x).path] == [("a", 2)]
    # A decoded recipe is plain YAML that parses back to the same path.
    text = space.decode(space.x0).to_yaml()
    assert PathRecipe.from_dict(yaml.safe_load(text)).to_dict() == space.decode(space.x0).to_dict()


def test_repeated_layers_have_their_own_cache_slots_and_generate_like_the_unrolled_model(llama_family, tmp_path):
    from transformers import AutoModelForCausalLM

    steps = [("a", 0), ("b", 1), ("a", 1), ("b", 1), ("a", 1), ("a", 3)]
    r = recipe(llama_family, steps)
    bank = PathBank([str(llama_family["expert0"]), str(llama_family["expert1"])], str(llama_family["expert0"]))
    model = bank.materialize(r)
    ids = torch.tensor([[5, 9, 12, 30, 31, 7, 40]])
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        assert len(cache.layers) == len(steps)
        # A layer used twice writes two different slots (its inputs differ), not one slot twice.
        assert not torch.equal(cache.layers[1].keys, cache.layers[3].keys)
        cached = model.generate(ids, max_new_tokens=24, do_sample=False)
        uncached = model.generate(ids, max_new_tokens=24, do_sample=False, use_cache=False)
    # The unrolled model: a plain model of len(path) layers with copies of the weights.
    export_path(r, tmp_path / "unrolled")
    unrolled = AutoModelForCausalLM.from_pretrained(tmp_path / "unrolled", trust_remote_code=False).eval()
    assert unrolled.config.num_hidden_layers == len(steps)
    with torch.no_grad():
        reference = unrolled.generate(ids, max_new_tokens=24, do_sample=False)
        assert torch.equal(model(ids).logits, unrolled(ids).logits)
    assert torch.equal(cached, uncached) and torch.equal(cached, reference)
    # Building a path of 100 layers is a list of wrappers: no weight is copied.
    long = recipe(llama_family, [("a" if i % 2 else "b", i % 4) for i in range(100)])
    before = {id(p) for p in model.parameters()}
    start = time.perf_counter()
    built = bank.materialize(long)
    assert time.perf_counter() - start < 0.5
    assert {id(p) for p in built.parameters()} <= before | {id(p) for p in bank.models[str(llama_family["expert1"])].parameters()}


def fold_gap(fam, steps, out):
    from transformers import AutoModelForCausalLM

    r = recipe(fam, steps)
    bank = PathBank([str(fam["expert0"]), str(fam["expert1"])], str(fam["expert0"]))
    ids = IDS
    with torch.no_grad():
        path_logits = bank.materialize(r)(ids).logits
    export_path(r, out)
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    with torch.no_grad():
        folded_logits = model(ids).logits
    return (folded_logits - path_logits).abs().max().item(), path_logits


def test_folded_export_matches_the_path_model_and_loads_without_remote_code(llama_family, tmp_path):
    import shutil

    from transformers import AutoModelForCausalLM

    steps = [("a", 0, 1.0), ("b", 2, 1.7), ("a", 1, 0.6), ("b", 2, 1.3), ("a", 3, 0.8)]
    gap, path_logits = fold_gap(llama_family, steps, tmp_path / "folded")
    assert gap <= EPS_RTOL * path_logits.abs().max().item(), gap
    out = tmp_path / "folded"
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == len(steps) and "auto_map" not in config
    assert not list(out.glob("*.py"))
    # With a negligible epsilon the fold is exact to float32 rounding, repeated layers included.
    exact = {k: Path(shutil.copytree(llama_family[k], tmp_path / k)) for k in ("expert0", "expert1")}
    for folder in exact.values():
        cfg = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps(dict(cfg, rms_norm_eps=1e-12)))
    gap, _ = fold_gap(exact, steps, tmp_path / "exact")
    assert gap <= EXACT_ATOL, gap
    # The scales really matter: unfolded copies of the same layers give other logits.
    plain = export_path(recipe(llama_family, [s[:2] for s in steps]), tmp_path / "plain")
    with torch.no_grad():
        plain_logits = AutoModelForCausalLM.from_pretrained(plain).eval()(IDS).logits
    assert (plain_logits - path_logits).abs().max() > 10 * EPS_RTOL * path_logits.abs().max()
    # Output projections of position 3 carry 1 / (1.7 * 0.6 * 1.3); its other tensors are copies.
    from safetensors.torch import load_file

    folded = load_file(out / "model.safetensors")
    src = load_file(llama_family["expert1"] / "model.safetensors") if (llama_family["expert1"] / "model.safetensors").exists() else None
    if src is None:
        from evomerge.checkpoint import Checkpoint

        ck = Checkpoint(llama_family["expert1"])
        src = {n: ck.get(n) for n in ck.names()}
    torch.testing.assert_close(folded["model.layers.3.mlp.down_proj.weight"],
                               src["model.layers.2.mlp.down_proj.weight"] / (1.7 * 0.6 * 1.3))
    assert torch.equal(folded["model.layers.3.mlp.up_proj.weight"], src["model.layers.2.mlp.up_proj.weight"])


def dfs_config(fam, **over):
    cfg = {
        "name": "dfs",
        "seed": 1,
        "sources": {"a": str(fam["expert0"]), "b": str(fam["expert1"])},
        "search_space": {"kind": "dfs", "repeats": 2, "scales": "pairs"},
        "optimizer": {"name": "cma", "population": 6},
        "budget": 12,
        "objectives": [{"name": "lp", "metrics": ["reverse_logprob"], "direction": "maximize"}],
        "fitness": [{"task": "synthetic-logprob:reverse", "split": "fitness", "n": 24}],
        "holdout": [{"task": "synthetic-logprob:reverse", "split": "holdout", "n": 24}],
    }
    cfg.update(over)
    return cfg


def cli(*argv):
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return exc.code


def test_dfs_campaign_exports_a_model_whose_score_equals_the_archived_one(llama_family, tmp_path, capsys):
    from evomerge.evaluate import evaluate_folder
    from evomerge.view import load_view

    config = tmp_path / "dfs.yaml"
    config.write_text(yaml.safe_dump(dfs_config(llama_family)))
    assert cli("run", config, "--out", tmp_path / "run", "--quiet") == 0
    view = load_view(tmp_path / "run")
    assert view.done and view.evaluated == 12
    best = max(view.front, key=lambda m: m.objectives["lp"])
    assert cli("export", tmp_path / "run", tmp_path / "best", "--best") == 0
    assert f"candidate #{best.id}" in capsys.readouterr().out
    config_out = json.loads((tmp_path / "best" / "config.json").read_text())
    assert config_out["num_hidden_layers"] == len(best.recipe["path"])
    # The card names the path; a data-flow recipe has no mergekit form, and says so.
    card = (tmp_path / "best" / "README.md").read_text()
    assert f"a layer path of {len(best.recipe['path'])} layers" in card and "dataflow-merge" in card
    assert "has no mergekit form" in card and not (tmp_path / "best" / "mergekit_config.yml").exists()
    # The export scores what the campaign archived, on the same evaluator (a mean log-probability
    # near -4.6: equal to 1e-4, the norms' epsilon; exact-match accuracies come out equal).
    report = evaluate_folder(tmp_path / "best", {"task": "synthetic-logprob:reverse", "split": "fitness", "n": 24})
    assert report["metrics"]["reverse_logprob"] == pytest.approx(best.metrics["reverse_logprob"], abs=1e-4)
    # The exported recipe rebuilds the same weights with `evomerge merge`.
    assert cli("merge", tmp_path / "best" / "evomerge_recipe.yaml", tmp_path / "again", "--quiet") == 0
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "best" / "model.safetensors"), load_file(tmp_path / "again" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def staged_config(fam, dfs_budget=12):
    shared = dfs_config(fam)
    for key in ("search_space", "optimizer", "budget", "sources"):
        shared.pop(key)
    shared.update(name="hy", base=str(fam["base"]), sources={f"e{i}": str(fam[f"expert{i}"]) for i in range(3)})
    shared["stages"] = [
        {"name": "ps", "search_space": {"kind": "ps", "method": "task_arithmetic", "parameters": {"weight": [0, 1]}},
         "optimizer": {"name": "cma", "population": 6}, "budget": 12},
        {"name": "dfs", "base": None, "sources": {"merged": "stage:ps", "e1": str(fam["expert1"])},
         "search_space": {"kind": "dfs", "lead": "merged", "scales": "pairs"},
         "optimizer": {"name": "cma", "population": 6}, "budget": dfs_budget},
    ]
    return shared


def journal_rows(folder):
    con = sqlite3.connect(folder / "journal.sqlite")
    rows = {r[0]: r[1:] for r in con.execute("SELECT id, genome, metrics, finished, attempts FROM candidates "
                                            "WHERE status = 'done'")}
    con.close()
    return rows


def front_of(folder):
    from evomerge.view import load_view

    return [(m.id, round(m.objectives["lp"], 10), json.dumps(m.recipe, sort_keys=True)) for m in load_view(folder).front]


@pytest.fixture(scope="module")
def staged_reference(llama_family, tmp_path_factory):
    from evomerge.hybrid import StagedRunner

    folder = tmp_path_factory.mktemp("staged") / "ref"
    StagedRunner(staged_config(llama_family, dfs_budget=24), folder, progress=False).run()
    return folder


def test_stage_hand_off_the_ps_winner_leads_the_dfs_stage(staged_reference, llama_family, tmp_path, capsys):
    from evomerge.export import choose_candidate, recipe_from_dict
    from evomerge.merge import merge_to_disk
    from safetensors.torch import load_file

    winner = choose_candidate(staged_reference / "ps")
    stored = json.loads((staged_reference / "ps" / "winner" / "evomerge_winner.json").read_text())
    assert stored["candidate"] == winner["id"] and stored["recipe"] == winner["recipe"]
    # The winner folder holds exactly the PS winner's merge.
    merge_to_disk(recipe_from_dict(winner["recipe"]), tmp_path / "again")
    a = load_file(staged_reference / "ps" / "winner" / "model.safetensors")
    b = load_file(tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # ... and it is the lead of every path the DFS stage evaluated.
    lead = str((staged_reference / "ps" / "winner").resolve())
    rows = journal_rows(staged_reference / "dfs")
    assert len(rows) == 24
    for member in [m for m in json.loads(json.dumps(front_of(staged_reference / "dfs")))]:
        r = json.loads(member[2])
        assert r["models"][r["lead"]] == lead
    assert cli("status", staged_reference) == 0
    out = capsys.readouterr().out
    assert re.search(r"stage ps: 12/12 candidates, done", out) and re.search(r"stage dfs: 24/24 candidates, done", out)


def test_staged_campaign_resumes_between_stages_exactly(staged_reference, llama_family, tmp_path, monkeypatch):
    """Stopped after stage 1 and before its winner was written: resume writes it and ends as the reference."""
    from evomerge import hybrid

    cfg = staged_config(llama_family, dfs_budget=24)

    def stop(self, folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(hybrid.StagedRunner, "write_winner", stop)
    with pytest.raises(KeyboardInterrupt):
        hybrid.StagedRunner(cfg, tmp_path / "run", progress=False).run()
    assert (tmp_path / "run" / "ps" / "journal.sqlite").exists() and not (tmp_path / "run" / "ps" / "winner").exists()
    monkeypatch.undo()
    assert cli("resume", tmp_path / "run", "--quiet") == 0
    assert front_of(tmp_path / "run" / "dfs") == [(i, v, r.replace(str((staged_reference / "ps" / "winner").resolve()),
                                                                   str((tmp_path / "run" / "ps" / "winner").resolve())))
                                                  for i, v, r in front_of(staged_reference / "dfs")]


def test_staged_campaign_sigkilled_in_stage_two_resumes_exactly(staged_reference, llama_family, tmp_path):
    config = tmp_path / "staged.yaml"
    config.write_text(yaml.safe_dump(staged_config(llama_family, dfs_budget=24)))
    folder = tmp_path / "killed"
    _, done = run_until(config, folder, folder / "dfs" / "journal.sqlite", 7, timeout=240)
    assert 7 <= done < 24, "the kill must land inside stage two"
    before = journal_rows(folder / "dfs")
    res = subprocess.run([sys.executable, "-m", "evomerge", "resume", str(folder), "--quiet"], capture_output=True,
                         text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert res.returncode == 0, res.stderr
    after = journal_rows(folder / "dfs")
    assert all(after[cid] == row for cid, row in before.items())  # nothing evaluated twice
    assert len(after) == 24
    ref = [(i, v) for i, v, _ in front_of(staged_reference / "dfs")]
    assert [(i, v) for i, v, _ in front_of(folder / "dfs")] == ref


@pytest.fixture
def narrow_family(tmp_path_factory):
    from evomerge.tiny import build_family

    return build_family(tmp_path_factory.mktemp("narrow"), 1, arch="llama", hidden=16, layers=2, seed=5)


def bad(capsys, *argv):
    code = cli(*argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


def test_staged_folders_refuse_other_configs(staged_reference, llama_family, tmp_path, capsys):
    def run(cfg, folder):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return bad(capsys, "run", path, "--out", folder, "--quiet")

    before = sorted(p.name for p in staged_reference.iterdir())
    assert re.search(r"holds a staged campaign; start this config in a new --out folder",
                     run(dfs_config(llama_family), staged_reference))
    edited = staged_config(llama_family, dfs_budget=30)
    assert re.search(r"holds a staged campaign with a different config \(stages\[1\].budget: 24 -> 30\)",
                     run(edited, staged_reference))
    assert sorted(p.name for p in staged_reference.iterdir()) == before
    assert re.search(r"unknown field 'scal'; allowed: model, layer, scale; did you mean 'scale'",
                     bad(capsys, "merge", _write(tmp_path / "r.yaml", {"models": {"a": str(llama_family["expert0"])},
                                                                      "path": [{"model": "a", "layer": 0, "scal": 2}]}),
                         tmp_path / "m"))


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def test_bad_data_flow_input_is_one_clear_line(llama_family, gpt2_family, narrow_family, tmp_path, capsys):
    def run(cfg):
        path = tmp_path / "c.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return bad(capsys, "run", path, "--out", tmp_path / "out", "--quiet")

    mixed = dfs_config(llama_family, sources={"a": str(llama_family["expert0"]), "n": str(narrow_family["expert0"])})
    assert re.search(r"n has hidden_size 16 and a has 32; models in one path must share hidden size, head layout",
                     run(mixed))
    heads = tmp_path / "heads"
    import shutil

    shutil.copytree(llama_family["expert1"], heads)
    cfg = json.loads((heads / "config.json").read_text())
    cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    (heads / "config.json").write_text(json.dumps(cfg))
    assert re.search(r"num_key_value_heads .* models in one path must share", run(
        dfs_config(llama_family, sources={"a": str(llama_family["expert0"]), "h": str(heads)})))
    assert re.search(r"'search_space.repeats': bad value 0; allowed: an integer from 1",
                     run(dfs_config(llama_family, search_space={"kind": "dfs", "repeats": 0})))
    assert re.search(r"'search_space.lead': 'c' is not a source",
                     run(dfs_config(llama_family, search_space={"kind": "dfs", "lead": "c"})))
    assert re.search(r"'base': a dfs search space runs layers of the sources and never reads a base",
                     run(dfs_config(llama_family, base=str(llama_family["base"]))))
    assert re.search(r"model type 'gpt2' cannot take a data-flow \(layer path\) merge",
                     run(dfs_config(llama_family, sources={"a": str(gpt2_family["expert0"]),
                                                           "b": str(gpt2_family["expert1"])})))
    staged = staged_config(llama_family)
    staged["stages"][1]["sources"]["merged"] = "stage:pss"
    assert re.search(r"'stages\[1\].sources.merged': 'stage:pss' names no earlier stage \(earlier: ps\)", run(staged))
    assert not (tmp_path / "out").exists()

    def merge(recipe):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(recipe))
        return bad(capsys, "merge", path, tmp_path / "merged", "--quiet")

    models = {"a": str(llama_family["expert0"]), "b": str(llama_family["expert1"])}
    assert re.search(r"'path' is empty; list the layers", merge({"models": models, "path": []}))
    assert re.search(r"path\[1\].model 'c' is not among the recipe's models \(a, b\)",
                     merge({"models": models, "path": [{"model": "a", "layer": 0}, {"model": "c", "layer": 1}]}))
    assert re.search(r"path\[0\] asks for layer 7 of b, which has 4 layers \(0-3\)",
                     merge({"models": models, "path": [{"model": "b", "layer": 7}]}))
    assert re.search(r"path\[0\].scale nan must be a finite number",
                     merge({"models": models, "path": [{"model": "a", "layer": 0, "scale": float("nan")}]}))
    assert not (tmp_path / "merged").exists()
    # A path over a model the worker has not loaded is refused, never silently run over another.
    bank = PathBank([str(llama_family["expert0"])], str(llama_family["expert0"]))
    with pytest.raises(EvomergeError, match=r"which this worker has not loaded"):
        bank.materialize(recipe(llama_family, [("b", 0)]))


def test_the_papers_setups_parse_and_their_evaluators_build():
    from evomerge.config import parse_campaign
    from evomerge.evaluators import build_evaluator
    from evomerge.hybrid import is_staged, parse_stages
    from evomerge.tiny import char_tokenizer

    root = Path(__file__).resolve().parents[1] / "experiments" / "paper"
    seen = {}
    for path in sorted(root.glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        configs = [c for _, c in parse_stages(data, str(path))] if is_staged(data) else [data]
        seen[path.name] = [parse_campaign(c, str(path)) for c in configs]
    assert set(seen) == {"evollm_jp_ps.yaml", "evollm_jp_dfs.yaml", "evollm_jp_hybrid.yaml"}
    dfs = seen["evollm_jp_dfs.yaml"][0].search_space
    assert dfs["repeats"] == 3 and dfs["scales"] == "full"
    assert [c.search_space["kind"] for c in seen["evollm_jp_hybrid.yaml"]] == ["ps", "dfs"]
    holdout = build_evaluator(seen["evollm_jp_ps.yaml"][0].holdout[0], char_tokenizer(), "holdout[0]")
    assert holdout.identity()["n"] == 250 and holdout.metric == "mgsm_ja"
