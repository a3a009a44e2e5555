"""`evomerge merge` end to end, and every bad input as one clear line (exit 2, nothing written)."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evomerge.checkpoint import Checkpoint


def cli(*args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "evomerge", *map(str, args)], capture_output=True, text=True, env=env, cwd=cwd)


def write(tmp_path, data, name="recipe.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def ties_recipe(fam, **over):
    data = {"method": "ties", "base": str(fam["base"]),
            "sources": [{"model": str(fam["expert0"]), "parameters": {"weight": 0.5, "density": 0.5}},
                        {"model": str(fam["expert1"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    data.update(over)
    return data


def test_merge_writes_a_loadable_model(llama_family, tmp_path):
    out = tmp_path / "merged"
    res = cli("merge", write(tmp_path, ties_recipe(llama_family, out_dtype="bfloat16")), out, "--shard-size", "50KB", "--quiet")
    assert res.returncode == 0, res.stderr
    files = sorted(p.name for p in out.iterdir())
    assert "model.safetensors.index.json" in files and "tokenizer.json" in files and "evomerge_recipe.yaml" in files
    assert "generation_config.json" in files
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("12+3=", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape[1] == ids.shape[1] + 3
    # The written recipe rebuilds the same model.
    again = tmp_path / "again"
    assert cli("merge", out / "evomerge_recipe.yaml", again, "--quiet").returncode == 0
    a, b = Checkpoint(out), Checkpoint(again)
    assert all(torch.equal(a.get(n), b.get(n)) for n in a.names())


def test_merge_accepts_mergekit_yaml(llama_family, tmp_path):
    fam = llama_family
    cfg = {"merge_method": "dare_ties", "base_model": str(fam["base"]), "dtype": "float32",
           "models": [{"model": str(fam["base"])},
                      {"model": str(fam["expert0"]), "parameters": {"weight": [0.2, 0.8], "density": 0.6}},
                      {"model": str(fam["expert2"]), "parameters": {"weight": 0.5, "density": [{"filter": "mlp", "value": 0.3}, {"value": 0.9}]}}],
           "parameters": {"int8_mask": True}}
    out = tmp_path / "mk_out"
    res = cli("merge", write(tmp_path, cfg), out, "--quiet")
    assert res.returncode == 0, res.stderr
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def _bad(tmp_path, fam, mutate):
    data = ties_recipe(fam)
    mutate(data)
    return write(tmp_path, data)


def _broken_source(tmp_path, fam, edit):
    """A copy of expert1 whose weights were edited (a tensor dropped, or reshaped)."""
    folder = tmp_path / "broken"
    shutil.copytree(fam["expert1"], folder)
    index = folder / "model.safetensors.index.json"
    index.unlink()
    state = dict(Checkpoint(fam["expert1"]).iter_tensors())
    for f in folder.glob("*.safetensors"):
        f.unlink()
    edit(state)
    save_file(state, str(folder / "model.safetensors"))
    return folder


@pytest.mark.parametrize("case, pattern", [
    ("unknown_method", r"unknown merge method 'tie'; choose one of: linear, task_arithmetic, ties"),
    ("out_of_range", r"sources\[0\]\.parameters\.density: 1\.5 is out of range; allowed \[0\.0, 1\.0\]"),
    ("missing_path", r"model path '.*/no/such/model' does not exist"),
    ("missing_weight", r"sources\[1\] \(.*\) has no 'weight'"),
    ("unknown_field", r"unknown field\(s\) \['sourcez'\]"),
    ("missing_tensor", r"tensor 'model.layers.2.mlp.up_proj.weight' is in .* but missing from source .*broken"),
    ("shape_mismatch", r"shape mismatch in model.layers.1.self_attn.q_proj.weight: .*broken has \(32, 16\)"),
    ("vocab_mismatch", r"vocabulary size mismatch in model.embed_tokens.weight: .*broken has 120 rows, .* has 100.*resize_token_embeddings"),
    ("pickle", r"pytorch_model.bin is a pickle checkpoint.*--allow-pickle"),
    ("bad_yaml", r"not valid YAML/JSON"),
])
def test_bad_input_is_one_clear_line(case, pattern, llama_family, tmp_path):
    fam = llama_family
    if case == "unknown_method":
        path = _bad(tmp_path, fam, lambda d: d.update(method="tie"))
    elif case == "out_of_range":
        path = _bad(tmp_path, fam, lambda d: d["sources"][0]["parameters"].update(density=1.5))
    elif case == "missing_path":
        path = _bad(tmp_path, fam, lambda d: d["sources"][0].update(model=str(tmp_path / "no/such/model")))
    elif case == "missing_weight":
        path = _bad(tmp_path, fam, lambda d: d["sources"][1]["parameters"].pop("weight"))
    elif case == "unknown_field":
        path = _bad(tmp_path, fam, lambda d: d.update(sourcez=[]))
    elif case in ("missing_tensor", "shape_mismatch", "vocab_mismatch"):
        edits = {
            "missing_tensor": lambda s: s.pop("model.layers.2.mlp.up_proj.weight"),
            "shape_mismatch": lambda s: s.update({"model.layers.1.self_attn.q_proj.weight": torch.zeros(32, 16)}),
            "vocab_mismatch": lambda s: s.update({"model.embed_tokens.weight": torch.zeros(120, 32)}),
        }
        broken = _broken_source(tmp_path, fam, edits[case])
        path = _bad(tmp_path, fam, lambda d: d["sources"][1].update(model=str(broken)))
    elif case == "pickle":
        folder = tmp_path / "pickled"
        folder.mkdir()
        shutil.copy(fam["expert1"] / "config.json", folder / "config.json")
        torch.save(dict(Checkpoint(fam["expert1"]).iter_tensors()), folder / "pytorch_model.bin")
        path = _bad(tmp_path, fam, lambda d: d["sources"][1].update(model=str(folder)))
    else:
        path = tmp_path / "recipe.yaml"
        path.write_text("method: [ties\n")
    out = tmp_path / "out"
    res = cli("merge", path, out)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("evomerge: error: ")
    import re

    assert re.search(pattern, lines[0]), lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(".out.tmp") for p in tmp_path.iterdir())


def test_tied_gpt2_merge_loads_with_tied_head(gpt2_family, tmp_path):
    from evomerge.merge import merge_to_disk
    from evomerge.recipe import Recipe

    r = Recipe.from_dict({"method": "slerp", "base": str(gpt2_family["base"]), "parameters": {"t": 0.4},
                          "sources": [str(gpt2_family["expert0"])]})
    out = merge_to_disk(r, tmp_path / "gpt2_merged")
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    assert torch.equal(model.transformer.wte.weight, Checkpoint(out).get("transformer.wte.weight"))
