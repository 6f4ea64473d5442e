"""Activations to disk: peak memory of `cache_activations` as the corpus grows 10x, and its
throughput against a plain recorded forward loop that keeps nothing.

Model: the embedded SmolLM2-135M (float32). Corpus: the paragraphs (40+ characters) of the
standard library's `pydoc_data.topics`, in order (cycled past its ~2000), at most 64 tokens each
(`max_tokens=64`). Sites: the residual stream after layers 2, 3, 4 and 5 (4 x 576 floats a row,
9 KiB); every forward stops after layer 5. batch_size 8, shards of 2048 rows (18 MiB). One
thread by default (the machine is shared; two busy threads on two shared cores thrash).

- **Memory**: one child process per corpus size (N and 10N documents) loads the model, reads the
  corpus and every weight (the weights are memory-mapped; the digest each call takes reads them
  all), runs one warm-up forward, then caches. Peak RSS is the child's `ru_maxrss`. Target:
  peak(10N) within 10% of peak(N). For scale, `rows_mb` is what the 10N rows would add if they
  were held in memory.
- **Throughput**: one child runs, round after round, a plain loop (the same token lists,
  left-padded in batches of 8 consecutive documents as `m.run(texts)` pads them,
  `m.run(..., record=sites, stop_after_record=True)` under `no_grad`, the recording dropped) and
  `cache_activations` of the same documents into a fresh directory, with `exact=True` (the
  default: forwards of equal-length documents) and `exact=False` (length-sorted, right-padded
  batches). A cache call is timed whole: the weights digest (also reported alone), tokenization,
  forwards, copies, writes, checksums. Tokens per second count real tokens; ratios are the
  medians of the rounds' ratios (cache throughput / plain loop throughput).

    .venv/bin/python benchmarks/activation_cache.py            # ~4 min on a shared 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).parent / "results"
SITES = [f"blocks.{layer}.resid_post" for layer in (2, 3, 4, 5)]
MAX_TOKENS, BATCH, SHARD_ROWS = 64, 8, 2048


def corpus(n: int) -> list[str]:
    """The first n paragraphs of pydoc_data.topics (cycled past its ~2000)."""
    from pydoc_data.topics import topics

    paragraphs = [
        p.strip() for key in sorted(topics) for p in topics[key].split("\n\n") if len(p.strip()) >= 40
    ]
    return [paragraphs[i % len(paragraphs)] for i in range(n)]


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load(threads: int):
    import torch
    from transformers.utils import logging as hf_logging

    import splice

    hf_logging.set_verbosity_error()
    torch.set_num_threads(threads)
    return splice.load()


def cache(model, texts: list[str], out: str, exact: bool = True) -> dict:
    """`cache_activations` with this benchmark's sites and settings."""
    from splice.activations import cache_activations

    return cache_activations(
        model,
        texts,
        SITES,
        out,
        batch_size=BATCH,
        max_tokens=MAX_TOKENS,
        shard_rows=SHARD_ROWS,
        exact=exact,
        progress=False,
    )


def child_memory(docs: int, threads: int) -> dict:
    """Cache `docs` documents; report the peak RSS before and after."""
    import torch

    from splice.loading import identity

    model = load(threads)
    texts = corpus(docs)
    identity(model.hf)  # reads every weight, as each cache call does: the whole model is resident
    with torch.no_grad():
        model.run(texts[:BATCH], record=SITES, stop_after_record=True)  # warm-up
    before = peak_mb()
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        stores = cache(model, texts, out)
        seconds = time.perf_counter() - start
        store = stores[SITES[0]]
        return {
            "docs": docs,
            "rows": len(store),
            "shards": len(store.info["shards"]),
            "truncated_documents": store.info["truncated_documents"],
            "peak_before_cache_mb": before,
            "peak_mb": peak_mb(),
            "rows_mb": len(store) * len(SITES) * 576 * 4 / 2**20,
            "disk_mb": sum(p.stat().st_size for p in Path(out).iterdir()) / 2**20,
            "seconds": seconds,
        }


def child_speed(docs: int, rounds: int, threads: int) -> dict:
    """Alternate a plain recorded loop and cache_activations over the same documents."""
    import torch

    import splice
    from splice.loading import identity

    model = load(threads)
    texts = corpus(docs)
    ids = [splice.tokens.token_ids(model.tokenizer, t)[:MAX_TOKENS] for t in texts]
    tokens = sum(map(len, ids))
    pad = splice.tokens.pad_token_id(model.tokenizer)

    def plain() -> None:
        with torch.no_grad():
            for i in range(0, len(ids), BATCH):
                batch = splice.tokens.left_pad(ids[i : i + BATCH], pad)
                model.run(batch, record=SITES, stop_after_record=True, use_cache=False)

    def cached(exact: bool) -> None:
        with tempfile.TemporaryDirectory() as out:
            cache(model, texts, out, exact=exact)

    variants = {"plain": plain, "cache exact": lambda: cached(True), "cache padded": lambda: cached(False)}
    plain()  # warm-up
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            start = time.perf_counter()
            fn()
            runs[name].append(time.perf_counter() - start)
    start = time.perf_counter()
    identity(model.hf)
    return {
        "docs": docs,
        "tokens": tokens,
        "rounds": rounds,
        "seconds": runs,
        "tokens_per_s": {name: tokens / statistics.median(times) for name, times in runs.items()},
        "ratio": {
            name: statistics.median(p / c for p, c in zip(runs["plain"], times))
            for name, times in runs.items()
            if name != "plain"
        },
        "weights_digest_seconds": time.perf_counter() - start,
    }


def run_child(*args: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=False
    )
    if result.returncode:
        raise SystemExit(f"child {args} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--docs", type=int, default=100, help="N: the small corpus (the large one is 10N)")
    parser.add_argument("--speed-docs", type=int, default=150, help="documents per throughput run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        values = [int(v) for v in rest]
        print(json.dumps(child_memory(*values) if kind == "memory" else child_speed(*values)))
        return

    t0 = time.perf_counter()
    small = run_child("memory", str(args.docs), str(args.threads))
    large = run_child("memory", str(10 * args.docs), str(args.threads))
    speed = run_child("speed", str(args.speed_docs), str(args.rounds), str(args.threads))
    growth = large["peak_mb"] / small["peak_mb"] - 1
    verdict = "PASS" if growth <= 0.10 else "MISS"
    print(
        f"{'corpus':>6} {'docs':>5} {'rows':>6} {'shards':>6} {'peak RSS MB':>11} {'before MB':>9} {'rows MB':>8} {'s':>6}"
    )
    for label, r in (("N", small), ("10N", large)):
        print(
            f"{label:>6} {r['docs']:>5} {r['rows']:>6} {r['shards']:>6} {r['peak_mb']:>11.1f} "
            f"{r['peak_before_cache_mb']:>9.1f} {r['rows_mb']:>8.1f} {r['seconds']:>6.1f}"
        )
    print(f"peak RSS N -> 10N: {growth:+.1%} (target within 10%: {verdict})")
    print(
        f"throughput, {speed['docs']} documents ({speed['tokens']} tokens), median of {speed['rounds']} rounds:"
    )
    for name, value in speed["tokens_per_s"].items():
        ratio = speed["ratio"].get(name)
        print(f"  {name:<13} {value:7.0f} tok/s" + (f"  {ratio:.2f}x the plain loop" if ratio else ""))
    print(f"  (weights digest, once per cache_activations call: {speed['weights_digest_seconds']:.2f} s)")
    OUT.mkdir(exist_ok=True)
    record = {
        "sites": SITES,
        "max_tokens": MAX_TOKENS,
        "batch_size": BATCH,
        "shard_rows": SHARD_ROWS,
        "threads": args.threads,
        "memory": {
            "N": small,
            "10N": large,
            "peak_growth": growth,
            "target": "within 10%",
            "result": verdict,
        },
        "throughput": speed,
        "wall_seconds": time.perf_counter() - t0,
    }
    (OUT / "activation_cache.json").write_text(json.dumps(record, indent=1) + "\n")
    rows: list[tuple] = [
        ("memory", "N", small["docs"], small["rows"], "peak_rss_mb", small["peak_mb"]),
        ("memory", "10N", large["docs"], large["rows"], "peak_rss_mb", large["peak_mb"]),
        ("memory", "10N vs N", "", "", "peak_rss_growth", growth),
    ]
    for name, value in speed["tokens_per_s"].items():
        rows.append(("throughput", name, speed["docs"], speed["tokens"], "tokens_per_s", value))
    for name, value in speed["ratio"].items():
        rows.append(("throughput", f"{name} / plain", "", "", "ratio", value))
    lines = ["section,variant,docs,rows_or_tokens,measure,value"]
    lines += [",".join(str(round(v, 4) if isinstance(v, float) else v) for v in row) for row in rows]
    (OUT / "activation_cache.csv").write_text("\n".join(lines) + "\n")
    print(f"wrote {OUT / 'activation_cache.csv'} and .json ({record['wall_seconds']:.0f} s)")


if __name__ == "__main__":
    main()
