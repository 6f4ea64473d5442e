"""How much does splice add to a forward pass?

Two measurements, both on randomly initialised GPT-2 models (no download needed):

1. GPT-2-small shape (12 layers, d_model 768, 12 heads, vocab 50257), batch 8 x 64, 2 threads:
   relative overhead of splice contexts against the bare Hugging Face forward, with a
   hand-written torch pre-hook doing the same head zeroing as a reference.
2. A tiny model with the same module tree (d_model 64, 4 heads, 12 layers), batch 1 x 8,
   1 thread: the fixed cost splice adds to each call, in milliseconds.

Variants are timed round-robin (bare, a, b, ..., bare, a, b, ...) so slow drift on a shared
machine hits every variant alike. Each sample is compared with the mean of the bare samples that
bracket its round (this round's and the next one's); ratios and extra milliseconds are medians of
those paired comparisons; `ratio_iqr` is their interquartile range (a verdict closer to the
target than that is within noise) and `cpu_ratio` the same median ratio computed from process CPU
time, as a cross-check that ignores time the process spent descheduled. Contexts are entered
before the timed region unless the row says "per call". Targets are reported as PASS/MISS;
nothing here fails on a timing. The full run takes a few minutes on 2 CPU cores.

Run: `make bench` or `.venv/bin/python benchmarks/overhead.py` (`--quick` for a smoke run).
Writes benchmarks/results/overhead.csv.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager as ContextManager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
import transformers
from transformers import GPT2Config, GPT2LMHeadModel

import splice

transformers.logging.set_verbosity_error()  # the tiny config's default bos/eos ids exceed its vocab; harmless here

RESULTS = Path(__file__).resolve().parent / "results" / "overhead.csv"
EDIT_LAYER = 3


@dataclass
class Variant:
    name: str
    context: Callable[[], ContextManager]  # entered around the timed loop, or around each call
    per_call: bool = False  # True: enter/exit the context inside the timed loop, once per call
    target: tuple[str, float] | None = None  # ("ratio" | "extra_ms", limit)


def raw_zero_hook(hf: GPT2LMHeadModel, layer: int, head: int):
    """A plain torch pre-hook on c_proj zeroing one head of the attention output (the reference)."""
    n_heads = hf.config.n_head
    d_head = hf.config.n_embd // n_heads

    def hook(module, args):
        x = args[0].clone()
        x.view(*x.shape[:-1], n_heads, d_head)[..., head, :] = 0
        return (x,) + tuple(args[1:])

    @contextlib.contextmanager
    def installed():
        handle = hf.transformer.h[layer].attn.c_proj.register_forward_pre_hook(hook)
        try:
            yield
        finally:
            handle.remove()

    return installed


def variants_for(hf: GPT2LMHeadModel, m: splice.Model, head: int, targets: dict) -> list[Variant]:
    site = f"blocks.{EDIT_LAYER}.attn.z"
    edits = {site: splice.Zero(heads=head)}
    return [
        Variant("bare HF forward", contextlib.nullcontext),
        Variant("raw torch pre-hook (reference)", raw_zero_hook(hf, EDIT_LAYER, head)),
        Variant("splice edit({}) empty registry", lambda: m.edit({}), target=targets.get("empty")),
        Variant(f"splice Zero(heads={head}) at {site}", lambda: m.edit(edits), target=targets.get("edit")),
        Variant(f"splice Zero(heads={head}), edit() per call", lambda: m.edit(edits), per_call=True),
        Variant("splice record blocks.*.resid_post", lambda: m.record("blocks.*.resid_post")),
    ]


def time_sample(variant: Variant, call: Callable[[], object], calls: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) per call, averaged over `calls` calls."""
    gc.collect()
    gc.disable()
    try:
        if variant.per_call:
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(calls):
                with variant.context():
                    call()
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        else:
            with variant.context():
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    call()
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    finally:
        gc.enable()
    return wall / calls, cpu / calls


def check_same_output(m: splice.Model, hf, call, variants: list[Variant]) -> bool:
    """The splice edit and the raw hook must produce identical logits (else the timing compares
    different work); also confirm no hook is left behind."""
    raw, edit = variants[1], variants[3]
    with raw.context():
        a = call()
    with edit.context():
        b = call()
    return bool(torch.equal(a, b)) and m.hook_count == 0


def measure(
    label: str,
    hf,
    m: splice.Model,
    ids: torch.Tensor,
    head: int,
    rounds: int,
    calls: int,
    warmup: int,
    targets: dict,
) -> list[dict]:
    variants = variants_for(hf, m, head, targets)

    def call():
        return hf(ids).logits

    with torch.inference_mode():
        for variant in variants:  # warm-up, also of each context's first entry
            time_sample(variant, call, warmup)
        same = check_same_output(m, hf, call, variants)
        times = {v.name: [] for v in variants}
        bare = variants[0]
        for r in range(rounds):
            for variant in variants:
                if variant is bare and m.hook_count:
                    raise RuntimeError("splice left hooks on the model between variants")
                times[variant.name].append(time_sample(variant, call, calls))
            print(f"  {label}: round {r + 1}/{rounds}", file=sys.stderr, end="\r", flush=True)
        closing_bare = time_sample(bare, call, calls)
        print(file=sys.stderr)

    def paired(kind: int, samples: list[tuple[float, float]]):
        """Per-round ratios and differences (ms) against the mean of the bracketing bare samples."""
        bare_t = [t[kind] for t in times[bare.name]] + [closing_bare[kind]]
        brackets = [(a + b) / 2 for a, b in zip(bare_t, bare_t[1:])]
        mine = [t[kind] for t in samples]
        return [t / b for t, b in zip(mine, brackets)], [(t - b) * 1e3 for t, b in zip(mine, brackets)]

    rows = []
    for variant in variants:
        samples = times[variant.name]
        ratios, extras = paired(0, samples)
        cpu_ratios, _ = paired(1, samples)
        q = statistics.quantiles(ratios, n=4)
        ratio, extra = statistics.median(ratios), statistics.median(extras)
        target = result = ""
        if variant.target:
            kind, limit = variant.target
            if kind == "ratio":
                target, ok = f"<= {(limit - 1) * 100:.0f}% over bare", ratio <= limit
            else:
                target, ok = f"<= {limit} ms over bare", extra <= limit
            result = "PASS" if ok else "MISS"
        rows.append(
            {
                "model": label,
                "variant": variant.name,
                "median_ms": round(statistics.median(t[0] for t in samples) * 1e3, 3),
                "ratio_to_bare": round(ratio, 4),
                "ratio_iqr": round(q[2] - q[0], 4),
                "extra_ms": round(extra, 3),
                "cpu_ratio": round(statistics.median(cpu_ratios), 4),
                "runs": len(samples),
                "target": target,
                "result": result,
            }
        )
    print(
        f"  {label}: splice Zero and raw hook give identical logits, no hooks left: {same}", file=sys.stderr
    )
    return rows


def build(config: GPT2Config, batch: int, seq: int):
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (batch, seq))
    return hf, splice.Model(hf), ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rounds-big", type=int, default=21, help="timed rounds on the GPT-2-small shape (default 21)"
    )
    parser.add_argument(
        "--rounds-tiny", type=int, default=100, help="timed rounds on the tiny model (default 100)"
    )
    parser.add_argument(
        "--calls-tiny", type=int, default=50, help="calls per timing sample on the tiny model (default 50)"
    )
    parser.add_argument("--quick", action="store_true", help="few rounds, for checking that the script runs")
    args = parser.parse_args()
    if args.quick:
        args.rounds_big, args.rounds_tiny, args.calls_tiny = 3, 3, 20

    print(
        f"splice {splice.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"python {platform.python_version()}, {os.cpu_count()} CPUs, CUDA available: {torch.cuda.is_available()}",
        file=sys.stderr,
    )
    load_before = os.getloadavg()[0]
    rows = []

    torch.set_num_threads(2)
    hf, m, ids = build(GPT2Config(), 8, 64)
    rows += measure(
        "gpt2-small 8x64, 2 threads",
        hf,
        m,
        ids,
        head=5,
        rounds=args.rounds_big,
        calls=1,
        warmup=2,
        targets={"edit": ("ratio", 1.03), "empty": ("ratio", 1.01)},
    )
    del hf, m, ids
    gc.collect()

    # Same module tree, 4 heads: head 5 does not exist here, so the edit zeroes the last head (3).
    torch.set_num_threads(1)
    hf, m, ids = build(GPT2Config(n_embd=64, n_head=4, n_layer=12, vocab_size=512), 1, 8)
    rows += measure(
        "tiny 1x8, 1 thread",
        hf,
        m,
        ids,
        head=3,
        rounds=args.rounds_tiny,
        calls=args.calls_tiny,
        warmup=200,
        targets={"edit": ("extra_ms", 0.3)},
    )

    table = pd.DataFrame(rows)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(RESULTS, index=False)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table.to_string(index=False))
    print(
        f"\n1-minute load average: {load_before:.2f} at start, {os.getloadavg()[0]:.2f} at end "
        f"({os.cpu_count()} CPUs); written to {RESULTS}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
