"""`evomerge` command line.

Nothing heavy is imported at the top (torch, transformers load in the subcommands), so
`evomerge --help` answers at once. Every failure a user can cause ends as one line on stderr and
exit status 2: an EvomergeError, a bad flag, a damaged journal, Ctrl-C (or SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import signal
import sqlite3
import sys

from evomerge.errors import EvomergeError


def _merge(args: argparse.Namespace) -> None:
    from evomerge.export import write_recipe
    from evomerge.loader import load_recipe

    recipe = load_recipe(args.recipe)
    out = write_recipe(
        recipe, args.out_dir, device=args.device, shard_size=args.shard_size,
        allow_pickle=args.allow_pickle, overwrite=args.overwrite, progress=not args.quiet,
        protect=[args.recipe], exact=not args.as_scored,
    )
    print(f"wrote {out}")


def _export(args: argparse.Namespace) -> None:
    from evomerge.export import export_candidates
    from evomerge.hybrid import final_folder

    if sum([args.candidate is not None, args.best is not None, args.front]) != 1:
        raise EvomergeError("export: give exactly one of --candidate ID, --best [OBJECTIVE] or --front")
    if args.push_to_hub:
        from evomerge.hub import check_push

        if args.front:
            raise EvomergeError("--push-to-hub uploads one model; choose it with --candidate ID or --best, "
                                "not --front")
        check_push(args.push_to_hub)  # a bad repo id or an offline hub costs no merge
    elif args.private:
        raise EvomergeError("--private applies to --push-to-hub REPO_ID; add it, or drop --private")
    best = None if args.best is None else (args.best or None)
    written = export_candidates(final_folder(args.dir), args.out_dir, args.candidate, best, args.front,
                                args.overwrite, args.shard_size, progress=True)
    for out, row in written:
        scores = ", ".join(f"{k}={v:.4g}" for k, v in (row["objectives"] or {}).items())
        print(f"wrote {out} (candidate #{row['id']}: {scores})")
    if args.push_to_hub:
        from evomerge.hub import push_folder

        out = written[0][0]
        try:
            url = push_folder(out, args.push_to_hub, private=args.private)
        except EvomergeError as exc:
            raise EvomergeError(f"{exc} (the export itself is complete in {out}; after fixing this, upload it with "
                                f"`hf upload {args.push_to_hub} {out}`)") from None
        print(f"pushed to {url}")


def _plot(args: argparse.Namespace) -> None:
    from evomerge.plots import make_plots

    written = make_plots(args.dir, args.out)
    for path in written:
        print(f"wrote {path}")
    if not written:
        print(f"nothing to plot yet: {args.dir} has no finished candidate (see `evomerge status {args.dir}`)")


def _report(args: argparse.Namespace) -> None:
    from evomerge.report import write_report

    print(f"wrote {write_report(args.dir, args.out)}")


def _inspect(args: argparse.Namespace) -> None:
    from evomerge.hybrid import final_folder
    from evomerge.view import candidate_detail, candidate_lines

    detail = candidate_detail(final_folder(args.dir), args.id)
    if args.json:
        print(json.dumps(detail))
        return
    print("\n".join(candidate_lines(detail, detail.pop("holdout_identity"))))


def _tiny(args: argparse.Namespace) -> None:
    from evomerge.tiny import build_family_safely

    paths = build_family_safely(args.out_dir, args.experts, arch=args.arch, hidden=args.hidden, layers=args.layers,
                                seed=args.seed, chat=args.chat)
    for name, path in paths.items():
        print(f"{name}: {path}")


def _executor_flags(args: argparse.Namespace) -> dict | None:
    """--executor / --address / --num-workers as an override of the config's executor block."""
    flags = {"kind": args.executor, "address": args.address, "num_workers": args.num_workers}
    return {k: v for k, v in flags.items() if v is not None} or None


def _run(args: argparse.Namespace) -> None:
    from evomerge.config import parse_campaign, with_executor
    from evomerge.errors import read_document
    from evomerge.hybrid import StagedRunner, is_staged, runner_for

    data = read_document(args.config, "config", "campaign YAML file")
    if isinstance(data, dict):
        data = with_executor(data, _executor_flags(args))
    if args.dry_run:
        from evomerge.preflight import describe, preflight

        staged = StagedRunner(data, args.out, origin=args.config) if is_staged(data) else None
        campaign = staged.campaign(0) if staged else parse_campaign(data, str(args.config))
        for line in describe(preflight(campaign, build=False)):
            print(line)
        if staged:
            print(f"later stages ({', '.join(n for n, _ in staged.stages[1:])}) are checked as configs now and "
                  "planned when the stage before them has a winner")
        print(f"dry run: nothing was loaded or written (campaign folder {args.out})")
        return
    from evomerge.view import front_lines

    out = runner_for(data, args.out, not args.quiet, str(args.config)).run()
    print("\n".join(front_lines(out.front)))


def _resume(args: argparse.Namespace) -> None:
    from evomerge.campaign import resume_campaign
    from evomerge.hybrid import is_staged_folder, resume_staged
    from evomerge.view import front_lines

    resume = resume_staged if is_staged_folder(args.dir) else resume_campaign
    out = resume(args.dir, progress=not args.quiet, executor=_executor_flags(args))
    print("\n".join(front_lines(out.front)))


def _status(args: argparse.Namespace) -> None:
    from evomerge.hybrid import final_folder, staged_status
    from evomerge.view import load_view, status_lines

    if args.watch:
        from evomerge.watch import watch

        if args.json:
            raise EvomergeError("--watch redraws text; drop --json (or poll `evomerge status DIR --json`)")
        watch(args.dir, args.interval)
        return

    stages = None if args.json else staged_status(args.dir)
    view = load_view(final_folder(args.dir))
    print(json.dumps(view.to_json()) if args.json else "\n".join((stages or []) + status_lines(view)))


def _front(args: argparse.Namespace) -> None:
    from evomerge.hybrid import final_folder
    from evomerge.view import front_lines, load_view

    front = load_view(final_folder(args.dir)).front
    print(json.dumps([m.to_json() for m in front]) if args.json else "\n".join(front_lines(front)))


def _demo(args: argparse.Namespace) -> None:
    from evomerge.demo import run_demo

    run_demo(args.out, budget=args.budget, config=args.config, progress=not args.quiet)
    print(f"summary: {args.out}/summary.json")


def _eval(args: argparse.Namespace) -> None:
    from evomerge.evaluate import evaluate_folder

    spec: dict = {"task": args.task}
    for key, value in (("lang", args.lang), ("split", args.split), ("limit", args.limit),
                       ("include_path", args.include_path), ("max_new_tokens", args.max_new_tokens),
                       ("shots", args.shots), ("num_fewshot", args.num_fewshot), ("batch_size", args.batch_size),
                       ("n", args.n), ("seed", args.seed)):
        if value is not None:
            spec[key] = value
    if args.data:
        spec["jsonl" if args.task.startswith("mgsm") else "path"] = args.data
    if args.language_check:
        spec["language_check"] = True
    if args.chat_template is not None:
        spec["chat_template"] = {"true": True, "false": False}.get(args.chat_template, args.chat_template)
    for key, value in (("system", args.system), ("prompt", args.prompt)):
        if value is not None:
            spec[key] = value
    report = evaluate_folder(args.model, spec, device=args.device, allow_pickle=args.allow_pickle)
    if args.json:
        print(json.dumps(report, allow_nan=False))
        return
    ident = report["identity"]
    print(f"{args.model}: {ident.get('task')} [{ident.get('split')}, n={ident.get('n')}] in {report['seconds']:.1f} s")
    prompt = ident.get("prompt")
    if prompt:  # which prompt stands behind the numbers: scores are comparable only between equal prompts
        print(f"  prompt: {prompt['format']}" + (f" (template {prompt['chat_template_sha256']})"
                                                 if prompt["chat_template_sha256"] else "")
              + (f", system {prompt['system']!r}" if prompt.get("system") else ""))
    for k, v in report["metrics"].items():
        print(f"  {k}: {v:.4f}" if v is not None else f"  {k}: not finite (the model's outputs are NaN or infinite)")


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (the usage is one --help away)."""

    def error(self, message: str):
        print(f"evomerge: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


def _add_executor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=["local", "ray"], help="where candidates run (overrides the config's executor)")
    p.add_argument("--address", help="Ray cluster: local (a private instance, the default), auto (the cluster started "
                                     "with `ray start` on this machine), host:port or ray://host:10001")
    p.add_argument("--num-workers", type=int, help="Ray workers (default: as many as the cluster's GPUs or CPUs hold)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="evomerge", description="Evolutionary model-merge search.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    m = sub.add_parser("merge", help="materialize one recipe (evomerge or mergekit YAML) into a model folder")
    m.add_argument("recipe", help="recipe YAML/JSON, or a mergekit config")
    m.add_argument("out_dir", help="output folder (written atomically)")
    m.add_argument("--device", default="cpu", help="where to merge: cpu, cuda, cuda:1 (default cpu)")
    m.add_argument("--shard-size", default="5GB", help="largest safetensors shard, e.g. 2GB (default 5GB)")
    m.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt sources (loaded with weights_only=True)")
    m.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    m.add_argument("--quiet", action="store_true", help="no progress bar")
    m.add_argument("--as-scored", action="store_true",
                   help="merge through a SourceBank as a campaign scores candidates (TIES thresholds of large "
                        "tensors from its sketch) instead of streaming with exact thresholds")
    m.set_defaults(func=_merge)
    x = sub.add_parser("export", help="write a campaign's candidate as a model folder that transformers loads")
    x.add_argument("dir", help="campaign folder")
    x.add_argument("out_dir", help="output folder (written atomically)")
    x.add_argument("--candidate", type=int, help="the candidate id (see `evomerge front DIR`)")
    x.add_argument("--best", nargs="?", const="", default=None, metavar="OBJECTIVE",
                   help="the best finished candidate on OBJECTIVE by fitness (default: the first objective)")
    x.add_argument("--front", action="store_true", help="every front member, as OUT/candidate-<id>/")
    x.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the exported folder to this Hugging Face repo "
                                                            "(token from HF_TOKEN or `hf auth login`)")
    x.add_argument("--private", action="store_true", help="with --push-to-hub: create the repo private")
    x.add_argument("--shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    x.set_defaults(func=_export)
    p = sub.add_parser("plot", help="PNG plots of a campaign: fitness, front, hypervolume, coefficients, path")
    p.add_argument("dir", help="campaign folder")
    p.add_argument("--out", help="folder for the PNGs (default DIR/plots)")
    p.set_defaults(func=_plot)
    p = sub.add_parser("report", help="one self-contained HTML page: config, front, plots, winner, timings, failures")
    p.add_argument("dir", help="campaign folder")
    p.add_argument("--out", help="the HTML file (default DIR/report.html)")
    p.set_defaults(func=_report)
    p = sub.add_parser("inspect", help="one candidate: recipe, metrics and what measured them, timings, error")
    p.add_argument("dir", help="campaign folder")
    p.add_argument("id", type=int, help="candidate id (see `evomerge front DIR`)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_inspect)
    r = sub.add_parser("run", help="start (or continue) a campaign from a config")
    r.add_argument("config")
    r.add_argument("--out", required=True, help="campaign folder (journal.sqlite lives here)")
    r.add_argument("--dry-run", action="store_true",
                   help="check everything and print the plan (genome, candidates, evaluators, memory); load nothing")
    r.add_argument("--quiet", action="store_true")
    _add_executor_flags(r)
    r.set_defaults(func=_run)
    for name, func, flag, text in (
        ("resume", _resume, "--quiet", "continue a stopped or killed campaign exactly where it was"),
        ("status", _status, "--json", "progress of a campaign"),
        ("front", _front, "--json", "the Pareto front of a campaign"),
    ):
        r = sub.add_parser(name, help=text)
        r.add_argument("dir", help="campaign folder")
        r.add_argument(flag, action="store_true")
        if name == "resume":
            _add_executor_flags(r)
        if name == "status":
            r.add_argument("--watch", action="store_true", help="refresh while the campaign runs (Ctrl-C leaves)")
            r.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes (default 2)")
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
    e.add_argument("--n", type=int, help="synthetic tasks: examples to draw (a campaign's `n`)")
    e.add_argument("--seed", type=int, help="synthetic tasks: the draw's seed")
    e.add_argument("--include-path", help="folder of local lm-eval task YAMLs")
    e.add_argument("--data", help="perplexity/VQA file, or an MGSM-style JSONL of {question, answer}")
    e.add_argument("--shots", type=int, help="MGSM few-shot exemplars (default 0)")
    e.add_argument("--num-fewshot", type=int, help="lm-eval few-shot count")
    e.add_argument("--max-new-tokens", type=int, help="generation length limit (recorded with the score)")
    e.add_argument("--batch-size", type=int)
    e.add_argument("--language-check", action="store_true", help="MGSM: the answer must be in the target language")
    e.add_argument("--chat-template", choices=["auto", "true", "false"],
                   help="MGSM: prompt through the tokenizer's chat template (auto: when it has one; the default)")
    e.add_argument("--system", help="MGSM: a system prompt")
    e.add_argument("--prompt", help="MGSM: the question wording, with {question} (e.g. 'Q: {question}')")
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
    t.add_argument("--chat", action="store_true", help="give the tokenizer a chat template (a tiny 'chat model')")
    t.set_defaults(func=_tiny)
    return parser


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, _terminate)  # a polite kill cleans up like Ctrl-C does
    try:
        args.func(args)
    except EvomergeError as exc:
        print(f"evomerge: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: error: interrupted; nothing half-written was kept (a campaign continues with "
              "`evomerge resume DIR`)", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `evomerge status DIR | head`: the reader left; nothing to report
        sys.stderr.close()
        return 0
    except sqlite3.Error as exc:
        print(f"evomerge: error: the campaign journal cannot be read ({exc}); restore journal.sqlite from a backup, "
              "or start again in a new --out folder", file=sys.stderr)
        return 2
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


if __name__ == "__main__":
    sys.exit(main())
