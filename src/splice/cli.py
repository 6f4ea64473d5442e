"""Command line: `splice sites [MODEL]` lists a model's sites and shapes."""

from __future__ import annotations

import argparse
import sys


def _sites(args) -> int:
    from .loading import load

    model = load(args.model)
    print(model)
    width = max(len(n) for n in model.sites)
    for name, shape in model.sites.items():
        if args.filter and args.filter not in name:
            continue
        print(f"{name:<{width}}  [{', '.join(str(s) for s in shape)}]")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="splice", description="Activation editing for Hugging Face transformers.")
    commands = parser.add_subparsers(dest="command", required=True)
    sites = commands.add_parser("sites", help="list every site of a model with its shape")
    sites.add_argument("model", nargs="?", default=None, help="hub name or local folder (default: the embedded SmolLM2-135M)")
    sites.add_argument("--filter", default="", help="only names containing this text, e.g. 'blocks.3.'")
    sites.set_defaults(run=_sites)
    args = parser.parse_args(argv)
    from .errors import SpliceError

    try:
        return args.run(args)
    except SpliceError as error:
        print(f"splice: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
