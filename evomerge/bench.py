"""Benchmarks. `python -m evomerge.bench materialize --json`, `python -m evomerge.bench generate --json`,
`racing`, `path`, `executor` (engine overhead, busy fraction with and without the barrier, Ray throughput).

materialize: for one family of local models (built once and cached), measures per method the
  in-memory materialization of a candidate against its bound (the bytes it must move: read the
  reference and the deltas it uses, write the output once, at the copy bandwidth measured in the same
  run), the bank's resident memory, the kept-fraction error of the TIES sketch, and mergekit like for
  like: `evomerge merge` vs `mergekit-yaml` disk to disk, and one search candidate in memory vs
  mergekit-evolve's merge written to disk and loaded. JSON keys: ratio_to_bound (worst method),
  resident_ratio, oneshot_vs_mergekit (worst method), candidate_speedup_vs_mergekit.
gpu: random Llama-shaped sources built in memory (no download): bank size, materialization per
  method against the device copy bound, first-candidate time, and the memory plan of 7B x 3 sources.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import statistics
import subprocess
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


METHOD_PARAMS = {"linear": {}, "task_arithmetic": {}, "ties": {"density": 0.5}, "dare_ties": {"density": 0.5},
                 "breadcrumbs_ties": {"density": 0.8, "gamma": 0.05}, "della": {"density": 0.5, "epsilon": 0.1}}


def _recipe(method: str, fam: dict[str, Path], n: int, dtype: str = "float32"):
    from evomerge.recipe import Recipe

    params = METHOD_PARAMS[method]
    sources = [{"model": str(fam[f"expert{i}"]), "parameters": {"weight": 0.3 + 0.1 * i, **params}} for i in range(n)]
    data = {"method": method, "sources": sources, "dtype": dtype,
            "base": str(fam["base"]) if method != "linear" else None}
    return Recipe.from_dict({k: v for k, v in data.items() if v is not None})


def _mergekit_config(method: str, fam: dict[str, Path], n: int, dtype: str = "float32") -> dict:
    recipe = _recipe(method, fam, n, dtype)
    cfg = {"merge_method": method, "dtype": dtype,
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


def copy_bandwidth(device: str, nbytes: int = 1 << 29, repeats: int = 10) -> float:
    """Bytes moved per second (read + write) by a plain device copy between two large buffers: the
    best of `repeats` (the bound gets the benefit of any doubt)."""
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch: page faults are not bandwidth
    secs = _time(lambda: dst.copy_(src), repeats, best=True)
    return 2 * nbytes / secs


def must_move(method: str, bank, n: int) -> int:
    """Bytes a candidate must move at least: read the reference and the deltas the method uses, write
    the output (the preallocated target) once."""
    from evomerge.bank import _nbytes

    used = n if method != "linear" else n - 1  # a base-free merge's first source is its reference
    reference = sum(_nbytes(bt.reference) for bt in bank.tensors.values())
    deltas = sum(_nbytes(d) for bt in bank.tensors.values() for d in bt.deltas[:used] if d is not None)
    return 2 * reference + deltas


def bench_materialize(args: argparse.Namespace) -> dict:
    """Per-candidate materialization against the bytes it must move, resident memory, the sketch's
    error, and mergekit like for like: disk to disk (CLI vs CLI) and per search candidate."""
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
    bandwidth = copy_bandwidth(args.device)
    print(f"model: {params / 1e6:.1f}M params/float32 ({model_bytes / 2**20:.0f} MiB), {args.sources} sources + base, "
          f"device {args.device}, {args.threads} threads; bank load {load_s:.1f} s; copy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s (read + write)", flush=True)

    results, first, bounds = {}, {}, {}
    target = bank.new_target()
    for method in methods:
        recipe = _recipe(method, fam, args.sources)
        start = time.perf_counter()
        bank.materialize(recipe, target)  # the first candidate builds the cached sketches (and compiles)
        first[method] = time.perf_counter() - start
        results[method] = _time(lambda: bank.materialize(recipe, target), args.repeats)
        bounds[method] = must_move(method, bank, args.sources) / bandwidth
        print(f"evomerge {method:16s}: {results[method] * 1e3:7.0f} ms/candidate, bound {bounds[method] * 1e3:5.0f} ms "
              f"({results[method] / bounds[method]:.2f}x; first candidate {first[method]:.1f} s)", flush=True)
    resident = bank.memory_bytes()
    resident_ratio = resident / ((args.sources + 1) * model_bytes)
    print(f"resident: {resident / 2**30:.2f} GiB = {resident_ratio:.3f} x (sources + 1) x model bytes")
    sketch = sketch_error()
    print(f"TIES thresholds from a {sketch['sketch_size']}-sample sketch: kept-fraction error {sketch['max_error']:.4f} "
          f"(stated {sketch['stated']:.4f}) on a {sketch['numel'] / 1e6:.0f}M-element tensor")
    summary = {
        "params": params, "sources": args.sources, "device": args.device, "threads": args.threads,
        "copy_GBps": round(bandwidth / 1e9, 2),
        "bound_s": {m: round(v, 4) for m, v in bounds.items()},
        "materialize_s": {m: round(v, 4) for m, v in results.items()},
        "first_candidate_s": {m: round(v, 2) for m, v in first.items()},
        "bank_load_s": round(load_s, 2),
        "ratio_to_bound": round(max(results[m] / bounds[m] for m in methods), 3),
        "resident_GiB": round(resident / 2**30, 3),
        "resident_ratio": round(resident_ratio, 3),
        "sketch": sketch,
    }
    if args.no_mergekit:
        return summary
    import importlib.util

    if importlib.util.find_spec("mergekit") is None:
        print("mergekit not installed: skipping the comparisons; pip install mergekit==0.1.5", file=sys.stderr)
        return summary
    bank = target = None  # free the bank before the comparisons load their own
    summary |= oneshot_vs_mergekit(fam, args)
    summary |= candidate_vs_mergekit(fam, args)
    return summary


def sketch_error(numel: int = 1 << 24, densities=(0.1, 0.3, 0.5, 0.7, 0.9)) -> dict:
    """The kept fraction of TIES thresholds read from the bank's quantile sketch, against the density."""
    from evomerge.methods import SKETCH_SIZE, Keep, SketchOrder, keep_mask, resolve_keep

    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(numel, generator=gen) * torch.rand(numel, generator=gen)  # a heavy-ish tail
    order = SketchOrder(delta, 0)
    worst = 0.0
    for d in densities:
        keep = resolve_keep(Keep("ranks", numel - int(d * numel), numel), order)
        kept = keep_mask("magnitude", keep, delta).float().mean().item()
        worst = max(worst, abs(kept - d))
    return {"sketch_size": SKETCH_SIZE, "numel": numel, "max_error": round(worst, 5),
            "stated": round((0.25 / SKETCH_SIZE) ** 0.5, 5)}


def _cli(argv: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    secs = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} failed: {done.stderr.strip()[-400:]}")
    return secs


def oneshot_vs_mergekit(fam: dict[str, Path], args: argparse.Namespace) -> dict:
    """`evomerge merge CONFIG OUT` vs `mergekit-yaml CONFIG OUT`, the same YAML, medians of repeats."""
    import yaml

    mergekit_yaml = shutil.which("mergekit-yaml") or str(Path(sys.executable).with_name("mergekit-yaml"))
    work = Path(tempfile.mkdtemp(prefix="evomerge-oneshot-"))
    out: dict = {"oneshot_s": {}, "mergekit_yaml_s": {}}
    try:
        for method in args.oneshot_methods.split(","):
            cfg = work / f"{method}.yaml"
            cfg.write_text(yaml.safe_dump(_mergekit_config(method, fam, args.sources, args.oneshot_dtype)))
            ours, theirs = [], []
            for r in range(args.oneshot_repeats):  # interleaved, so drift in the machine hits both
                shutil.rmtree(work / "out", ignore_errors=True)
                ours.append(_cli([sys.executable, "-m", "evomerge", "merge", str(cfg), str(work / "out")]))
                shutil.rmtree(work / "out", ignore_errors=True)
                theirs.append(_cli([mergekit_yaml, str(cfg), str(work / "out"), "--no-copy-tokenizer"]))
            out["oneshot_s"][method] = round(statistics.median(ours), 2)
            out["mergekit_yaml_s"][method] = round(statistics.median(theirs), 2)
            print(f"one-shot {method} ({args.oneshot_dtype}, disk to disk, median of {args.oneshot_repeats}): "
                  f"evomerge merge {statistics.median(ours):.1f} s, mergekit-yaml {statistics.median(theirs):.1f} s "
                  f"({statistics.median(ours) / statistics.median(theirs):.2f}x)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["oneshot_vs_mergekit"] = round(max(out["oneshot_s"][m] / out["mergekit_yaml_s"][m] for m in out["oneshot_s"]), 3)
    return out


def candidate_vs_mergekit(fam: dict[str, Path], args: argparse.Namespace) -> dict:
    """One search candidate: evomerge's in-memory materialization into the evaluation model, vs
    mergekit-evolve's default path (the merge written to disk by run_merge, then loaded)."""
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from transformers import AutoModelForCausalLM

    from evomerge.bank import SourceBank

    method = "ties"
    bank = SourceBank([str(fam[f"expert{i}"]) for i in range(args.sources)], str(fam["base"]), device=args.device)
    model = AutoModelForCausalLM.from_pretrained(fam["base"], dtype=torch.float32).to(args.device)
    recipe = _recipe(method, fam, args.sources)
    bank.materialize(recipe, model)
    ours = _time(lambda: bank.materialize(recipe, model), args.repeats)
    bank = None
    cfg = MergeConfiguration.model_validate(_mergekit_config(method, fam, args.sources))
    opts = MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0, device=args.device)
    work = Path(tempfile.mkdtemp(prefix="mk-candidate-"))

    def mergekit_candidate():
        shutil.rmtree(work / "out", ignore_errors=True)
        run_merge(cfg, str(work / "out"), opts)
        AutoModelForCausalLM.from_pretrained(work / "out", dtype=torch.float32).to(args.device)

    try:
        theirs = _time(mergekit_candidate, args.mergekit_repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"per candidate ({method}): evomerge in memory {ours * 1e3:.0f} ms, mergekit merge to disk + load "
          f"{theirs:.1f} s ({theirs / ours:.0f}x)")
    return {"candidate_s": round(ours, 4), "mergekit_candidate_s": round(theirs, 3),
            "candidate_speedup_vs_mergekit": round(theirs / ours, 1)}


# Llama-shaped models for `bench gpu`: Llama-3.2-1B and Llama-2-7B's shapes, and a tiny one for CPU.
LLAMA_SIZES = {
    "tiny": {"hidden": 256, "layers": 4, "intermediate": 688, "vocab": 8000, "heads": 4, "kv_heads": 4},
    "1b": {"hidden": 2048, "layers": 16, "intermediate": 8192, "vocab": 128256, "heads": 32, "kv_heads": 8},
    "7b": {"hidden": 4096, "layers": 32, "intermediate": 11008, "vocab": 32000, "heads": 32, "kv_heads": 32},
}


def llama_shapes(hidden: int, layers: int, intermediate: int, vocab: int, heads: int, kv_heads: int) -> dict:
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                   p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                   p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                   p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                   p + "post_attention_layernorm.weight": (hidden,)}
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def _random_model(shapes: dict, seed: int, device: str, dtype: torch.dtype, base=None, noise: float = 0.01):
    """A lazy name -> tensor mapping of random weights made on the device when read (no download, and
    never a whole extra model in memory); with `base`, the base plus seeded noise (a "fine-tune")."""
    from evomerge.checkpoint import StreamedTensors
    from evomerge.methods import tensor_seed

    def make(name: str) -> torch.Tensor:
        gen = torch.Generator(device=device).manual_seed(tensor_seed(seed, 0, name))
        t = torch.randn(shapes[name], generator=gen, device=device, dtype=torch.float32)
        if base is None:
            return (t * 0.02).to(dtype)
        return (base[name].float() + t * noise).to(dtype)

    return StreamedTensors({n: (s, dtype) for n, s in shapes.items()}, make)


def plan_for(size: str, sources: int, method: str, dtype: str, capacity: int) -> dict:
    """The memory plan of `sources` Llama-`size` models on a device of `capacity` bytes, MGSM-sized
    generation (batch 16 x (512 + 256) tokens) beside the bank."""
    from evomerge.memory_plan import kv_cache_bytes, layout_of, plan_memory
    from evomerge.methods import get_method
    from evomerge.recipe import DTYPES

    cfg = LLAMA_SIZES[size]
    shapes = llama_shapes(**cfg)
    element = torch.empty(0, dtype=DTYPES[dtype]).element_size()
    numel = sum(math.prod(s) for s in shapes.values())
    layout = layout_of(shapes, set(shapes), sources, get_method(method).element_key == "magnitude", numel)
    config = {"num_hidden_layers": cfg["layers"], "num_attention_heads": cfg["heads"],
              "num_key_value_heads": cfg["kv_heads"], "hidden_size": cfg["hidden"]}
    kv = kv_cache_bytes(config, 16 * (512 + 256), element)
    out = {"size": size, "sources": sources, "method": method, "dtype": dtype, "capacity_GB": round(capacity / 1e9, 1)}
    try:
        plan = plan_memory(layout, element, kv, "cuda", {"storage": "auto", "quantize": "none"},
                           device_capacity=capacity, host_capacity=None)
    except Exception as exc:  # an EvomergeError: it does not fit; say why
        return out | {"fits": False, "why": str(exc)}
    return out | {"fits": True, "storage": plan.storage, "device_GB": round(plan.device_total / 1e9, 1),
                  "parts_GB": {k: round(v / 1e9, 2) for k, v in plan.on_device.items()}}


def bench_gpu(args: argparse.Namespace) -> dict:
    """The bank on the accelerator: random Llama-shaped sources made in device memory, one candidate
    per method against the device's copy bound, first-candidate time (sketches, compile), and the
    memory plan of 7B x 3 sources DARE-TIES on an 80 GB device."""
    from evomerge.bank import SourceBank
    from evomerge.recipe import DTYPES, Recipe

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size or ("1b" if device.startswith("cuda") else "tiny")
    dtype = DTYPES[args.dtype]
    shapes = llama_shapes(**LLAMA_SIZES[size])
    params = sum(math.prod(s) for s in shapes.values())
    print(f"{size}: {params / 1e9:.2f}B parameters x ({args.sources} sources + base), {args.dtype}, on {device}",
          flush=True)
    t0 = time.perf_counter()
    base = _random_model(shapes, 0, device, dtype)
    bank = SourceBank.from_tensors(base, [_random_model(shapes, i + 1, device, dtype, base)
                                          for i in range(args.sources)], dtype=dtype, device=device,
                                   storage=args.storage, compile=None if device.startswith("cuda") else False)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    target = bank.new_target()  # the evaluation model's weights, written in place
    bandwidth = copy_bandwidth(device, 1 << 30 if device.startswith("cuda") else 1 << 29)
    results, first, bounds = {}, {}, {}
    for method in args.methods.split(","):
        params_ = METHOD_PARAMS[method]
        recipe = Recipe.from_dict({"method": method, "base": "base", "dtype": args.dtype, "sources": [
            {"model": f"source{i}", "parameters": {"weight": 0.3 + 0.1 * i, **params_}} for i in range(args.sources)]})
        first[method] = _time(lambda: bank.materialize(recipe, target), 1)
        results[method] = _time(lambda: bank.materialize(recipe, target), args.repeats)
        bounds[method] = must_move(method, bank, args.sources) / bandwidth
        print(f"  {method:16s}: {results[method] * 1e3:8.1f} ms/candidate, bound {bounds[method] * 1e3:6.1f} ms "
              f"({results[method] / bounds[method]:.2f}x); first candidate {first[method]:.1f} s", flush=True)
    peak = torch.cuda.max_memory_allocated(device) if device.startswith("cuda") else None
    capacity = torch.cuda.mem_get_info(device)[1] if device.startswith("cuda") else 80 * 10**9
    plans = [plan_for("7b", 3, "dare_ties", "bfloat16", 80 * 10**9)]
    if device.startswith("cuda"):
        plans.append(plan_for("7b", 3, "dare_ties", "bfloat16", capacity))
    for p in plans:
        verdict = f"fits ({p['storage']} storage, {p['device_GB']} GB)" if p["fits"] else f"does not fit: {p['why']}"
        print(f"plan 7b x 3 dare_ties bfloat16 on {p['capacity_GB']} GB: {verdict}")
    summary = {
        "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu",
        "size": size, "params": params, "dtype": args.dtype, "sources": args.sources, "storage": args.storage,
        "bank_GB": round(bank.memory_bytes() / 1e9, 2), "bank_device_GB": round(bank.device_bytes() / 1e9, 2),
        "build_s": round(build_s, 1), "copy_GBps": round(bandwidth / 1e9, 1),
        "materialize_ms": {m: round(v * 1e3, 2) for m, v in results.items()},
        "bound_ms": {m: round(v * 1e3, 2) for m, v in bounds.items()},
        "ratio_to_bound": round(max(results[m] / bounds[m] for m in results), 3),
        "first_candidate_s": {m: round(v, 2) for m, v in first.items()},
        "plans": plans,
    }
    if peak is not None:
        summary["peak_device_GB"] = round(peak / 1e9, 2)
    return summary


def bench_generate(args: argparse.Namespace) -> dict:
    """The generation loop (length-sorted batches, finished rows leave the batch) against the previous
    path (`model.generate` on batches in the order given), same model, prompts and settings.

    Two workloads: `fixed` (every answer runs to --new-tokens: a random model never stops, so only the
    sorting can help) and `varied` (answers end at different lengths, as a real model's do: with the
    built-in random model, EOS takes over the output row of one of its commonly generated tokens)."""
    from evomerge.evaluators.generation import GenerationSettings, generate, generate_hf
    from evomerge.evaluators.mgsm import MGSM
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
    ev = MGSM(tok, lang=args.lang, split="all", limit=args.prompts)
    prompts = ev.rendered
    workloads = {"fixed": model}
    if not args.model:
        workloads["varied"] = _early_stopping(model, tok, prompts, args.new_tokens)
    results: dict = {"prompts": len(prompts), "new_tokens": args.new_tokens, "format": ev.format.identity()["format"],
                     "device": args.device, "workloads": {}}
    for name, m in workloads.items():
        rows = {}
        for bs in args.batch_sizes:
            settings = GenerationSettings(max_new_tokens=args.new_tokens, batch_size=bs, stop=ev.settings.stop)
            row = {}
            for label, fn in (("old", generate_hf), ("new", generate)):
                fn(m, tok, prompts[:bs], settings)  # warm-up
                start = time.perf_counter()
                outs = fn(m, tok, prompts, settings)
                secs = time.perf_counter() - start
                tokens = sum(g.tokens for g in outs)
                row[label] = {"seconds": round(secs, 2), "tokens": tokens, "tokens_per_s": round(tokens / secs, 1),
                              "mean_tokens": round(tokens / len(outs), 1), "outputs": outs}
            same = row["old"].pop("outputs") == row["new"].pop("outputs")
            row["speedup"] = round(row["new"]["tokens_per_s"] / row["old"]["tokens_per_s"], 2)
            row["same_outputs"] = same
            rows[bs] = row
            print(f"{name:6s} batch {bs:3d}: old {row['old']['tokens_per_s']:8.1f} tokens/s, new "
                  f"{row['new']['tokens_per_s']:8.1f} tokens/s ({row['speedup']:.2f}x; mean answer "
                  f"{row['new']['mean_tokens']} tokens; same outputs: {same})")
        results["workloads"][name] = rows
    return results


def _early_stopping(model, tok, prompts: list[str], new_tokens: int):
    """A copy of a random model whose answers end at varied lengths: the EOS output row trades places
    with the row of a token it generates now and then (the one closest to a median first stop)."""
    import copy

    made = []  # what the model generates for a few prompts when nothing stops it, batch 1: no padding
    for prompt in prompts[:8]:
        enc = tok(prompt, return_tensors="pt", add_special_tokens=False).to(next(model.parameters()).device)
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        made.append(out[0, enc.input_ids.shape[1]:].tolist())
    first = {}  # token -> positions where it first appears in each answer
    for ids in made:
        for t in set(ids):
            first.setdefault(t, []).append(ids.index(t))
    eos = tok.eos_token_id
    target = new_tokens / 3
    token = min((t for t in first if t != eos), key=lambda t: abs(sorted(first[t])[len(first[t]) // 2] - target)
                + new_tokens * (len(made) - len(first[t])) / len(made))
    varied = copy.deepcopy(model)
    head = varied.get_output_embeddings().weight
    with torch.no_grad():  # swap the two output rows: EOS is chosen exactly where `token` would have been
        head[[eos, token]] = head[[token, eos]]
    return varied


def bench_racing(args: argparse.Namespace) -> dict:
    """The demo campaign with and without racing, over several seeds: examples spent, wrong stops
    (raced candidates whose full score would have beaten their incumbent; each is re-scored in full
    to find out), and the held-out score of each arm's winner."""
    import statistics

    import yaml

    from evomerge.campaign import CampaignRunner
    from evomerge.config import parse_campaign
    from evomerge.demo import DEMO_CONFIG
    from evomerge.journal import Journal
    from evomerge.view import front_members
    from evomerge.worker import FITNESS, Task, Worker

    torch.set_num_threads(args.threads)
    data = yaml.safe_load(Path(args.config or DEMO_CONFIG).read_text())
    if args.budget:
        data["budget"] = args.budget
    seeds = list(range(args.seeds))
    arms: dict[str, list[dict]] = {"plain": [], "racing": []}
    for seed in seeds:
        for label in arms:
            racing = {"stages": args.stages, "z": args.z, "seed": seed} if label == "racing" else None
            cfg = dict(data, seed=seed, **({"racing": racing} if racing else {}))
            folder = Path(tempfile.mkdtemp(prefix=f"evomerge-racing-{label}-"))
            try:
                start = time.perf_counter()
                runner = CampaignRunner(parse_campaign(cfg), folder, progress=False)
                runner.run()
                seconds = time.perf_counter() - start
                objective = runner.campaign.objectives[0].name
                rows = Journal(folder).candidates()
                raced = [r for r in rows if r.status == "raced"]
                wrong = 0
                if raced:  # the full score each stopped candidate would have had: one worker, no racing
                    worker = Worker(dataclasses.replace(runner.plan.worker, racing=None), runner.plan.evaluators,
                                    runner.plan.tokenizer)
                    full = {r.id: runner.objectives_of(worker.run(Task(r.id, r.recipe, FITNESS)).metrics)[objective]
                            for r in raced}
                    wrong = sum(full[r.id] > r.incumbent for r in raced)
                # Candidates whose full score beat the bar they were raced against: the ones a stop would wrong.
                beat = wrong + sum(r.status == "done" and r.incumbent is not None and r.objectives[objective] > r.incumbent
                                   for r in rows)
                winner = max(front_members(Journal(folder), runner.campaign), key=lambda m: m.objectives[objective])
                arms[label].append({
                    "seed": seed, "examples": sum(r.examples or 0 for r in rows), "candidates": len(rows),
                    "raced": len(raced), "wrong_stops": wrong, "beat_incumbent": beat,
                    "best_fitness": winner.objectives[objective],
                    "winner_holdout": winner.holdout.get(objective), "seconds": round(seconds, 1)})
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            r = arms[label][-1]
            held = f"{r['winner_holdout']:.4f}" if r["winner_holdout"] is not None else "n/a (no holdout)"
            print(f"seed {seed} {label:6s}: {r['examples']:6d} examples, {r['raced']:3d}/{r['candidates']} stopped "
                  f"({r['wrong_stops']} wrongly), best fitness {r['best_fitness']:.4f}, winner held-out {held}, "
                  f"{r['seconds']:.0f} s", flush=True)

    def spread(values: list) -> dict | None:
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"mean": round(statistics.fmean(values), 4),
                "sd": round(statistics.stdev(values), 4) if len(values) > 1 else 0.0}

    ratios = [r["examples"] / p["examples"] for r, p in zip(arms["racing"], arms["plain"])]
    raced = sum(r["raced"] for r in arms["racing"])
    wrong = sum(r["wrong_stops"] for r in arms["racing"])
    beat = sum(r["beat_incumbent"] for r in arms["racing"])
    summary = {
        "seeds": len(seeds), "rule": {"stages": args.stages, "z": args.z},
        "examples_ratio": spread(ratios),
        "raced_fraction": round(raced / sum(r["candidates"] for r in arms["racing"]), 4),
        # What the bound controls: of the candidates whose full score beat their bar, the share stopped.
        "wrong_stop_rate": round(wrong / beat, 4) if beat else None,
        "wrong_stops": wrong, "beat_incumbent": beat, "raced": raced,
        "wrong_share_of_stops": round(wrong / raced, 4) if raced else None,
        "winner_holdout": {k: spread([r["winner_holdout"] for r in v]) for k, v in arms.items()},
        "best_fitness": {k: spread([r["best_fitness"] for r in v]) for k, v in arms.items()},
        "runs": arms,
    }

    def held(arm: str) -> str:
        h = summary["winner_holdout"][arm]
        return f"{h['mean']:.4f} ± {h['sd']:.4f}" if h else "n/a"

    print(f"examples racing/plain {summary['examples_ratio']['mean']:.3f} ± {summary['examples_ratio']['sd']:.3f} "
          f"over {len(seeds)} seeds; {raced} candidates stopped; of the {beat} whose full score beat their bar, "
          f"{wrong} were stopped (wrong-stop rate {summary['wrong_stop_rate']}); winner held-out plain {held('plain')}, "
          f"racing {held('racing')}")
    return summary


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


def _at_least_one(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a whole number >= 1")
    return int(text)


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
    m.add_argument("--methods", default="linear,ties,dare_ties,breadcrumbs_ties")
    m.add_argument("--device", default="cpu")
    m.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument("--mergekit-repeats", type=int, default=1)
    m.add_argument("--no-mergekit", action="store_true")
    m.add_argument("--oneshot-methods", default="ties,dare_ties")
    m.add_argument("--oneshot-dtype", default="bfloat16")
    m.add_argument("--oneshot-repeats", type=int, default=3)
    m.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "evomerge-bench"))
    m.add_argument("--json", action="store_true", help="end with one JSON line")
    g = sub.add_parser("generate", help="the generation loop vs model.generate, tokens/s (MGSM prompts)")
    g.add_argument("--model", help="model folder (default: a random tiny Llama)")
    g.add_argument("--hidden", type=int, default=256)
    g.add_argument("--layers", type=int, default=4)
    g.add_argument("--lang", default="en")
    g.add_argument("--prompts", type=int, default=32)
    g.add_argument("--new-tokens", type=int, default=64)
    g.add_argument("--batch-sizes", type=int, nargs="+", default=[16])
    g.add_argument("--device", default="cpu")
    g.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    g.add_argument("--json", action="store_true")
    r = sub.add_parser("racing", help="the demo campaign with and without racing over seeds (needs the demo family; "
                                      "built if absent)")
    r.add_argument("--config", help="a demo-style config (default experiments/demo.yaml)")
    r.add_argument("--budget", type=int)
    r.add_argument("--seeds", type=_at_least_one, default=5, help="campaigns per arm (seeds 0..N-1)")
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
    gp = sub.add_parser("gpu", help="the bank on an accelerator: random Llama-shaped sources, no download")
    gp.add_argument("--size", choices=sorted(LLAMA_SIZES), help="default: 1b on CUDA, tiny elsewhere")
    gp.add_argument("--device", help="default: cuda when available")
    gp.add_argument("--dtype", default="bfloat16")
    gp.add_argument("--sources", type=int, default=3)
    gp.add_argument("--storage", choices=["device", "host"], default="device")
    gp.add_argument("--methods", default="task_arithmetic,ties,dare_ties,breadcrumbs_ties")
    gp.add_argument("--repeats", type=int, default=5)
    gp.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    handlers = {"materialize": bench_materialize, "generate": bench_generate, "racing": bench_racing,
                "path": bench_path, "executor": bench_executor, "gpu": bench_gpu}
    summary = handlers[args.what](args)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
