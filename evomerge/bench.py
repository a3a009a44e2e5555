"""Benchmarks. `python -m evomerge.bench materialize --json`, `python -m evomerge.bench generate --json`,
`racing`, `path`, `executor` (engine overhead, busy fraction with and without the barrier, Ray throughput).

materialize: for one family of local models (built once and cached), measures
  (a) the bound: torch clone of (sources + 1) x model bytes, what any merge must at least read;
  (b) evomerge's in-memory materialization per candidate for linear, ties and dare_ties;
  (c) mergekit's run_merge of the same recipe on the same folders (when mergekit is installed);
and prints them, then one JSON line with ratio_to_bound (worst b/a) and speedup_vs_mergekit (c/b).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _family(cache: Path, hidden: int, layers: int, intermediate: int, vocab: int, n: int) -> dict[str, Path]:
    from evomerge.tiny import build_family

    key = cache / f"llama-h{hidden}-l{layers}-i{intermediate}-v{vocab}-n{n}"
    done = key / "done"
    if not done.exists():
        shutil.rmtree(key, ignore_errors=True)
        build_family(key, n, hidden=hidden, layers=layers, intermediate=intermediate, vocab=vocab, seed=0)
        done.write_text("ok")
    return {p.name: p for p in key.iterdir() if p.is_dir()}


def _recipe(method: str, fam: dict[str, Path], n: int):
    from evomerge.recipe import Recipe

    params = {"linear": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5}}[method]
    sources = [{"model": str(fam[f"expert{i}"]), "parameters": {"weight": 0.3 + 0.1 * i, **params}} for i in range(n)]
    data = {"method": method, "sources": sources, "base": str(fam["base"]) if method != "linear" else None}
    return Recipe.from_dict({k: v for k, v in data.items() if v is not None})


def _mergekit_config(method: str, fam: dict[str, Path], n: int) -> dict:
    recipe = _recipe(method, fam, n)
    cfg = {"merge_method": method, "dtype": "float32",
           "models": [{"model": s.model, "parameters": s.parameters} for s in recipe.sources]}
    if recipe.base:
        cfg["base_model"] = recipe.base
    return cfg


def _time(fn, repeats: int, best: bool = False) -> float:
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times) if best else statistics.median(times)


def bench_materialize(args: argparse.Namespace) -> dict:
    from evomerge.bank import SourceBank

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    fam = _family(cache, args.hidden, args.layers, args.intermediate, args.vocab, args.sources)
    methods = args.methods.split(",")
    experts = [str(fam[f"expert{i}"]) for i in range(args.sources)]
    t0 = time.perf_counter()
    bank = SourceBank(experts, str(fam["base"]), device=args.device)
    load_s = time.perf_counter() - t0
    params = sum(bt.reference.numel() for bt in bank.tensors.values())
    model_bytes = params * 4

    # (a) the bound: a clone of every byte a candidate must read (base + each source).
    tensors = [bt.reference for bt in bank.tensors.values()] + [
        d for bt in bank.tensors.values() for d in bt.deltas if d is not None
    ]
    # The bound's best run (allocator warm) against our median: the comparison favours the bound.
    bound = _time(lambda: [t.clone() for t in tensors], args.repeats, best=True)

    results, first = {}, {}
    target = bank.new_target()
    for method in methods:
        recipe = _recipe(method, fam, args.sources)
        start = time.perf_counter()
        bank.materialize(recipe, target)  # first use builds the cached ranks / drop fields, compiles
        first[method] = time.perf_counter() - start
        results[method] = _time(lambda: bank.materialize(recipe, target), args.repeats)

    mergekit_s = {}
    if not args.no_mergekit:
        try:
            from mergekit.config import MergeConfiguration
            from mergekit.merge import MergeOptions, run_merge
        except ImportError:
            print("mergekit not installed: skipping (c); pip install mergekit==0.1.5", file=sys.stderr)
        else:
            for method in methods:
                cfg = MergeConfiguration.model_validate(_mergekit_config(method, fam, args.sources))
                out = Path(tempfile.mkdtemp(prefix="mk-bench-"))
                opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0,
                                    device=args.device, num_threads=args.threads)
                mergekit_s[method] = _time(lambda: run_merge(cfg, str(out), opts), args.mergekit_repeats)
                shutil.rmtree(out, ignore_errors=True)

    print(f"model: {params / 1e6:.1f}M params/float32 ({model_bytes / 2**20:.0f} MiB), {args.sources} sources + base, "
          f"device {args.device}, {args.threads} threads; bank load {load_s:.1f}s, resident {bank.memory_bytes() / 2**30:.2f} GiB")
    print(f"(a) bound: clone of {args.sources + 1} x model bytes: {bound * 1e3:.0f} ms")
    for method in methods:
        line = (f"(b) evomerge {method:10s}: {results[method] * 1e3:7.0f} ms/candidate  ({results[method] / bound:.2f}x bound; "
                f"first candidate {first[method]:.1f} s)")
        if method in mergekit_s:
            line += f"   (c) mergekit run_merge: {mergekit_s[method]:.1f} s  ({mergekit_s[method] / results[method]:.0f}x slower)"
        print(line)
    summary = {
        "params": params,
        "sources": args.sources,
        "device": args.device,
        "bound_s": round(bound, 4),
        "materialize_s": {m: round(v, 4) for m, v in results.items()},
        "first_candidate_s": {m: round(v, 2) for m, v in first.items()},
        "bank_load_s": round(load_s, 2),
        "ratio_to_bound": round(max(v / bound for v in results.values()), 3),
    }
    if mergekit_s:
        summary["mergekit_s"] = {m: round(v, 3) for m, v in mergekit_s.items()}
        summary["speedup_vs_mergekit"] = round(min(mergekit_s[m] / results[m] for m in mergekit_s), 1)
    return summary


def bench_generate(args: argparse.Namespace) -> dict:
    """Batched greedy generation (left padding) vs batch size 1, same model, same prompts."""
    from evomerge.evaluators.mgsm import GenerationSettings, build_prompt, generate, load_rows
    from evomerge.evaluate import load_model

    torch.set_num_threads(args.threads)
    if args.model:
        model, tok = load_model(args.model, args.device)
    else:
        from transformers import AutoModelForCausalLM

        from evomerge.tiny import char_tokenizer, tiny_config

        torch.manual_seed(0)
        tok = char_tokenizer()
        model = AutoModelForCausalLM.from_config(
            tiny_config("llama", hidden=args.hidden, layers=args.layers, positions=2048)).to(args.device).eval()
    prompts = [build_prompt(q, args.lang, []) for q, _ in load_rows(args.lang)[: args.prompts]]
    results = {}
    for bs in sorted({1, *args.batch_sizes}):
        settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=bs, stop=[])
        generate(model, tok, prompts[:bs], settings)  # warm-up
        start = time.perf_counter()
        outs = generate(model, tok, prompts, settings)
        secs = time.perf_counter() - start
        tokens = sum(len(tok(text, add_special_tokens=False).input_ids) for text, _ in outs)
        results[bs] = {"seconds": round(secs, 2), "tokens": tokens, "tokens_per_s": round(tokens / secs, 1)}
        print(f"batch {bs:3d}: {tokens} tokens in {secs:6.2f} s = {tokens / secs:8.1f} tokens/s")
    best = max(results.values(), key=lambda r: r["tokens_per_s"])
    return {"prompts": len(prompts), "new_tokens": args.new_tokens, "by_batch": results,
            "speedup_vs_batch1": round(best["tokens_per_s"] / results[1]["tokens_per_s"], 2)}


def bench_racing(args: argparse.Namespace) -> dict:
    """The demo campaign with and without racing: examples scored to reach the plain run's final fitness."""
    import yaml

    from evomerge.campaign import CampaignRunner
    from evomerge.config import parse_campaign
    from evomerge.demo import DEMO_CONFIG
    from evomerge.journal import Journal

    torch.set_num_threads(args.threads)
    data = yaml.safe_load(Path(args.config or DEMO_CONFIG).read_text())
    if args.budget:
        data["budget"] = args.budget
    runs = {}
    for label, racing in (("plain", None), ("racing", {"stages": args.stages, "z": args.z})):
        cfg = dict(data, **({"racing": racing} if racing else {}))
        folder = Path(tempfile.mkdtemp(prefix=f"evomerge-racing-{label}-"))
        start = time.perf_counter()
        runner = CampaignRunner(parse_campaign(cfg), folder, progress=False)
        runner.run()
        name = runner.campaign.objectives[0].name
        rows = Journal(folder).candidates()
        trace, best, used = [], float("-inf"), 0
        for r in rows:  # in evaluation order: examples spent, best fully-scored fitness so far
            used += r.examples or 0
            if r.status == "done":
                best = max(best, r.objectives[name])
            trace.append((used, best))
        runs[label] = {"trace": trace, "final": best, "examples": used, "seconds": time.perf_counter() - start,
                       "raced": sum(r.status == "raced" for r in rows), "candidates": len(rows)}
        shutil.rmtree(folder, ignore_errors=True)
    target = runs["plain"]["final"]

    def to_reach(trace):
        return next((used for used, best in trace if best >= target - 1e-12), None)

    plain_n, racing_n = to_reach(runs["plain"]["trace"]), to_reach(runs["racing"]["trace"])
    for label, r in runs.items():
        print(f"{label:7s}: {r['candidates']} candidates ({r['raced']} stopped early), {r['examples']} examples scored, "
              f"final best {r['final']:.4f}, {r['seconds']:.1f} s")
    ratio = racing_n / plain_n if racing_n and plain_n else None
    print(f"examples to reach the plain run's final fitness {target:.4f}: plain {plain_n}, racing {racing_n}"
          + (f" ({ratio:.2f}x)" if ratio else " (not reached)"))
    return {"target": target, "plain_examples_to_target": plain_n, "racing_examples_to_target": racing_n,
            "ratio": round(ratio, 3) if ratio else None,
            "total_examples": {k: v["examples"] for k, v in runs.items()},
            "final": {k: v["final"] for k, v in runs.items()}, "raced": runs["racing"]["raced"],
            "rule": {"stages": args.stages, "z": args.z}}


def bench_path(args: argparse.Namespace) -> dict:
    """Building a data-flow candidate (a path over resident layers) and exporting it with scales folded."""
    from evomerge.dataflow import PathBank, PathRecipe, Step, export_path

    torch.set_num_threads(args.threads)
    fam = _family(Path(args.cache), args.hidden, args.source_layers, 2 * args.hidden, None, 2)
    refs = [str(fam["expert0"]), str(fam["expert1"])]
    bank = PathBank(refs, refs[0])
    models = {"a": refs[0], "b": refs[1]}
    recipe = PathRecipe(models, [Step("ab"[i % 2], i % args.source_layers, 1.0 + 0.01 * (i % 3))
                                 for i in range(args.path_layers)], "a")
    build_s = _time(lambda: bank.materialize(recipe), 20)
    with tempfile.TemporaryDirectory() as tmp:
        export_s = _time(lambda: export_path(recipe, Path(tmp) / "out", overwrite=True), 3)
    params = sum(p.numel() for p in bank.models[refs[0]].parameters())
    summary = {"path_layers": args.path_layers, "source_params_m": round(params / 1e6, 2),
               "build_ms": round(build_s * 1e3, 3), "export_s": round(export_s, 3)}
    print(f"path of {args.path_layers} layers over two {params / 1e6:.1f}M-parameter models: built in "
          f"{build_s * 1e3:.2f} ms (no weight copied); exported with scales folded in {export_s:.2f} s")
    return summary


def _executor_run(fam: dict, executor: dict, fitness: list, budget: int, barrier: bool = True) -> dict:
    """One campaign over the tiny family; engine time, worker time and busy fraction from its own clocks."""
    from evomerge.campaign import CampaignRunner
    from evomerge.config import parse_campaign
    from evomerge.journal import Journal

    cfg = {"name": "bench-executor", "seed": 0, "base": str(fam["base"]),
           "sources": {f"e{i}": str(fam[f"expert{i}"]) for i in range(3)},
           "search_space": {"kind": "ps", "method": "ties", "parameters": {"weight": [0.0, 1.0], "density": [0.1, 1.0]},
                            "granularity": "groups"},
           "optimizer": {"name": "cma", "population": 8}, "budget": budget, "barrier": barrier,
           "objectives": [{"name": "lp", "metrics": ["reverse_logprob"]}], "fitness": fitness, "executor": executor}
    with tempfile.TemporaryDirectory() as tmp:
        runner = CampaignRunner(parse_campaign(cfg), Path(tmp) / "c", progress=False)
        runner.run()
        rows = Journal(Path(tmp) / "c").candidates()
    t = runner.timing
    work = sum((r.materialize_s or 0) + (r.eval_s or 0) for r in rows)
    slots = runner.executor.slots
    return {"workers": slots, "candidates": len(rows), "wall_s": round(t["wall_s"], 3),
            "startup_s": round(t["startup_s"], 2),
            "engine_ms_per_candidate": round((t["wall_s"] - t["waiting_s"]) / len(rows) * 1e3, 2),
            "candidate_s": round(work / len(rows), 4),
            "unaccounted_ms_per_candidate": round((t["wall_s"] * slots - work) / len(rows) * 1e3, 2),
            "busy_fraction": round(work / (slots * t["wall_s"]), 3),
            "candidates_per_s": round(len(rows) / t["wall_s"], 3)}


def bench_executor(args: argparse.Namespace) -> dict:
    """Engine overhead per candidate, worker busy fraction with and without the generation barrier under
    uneven candidate times, and throughput on 1 and 2 Ray workers."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    torch.set_num_threads(args.threads)
    fam = _family(Path(args.cache), 64, 4, 128, None, 3)
    real = {"task": "synthetic-logprob:reverse", "split": "fitness", "n": args.examples}
    even = [real, {"task": "simulate", "seconds": args.seconds}]
    uneven = [real, {"task": "simulate", "seconds": args.seconds, "spread": args.spread}]
    ray1 = {"kind": "ray", "num_workers": 1, "address": "local"}
    ray2 = {"kind": "ray", "num_workers": 2, "address": "local"}
    out: dict = {}
    out["overhead_local"] = _executor_run(fam, {"kind": "local"}, even, args.budget)
    out["overhead_ray_1"] = _executor_run(fam, ray1, even, args.budget)
    out["barrier"] = _executor_run(fam, ray2, uneven, args.budget, barrier=True)
    out["no_barrier"] = _executor_run(fam, ray2, uneven, args.budget, barrier=False)
    cpu = [dict(real, n=args.cpu_examples)]
    out["throughput_local"] = _executor_run(fam, {"kind": "local"}, cpu, args.budget)
    out["throughput_ray_1"] = _executor_run(fam, ray1, cpu, args.budget)
    out["throughput_ray_2"] = _executor_run(fam, ray2, cpu, args.budget)
    for label, r in out.items():
        print(f"{label:17s} {r['workers']} worker(s): {r['candidates']} candidates in {r['wall_s']:.1f} s "
              f"(+{r['startup_s']:.1f} s start), {r['candidate_s'] * 1e3:.0f} ms each on a worker, engine "
              f"{r['engine_ms_per_candidate']:.1f} ms/candidate, busy {r['busy_fraction']:.0%}, "
              f"{r['candidates_per_s']:.2f} candidates/s")
    local, ray_1 = out["overhead_local"], out["overhead_ray_1"]
    summary = {
        "engine_overhead_fraction": round(local["engine_ms_per_candidate"] / 1e3 / local["candidate_s"], 4),
        "ray_overhead_fraction": round(ray_1["unaccounted_ms_per_candidate"] / 1e3 / ray_1["candidate_s"], 4),
        "busy_fraction_barrier": out["barrier"]["busy_fraction"],
        "busy_fraction_no_barrier": out["no_barrier"]["busy_fraction"],
        "throughput_1_worker": out["throughput_ray_1"]["candidates_per_s"],
        "throughput_2_workers": out["throughput_ray_2"]["candidates_per_s"],
        "throughput_local": out["throughput_local"]["candidates_per_s"],
        "runs": out,
    }
    print(f"engine overhead {summary['engine_overhead_fraction']:.2%} of a {local['candidate_s']:.2f} s candidate "
          f"(local); everything outside the worker with Ray: {summary['ray_overhead_fraction']:.2%}; busy "
          f"{summary['busy_fraction_barrier']:.0%} with the barrier, {summary['busy_fraction_no_barrier']:.0%} "
          f"without; {summary['throughput_1_worker']:.2f} vs {summary['throughput_2_workers']:.2f} candidates/s on "
          "1 vs 2 Ray workers")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evomerge.bench")
    sub = parser.add_subparsers(dest="what", required=True)
    m = sub.add_parser("materialize", help="in-memory materialization vs the memory bound and mergekit")
    # Defaults: three ~134M-parameter float32 sources, sized for a 2-core, 24 GiB machine.
    m.add_argument("--hidden", type=int, default=768)
    m.add_argument("--layers", type=int, default=12)
    m.add_argument("--intermediate", type=int, default=2048)
    m.add_argument("--vocab", type=int, default=32000)
    m.add_argument("--sources", type=int, default=3)
    m.add_argument("--methods", default="linear,ties,dare_ties")
    m.add_argument("--device", default="cpu")
    m.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--mergekit-repeats", type=int, default=1)
    m.add_argument("--no-mergekit", action="store_true")
    m.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "evomerge-bench"))
    m.add_argument("--json", action="store_true", help="end with one JSON line")
    g = sub.add_parser("generate", help="batched generation throughput vs batch size 1 (MGSM prompts)")
    g.add_argument("--model", help="model folder (default: a random tiny Llama)")
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--lang", default="en")
    g.add_argument("--prompts", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 32])
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    g.add_argument("--json", action="store_true")
    r = sub.add_parser("racing", help="the demo campaign with and without racing (needs the demo family; built if absent)")
    r.add_argument("--config", help="a demo-style config (default experiments/demo.yaml)")
    r.add_argument("--budget", type=int)
    r.add_argument("--stages", type=float, nargs="+", default=[0.25, 0.5])
    r.add_argument("--z", type=float, default=2.0)
    r.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    r.add_argument("--json", action="store_true")
    p = sub.add_parser("path", help="building a data-flow candidate (a layer path) and exporting it folded")
    p.add_argument("--path-layers", type=int, default=100)
    p.add_argument("--source-layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "evomerge-bench"))
    p.add_argument("--json", action="store_true")
    e = sub.add_parser("executor", help="engine overhead, worker busy fraction with and without the barrier, "
                                        "throughput on 1 and 2 Ray workers")
    e.add_argument("--budget", type=int, default=32)
    e.add_argument("--seconds", type=float, default=0.5, help="median simulated evaluation time per candidate")
    e.add_argument("--spread", type=float, default=0.8, help="sigma of the log of the uneven times")
    e.add_argument("--examples", type=int, default=16, help="real examples scored beside the simulated time")
    e.add_argument("--cpu-examples", type=int, default=256, help="examples per candidate in the throughput runs")
    e.add_argument("--threads", type=int, default=1, help="torch threads of the driver (each Ray worker has one)")
    e.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "evomerge-bench"))
    e.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    handlers = {"materialize": bench_materialize, "generate": bench_generate, "racing": bench_racing,
                "path": bench_path, "executor": bench_executor}
    summary = handlers[args.what](args)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
