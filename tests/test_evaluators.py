"""Evaluators: MGSM answer extraction and scoring, perplexity, lm-eval parity, `evomerge eval`."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from evomerge.evaluators import build_evaluator
from evomerge.evaluators.mgsm import DATA, LANGUAGES, MGSM, build_prompt, extract_answer, load_rows, script_share
from evomerge.errors import EvomergeError
from evomerge.tiny import char_tokenizer, fit_answers, save_model, tiny_config


@pytest.mark.parametrize("text, value", [
    ("The answer is 18.", 18.0),
    ("So 3 + 4 = 7, then 7 * 2 = 14", 14.0),
    ("She earns $1,234,567 in total", 1234567.0),
    ("It costs 3.75 dollars.", 3.75),
    ("The temperature is -12 degrees", -12.0),
    ("答えは１２３です。", 123.0),
    ("合計は１，０００円", 1000.0),
    ("残りは−5個", -5.0),
    ("no number here", None),
    ("1,2", 2.0),  # not a thousands group: the last number wins
])
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_script_share_language_check():
    assert script_share("まず、卵は16個です。答えは18。", "ja") == 1.0
    assert script_share("First, 16 eggs. The answer is 18.", "ja") == 0.0
    assert 0.3 < script_share("答えは eighteen です", "ja") < 0.7
    assert script_share("12 + 6 = 18", "ja") == 1.0  # no letters: nothing to judge


def test_mgsm_data_ships_with_license():
    assert (DATA / "LICENSE").is_file() and "CC BY" in (DATA / "README.md").read_text()
    for lang in LANGUAGES:
        assert len(load_rows(lang)) == 250
    ja, en = load_rows("ja"), load_rows("en")
    assert [a for _, a in ja] == [a for _, a in en]  # row i is the same problem everywhere


@pytest.fixture(scope="module")
def overfit_mgsm(tmp_path_factory):
    """A tiny model trained until it answers MGSM-en rows 0-3 (and nothing else)."""
    torch.manual_seed(0)
    tok = char_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_config("llama", hidden=64, layers=2, intermediate=128, positions=1024))
    pairs = [(build_prompt(q, "en", []), f" The answer is {int(a)}.") for q, a in load_rows("en")[:4]]
    fit_answers(model, tok, pairs, steps=150, lr=3e-3)
    folder = save_model(model, tmp_path_factory.mktemp("mgsm") / "overfit", tok)
    return model, tok, folder


def test_overfit_model_scores_one_on_its_problems_and_zero_elsewhere(overfit_mgsm):
    model, tok, _ = overfit_mgsm
    seen = MGSM(tok, lang="en", rows=[0, 4], max_new_tokens=24, batch_size=4)
    assert seen.score(model)["mgsm_en"] == 1.0
    unseen = MGSM(tok, lang="en", rows=[4, 8], max_new_tokens=24, batch_size=4)
    res = unseen.score(model)
    assert res["mgsm_en"] == 0.0
    # Rambling up to the token limit is reported, and never counted as correct.
    assert res["mgsm_en_truncated"] > 0
    ident = unseen.identity()
    assert ident["split"] == "rows 4-7" and ident["n"] == 4 and ident["generation"]["max_new_tokens"] == 24


def test_truncated_answer_never_counts(overfit_mgsm):
    model, tok, _ = overfit_mgsm
    # 6 new tokens reach " The a" — the right number never appears, and the cut is flagged.
    short = MGSM(tok, lang="en", rows=[0, 4], max_new_tokens=6, batch_size=4).score(model)
    assert short["mgsm_en"] == 0.0 and short["mgsm_en_truncated"] == 1.0


def test_mgsm_racing_stops_a_hopeless_model_early(overfit_mgsm):
    from evomerge.racing import RacingRule, race

    model, tok, _ = overfit_mgsm
    unseen = MGSM(tok, lang="en", rows=[4, 20], max_new_tokens=24, batch_size=4)
    metrics, examples, stopped = race([unseen], model, {"mgsm_en": 1.0}, incumbent=0.9, rule=RacingRule())
    assert stopped and examples == 4 and metrics["mgsm_en"] == 0.0  # 4 of 16 problems were enough
    seen = MGSM(tok, lang="en", rows=[0, 4], max_new_tokens=24, batch_size=4)
    metrics, examples, stopped = race([seen], model, {"mgsm_en": 1.0}, incumbent=0.9, rule=RacingRule())
    assert not stopped and examples == 4 and metrics["mgsm_en"] == 1.0


def test_mgsm_user_jsonl_and_language_check(overfit_mgsm, tmp_path):
    model, tok, _ = overfit_mgsm
    rows = load_rows("en")[:4]
    path = tmp_path / "fit.jsonl"
    path.write_text("\n".join(json.dumps({"question": q, "answer": str(int(a))}) for q, a in rows))
    ev = build_evaluator({"task": "mgsm", "lang": "en", "jsonl": str(path), "max_new_tokens": 24}, tok)
    assert ev.score(model)["mgsm_en"] == 1.0
    # The same English answers fail a Japanese language check.
    ja = MGSM(tok, lang="ja", jsonl=str(path), max_new_tokens=24, language_check=True)
    assert ja.score(model)["mgsm_ja"] == 0.0


def test_perplexity_matches_the_model_loss(overfit_mgsm, tmp_path):
    model, tok, _ = overfit_mgsm
    texts = ["r:abcdef=fedcba", "c:hello=hello and more text"]
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    res = build_evaluator({"task": "perplexity", "path": str(path)}, tok).score(model)
    nll, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, return_tensors="pt").input_ids
            n = ids.shape[1] - 1
            nll += float(model(input_ids=ids, labels=ids).loss) * n
            count += n
    assert res["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-4)
    assert res["loglik"] == pytest.approx(-nll / count, rel=1e-4)


def test_bad_evaluator_specs_are_clear(overfit_mgsm):
    _, tok, _ = overfit_mgsm
    with pytest.raises(EvomergeError, match="bad value 'mgsn'"):
        build_evaluator({"task": "mgsn"}, tok)
    with pytest.raises(EvomergeError, match=r"unknown key\(s\) \['langauge'\]"):
        build_evaluator({"task": "mgsm", "langauge": "ja"}, tok)
    with pytest.raises(EvomergeError, match="unknown MGSM language 'xx'"):
        build_evaluator({"task": "mgsm", "lang": "xx"}, tok)
    with pytest.raises(EvomergeError, match="MGSM split 'half'"):
        build_evaluator({"task": "mgsm", "lang": "ja", "split": "half"}, tok)


def cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "evomerge", *map(str, args)], capture_output=True, text=True, env=env)


def test_eval_cli_mgsm_and_perplexity(overfit_mgsm, tmp_path):
    _, _, folder = overfit_mgsm
    res = cli("eval", folder, "--task", "mgsm", "--lang", "en", "--split", "0-3", "--max-new-tokens", "24", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["metrics"]["mgsm_en"] == 1.0
    assert report["identity"]["generation"]["max_new_tokens"] == 24 and report["identity"]["n"] == 4
    (tmp_path / "t.txt").write_text("r:abc=cba\n\nc:xyz=xyz")
    res = cli("eval", folder, "--task", "perplexity", "--data", tmp_path / "t.txt", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.strip().splitlines()[-1])["metrics"]["perplexity"] > 1.0
    res = cli("eval", tmp_path / "missing", "--task", "mgsm")
    assert res.returncode == 2 and "does not exist" in res.stderr


LM_EVAL_TASKS = {
    "evo_reverse_gen": """
task: evo_reverse_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["</s>", "\\n"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
""",
    "evo_reverse_mc": """
task: evo_reverse_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
target_delimiter: ""
doc_to_text: "{{{{prompt}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
""",
}


@pytest.mark.slow  # 24 s of lm-eval's own harness; `pytest -m slow` runs it
def test_lm_eval_in_memory_equals_lm_eval_itself(demo_cache, tmp_path):
    """generate_until and multiple_choice tasks from local files: in-memory scores == lm-eval's own run."""
    lm_eval = pytest.importorskip("lm_eval")
    from evomerge.evaluators.synthetic import examples

    data = tmp_path / "reverse.jsonl"
    rows = []
    for i, (prompt, answer) in enumerate(examples("reverse", "holdout", 24)):
        wrong = [answer[1:] + answer[0], "".join(sorted(answer))]
        choices = [answer, *wrong] if i % 2 else [*wrong, answer]
        rows.append({"prompt": prompt, "answer": answer, "choices": choices, "label": choices.index(answer)})
    data.write_text("\n".join(json.dumps(r) for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name, text in LM_EVAL_TASKS.items():
        (tasks / f"{name}.yaml").write_text(text.format(data=data))
    model_dir = Path(demo_cache) / "demo-v1" / "reverse"

    from evomerge.evaluate import load_model

    model, tok = load_model(model_dir)
    from lm_eval.tasks import TaskManager

    for name, metric in (("evo_reverse_gen", "exact_match"), ("evo_reverse_mc", "acc")):
        ours = build_evaluator({"task": f"lm_eval:{name}", "include_path": str(tasks)}, tok).score(model)
        theirs = lm_eval.simple_evaluate(
            model="hf", model_args={"pretrained": str(model_dir), "device": "cpu", "dtype": "float32"},
            tasks=[name], task_manager=TaskManager(include_path=str(tasks)), log_samples=False, bootstrap_iters=0,
        )["results"][name]
        key = next(k for k in theirs if k.startswith(metric + ",") and "stderr" not in k)
        assert ours[f"{name}/{key.replace(',none', '')}"] == pytest.approx(theirs[key])
        assert theirs[key] > 0.5  # a real signal: the reverse expert solves these
    # The same through the command line.
    res = cli("eval", model_dir, "--task", "lm_eval:evo_reverse_mc", "--include-path", tasks, "--json")
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["metrics"]["evo_reverse_mc/acc"] == pytest.approx(theirs[key])


def test_lm_eval_tasks_race_on_seeded_document_subsets(tmp_path):
    """lm-eval racing: per-document scores come from lm-eval's own `samples` selection, in the order
    asked, and agree with lm-eval's aggregate; a race stops after its first look when it cannot win."""
    pytest.importorskip("lm_eval")
    from evomerge.evaluate import load_model
    from evomerge.evaluators.synthetic import examples
    from evomerge.racing import RacingRule, race

    data = tmp_path / "reverse.jsonl"
    rows = []
    for i, (prompt, answer) in enumerate(examples("reverse", "holdout", 24)):
        choices = [answer, answer[1:] + answer[0]] if i % 3 else ["".join(sorted(answer)), answer]
        rows.append({"prompt": prompt, "answer": answer, "choices": choices, "label": choices.index(answer)})
    data.write_text("\n".join(json.dumps(r) for r in rows))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "evo_reverse_mc.yaml").write_text(LM_EVAL_TASKS["evo_reverse_mc"].format(data=data))
    from evomerge.tiny import build_family

    model, tok = load_model(build_family(tmp_path / "fam", 1, layers=2)["base"])  # random: right and wrong
    ev = build_evaluator({"task": "lm_eval:evo_reverse_mc", "include_path": str(tasks)}, tok)
    assert ev.bounded and ev.n == 24 and ev.race_metric_names() == {"evo_reverse_mc/acc"}
    order = RacingRule(seed=3).order(24, 0)
    per_doc = ev.score_examples(model, order)["evo_reverse_mc/acc"]
    whole = ev.score(model)["evo_reverse_mc/acc"]
    assert 0 < whole < 1 and float(per_doc.mean()) == pytest.approx(whole)  # a mix of right and wrong
    again = ev.score_examples(model, order[:6])["evo_reverse_mc/acc"]
    assert again.tolist() == per_doc[:6].tolist()  # scores follow the order asked, not lm-eval's
    metrics, scored, stopped = race([ev], model, {"evo_reverse_mc/acc": 1.0}, incumbent=None, rule=RacingRule(seed=3))
    assert not stopped and scored == 24 and metrics["evo_reverse_mc/acc"] == pytest.approx(whole)
    metrics, scored, stopped = race([ev], model, {"evo_reverse_mc/acc": 1.0}, incumbent=1.0, rule=RacingRule(seed=3))
    assert (stopped, scored) == (True, 6) and metrics["evo_reverse_mc/acc"] == pytest.approx(float(per_doc[:6].mean()))
    # Few-shot: lm-eval draws exemplars in evaluation order, so a subset would not score like the full set.
    shots = build_evaluator({"task": "lm_eval:evo_reverse_mc", "include_path": str(tasks), "num_fewshot": 2}, tok)
    assert not shots.bounded and "is few-shot (2)" in shots.race_refusal
