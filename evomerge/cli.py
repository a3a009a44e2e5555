"""`evomerge` command line."""

from __future__ import annotations

import argparse
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
