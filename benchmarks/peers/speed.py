"""Speed: splice next to TransformerLens (HookedTransformer 3.9, TransformerBridge 4.3), nnsight and
pyvene, on the same random GPT-2-small weights, each peer measured in one process with splice.

    .venv/bin/python benchmarks/peers/speed.py            # after setup.sh; ~30-40 min on 2 cores
    .venv/bin/python benchmarks/peers/speed.py --quick    # smoke run: 2 rounds, one layer's heads

Run from the main venv, it starts one worker per peer venv (`benchmarks/peers/.venvs/<peer>`,
which holds the peer, splice and the same torch/transformers). Each worker times, in one process:

1. GPT-2 small, 8 x 64 random tokens, 2 threads, inference mode: the bare HF forward and, in
   splice and in the peer, each of the five parity edits and the recording of all 12 `resid_post`.
   One sample is one call, set-up and tear-down of the edit included (splice: `m.run(ids,
   edits=...)`; TransformerLens: `run_with_hooks` / `run_with_cache`; nnsight: one `trace`;
   pyvene: one call of an `IntervenableModel` built beforehand). The patch rows also run the
   source prompts (two forwards in splice, TransformerLens and pyvene; one forward of 16 rows in
   nnsight, whose two invokes are batched). Variants run round-robin, so machine drift hits all
   alike; after warm-up, each variant's ratio to bare is the median over rounds of its time over
   the mean of the bare samples that bracket its round, and its ratio to splice the median over
   rounds of its time over splice's for the same edit in the same round.
2. The 144-head zero-ablation sweep, 16 prompts x 32 tokens, metric: mean last-position logit
   difference of two tokens. splice: one `Sweep(...).run(model, data, batch_size=16)`; each peer
   its own idiom (TransformerLens: a `run_with_hooks` loop; nnsight: 4 invokes of 16 prompts per
   trace; pyvene: one `IntervenableModel` per layer, one call per head). Also checks that every
   peer's 144 values equal splice's.
3. Fixed cost per call: `GPT2Config(n_embd=64, n_head=4, n_layer=12, vocab_size=512)`, 1 x 8
   tokens, 1 thread, zeroing head 3 of layer 3 (the tiny model has 4 heads), mean of many calls.

Writes benchmarks/peers/results/speed.csv and prints markdown tables. Never fails on a timing.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

PEERS = ("tl3", "tl4", "nnsight", "pyvene")
PEER_NAMES = {
    "tl3": "TL 3.9 HookedTransformer",
    "tl4": "TL 4.3 TransformerBridge",
    "nnsight": "nnsight 0.8.1",
    "pyvene": "pyvene 0.1.8",
}


# ---------------------------------------------------------------------------------------------
# worker side (inside one venv)


def timed(fn, calls: int = 1) -> float:
    """Wall seconds per call, averaged over `calls` calls, GC paused."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - start) / calls
    finally:
        gc.enable()


def round_robin(variants: dict, rounds: int, warmup: int, calls: int, label: str) -> tuple[dict, list]:
    """{name: [seconds per round]} and the closing bare samples; 'bare' must be the first variant."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in variants}
    for r in range(rounds):
        for name, fn in variants.items():
            times[name].append(timed(fn, calls))
        print(f"  {label}: round {r + 1}/{rounds}", file=sys.stderr, end="\r", flush=True)
    closing = timed(variants["bare"], calls)
    print(file=sys.stderr)
    return times, closing


def summarise(times: dict, closing: float, pairs: dict) -> dict:
    """Per variant: median ms, paired ratio to bare (bracketing bare mean), its IQR, extra ms, and
    the paired ratio to the splice variant named in `pairs` (same round)."""
    bare = times["bare"] + [closing]
    brackets = [(a + b) / 2 for a, b in zip(bare, bare[1:])]
    out = {}
    for name, samples in times.items():
        ratios = [t / b for t, b in zip(samples, brackets)]
        q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
        row = {
            "median_ms": statistics.median(samples) * 1e3,
            "ratio_to_bare": statistics.median(ratios),
            "ratio_iqr": q[2] - q[0],
            "extra_ms": statistics.median((t - b) * 1e3 for t, b in zip(samples, brackets)),
            "runs": len(samples),
            "ratio_to_splice": None,
        }
        if name in pairs:
            row["ratio_to_splice"] = statistics.median(t / s for t, s in zip(samples, times[pairs[name]]))
        out[name] = row
    return out


def worker(peer: str, args) -> dict:
    import common as C
    import libs
    import torch
    import transformers

    C.quiet_transformers()
    rows = []
    meta = {"peer": peer, "torch": torch.__version__, "transformers": transformers.__version__}

    # 1. the five edits and the recording, 8 x 64, 2 threads
    torch.set_num_threads(2)
    splice_lib, peer_lib = libs.Splice(), libs.PEERS[peer]()
    meta.update(splice=splice_lib.version, version=peer_lib.version, digest=C.weights_digest(splice_lib.hf))
    inp = C.make_inputs(args.batch, args.seq, splice_lib.config.vocab_size, splice_lib.config.n_embd)
    variants, pairs, unexpressed = {"bare": lambda: splice_lib.hf(inp.ids)}, {}, {}  # noqa: F821 - del below frees the models; the lambdas run before it
    for edit in args.edits:
        variants[f"splice:{edit}"] = lambda f=splice_lib.call(edit): f(inp)
        try:
            fn = peer_lib.call(edit)
        except NotImplementedError as e:
            unexpressed[edit] = str(e)
            continue
        variants[f"{peer}:{edit}"] = lambda f=fn: f(inp)
        pairs[f"{peer}:{edit}"] = f"splice:{edit}"
    with torch.inference_mode():
        times, closing = round_robin(variants, args.rounds, args.warmup, 1, f"{peer} {args.batch}x{args.seq}")
    for name, stats in summarise(times, closing, pairs).items():
        lib, _, edit = name.partition(":")
        rows.append(
            {
                "section": f"gpt2-small {args.batch}x{args.seq}, 2 threads",
                "process": peer,
                "library": lib,
                "variant": edit or "bare HF forward",
                **stats,
            }
        )
    for edit, reason in unexpressed.items():
        rows.append(
            {
                "section": f"gpt2-small {args.batch}x{args.seq}, 2 threads",
                "process": peer,
                "library": peer,
                "variant": edit,
                "note": f"cannot express: {reason}",
            }
        )

    # 2. the head-ablation sweep
    if args.sweep_layers:
        ids = C.sweep_ids(args.sweep_prompts, args.sweep_seq, splice_lib.config.vocab_size)
        heads = [(l, h) for l in args.sweep_layers for h in range(splice_lib.n_head)]
        with torch.inference_mode():
            bare_s = statistics.median(timed(lambda: splice_lib.hf(ids)) for _ in range(3))  # noqa: F821
            for lib in (splice_lib, peer_lib):  # warm-up on 2 prompts, one layer
                lib.sweep(ids[:2], [h for h in heads if h[0] == heads[0][0]], C.SWEEP_A, C.SWEEP_B)
            runs = {"splice": [], peer: []}
            for r in range(args.sweep_repeats):
                for lib in (splice_lib, peer_lib):
                    start = time.perf_counter()
                    values = lib.sweep(ids, heads, C.SWEEP_A, C.SWEEP_B)
                    runs[lib.key].append((time.perf_counter() - start, values))
                    print(
                        f"  {peer} sweep: {lib.key} {r + 1}/{args.sweep_repeats} "
                        f"{runs[lib.key][-1][0]:.1f} s",
                        file=sys.stderr,
                        flush=True,
                    )
        splice_s = statistics.median(t for t, _ in runs["splice"])
        diff = max(abs(a - b) for a, b in zip(runs["splice"][0][1], runs[peer][0][1]))
        for key in ("splice", peer):
            seconds = statistics.median(t for t, _ in runs[key])
            rows.append(
                {
                    "section": f"sweep {len(heads)} heads, {args.sweep_prompts}x{args.sweep_seq}, 2 threads",
                    "process": peer,
                    "library": key,
                    "variant": "head-ablation sweep",
                    "median_ms": seconds * 1e3,
                    "ratio_to_bare": seconds / bare_s,
                    "ratio_to_splice": seconds / splice_s,
                    "runs": len(runs[key]),
                    "note": f"bare forward {bare_s * 1e3:.0f} ms; max |values - splice| {diff:.1e}"
                    if key != "splice"
                    else f"bare forward {bare_s * 1e3:.0f} ms",
                }
            )
    del splice_lib, peer_lib
    gc.collect()

    meta["rows"] = rows
    if args.no_tiny:
        return meta

    # 3. fixed cost per call on the tiny model, 1 x 8, 1 thread
    torch.set_num_threads(1)
    s_tiny, p_tiny, hand = libs.Splice(tiny=True), libs.PEERS[peer](tiny=True), libs.HandHooks(tiny=True)
    tiny_inp = C.make_inputs(1, 8, s_tiny.config.vocab_size, s_tiny.config.n_embd)
    edits = {f"blocks.{C.ZERO_LAYER}.attn.z": s_tiny.splice.Zero(heads=s_tiny.head)}
    variants = {
        "bare": lambda: s_tiny.hf(tiny_inp.ids),
        "hand:zero_head": lambda: hand.zero_head(tiny_inp),
        "splice:zero_head": lambda: s_tiny.zero_head(tiny_inp),
        "splice-held:zero_head": lambda: s_tiny.hf(tiny_inp.ids),
    }  # inside an open edit context
    if "zero_head" not in p_tiny.cannot:
        variants[f"{peer}:zero_head"] = lambda: p_tiny.zero_head(tiny_inp)

    def sample(name, fn, calls):
        if name.startswith("splice-held"):
            with s_tiny.m.edit(edits):  # entered once around the sample's calls, as in overhead.py
                return timed(fn, calls)
        return timed(fn, calls)

    with torch.inference_mode():
        for name, fn in variants.items():
            sample(name, fn, args.tiny_warmup)
        times = {name: [] for name in variants}
        for r in range(args.tiny_rounds):
            for name, fn in variants.items():
                times[name].append(sample(name, fn, args.tiny_calls))
            print(f"  {peer} tiny: round {r + 1}/{args.tiny_rounds}", file=sys.stderr, end="\r", flush=True)
        closing = timed(variants["bare"], args.tiny_calls)
        print(file=sys.stderr)
    for name, stats in summarise(times, closing, {f"{peer}:zero_head": "splice:zero_head"}).items():
        lib, _, edit = name.partition(":")
        rows.append(
            {
                "section": "tiny 1x8, 1 thread",
                "process": peer,
                "library": lib,
                "variant": edit or "bare HF forward",
                **stats,
            }
        )
    meta["rows"] = rows
    return meta


# ---------------------------------------------------------------------------------------------
# driver side (main venv)


def run_worker(peer: str, argv: list[str]) -> dict:
    python = HERE / ".venvs" / peer / "bin" / "python"
    if not python.exists():
        return {"peer": peer, "failed": f"{python} missing: run `bash benchmarks/peers/setup.sh` first"}
    print(f"{peer}: starting worker", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [str(python), str(Path(__file__).resolve()), "--worker", peer, *argv],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(HERE),
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        return {"peer": peer, "failed": f"worker exited {proc.returncode}"}
    return json.loads(lines[-1])


def fmt(x, digits=2):
    return "" if x is None or x != x else f"{x:.{digits}f}"


def markdown(table, reports) -> str:
    import common as C

    out = []
    peers = [r["peer"] for r in reports if "failed" not in r]
    big = table[table.section.str.startswith("gpt2-small")]
    if len(big):
        section = big.section.iloc[0]
        bare = big[big.library == "bare"]
        out.append(
            f"**{section}**: bare HF forward median {bare.median_ms.median():.0f} ms "
            f"(per process: {', '.join(f'{p} {m:.0f}' for p, m in zip(bare.process, bare.median_ms))}). "
            "Cells: ratio to bare HF (ratio to splice, same process). splice's column is the median "
            "of its ratio to bare over the peer processes.\n"
        )
        head = ["edit", "splice"] + [PEER_NAMES.get(p, p) for p in peers]
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for edit in C.EDITS:
            s = big[(big.library == "splice") & (big.variant == edit)]
            if not len(s):  # not timed in this run (--edits)
                continue
            cells = [C.EDIT_LABELS[edit], fmt(s.ratio_to_bare.median())]
            for p in peers:
                r = big[(big.process == p) & (big.library == p) & (big.variant == edit)]
                if not len(r):
                    cells.append("")
                elif isinstance(r.note.iloc[0], str) and r.note.iloc[0].startswith("cannot"):
                    cells.append(r.note.iloc[0])
                else:
                    cells.append(f"{fmt(r.ratio_to_bare.iloc[0])} ({fmt(r.ratio_to_splice.iloc[0])})")
            out.append("| " + " | ".join(cells) + " |")
    sweep = table[table.section.str.startswith("sweep")]
    if len(sweep):
        out.append(
            f"\n**{sweep.section.iloc[0]}** (seconds; ratio to one bare forward of the same batch; "
            "ratio to splice's sweep in the same process)\n"
        )
        out += [
            "| process | library | seconds | x bare forward | x splice | note |",
            "|---|---|---|---|---|---|",
        ]
        for r in sweep.itertuples():
            name = "splice" if r.library == "splice" else PEER_NAMES.get(r.library, r.library)
            out.append(
                f"| {r.process} | {name} | {r.median_ms / 1e3:.1f} | {fmt(r.ratio_to_bare, 1)} | "
                f"{fmt(r.ratio_to_splice)} | {r.note} |"
            )
    tiny = table[table.section.str.startswith("tiny")]
    if len(tiny):
        out.append(
            f"\n**{tiny.section.iloc[0]}**, Zero head 3 of layer 3: extra ms per call over bare "
            "(paired median) and ratio to bare\n"
        )
        names = {
            "bare": "bare HF forward",
            "hand": "hand-written torch pre-hook",
            "splice": "splice m.run(ids, edits=...) (context per call)",
            "splice-held": "splice inside one open edit() context",
        }
        out += [
            "| process | variant | median ms | extra ms | x bare | x splice |",
            "|---|---|---|---|---|---|",
        ]
        for r in tiny.itertuples():
            name = names.get(r.library, PEER_NAMES.get(r.library, r.library))
            out.append(
                f"| {r.process} | {name} | {r.median_ms:.2f} | {fmt(r.extra_ms, 3)} | "
                f"{fmt(r.ratio_to_bare)} | {fmt(r.ratio_to_splice)} |"
            )
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--peers", nargs="*", default=list(PEERS))
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds at 8x64 (default 11)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument(
        "--sweep-layers",
        type=int,
        nargs="*",
        default=list(range(12)),
        help="layers whose heads the sweep ablates (default all 12; none to skip)",
    )
    parser.add_argument("--sweep-prompts", type=int, default=16)
    parser.add_argument("--sweep-seq", type=int, default=32)
    parser.add_argument("--sweep-repeats", type=int, default=1)
    parser.add_argument("--edits", nargs="*", default=None, help="edits timed at 8x64 (default: all five)")
    parser.add_argument("--no-tiny", action="store_true", help="skip the tiny-model per-call section")
    parser.add_argument("--tiny-rounds", type=int, default=30)
    parser.add_argument("--tiny-calls", type=int, default=50)
    parser.add_argument("--tiny-warmup", type=int, default=100)
    parser.add_argument(
        "--out", help="results CSV name under results/ (default speed.csv, speed-quick.csv with --quick)"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 rounds, 1 warm-up, sweep of layer 11's 12 heads on 4 x 16, small tiny run",
    )
    args = parser.parse_args()
    import common as C

    args.edits = list(C.EDITS) if args.edits is None else args.edits
    unknown = set(args.edits) - set(C.EDITS)
    if unknown:
        parser.error(f"unknown edits {sorted(unknown)}; choose from {list(C.EDITS)}")
    if args.quick:
        args.rounds, args.warmup, args.sweep_layers, args.sweep_prompts, args.sweep_seq = 2, 1, [11], 4, 16
        args.tiny_rounds, args.tiny_calls, args.tiny_warmup = 3, 10, 10
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return 0

    import pandas as pd
    import torch

    argv = [a for a in sys.argv[1:] if a != "--peers" and a not in args.peers]
    if args.out:
        argv = [a for a in argv if a not in ("--out", args.out)]
    print(
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
        f"1-minute load average at start {os.getloadavg()[0]:.2f}",
        file=sys.stderr,
    )
    reports = [run_worker(p, argv) for p in args.peers]
    rows = [row for r in reports if "failed" not in r for row in r["rows"]]
    table = pd.DataFrame(rows)
    if "note" not in table:
        table["note"] = None
    out = HERE / "results" / (args.out or ("speed-quick.csv" if args.quick else "speed.csv"))
    out.parent.mkdir(exist_ok=True)
    table.to_csv(out, index=False)
    if len(table):
        print(markdown(table, reports))
    print()
    for r in reports:
        if "failed" in r:
            print(f"{r['peer']}: FAILED ({r['failed']})")
        else:
            print(
                f"{r['peer']}: {r['version']}, splice {r['splice']}, torch {r['torch']}, "
                f"transformers {r['transformers']}, weights {r['digest']}"
            )
    print(
        f"1-minute load average at end {os.getloadavg()[0]:.2f} ({os.cpu_count()} CPUs); written to {out}"
        + (" (--quick: smoke run, not a measurement)" if args.quick else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
