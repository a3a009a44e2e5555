"""`evomerge` command line."""

from __future__ import annotations

import argparse
import json
import sys

from evomerge.errors import EvomergeError


def _merge(args: argparse.Namespace) -> None:
    from evomerge.merge import merge_to_disk
    from evomerge.recipe import Recipe

    recipe = Recipe.load(args.recipe)
    out = merge_to_disk(
        recipe, args.out_dir, device=args.device, shard_size=args.shard_size,
        allow_pickle=args.allow_pickle, overwrite=args.overwrite, progress=not args.quiet,
    )
    print(f"wrote {out}")


def _tiny(args: argparse.Namespace) -> None:
    from evomerge.tiny import build_family

    paths = build_family(args.out_dir, args.experts, arch=args.arch, hidden=args.hidden, layers=args.layers, seed=args.seed)
    for name, path in paths.items():
        print(f"{name}: {path}")


def _run(args: argparse.Namespace) -> None:
    from evomerge.campaign import run_campaign

    out = run_campaign(args.config, args.out, progress=not args.quiet)
    _print_front(out.front)


def _resume(args: argparse.Namespace) -> None:
    from evomerge.campaign import resume_campaign

    out = resume_campaign(args.dir, progress=not args.quiet)
    _print_front(out.front)


def _print_front(front: list[dict]) -> None:
    print(f"front: {len(front)} member(s)")
    for m in front:
        objs = ", ".join(f"{k}={v:.4g}" for k, v in m["objectives"].items())
        hold = ", ".join(f"{k}={v:.4g}" for k, v in m["holdout"].items() if isinstance(v, float))
        print(f"  #{m['id']}: {objs}" + (f"   held-out: {hold}" if hold else ""))


def _status(args: argparse.Namespace) -> None:
    from evomerge.campaign import campaign_status

    st = campaign_status(args.dir)
    if args.json:
        print(json.dumps(st))
        return
    state = "done" if st["done"] else ("pending" if st["evaluated"] < st["budget"] else "finishing")
    print(f"{st['name']}: {st['evaluated']}/{st['budget']} candidates evaluated ({st['failed']} failed), "
          f"{st['generations']} generation(s), {state}")
    for k, v in st["best"].items():
        print(f"  best {k}: {v:.4g}")
    print(f"  front: {st['front_size']} member(s); hypervolume by generation: "
          + ", ".join(f"{h:.4g}" for h in st["hypervolume"][-8:]))


def _front(args: argparse.Namespace) -> None:
    from evomerge.campaign import front_members, open_campaign

    members = front_members(*open_campaign(args.dir))
    if args.json:
        print(json.dumps([{k: m[k] for k in ("id", "objectives", "holdout", "recipe", "generation", "metrics")}
                          for m in members]))
        return
    _print_front(members)


def _demo(args: argparse.Namespace) -> None:
    from evomerge.demo import run_demo

    run_demo(args.out, budget=args.budget, config=args.config, progress=not args.quiet)
    print(f"summary: {args.out}/summary.json")


def _eval(args: argparse.Namespace) -> None:
    from evomerge.evaluate import evaluate_folder

    spec: dict = {"task": args.task}
    for key, value in (("lang", args.lang), ("split", args.split), ("limit", args.limit),
                       ("include_path", args.include_path), ("max_new_tokens", args.max_new_tokens),
                       ("shots", args.shots), ("num_fewshot", args.num_fewshot), ("batch_size", args.batch_size)):
        if value is not None:
            spec[key] = value
    if args.data:
        spec["jsonl" if args.task.startswith("mgsm") else "path"] = args.data
    if args.language_check:
        spec["language_check"] = True
    report = evaluate_folder(args.model, spec, device=args.device, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(report))
        return
    ident = report["identity"]
    print(f"{args.model}: {ident.get('task')} [{ident.get('split')}, n={ident.get('n')}] in {report['seconds']:.1f} s")
    for k, v in report["metrics"].items():
        print(f"  {k}: {v:.4f}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evomerge", description="Evolutionary model-merge search.")
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="materialize one recipe (evomerge or mergekit YAML) into a model folder")
    m.add_argument("recipe", help="recipe YAML/JSON, or a mergekit config")
    m.add_argument("out_dir", help="output folder (written atomically)")
    m.add_argument("--device", default="cpu", help="where to merge: cpu, cuda, cuda:1 (default cpu)")
    m.add_argument("--shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB (default 5GB)")
    m.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt sources (loaded with weights_only=True)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.set_defaults(func=_merge)
    r = sub.add_parser("run", help="start (or continue) a campaign from a config")
    r.add_argument("config")
    r.add_argument("--out", required=True, help="campaign folder (journal.sqlite lives here)")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_run)
    for name, func, flag, text in (
        ("resume", _resume, "--quiet", "continue a stopped or killed campaign exactly where it was"),
        ("status", _status, "--json", "progress of a campaign"),
        ("front", _front, "--json", "the Pareto front of a campaign"),
    ):
        r = sub.add_parser(name, help=text)
        r.add_argument("dir", help="campaign folder")
        r.add_argument(flag, action="store_true")
        r.set_defaults(func=func)
    r = sub.add_parser("demo", help="train a tiny model family locally and run a real merge campaign on it")
    r.add_argument("--out", default="runs/demo")
    r.add_argument("--budget", type=int, default=None, help="candidates (default: experiments/demo.yaml's)")
    r.add_argument("--config", default=None, help="another demo-style config")
    r.add_argument("--quiet", action="store_true")
    r.set_defaults(func=_demo)
    e = sub.add_parser("eval", help="score a model folder on a task, the way a campaign does")
    e.add_argument("model", help="model folder (a source, a baseline, an export)")
    e.add_argument("--task", required=True, help="mgsm | mgsm:<lang> | lm_eval:<task> | perplexity | vqa | synthetic:<task>")
    e.add_argument("--lang", help="MGSM / VQA language (e.g. ja)")
    e.add_argument("--split", help="MGSM: search | holdout | all | 0-99; synthetic: fitness | holdout")
    e.add_argument("--limit", type=int, help="score only the first N examples")
    e.add_argument("--include-path", help="folder of local lm-eval task YAMLs")
    e.add_argument("--data", help="perplexity/VQA file, or an MGSM-style JSONL of {question, answer}")
    e.add_argument("--shots", type=int, help="MGSM few-shot exemplars (default 0)")
    e.add_argument("--num-fewshot", type=int, help="lm-eval few-shot count")
    e.add_argument("--max-new-tokens", type=int, help="generation length limit (recorded with the score)")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--language-check", action="store_true", help="MGSM: the answer must be in the target language")
    e.add_argument("--device", default="cpu")
    e.add_argument("--allow-pickle", action="store_true")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=_eval)
    t = sub.add_parser("tiny", help="build a tiny local model family (a base and perturbed experts) to try merges on")
    t.add_argument("out_dir")
    t.add_argument("--experts", type=int, default=3)
    t.add_argument("--arch", default="llama", choices=["llama", "gpt2"])
    t.add_argument("--hidden", type=int, default=64)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_tiny)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EvomergeError as exc:
        print(f"evomerge: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
