"""Command line: `splice sites [MODEL]` lists a model's sites and shapes; `splice sweep
CONFIG.yaml` runs a sweep and writes its table (CSV + JSONL) and heatmap."""

from __future__ import annotations

import argparse
import fnmatch
import sys
from collections.abc import Sequence


def matches_filter(name: str, pattern: str) -> bool:
    """`--filter`: a glob (`*`, `?`, `[...]`) matches whole names, as site globs do everywhere in
    splice (`blocks.*.attn.q`); plain text matches names containing it (`blocks.3.`).

    Example:
        >>> matches_filter("blocks.3.attn.q", "blocks.*.attn.q"), matches_filter("blocks.3.attn.q", "attn.")
        (True, True)
        >>> matches_filter("blocks.13.attn.q", "blocks.3.")
        False
    """
    from .engine.sites import is_pattern

    return fnmatch.fnmatchcase(name, pattern) if is_pattern(pattern) else pattern in name


def _sites(args: argparse.Namespace) -> int:
    from .errors import SpliceError
    from .spec import load

    model = load(args.model)
    shown = {name: shape for name, shape in model.sites.items() if matches_filter(name, args.filter)}
    if not shown:
        raise SpliceError(
            f"no site of this model matches --filter {args.filter!r} (a glob like 'blocks.*.attn.q' or text like 'attn.')"
        )
    print(model)
    width = max(len(n) for n in shown)
    for name, shape in shown.items():
        print(f"{name:<{width}}  [{', '.join(str(s) for s in shape)}]")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .config import load_config
    from .errors import SpliceError
    from .plot import effect_bars, sweep_heatmap
    from .spec import load

    config = load_config(args.config)
    output = config.output
    stem = Path(output.get("table", f"out/{config.sweep.name}.csv"))
    checkpoint = config.run.get("checkpoint")
    if checkpoint and Path(checkpoint).resolve() == stem.with_suffix(".jsonl").resolve():
        raise SpliceError(
            f"run.checkpoint {checkpoint} is also where the table's JSONL copy goes; name it differently"
        )
    run = dict(config.run)
    if args.executor is not None:
        run["executor"] = args.executor
    if args.address is not None or args.workers is not None:
        if run.get("executor") != "ray":
            raise SpliceError("--address and --workers are options of --executor ray")
        from .sweeps.ray_executor import RayExecutor

        run["executor"] = RayExecutor(address=args.address, num_workers=args.workers)
    model = load(config.model)
    table = config.sweep.run(model, config.data, **run)
    top = int(output.get("top", 10))
    for metric in table["metric"].unique():
        rows = table[(table["metric"] == metric) & (table["variant"] >= 0)]
        baseline = table[(table["metric"] == metric) & (table["variant"] == -1)]["value"].iloc[0]
        print(f"\n{metric}: baseline {baseline:.4f}; the {top} variants with the largest effect")
        ranked = rows.reindex(rows["effect"].abs().sort_values(ascending=False).index).head(top)
        labels = ["site", "layer", "head", "pos"] + (["feature"] if "feature" in table else [])
        print(ranked[labels + ["intervention", "value", "effect", "relative"]].to_string(index=False))
    stem.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(stem.with_suffix(".csv"), index=False)
    table.to_json(stem.with_suffix(".jsonl"), orient="records", lines=True)
    print(f"\ntable: {stem.with_suffix('.csv')} and {stem.with_suffix('.jsonl')}")
    if output.get("heatmap", True):
        where = output.get("heatmap") if isinstance(output.get("heatmap"), str) else stem.with_suffix(".png")
        # Latents have no layer x head grid: their picture is the largest effects as bars.
        picture = (
            effect_bars(table, where, top=max(top, 20)) if "feature" in table else sweep_heatmap(table, where)
        )
        print(f"{'bars' if 'feature' in table else 'heatmap'}: {picture}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The `splice` command: `splice sites [MODEL] [--filter TEXT]` and `splice sweep CONFIG.yaml
    [--executor ray [--address ADDR] [--workers N]]`.

    `sites` prints the model and every site with its shape; `sweep` runs a sweep config (see
    `splice.config`), prints the variants with the largest effect per metric and writes
    the table (CSV and JSONL) and a heatmap.

    Args:
        argv: The arguments after the program name; None reads `sys.argv`.

    Returns:
        The exit status: 0 on success, 2 after a `SpliceError` (printed on one line to stderr,
        without a traceback). `--help`, `--version` and argument errors exit through argparse.

    Example:
        >>> main(["sites", "/no/such/model"])  # prints "splice: cannot load the model ..." to stderr
        2
    """
    parser = argparse.ArgumentParser(
        prog="splice", description="Activation editing for Hugging Face transformers."
    )
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"splice {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    sites = commands.add_parser("sites", help="list every site of a model with its shape")
    sites.add_argument(
        "model", nargs="?", default=None, help="hub name or local folder (default: the embedded SmolLM2-135M)"
    )
    sites.add_argument(
        "--filter",
        default="",
        help="only names containing this text ('blocks.3.') or matching this glob ('blocks.*.attn.q')",
    )
    sites.set_defaults(run=_sites)
    sweep = commands.add_parser(
        "sweep", help="run a sweep described in a YAML file; writes a table and a heatmap"
    )
    sweep.add_argument("config", help="YAML sweep config (see splice.config)")
    sweep.add_argument(
        "--executor",
        choices=("local", "ray"),
        default=None,
        help="where the variants run (default: the config's run.executor, else here)",
    )
    sweep.add_argument("--address", default=None, help="Ray cluster address (default: start a local one)")
    sweep.add_argument("--workers", type=int, default=None, help="Ray workers (default: one per CPU)")
    sweep.set_defaults(run=_sweep)
    args = parser.parse_args(argv)
    from .errors import SpliceError

    try:
        return args.run(args)
    except SpliceError as error:
        print(f"splice: {' '.join(str(error).split())}", file=sys.stderr)  # one line, always
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
