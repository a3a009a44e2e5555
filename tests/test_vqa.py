"""VQA with a tiny LLaVA on easy-vqa images, ROUGE-L, and merging an LLM into the VLM's language model."""

import json
import os
import subprocess
import sys

import pytest
import torch

from evomerge.evaluators.vqa import rouge_l, write_easy_vqa
from evomerge.bank import SourceBank
from evomerge.checkpoint import Checkpoint
from evomerge.merge import merge_to_disk
from evomerge.recipe import Recipe
from evomerge.tiny import build_tiny_llava

pytest.importorskip("easy_vqa")


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    paths = build_tiny_llava(root)
    paths["data"] = write_easy_vqa(root / "easy_vqa.jsonl", n=8)
    return paths


def test_rouge_l_word_and_character_level():
    assert rouge_l(["a red circle"], ["a red circle"]) == [1.0]
    assert rouge_l(["blue"], ["red"]) == [0.0]
    # Japanese: characters, not (ASCII-only) words; 4 of 5 characters in common.
    assert rouge_l(["赤い三角形"], ["赤い四角形"], lang="ja") == [pytest.approx(0.8)]
    assert rouge_l(["赤い三角形"], ["赤い四角形"], lang="en") == [0.0]  # why ja must be character-level


def test_vqa_end_to_end_with_tiny_llava_on_easy_vqa(llava):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    res = subprocess.run([sys.executable, "-m", "evomerge", "eval", str(llava["vlm"]), "--task", "vqa",
                          "--data", str(llava["data"]), "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert 0.0 <= report["metrics"]["vqa_rougeL"] <= 1.0
    assert report["identity"]["n"] == 8 and report["identity"]["generation"]["max_new_tokens"] == 4
    items = [json.loads(line) for line in llava["data"].read_text().splitlines()]
    assert all(os.path.isfile(it["image"]) for it in items)  # real images shipped by easy-vqa


def test_component_merge_leaves_vision_tower_bit_identical(llava, tmp_path):
    component = {"language_model.": ""}
    recipe = Recipe.from_dict({"method": "linear", "base": str(llava["vlm"]), "component": component,
                               "sources": [{"model": str(llava["vlm"]), "parameters": {"weight": 0.7}},
                                           {"model": str(llava["llm"]), "parameters": {"weight": 0.3}}]})
    out = merge_to_disk(recipe, tmp_path / "merged_vlm")
    merged, vlm, llm = Checkpoint(out), Checkpoint(llava["vlm"]), Checkpoint(llava["llm"])
    untouched = [n for n in vlm.names() if not n.startswith("language_model.")]
    assert any(n.startswith("vision_tower.") for n in untouched) and any("projector" in n for n in untouched)
    for n in untouched:
        assert torch.equal(merged.get(n), vlm.get(n)), n
    for n in ("language_model.model.layers.1.mlp.up_proj.weight", "language_model.lm_head.weight"):
        expected = 0.7 * vlm.get(n) + 0.3 * llm.get(n[len("language_model."):])
        assert torch.allclose(merged.get(n), expected, atol=1e-6), n
    # The merged VLM loads and answers.
    from evomerge.evaluate import evaluate_folder

    report = evaluate_folder(out, {"task": "vqa", "path": str(llava["data"]), "max_new_tokens": 3})
    assert 0.0 <= report["metrics"]["vqa_rougeL"] <= 1.0


def test_component_bank_materializes_into_a_llava_module_in_place(llava):
    from evomerge.evaluate import new_model_and_processor

    bank = SourceBank([str(llava["llm"])], str(llava["vlm"]), component={"language_model.": ""})
    recipe = Recipe.from_dict({"method": "task_arithmetic", "base": str(llava["vlm"]), "component": {"language_model.": ""},
                               "sources": [{"model": str(llava["llm"]), "parameters": {"weight": 0.5}}]})
    model, _ = new_model_and_processor(llava["vlm"])
    bank.materialize(recipe, model)
    state = model.state_dict()
    vlm, llm = Checkpoint(llava["vlm"]), Checkpoint(llava["llm"])
    assert torch.equal(state["model.vision_tower.encoder.layers.0.mlp.fc1.weight"],
                       vlm.get("vision_tower.encoder.layers.0.mlp.fc1.weight"))
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = (vlm.get("language_model." + name) + llm.get(name)) / 2
    assert torch.allclose(state["model.language_model.layers.0.self_attn.q_proj.weight"], expected, atol=1e-6)


def test_easy_vqa_items_straight_from_the_package(llava):
    from evomerge.evaluate import load_processor
    from evomerge.evaluators import build_evaluator
    from evomerge.errors import EvomergeError

    proc = load_processor(llava["vlm"])
    ev = build_evaluator({"task": "vqa", "easy_vqa": {"split": "test", "start": 10, "n": 6}, "max_new_tokens": 3}, proc)
    written = [json.loads(line) for line in write_easy_vqa(llava["data"].parent / "all.jsonl", n=16).read_text().splitlines()]
    assert ev.items == written[10:16]
    assert ev.examples_key() == ("easy-vqa:test", set(range(10, 16))) and ev.identity()["split"] == "easy-vqa:test 10-15"
    from evomerge.evaluate import load_model

    assert len(ev.answers(load_model(llava["vlm"])[0])) == 6  # in the items' order though batched by length
    for spec, message in (({"split": "dev"}, "train or test"), ({"n": 0}, "easy_vqa n 0"),
                          ({"start": 9670, "n": 10}, "runs past them"), ({"rows": 3}, "write {split")):
        with pytest.raises(EvomergeError, match=message):
            build_evaluator({"task": "vqa", "easy_vqa": spec}, proc)
