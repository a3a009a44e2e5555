"""Prompt formats (chat templates, system prompts, per-task wording), the generation loop, the
generated-length metric and Hugging Face fitness sets, on a tiny chat model trained locally."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.evaluators import build_evaluator
from evomerge.evaluators.generation import GenerationSettings, generate, generate_hf
from evomerge.evaluators.mgsm import MGSM, load_rows
from evomerge.errors import EvomergeError
from evomerge.tiny import char_tokenizer, fit_answers, save_model, tiny_config

ANSWER = " The answer is {}."


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    """A tiny model whose tokenizer carries a chat template, trained until it answers MGSM-en rows 0-3
    when asked through that template (and ends its turn with EOS)."""
    torch.manual_seed(0)
    tok = char_tokenizer(chat=True)
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden=64, layers=2, intermediate=128, positions=1024))
    chat = MGSM(tok, lang="en", rows=[0, 4])
    assert chat.format.chat  # auto: the template is there, so it is used
    fit_answers(model, tok, [(p, ANSWER.format(int(a))) for p, (_, a) in zip(chat.prompts(chat.items), chat.items)],
                steps=150, lr=3e-3)
    folder = save_model(model, tmp_path_factory.mktemp("chat") / "chat", tok)
    return model, tok, folder


def test_eval_uses_the_chat_template_by_default_and_reports_length(chat_model):
    _, _, folder = chat_model
    out = subprocess.run([sys.executable, "-m", "evomerge", "eval", str(folder), "--task", "mgsm:en", "--split", "0-3",
                          "--max-new-tokens", "40", "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["metrics"]["mgsm_en"] == 1.0 and report["metrics"]["mgsm_en_truncated"] == 0.0
    # Each answer is " The answer is N." plus the EOS that ends the turn.
    lengths = [len(ANSWER.format(int(a))) + 1 for _, a in load_rows("en")[:4]]
    assert report["metrics"]["mgsm_en_tokens"] == pytest.approx(sum(lengths) / 4)
    prompt = report["identity"]["prompt"]
    assert prompt["format"] == "chat" and len(prompt["chat_template_sha256"]) == 12
    assert report["identity"]["generation"]["stop"] == []  # a chat answer ends at end-of-turn, not a blank line


def test_plain_format_system_prompt_and_task_wording_change_the_prompt_and_identity(chat_model):
    _, tok, _ = chat_model
    q = load_rows("en")[0][0]
    chat = MGSM(tok, lang="en", rows=[0, 1])
    plain = MGSM(tok, lang="en", rows=[0, 1], chat_template=False)
    assert chat.prompts(chat.items)[0].startswith("<|user|>\nQuestion: " + q)
    assert plain.prompts(plain.items)[0] == f"Question: {q}\nStep-by-Step Answer:"
    assert plain.identity()["prompt"]["format"] == "plain" and plain.identity()["prompt"]["chat_template_sha256"] is None
    assert "\n\n" in plain.settings.stop and chat.settings.stop == []
    custom = MGSM(tok, lang="en", rows=[0, 1], system="Answer with a number.", prompt="Q: {question}", answer_prefix="A:",
                  shots=1, shot_rows=[5, 6])
    text = custom.prompts(custom.items)[0]
    shot_q, shot_a = load_rows("en")[5]
    assert text == (f"<|system|>\nAnswer with a number.\n<|user|>\nQ: {shot_q}\n<|assistant|>\nA: {int(shot_a)}</s>\n"
                    f"<|user|>\nQ: {q}\n<|assistant|>\nA:")
    assert custom.identity()["prompt"]["system"] == "Answer with a number."
    assert custom.identity()["prompt"] != chat.identity()["prompt"]


@pytest.mark.parametrize("spec, message", [
    ({"chat_template": True}, "the tokenizer has no chat template"),
    ({"chat_template": "yes"}, "chat_template 'yes': auto"),
    ({"prompt": "Solve this."}, "has no {question} placeholder"),
    ({"system": "  "}, "system prompt is empty"),
    ({"stop": [""]}, "a list of non-empty strings"),
    ({"chat_template": 1}, "chat_template 1: auto"),
    ({"language_check": True, "lang": "ko", "jsonl": __file__}, "language_check knows the scripts of"),
])
def test_bad_prompt_settings_are_one_line(spec, message):
    with pytest.raises(EvomergeError, match=message.replace("{", r"\{").replace("}", r"\}")):
        build_evaluator({"task": "mgsm", "lang": "en", **spec}, char_tokenizer())


def test_generation_loop_matches_hf_generate_with_rows_leaving_the_batch(chat_model):
    model, tok, _ = chat_model
    ev = MGSM(tok, lang="en", rows=[0, 8])  # rows 0-3 stop early on EOS, unseen rows mostly ramble
    prompts = ev.prompts(ev.items)
    for settings in (GenerationSettings(max_new_tokens=30, batch_size=8),
                     GenerationSettings(max_new_tokens=30, batch_size=3, stop=["answer"])):
        ours, theirs = generate(model, tok, prompts, settings), generate_hf(model, tok, prompts, settings)
        assert ours == theirs
    early = generate(model, tok, prompts, GenerationSettings(max_new_tokens=30, batch_size=8))
    assert not any(g.truncated for g in early[:4]) and any(g.truncated for g in early[4:])  # rows left at different steps
    assert all(g.tokens == 30 for g in early if g.truncated) and all(g.tokens < 30 for g in early if not g.truncated)
    cut = generate(model, tok, prompts[:4], GenerationSettings(max_new_tokens=30, stop=["answer"]))
    assert all(g.text == " The " and not g.truncated and g.tokens == len(" The answer") for g in cut)


def test_fitness_set_from_a_local_hugging_face_dataset_folder(chat_model, tmp_path, monkeypatch):
    model, tok, _ = chat_model
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "gsm8k_like"
    folder.mkdir()
    rows = load_rows("en")[:4]
    (folder / "test.jsonl").write_text("\n".join(
        json.dumps({"problem": q, "solution": f"Work it out.\n#### {int(a):,}"}) for q, a in rows))
    spec = {"task": "mgsm", "lang": "en", "hf": {"path": str(folder), "split": "test", "question_field": "problem",
                                                 "answer_field": "solution"}, "max_new_tokens": 40}
    ev = build_evaluator(spec, tok)
    assert [a for _, a in ev.items] == [a for _, a in rows] and ev.score(model)["mgsm_en"] == 1.0
    ident = ev.identity()
    assert ident["split"].startswith(f"hf:{folder}:test rows 0-3") and ident["data"]["fingerprint"]
    assert ident["data"]["question_field"] == "problem" and ident["data"]["answer_field"] == "solution"
    assert ev.examples_key() == (f"hf:{folder}:test", {0, 1, 2, 3})
    part = build_evaluator({**spec, "rows": [2, 4]}, tok)
    assert part.items == ev.items[2:]
    with pytest.raises(EvomergeError, match=r"has no column\(s\) \['question'\]; its columns: \['problem', 'solution'\]"):
        build_evaluator({**spec, "hf": {"path": str(folder), "split": "test", "answer_field": "solution"}}, tok)
    with pytest.raises(EvomergeError, match="split 'train'.*cannot be loaded"):
        build_evaluator({**spec, "hf": {"path": str(folder), "split": "train", "question_field": "problem"}}, tok)
    with pytest.raises(EvomergeError, match=r"unknown key\(s\) \['splt'\].*did you mean 'split'"):
        build_evaluator({**spec, "hf": {"path": str(folder), "splt": "test"}}, tok)


@pytest.mark.parametrize("config", ["demo_length.yaml", "demo_vqa.yaml"])
def test_demo_configs_plan_without_building_their_families(config, tmp_path):
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, EVOMERGE_CACHE=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-m", "evomerge", "run", os.path.join(root, "experiments", config), "--out",
                          str(tmp_path / "run"), "--dry-run"], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert "dry run: nothing was loaded or written" in out.stdout
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


@pytest.mark.slow  # trains builtin:length (~1 min), then 40 candidates (~10 s)
def test_demo_length_finds_a_front_of_accuracy_against_answer_length(tmp_path, monkeypatch):
    import os

    import yaml

    from evomerge.campaign import CampaignRunner
    from evomerge.config import parse_campaign

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = yaml.safe_load(open(os.path.join(root, "experiments", "demo_length.yaml")))
    front = CampaignRunner(parse_campaign(data), tmp_path / "run", progress=False).run().front
    points = sorted({(m.objectives["accuracy"], m.objectives["answer_tokens"]) for m in front})
    assert len(points) >= 2 and points[-1][0] == 1.0 and points[0][1] < points[-1][1] / 3, points


@pytest.mark.slow  # trains builtin:vqa (~30 s), then 24 candidates on easy-vqa images
def test_demo_vqa_merges_a_text_model_into_the_llava_and_scores_rouge(tmp_path, monkeypatch):
    import os

    import yaml

    from evomerge.campaign import CampaignRunner
    from evomerge.config import parse_campaign

    pytest.importorskip("easy_vqa")
    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path / "cache"))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = yaml.safe_load(open(os.path.join(root, "experiments", "demo_vqa.yaml")))
    runner = CampaignRunner(parse_campaign(data), tmp_path / "run", progress=False)
    front = runner.run().front
    assert front and front[0].objectives["rougeL"] > 0.3  # the trained VLM answers; random would score ~0
    assert "vqa_rougeL" in front[0].holdout


def test_sliding_window_models_generate_like_hf_without_splicing_their_cache():
    """Mistral-style sliding-window cache layers cannot be spliced: finished rows still leave, and a
    new batch is prefilled only when the running one is done (no prefill per step)."""
    from transformers import DynamicCache, MistralConfig

    from evomerge.bench import _early_stopping

    torch.manual_seed(1)
    tok = char_tokenizer()
    config = MistralConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=1024, sliding_window=16,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2)
    assert any(type(layer).__name__ != "DynamicLayer" for layer in DynamicCache(config=config).layers)
    model = AutoModelForCausalLM.from_config(config).eval()
    ev = MGSM(tok, lang="en", rows=[0, 10])
    prompts = ev.prompts(ev.items)
    varied = _early_stopping(model, tok, prompts, 24)
    prefills = []
    varied.register_forward_pre_hook(lambda m, a, kw: prefills.append(1) if kw["input_ids"].shape[1] > 1 else None,
                                     with_kwargs=True)
    settings = GenerationSettings(max_new_tokens=24, batch_size=4)
    ours = generate(varied, tok, prompts, settings)
    assert len(prefills) == 3  # ceil(10 / 4) batches, each prefilled once
    assert ours == generate_hf(varied, tok, prompts, settings)
    assert len({g.tokens for g in ours}) > 1  # rows did finish at different steps


def test_a_chat_template_that_refuses_the_system_prompt_is_one_line_before_any_generation():
    tok = char_tokenizer(chat=True)
    tok.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                         "{% endif %}" + tok.chat_template)
    with pytest.raises(EvomergeError, match="chat template cannot render this prompt.*System role not supported.*"
                                            "drop the system prompt or set chat_template: false"):
        build_evaluator({"task": "mgsm", "lang": "en", "system": "Be brief."}, tok)
