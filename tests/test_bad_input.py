"""Hostile inputs, tried as a new user would: every one ends in exactly one line on stderr, exit 2,
naming the culprit (and the fix), with nothing lost or half-written.

The cases run the real CLI entry point in-process (`evomerge.cli.main`) on real tiny model folders,
real safetensors files and real SQLite journals; Ctrl-C runs a real subprocess.
"""

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from evomerge.checkpoint import OUTPUT_MARKER, Checkpoint
from evomerge.cli import main
from killing import run_until


@dataclass
class Ctx:
    tmp: Path
    fam: dict
    campaign_dir: Path

    @property
    def out(self) -> Path:
        return self.tmp / "out"

    def copy(self, member: str, name: str | None = None) -> Path:
        return Path(shutil.copytree(self.fam[member], self.tmp / (name or f"copy-{member}")))

    def recipe(self, mutate=None, data=None, name="recipe.yaml") -> Path:
        data = data or {"method": "ties", "base": str(self.fam["base"]), "sources": [
            {"model": str(self.fam["expert0"]), "parameters": {"weight": 0.5, "density": 0.5}},
            {"model": str(self.fam["expert1"]), "parameters": {"weight": 0.5, "density": 0.5}}]}
        if mutate:
            mutate(data)
        path = self.tmp / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def config(self, mutate=None, name="campaign.yaml") -> Path:
        data = {"name": "bad", "base": str(self.fam["base"]),
                "sources": {"e0": str(self.fam["expert0"]), "e1": str(self.fam["expert1"])},
                "search_space": {"kind": "ps", "method": "ties", "parameters": {"weight": [0, 1], "density": [0.1, 1]},
                                 "granularity": "groups", "fixed": {"normalize": True}},
                "optimizer": {"name": "cma", "population": 6}, "budget": 12,
                "objectives": [{"name": "lp", "metrics": ["reverse_logprob"]}],
                "fitness": [{"task": "synthetic-logprob:reverse", "split": "fitness", "n": 8}],
                "holdout": [{"task": "synthetic-logprob:reverse", "split": "holdout", "n": 8}],
                "executor": {"kind": "local", "device": "cpu"}}
        if mutate:
            mutate(data)
        path = self.tmp / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def run(self, mutate=None) -> list[str]:
        return ["run", str(self.config(mutate)), "--out", str(self.tmp / "campaign")]


# -- broken model folders ----------------------------------------------------------------------------


def truncated_source(c: Ctx) -> Path:
    folder = c.copy("expert1", "truncated")
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-100])
    return folder


def garbage_source(c: Ctx) -> Path:
    folder = c.copy("expert1", "garbage")
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    return folder


def missing_shard_source(c: Ctx) -> Path:
    folder = c.copy("expert1", "missing_shard")
    sorted(folder.glob("model-*.safetensors"))[-1].unlink()
    return folder


def bad_config_source(c: Ctx) -> Path:
    folder = c.copy("expert1", "bad_config")
    (folder / "config.json").write_text("{not json")
    return folder


def no_tokenizer_model(c: Ctx) -> Path:
    folder = c.copy("base", "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    return folder


def evomerge_output(c: Ctx, name="written") -> Path:
    folder = c.tmp / name
    folder.mkdir()
    (folder / OUTPUT_MARKER).write_text("{}")
    (folder / "keep.txt").write_text("precious")
    return folder


def with_source(c: Ctx, folder: Path, index: int = 1):
    return c.recipe(lambda d: d["sources"][index].update(model=str(folder)))


def set_source(key, folder_fn):
    def mutate_config(c):
        return c.run(lambda d: d["sources"].update({key: str(folder_fn(c))}))
    return mutate_config


def damaged_journal(c: Ctx, how: str) -> Path:
    folder = Path(shutil.copytree(c.campaign_dir, c.tmp / f"journal-{how}"))
    db = folder / "journal.sqlite"
    for extra in folder.glob("journal.sqlite-*"):
        extra.unlink()
    if how == "garbage":
        db.write_bytes(b"this is not a database" * 100)
    else:
        db.write_bytes(db.read_bytes()[: len(db.read_bytes()) // 3])
    return folder


LM_EVAL_REMOTE_TASK = """task: evo_remote_only
dataset_path: evomerge-test/not-cached-anywhere
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
metric_list:
  - metric: exact_match
"""


def lm_eval_remote(c: Ctx) -> list[str]:
    tasks = c.tmp / "tasks"
    tasks.mkdir()
    (tasks / "remote.yaml").write_text(LM_EVAL_REMOTE_TASK)
    return ["eval", str(c.fam["base"]), "--task", "lm_eval:evo_remote_only", "--include-path", str(tasks)]


def bad_tokenizer_model(c: Ctx) -> Path:
    folder = c.copy("base", "bad_tokenizer")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["type"] = "NoSuchModel"  # valid JSON, not a tokenizer (a tokenizers version mismatch looks alike)
    (folder / "tokenizer.json").write_text(json.dumps(data))
    return folder


def damaged_value(c: Ctx, sql: str) -> Path:
    folder = Path(shutil.copytree(c.campaign_dir, c.tmp / "journal-values"))
    con = sqlite3.connect(folder / "journal.sqlite")
    con.execute(sql)
    con.commit()
    con.close()
    return folder


def jsonl(c: Ctx, lines: list[str], name="set.jsonl") -> Path:
    path = c.tmp / name
    path.write_text("\n".join(lines) + "\n")
    return path


def mergekit(c: Ctx, ranges, slices=1) -> Path:
    sources = [{"model": str(c.fam[m]), "layer_range": r, "parameters": {"weight": 0.5, "density": 0.5}}
               for m, r in zip(("expert0", "expert1"), ranges)]
    data = {"merge_method": "ties", "base_model": str(c.fam["base"]), "dtype": "float32",
            "slices": [{"sources": sources}] * slices}
    return c.recipe(data=data)


# Each case: (id, argv builder, pattern the one stderr line must match).
CASES = [
    # -- evomerge merge: recipes ------------------------------------------------------------------------
    ("weight-nan", lambda c: ["merge", c.recipe(lambda d: d["sources"][0]["parameters"].update(weight=float("nan"))), c.out],
     r"sources\[0\]\.parameters\.weight: nan is not a finite number"),
    ("density-nan", lambda c: ["merge", c.recipe(lambda d: d["sources"][1]["parameters"].update(density=float("nan"))), c.out],
     r"sources\[1\]\.parameters\.density: nan is not a finite number"),
    ("weight-inf-shared", lambda c: ["merge", c.recipe(lambda d: d.update(parameters={"lambda": float("inf")})), c.out],
     r"parameters\.lambda: inf is not a finite number"),
    ("rule-family-typo", lambda c: ["merge", c.recipe(lambda d: d["sources"][0]["parameters"].update(
        density=[{"family": "attn", "value": 0.3}, {"value": 0.5}])), c.out],
     r"rule family 'attn' does not exist; families: .*did you mean 'attention'\?"),
    ("rule-group-out-of-range", lambda c: ["merge", c.recipe(lambda d: d["sources"][0]["parameters"].update(
        weight=[{"group": "block.99", "value": 0.3}, {"value": 0.5}])), c.out],
     r"sources\[0\]\.parameters\.weight: rule \{'group': 'block.99'\} matches no tensor of the model \(groups: "
     r"embeddings, block.0-3, final_norm, lm_head\)"),
    ("rule-filter-matches-nothing", lambda c: ["merge", c.recipe(lambda d: d.update(parameters={"lambda": [
        {"filter": "q_projj", "value": 0.3}, {"value": 1.0}]})), c.out],
     r"parameters\.lambda: rule \{'filter': 'q_projj'\} matches no tensor"),
    ("parameters-as-list", lambda c: ["merge", c.recipe(lambda d: d["sources"][0].update(parameters=[0.5, 0.5])), c.out],
     r"sources\[0\]\.parameters must be a mapping like \{weight: 0.5\}, got a list"),
    ("recipe-seed-abc", lambda c: ["merge", c.recipe(lambda d: d.update(seed="abc")), c.out],
     r"seed 'abc' is not a non-negative integer"),
    ("recipe-seed-negative", lambda c: ["merge", c.recipe(lambda d: d.update(seed=-1)), c.out],
     r"seed '-1' is not a non-negative integer"),
    ("density-for-task-arithmetic", lambda c: ["merge", c.recipe(lambda d: d.update(method="task_arithmetic")), c.out],
     r"sources\[0\]\.parameters\.density does not apply to 'task_arithmetic'"),
    ("method-typo", lambda c: ["merge", c.recipe(lambda d: d.update(method="tie")), c.out],
     r"unknown merge method 'tie'.*did you mean 'ties'\?"),
    ("recipe-field-typo", lambda c: ["merge", c.recipe(lambda d: d.update(sourcez=[])), c.out],
     r"unknown field\(s\) \['sourcez'\].*did you mean 'sources'\?"),
    ("truncated-safetensors", lambda c: ["merge", with_source(c, truncated_source(c)), c.out],
     r"truncated/model-00001-of-\d+\.safetensors is not a readable safetensors file \(its tensors need \d+ bytes but "
     r"the file has \d+\).*download or save it again"),
    ("garbage-safetensors", lambda c: ["merge", with_source(c, garbage_source(c)), c.out],
     r"garbage/model.safetensors is not a readable safetensors file"),
    ("index-names-missing-shard", lambda c: ["merge", with_source(c, missing_shard_source(c)), c.out],
     r"model.safetensors.index.json names shard 'model-\d+-of-\d+.safetensors', which is missing"),
    ("config-not-json", lambda c: ["merge", with_source(c, bad_config_source(c)), c.out],
     r"bad_config/config.json is not valid JSON"),
    ("device-cuda-missing", lambda c: ["merge", c.recipe(), c.out, "--device", "cuda"],
     r"device 'cuda': no CUDA GPU is available here"),
    ("device-nonsense", lambda c: ["merge", c.recipe(), c.out, "--device", "gpu0"],
     r"device 'gpu0' is not a device name"),
    ("out-under-a-file", lambda c: ["merge", c.recipe(), (c.tmp / "afile").write_text("x") and c.tmp / "afile" / "out"],
     r"cannot write .*afile/out: .*afile is a file, not a folder"),
    ("out-read-only", lambda c: ["merge", c.recipe(), "/proc/evomerge-out"],
     r"cannot write /proc/evomerge-out: /proc is not writable"),
    ("out-is-a-file", lambda c: ["merge", c.recipe(), (c.tmp / "f.txt").write_text("x") and c.tmp / "f.txt"],
     r"output .*f.txt is a file; pass a folder path"),
    ("out-exists", lambda c: ["merge", c.recipe(), evomerge_output(c)],
     r"output folder .*written already exists; pick a new folder or pass --overwrite"),
    ("overwrite-foreign-folder", lambda c: ["merge", c.recipe(), (c.tmp / "mine").mkdir() or c.tmp / "mine", "--overwrite"],
     r"--overwrite refused: .*mine was not written by evomerge"),
    ("overwrite-holding-the-recipe", lambda c: ["merge", c.recipe(name="written/recipe.yaml") if evomerge_output(c) else None,
                                                c.tmp / "written", "--overwrite"],
     r"--overwrite refused: .*written holds .*recipe.yaml, an input of this merge"),
    ("overwrite-a-source", lambda c: ["merge", c.recipe(), (c.fam["expert0"] / OUTPUT_MARKER).write_text("{}") and c.fam["expert0"],
                                      "--overwrite"],
     r"--overwrite refused: .*expert0 holds .*expert0, an input of this merge"),
    ("overwrite-current-directory", lambda c: ["merge", c.recipe(), ".", "--overwrite"],
     r"--overwrite refused: .* is \(or contains\) the current directory"),
    ("bad-shard-size", lambda c: ["merge", c.recipe(), c.out, "--shard-size", "lots"],
     r"shard size 'lots' is not a size"),
    ("campaign-config-given-to-merge", lambda c: ["merge", c.config(), c.out],
     r"campaign.yaml is a campaign config, not a merge recipe; run it with `evomerge run"),
    ("missing-relative-source", lambda c: c.run(lambda d: d["sources"].update(e1="fam/expert9")),
     r"config field 'sources.e1': model 'fam/expert9': there is no folder .*/fam/expert9, and as a hub id it could not be fetched"),
    ("recipe-is-a-folder", lambda c: ["merge", c.tmp, c.out],
     r"recipe .* is a folder; pass the recipe YAML/JSON file"),
    ("mergekit-partial-layer-range", lambda c: ["merge", mergekit(c, [[0, 2], [0, 2]]), c.out],
     r"slices\[0\]\.sources\[0\]: layer_range \[0, 2\] of .*expert0 is not its full range \[0, 4\]"),
    ("mergekit-mixed-layer-ranges", lambda c: ["merge", mergekit(c, [[0, 4], [1, 4]]), c.out],
     r"slices\[0\]\.sources\[1\]: layer_range \[1, 4\] of .*expert1 is not its full range \[0, 4\]"),
    ("mergekit-several-slices", lambda c: ["merge", mergekit(c, [[0, 4], [0, 4]], slices=2), c.out],
     r"several slices stack layers"),
    # -- evomerge run: campaign configs -------------------------------------------------------------------
    ("granularity-typo", lambda c: c.run(lambda d: d["search_space"].update(granularty="groups")),
     r"config field 'search_space.granularty' is unknown; allowed: .*did you mean 'granularity'\?"),
    ("optimizer-key-typo", lambda c: c.run(lambda d: d["optimizer"].update(popsize=8)),
     r"config field 'optimizer.popsize' is unknown; allowed: name, population, sigma0"),
    ("fixed-key-typo", lambda c: c.run(lambda d: d["search_space"]["fixed"].update(normalise=True)),
     r"config field 'search_space.fixed.normalise' is unknown for ties; .*did you mean 'normalize'\?"),
    ("executor-key-typo", lambda c: c.run(lambda d: d["executor"].update(devices="cpu")),
     r"config field 'executor.devices' is unknown; allowed: kind, device, retries; did you mean 'device'\?"),
    ("top-level-typo", lambda c: c.run(lambda d: d.update(budjet=3)),
     r"config field 'budjet': .*did you mean 'budget'\?"),
    ("objective-key-typo", lambda c: c.run(lambda d: d["objectives"][0].update(directon="maximize")),
     r"config field 'objectives\[0\].directon' is unknown; .*did you mean 'direction'\?"),
    ("config-seed-abc", lambda c: c.run(lambda d: d.update(seed="abc")),
     r"config field 'seed': bad value 'abc'; allowed: a non-negative integer up to 2147483646"),
    ("config-seed-negative", lambda c: c.run(lambda d: d.update(seed=-1)),
     r"config field 'seed': bad value -1; allowed: a non-negative integer up to 2147483646"),
    ("population-over-budget", lambda c: c.run(lambda d: d.update(budget=8, optimizer={"name": "cma", "population": 12})),
     r"config field 'budget': 8 is smaller than one generation of 12 candidates"),
    ("mgsm-split-beyond-data", lambda c: c.run(lambda d: d.update(
        fitness=[{"task": "mgsm", "lang": "en", "split": "300-400"}], holdout=[],
        objectives=[{"name": "acc", "metrics": ["mgsm_en"]}])),
     r"config field 'fitness\[0\]': MGSM split '300-400' selects rows 300-400, outside the data \(rows 0-249\)"),
    ("list-sources-same-name", lambda c: c.run(lambda d: d.update(sources=[str(c.fam["expert0"]),
                                                                            str(c.copy("expert1", "x/expert0"))])),
     r"config field 'sources': two sources are named 'expert0'"),
    ("metric-weight-string", lambda c: c.run(lambda d: d["objectives"][0].update(metrics={"reverse_logprob": "half"})),
     r"config field 'objectives\[0\].metrics.reverse_logprob': bad value 'half'"),
    ("sigma0-string", lambda c: c.run(lambda d: d["optimizer"].update(sigma0="big")),
     r"config field 'optimizer.sigma0': bad value 'big'"),
    ("fixed-density-nan", lambda c: c.run(lambda d: d["search_space"]["fixed"].update(rescale=float("nan"))),
     r"config field 'search_space.fixed.rescale': expected true or false, got nan"),
    ("search-parameters-as-list", lambda c: c.run(lambda d: d["search_space"].update(parameters=["weight"])),
     r"config field 'search_space.parameters': bad value \['weight'\]"),
    ("ray-key-typo", lambda c: c.run(lambda d: d.update(executor={"kind": "ray", "num_worker": 2})),
     r"config field 'executor.num_worker' is unknown; allowed: .*did you mean 'num_workers'\?"),
    ("ray-workers-zero", lambda c: c.run(lambda d: d.update(executor={"kind": "ray", "num_workers": 0})),
     r"config field 'executor.num_workers': bad value 0; allowed: auto or a positive integer"),
    ("ray-gpus-1.5", lambda c: c.run(lambda d: d.update(executor={"kind": "ray", "num_gpus_per_worker": 1.5})),
     r"config field 'executor.num_gpus_per_worker': bad value 1.5"),
    ("ray-timeout-nan", lambda c: c.run(lambda d: d.update(executor={"kind": "ray", "timeout": float("nan")})),
     r"config field 'executor.timeout': bad value nan"),
    ("ray-gpus-on-cpu-cluster", lambda c: c.run(lambda d: d.update(executor={"kind": "ray", "num_gpus_per_worker": 1})) + [
        "--address", "local"], r"1 GPU\(s\) and 1 CPU\(s\) per worker, but the Ray cluster has 0 GPU\(s\) .*set 0 GPUs for CPU workers"),
    ("ray-auto-without-cluster", lambda c: c.run() + ["--executor", "ray", "--address", "auto"],
     r"config field 'executor.address': cannot reach a Ray cluster at 'auto' .*ray start --head"),
    ("ray-address-nobody-answers", lambda c: c.run() + ["--executor", "ray", "--address", "127.0.0.1:1"],
     r"config field 'executor.address': nothing answers at 127.0.0.1:1 .*ray start --head"),
    ("address-without-ray", lambda c: c.run() + ["--address", "auto"],
     r"--address and --num-workers apply to Ray workers; add --executor ray"),
    ("barrier-string", lambda c: c.run(lambda d: d.update(barrier="no")),
     r"config field 'barrier': bad value 'no'; allowed: true .* or false"),
    ("simulate-fail-rate-2", lambda c: c.run(lambda d: d["fitness"].append({"task": "simulate", "fail_rate": 2})),
     r"config field 'fitness\[1\]': fail_rate 2: a number in \[0, 1\]"),
    ("executor-device-cuda", lambda c: c.run(lambda d: d["executor"].update(device="cuda")),
     r"config field 'executor.device': device 'cuda': no CUDA GPU is available here"),
    ("missing-source-folder", lambda c: c.run(lambda d: d["sources"].update(e1=str(c.tmp / "nowhere"))),
     r"config field 'sources.e1': model path .*nowhere' does not exist"),
    ("source-is-the-base", lambda c: c.run(lambda d: d["sources"].update(e1=str(c.fam["base"]))),
     r"config field 'sources.e1': .*base is the base model itself"),
    ("truncated-source-in-campaign", set_source("e1", truncated_source),
     r"config field 'sources.e1': .*is not a readable safetensors file"),
    ("objective-metric-not-produced", lambda c: c.run(lambda d: d["objectives"][0].update(metrics=["reverse"])),
     r"config field 'objectives': metric\(s\) \['reverse'\] are not produced by the fitness evaluators"),
    ("fitness-overlaps-holdout", lambda c: c.run(lambda d: d["fitness"][0].update(split="holdout")),
     r"config field 'fitness\[0\]' scores 8 example\(s\) .* that holdout\[0\] holds out"),
    ("racing-z-string", lambda c: c.run(lambda d: d.update(racing={"z": "two"})),
     r"config field 'racing.z': bad value 'two'"),
    ("out-in-read-only-folder", lambda c: ["run", str(c.config()), "--out", "/proc/evomerge-campaign"],
     r"cannot create campaign folder /proc/evomerge-campaign"),
    ("config-file-missing", lambda c: ["run", str(c.tmp / "nope.yaml"), "--out", str(c.tmp / "x")],
     r"config file .*nope.yaml does not exist"),
    ("config-not-yaml", lambda c: ["run", str((c.tmp / "b.yaml").write_text("a: [1,\n") and c.tmp / "b.yaml"),
                                   "--out", str(c.tmp / "x")],
     r"b.yaml: not valid YAML"),
    # -- journals --------------------------------------------------------------------------------------
    ("status-garbage-journal", lambda c: ["status", str(damaged_journal(c, "garbage"))],
     r"journal.sqlite is damaged or not an evomerge journal"),
    ("resume-truncated-journal", lambda c: ["resume", str(damaged_journal(c, "truncated"))],
     r"journal.sqlite is damaged or not an evomerge journal"),
    ("status-no-journal", lambda c: ["status", str(c.tmp)],
     r"holds no campaign journal \(journal.sqlite\); start one with `evomerge run CONFIG --out"),
    ("resume-no-journal", lambda c: ["resume", str(c.tmp / "never")],
     r"never holds no campaign journal"),
    # -- evomerge eval ----------------------------------------------------------------------------------
    ("eval-no-tokenizer", lambda c: ["eval", str(no_tokenizer_model(c)), "--task", "synthetic:reverse"],
     r"no_tokenizer has no tokenizer files \(tokenizer.json"),
    ("eval-mgsm-split-beyond-data", lambda c: ["eval", str(c.fam["base"]), "--task", "mgsm", "--lang", "en",
                                               "--split", "300-400"],
     r"MGSM split '300-400' selects rows 300-400, outside the data"),
    ("eval-device-cuda", lambda c: ["eval", str(c.fam["base"]), "--task", "synthetic:reverse", "--device", "cuda"],
     r"device 'cuda': no CUDA GPU is available here"),
    ("eval-lm-eval-data-not-offline", lambda c: lm_eval_remote(c),
     r"lm-eval task 'evo_remote_only' could not load its data .*offline, its data set must be in the datasets cache"),
    ("eval-perplexity-missing-file", lambda c: ["eval", str(c.fam["base"]), "--task", "perplexity", "--data",
                                                str(c.tmp / "none.txt")],
     r"perplexity data .*none.txt does not exist"),
    ("eval-task-typo", lambda c: ["eval", str(c.fam["base"]), "--task", "mgsn"],
     r"bad value 'mgsn'.*did you mean 'mgsm'\?"),
    # -- found by review: odd types, huge numbers, evaluator settings, journals with damaged values ----------
    ("search-space-kind-list", lambda c: c.run(lambda d: d["search_space"].update(kind=["ps"])),
     r"config field 'search_space.kind': bad value \['ps'\]; allowed: dfs, ps"),
    ("executor-kind-list", lambda c: c.run(lambda d: d["executor"].update(kind=["local"])),
     r"config field 'executor.kind': bad value \['local'\]; allowed: local"),
    ("method-list-empty", lambda c: c.run(lambda d: d["search_space"].update(method=[])),
     r"config field 'search_space.method': bad value \[\]; allowed: a method name or a list"),
    ("method-list-nested", lambda c: c.run(lambda d: d["search_space"].update(method=[["ties"]])),
     r"config field 'search_space.method\[0\]': bad value \['ties'\]"),
    ("bank-storage", lambda c: c.run(lambda d: d.update(bank={"storage": "disk"})),
     r"config field 'bank.storage': bad value 'disk'; allowed: auto, device, host"),
    ("bank-quantize", lambda c: c.run(lambda d: d.update(bank={"quantize": 4})),
     r"config field 'bank.quantize': bad value 4; allowed: none, int8"),
    ("bank-unknown-key", lambda c: c.run(lambda d: d.update(bank={"storge": "host"})),
     r"config field 'bank.storge'"),
    ("bank-device-memory", lambda c: c.run(lambda d: d.update(bank={"device_memory": "lots"})),
     r"config field 'bank.device_memory': bad value 'lots'"),
    ("bank-does-not-fit", lambda c: c.run(lambda d: d.update(bank={"storage": "device", "device_memory": "1KB"})),
     r"memory plan: storage device needs ~.* on cpu .* but ~.* of 1000 B can be used; use a larger device"),
    ("sigma0-400-digits", lambda c: c.run(lambda d: d["optimizer"].update(sigma0=10**400)),
     r"config field 'optimizer.sigma0': bad value 10{50,}\.\.\.; allowed: a number in"),
    ("budget-absurd", lambda c: c.run(lambda d: d.update(budget=10**12)),
     r"config field 'budget': bad value 1000000000000; allowed: a positive integer up to 10,000,000"),
    ("seed-beyond-cma", lambda c: c.run(lambda d: d.update(seed=2**32 - 1)),
     r"config field 'seed': bad value 4294967295"),
    ("search-space-null", lambda c: c.run(lambda d: d.update(search_space=None)),
     r"config field 'search_space': bad value None; allowed: a non-empty mapping"),
    ("holdout-zero", lambda c: c.run(lambda d: d.update(holdout=0)),
     r"config field 'holdout': bad value 0; allowed: a list of evaluators"),
    ("fixed-false", lambda c: c.run(lambda d: d["search_space"].update(fixed=False)),
     r"config field 'search_space.fixed': bad value False"),
    ("yaml-date-value", lambda c: ["run", str((c.tmp / "d.yaml").write_text(
        c.config().read_text().replace("name: lp", "name: 2024-05-01")) and c.tmp / "d.yaml"), "--out", str(c.tmp / "campaign")],
     r"config field objectives\[0\]\.name \(date 2024-05-01\) is not a plain value; quote it"),
    ("same-source-two-spellings", lambda c: c.run(lambda d: d["sources"].update(
        e1=str(c.fam["expert0"].parent / ".." / c.fam["expert0"].parent.name / "expert0"))),
     r"config field 'sources.e1': .* is the same model as 'sources.e0'"),
    ("racing-objective-not-raced", lambda c: c.run(lambda d: d.update(
        racing=True, fitness=[{"task": "mgsm", "lang": "en", "split": "0-9", "max_new_tokens": 4}], holdout=[],
        objectives=[{"name": "acc", "metrics": ["mgsm_en", "mgsm_en_in_language"]}])),
     r"config field 'racing': the objective uses \['mgsm_en_in_language'\], which racing does not score"),
    ("language-threshold-string", lambda c: c.run(lambda d: d.update(
        fitness=[{"task": "mgsm", "lang": "en", "split": "0-9", "language_threshold": "high"}], holdout=[],
        objectives=[{"name": "acc", "metrics": ["mgsm_en"]}])),
     r"config field 'fitness\[0\]': MGSM language_threshold 'high': a share between 0 and 1"),
    ("language-threshold-5", lambda c: c.run(lambda d: d.update(
        fitness=[{"task": "mgsm", "lang": "en", "split": "0-9", "language_threshold": 5}], holdout=[],
        objectives=[{"name": "acc", "metrics": ["mgsm_en"]}])),
     r"MGSM language_threshold 5: a share between 0 and 1"),
    ("perplexity-batch-zero-in-campaign", lambda c: c.run(lambda d: d.update(
        fitness=[{"task": "perplexity", "path": str(jsonl(c, ['{"text": "abc def"}'])), "batch_size": 0}], holdout=[],
        objectives=[{"name": "ll", "metrics": ["loglik"]}])),
     r"config field 'fitness\[0\]': batch_size 0: an integer >= 1"),
    ("recipe-component-empty", lambda c: ["merge", c.recipe(lambda d: d.update(component={})), c.out],
     r"'component' is empty"),
    ("mergekit-models-mapping", lambda c: ["merge", c.recipe(data={"merge_method": "ties", "base_model": str(c.fam["base"]),
                                                                   "models": {"a": str(c.fam["expert0"])}}), c.out],
     r"'models' must be a list"),
    ("mergekit-rule-without-value", lambda c: ["merge", c.recipe(data={
        "merge_method": "ties", "base_model": str(c.fam["base"]),
        "models": [{"model": str(c.fam["expert0"]), "parameters": {"weight": [{"filter": "self_attn"}], "density": 0.5}}]}), c.out],
     r"models\[0\]\.parameters\.weight: conditional \{'filter': 'self_attn'\} has no 'value'"),
    ("mergekit-parameters-list", lambda c: ["merge", c.recipe(data={
        "merge_method": "ties", "base_model": str(c.fam["base"]), "parameters": [0.5],
        "models": [{"model": str(c.fam["expert0"]), "parameters": {"weight": 0.5}}]}), c.out],
     r": parameters must be a mapping like \{weight: 0.5\}, got \[0.5\]"),
    ("shard-size-two-dots", lambda c: ["merge", c.recipe(), c.out, "--shard-size", "1.2.3GB"],
     r"shard size '1.2.3GB' is not a size"),
    ("shard-size-zero", lambda c: ["merge", c.recipe(), c.out, "--shard-size", "0"],
     r"shard size '0' is not a positive size"),
    ("eval-bad-tokenizer", lambda c: ["eval", str(bad_tokenizer_model(c)), "--task", "synthetic:reverse"],
     r"bad_tokenizer: transformers cannot load its config or tokenizer"),
    ("eval-flag-for-another-task", lambda c: ["eval", str(c.fam["base"]), "--task", "synthetic:reverse", "--limit", "3"],
     r"flag\(s\) --limit do not apply to synthetic tasks; its flags: --n, --seed, --split"),
    ("eval-perplexity-batch-zero", lambda c: ["eval", str(c.fam["base"]), "--task", "perplexity", "--data",
                                              str(jsonl(c, ['{"text": "abc def ghi"}'])), "--batch-size", "0"],
     r"batch_size 0: an integer >= 1"),
    ("eval-perplexity-limit-negative", lambda c: ["eval", str(c.fam["base"]), "--task", "perplexity", "--data",
                                                  str(jsonl(c, ['{"text": "abc def ghi"}'])), "--limit", "-1"],
     r"limit -1: an integer >= 1"),
    ("eval-mgsm-jsonl-with-split", lambda c: ["eval", str(c.fam["base"]), "--task", "mgsm", "--lang", "en", "--data",
                                              str(jsonl(c, ['{"question": "1+1?", "answer": 2}'])), "--split", "5-9"],
     r"MGSM split names rows of the shipped MGSM data; a jsonl/hf set takes rows"),
    ("eval-mgsm-jsonl-nan-answer", lambda c: ["eval", str(c.fam["base"]), "--task", "mgsm", "--lang", "en", "--data",
                                              str(jsonl(c, ['{"question": "1+1?", "answer": "nan"}']))],
     r"set.jsonl:1: answer 'nan' is not a finite number"),
    ("tiny-hidden-3", lambda c: ["tiny", str(c.tmp / "fam3"), "--hidden", "3"],
     r"--hidden 3: give a multiple of 8"),
    ("tiny-negative-experts", lambda c: ["tiny", str(c.tmp / "famx"), "--experts", "-2"],
     r"--experts -2: give 1 to 64 experts"),
    ("tiny-into-a-file", lambda c: ["tiny", str((c.tmp / "ff").write_text("x") and c.tmp / "ff")],
     r"ff is a file; pass a folder for the family"),
    ("tiny-over-an-existing-family", lambda c: ["tiny", str(c.fam["base"].parent), "--experts", "2"],
     r"base already exists; evomerge tiny never writes over a folder"),
    ("demo-config-not-yaml", lambda c: ["demo", "--out", str(c.tmp / "demo"), "--config",
                                        str((c.tmp / "x.yaml").write_text("a: [") and c.tmp / "x.yaml")],
     r"x.yaml: not valid YAML \(line"),
    ("demo-config-a-list", lambda c: ["demo", "--out", str(c.tmp / "demo"), "--config",
                                      str((c.tmp / "l.yaml").write_text("- 1\n- 2\n") and c.tmp / "l.yaml")],
     r"l.yaml: expected a campaign config \(a mapping\) at the top level"),
    ("demo-config-without-holdout", lambda c: ["demo", "--out", str(c.tmp / "demo"), "--config",
                                               str(c.config(lambda d: d.pop("holdout")))],
     r"the demo's report scores models on the held-out evaluators, which must produce the objective's metrics"),
    ("status-on-a-file", lambda c: ["status", str((c.tmp / "notes.txt").write_text("x") and c.tmp / "notes.txt")],
     r"notes.txt is a file, not a campaign folder"),
    ("journal-config-not-json", lambda c: ["status", str(damaged_value(c, "UPDATE meta SET value = '{bad' WHERE key = 'config'"))],
     r"journal.sqlite is damaged or not an evomerge journal \(a stored value is not JSON"),
    ("journal-genome-not-json", lambda c: ["front", str(damaged_value(c, "UPDATE candidates SET genome = '[1,' WHERE id = 2"))],
     r"journal.sqlite is damaged or not an evomerge journal"),
    ("journal-objectives-missing", lambda c: ["status", str(damaged_value(c, "UPDATE candidates SET objectives = NULL WHERE id = 2"))],
     r"journal.sqlite is damaged .*candidate #2 is incomplete"),
    ("journal-without-candidates-table", lambda c: ["status", str(damaged_value(c, "DROP TABLE candidates"))],
     r"journal.sqlite is damaged .*tables missing: \['candidates'\]"),
    # -- flags ------------------------------------------------------------------------------------------
    ("unknown-flag", lambda c: ["run", str(c.config()), "--out", str(c.tmp / "x"), "--budjet", "3"],
     r"unrecognized arguments: --budjet 3 \(see `evomerge --help`\)"),
    ("missing-required-flag", lambda c: ["run", str(c.config())],
     r"the following arguments are required: --out"),
    # -- export, push, plots, reports, inspect, watch -----------------------------------------------------
    ("export-best-and-front", lambda c: ["export", c.campaign_dir, c.out, "--best", "--front"],
     r"give exactly one of --candidate ID, --best \[OBJECTIVE\] or --front"),
    ("export-private-without-push", lambda c: ["export", c.campaign_dir, c.out, "--best", "--private"],
     r"--private applies to --push-to-hub REPO_ID"),
    ("export-front-pushed", lambda c: ["export", c.campaign_dir, c.out, "--front", "--push-to-hub", "me/merged"],
     r"--push-to-hub uploads one model; choose it with --candidate ID or --best"),
    ("push-while-offline", lambda c: ["export", c.campaign_dir, c.out, "--best", "--push-to-hub", "me/merged"],
     r"HF_HUB_OFFLINE"),
    ("export-front-into-a-file", lambda c: ["export", c.campaign_dir, (c.tmp / "f.txt").write_text("x") and c.tmp / "f.txt",
                                             "--front"], r"f.txt, which is a file"),
    ("export-unknown-objective", lambda c: ["export", c.campaign_dir, c.out, "--best", "lq"],
     r"--best 'lq': the campaign's objectives are lp"),
    ("inspect-unknown-id", lambda c: ["inspect", c.campaign_dir, "999"], r"has no candidate #999 \(ids run 1-"),
    ("inspect-id-not-a-number", lambda c: ["inspect", c.campaign_dir, "best"], r"invalid int value: 'best'"),
    ("watch-interval-nan", lambda c: ["status", c.campaign_dir, "--watch", "--interval", "nan"],
     r"--interval nan: give a number of seconds above 0"),
    ("watch-with-json", lambda c: ["status", c.campaign_dir, "--watch", "--json"], r"--watch redraws text; drop --json"),
    ("plot-without-journal", lambda c: ["plot", str(c.tmp)], r"holds no campaign journal"),
    ("report-without-journal", lambda c: ["report", str(c.tmp)], r"holds no campaign journal"),
]


@pytest.fixture(scope="module")
def finished_campaign(llama_family, tmp_path_factory):
    from evomerge.campaign import CampaignRunner
    from evomerge.config import parse_campaign

    folder = tmp_path_factory.mktemp("finished") / "campaign"
    c = Ctx(folder.parent, llama_family, folder)
    CampaignRunner(parse_campaign(yaml.safe_load(c.config().read_text())), folder, progress=False).run()
    return folder


@pytest.fixture
def family_copy(llama_family, tmp_path_factory):
    """A private copy of the family (some cases mark a source folder), shared by the cases of one test."""
    root = tmp_path_factory.mktemp("fam")
    return {k: Path(shutil.copytree(v, root / k)) for k, v in llama_family.items()}


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case, build, pattern", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_clear_line(case, build, pattern, family_copy, finished_campaign, tmp_path, capsys,
                                         monkeypatch):
    monkeypatch.chdir(tmp_path)
    c = Ctx(tmp_path, family_copy, finished_campaign)
    argv = [str(a) for a in build(c)]
    if "--quiet" not in argv and argv[0] in ("merge", "run", "resume"):
        argv.append("--quiet")
    before = {name: snapshot(Path(p)) for name, p in family_copy.items()}
    before_tmp = sorted(p.name for p in tmp_path.iterdir())
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("evomerge: error: "), lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    # Nothing lost, nothing half-written.
    assert {name: snapshot(Path(p)) for name, p in family_copy.items() if name != "expert0" or case != "overwrite-a-source"} \
        == {name: snap for name, snap in before.items() if name != "expert0" or case != "overwrite-a-source"}
    assert not c.out.exists()
    assert not any(p.name.startswith((".out.tmp", ".written.tmp")) for p in tmp_path.iterdir())
    assert not (tmp_path / "campaign" / "journal.sqlite").exists()
    if (tmp_path / "written").exists():
        assert (tmp_path / "written" / "keep.txt").read_text() == "precious"
    if (tmp_path / "mine").exists():
        assert sorted(p.name for p in tmp_path.iterdir()) == before_tmp


def test_the_matrix_is_wide():
    assert len(CASES) >= 40


def test_ctrl_c_during_a_run_says_how_to_resume(llama_family, tmp_path):
    c = Ctx(tmp_path, llama_family, tmp_path)
    config = c.config(lambda d: d.update(budget=400))
    folder = tmp_path / "campaign"
    proc, _ = run_until(config, folder, folder / "journal.sqlite", 3, sig=signal.SIGINT, timeout=120,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2, err
    assert len(lines) == 1, err
    assert re.search(rf"interrupted; \d+ of 400 candidates are safe in .*journal.sqlite; continue with "
                     rf"`evomerge resume {re.escape(str(folder))}`", lines[0]), lines[0]
    status = subprocess.run([sys.executable, "-m", "evomerge", "status", str(folder), "--json"], capture_output=True,
                            text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert json.loads(status.stdout)["evaluated"] >= 3


def test_perplexity_of_a_nan_model_is_valid_json(llama_family, tmp_path, capsys):
    folder = Path(shutil.copytree(llama_family["base"], tmp_path / "nan_model"))
    state = {n: t for n, t in Checkpoint(folder).iter_tensors()}
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("nan"))
    for f in folder.glob("*.safetensors*"):
        f.unlink()
    save_file(state, str(folder / "model.safetensors"))
    text = tmp_path / "t.txt"
    text.write_text("hello world, this is a test.\n\nanother paragraph here.")
    assert main(["eval", str(folder), "--task", "perplexity", "--data", str(text), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["metrics"] == {"perplexity": None, "loglik": None}
    assert report["non_finite"] == ["loglik", "perplexity"]
