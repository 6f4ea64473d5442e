"""Head-ablation sweep benchmark: splice batched vs splice sequential vs a plain loop of hooked
HF forwards, and the FLOP bound, in one process.

Model: GPT-2-small shape (12 layers x 12 heads, d_model 768, vocab 50257), random weights.
Task: zero each head's z (all 144), 16 prompts x 32 tokens, metric = last-position logit
difference between two tokens. Threads: 2. The ideal cost is the summed FLOPs of what a sweep
must compute (one clean forward with last-position unembedding, then for each head the layers
from its own on, for 16 rows, and its last-position unembedding) at the FLOP rate this machine
reaches on a bare forward of the same batch.

    .venv/bin/python benchmarks/sweep.py            # ~12 min on a 2-core CPU
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

import splice
from splice import metrics

hf_logging.set_verbosity_error()
OUT = Path(__file__).parent / "results"
A, B = 11, 22  # the two answer tokens of the logit difference


def forward_flops(config, rows: int, seq: int, layers: int, unembed_positions: int) -> float:
    """Multiply-adds x 2 of `layers` GPT-2 blocks on rows x seq tokens, plus unembedding."""
    d, inner = config.n_embd, config.n_inner or 4 * config.n_embd
    per_token = 2 * (4 * d * d + 2 * d * inner) + 2 * 2 * seq * d  # projections + MLP + attention scores/mix
    return rows * (seq * layers * per_token + unembed_positions * 2 * d * config.vocab_size)


def plain_loop(hf, ids):
    """What people write today: one hooked forward per head."""
    heads, d_head = hf.config.n_head, hf.config.n_embd // hf.config.n_head
    values = []
    for layer in range(hf.config.n_layer):
        for head in range(heads):

            def zero_head(module, args, head=head):
                z = args[0].clone()
                z[..., head * d_head : (head + 1) * d_head] = 0
                return (z,)

            handle = hf.transformer.h[layer].attn.c_proj.register_forward_pre_hook(zero_head)
            try:
                logits = hf(ids).logits
            finally:
                handle.remove()
            values.append(float((logits[:, -1, A] - logits[:, -1, B]).mean()))
    return values


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = GPT2Config()
    hf = GPT2LMHeadModel(config).eval()
    model = splice.Model(hf)
    ids = torch.randint(0, config.vocab_size, (args.prompts, args.seq))
    data = [{"input_ids": row, "a": A, "b": B} for row in ids.tolist()]
    sweep = splice.Sweep(
        sites="blocks.*.attn.z",
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff("a", "b")],
        name="splice batched",
    )

    bare = []

    def sample_bare(k=3):
        """Bare forwards before and after every phase: the FLOP rate is their median, so a slow
        or fast spell of the shared machine during one phase does not set the bound alone."""
        for _ in range(k):
            start = time.perf_counter()
            hf(ids)
            bare.append(time.perf_counter() - start)

    with torch.inference_mode():
        for _ in range(2):
            hf(ids)  # warm-up
        sample_bare()
        start = time.perf_counter()
        batched = sweep.run(model, data, batch_size=args.prompts, progress=True)
        batched_s = time.perf_counter() - start

        sample_bare()
        start = time.perf_counter()
        sequential = sweep.run(model, data, batch_size=args.prompts, prefix_reuse=False, progress=True)
        sequential_s = time.perf_counter() - start

        sample_bare()
        start = time.perf_counter()
        plain = plain_loop(hf, ids)
        plain_s = time.perf_counter() - start
        sample_bare()
    bare_s = sorted(bare)[len(bare) // 2]

    layers, heads = config.n_layer, config.n_head
    rate = forward_flops(config, args.prompts, args.seq, layers, args.seq) / bare_s
    ideal = forward_flops(config, args.prompts, args.seq, layers, 1)  # the clean run
    ideal += sum(heads * forward_flops(config, args.prompts, args.seq, layers - l, 1) for l in range(layers))
    ideal_s = ideal / rate

    effects = batched[batched.variant >= 0].value.to_numpy()
    diff_plain = max(abs(a - b) for a, b in zip(effects, plain))
    diff_seq = float((batched.value - sequential.value).abs().max())
    table = pd.DataFrame(
        [
            {"run": "plain loop of hooked HF forwards", "seconds": plain_s, "speed-up vs plain": 1.0},
            {
                "run": "splice sequential (one variant per forward)",
                "seconds": sequential_s,
                "speed-up vs plain": plain_s / sequential_s,
            },
            {
                "run": "splice batched (rows + prefix reuse + last-position unembedding)",
                "seconds": batched_s,
                "speed-up vs plain": plain_s / batched_s,
            },
            {"run": "FLOP bound (ideal)", "seconds": ideal_s, "speed-up vs plain": plain_s / ideal_s},
        ]
    )
    table["seconds"] = table["seconds"].round(1)
    table["speed-up vs plain"] = table["speed-up vs plain"].round(2)
    fraction = (plain_s / batched_s) / (plain_s / ideal_s)
    print(table.to_string(index=False))
    print(
        f"bare forward {args.prompts}x{args.seq}: median {bare_s * 1000:.0f} ms of {len(bare)} "
        f"(range {min(bare) * 1000:.0f}-{max(bare) * 1000:.0f} ms); batched reaches {fraction:.0%} of the FLOP bound"
    )
    print(f"max |batched - plain loop| = {diff_plain:.2e}; max |batched - sequential| = {diff_seq:.2e}")
    OUT.mkdir(exist_ok=True)
    table.assign(
        fraction_of_bound=round(fraction, 3), max_diff_vs_plain=diff_plain, bare_ms=round(bare_s * 1000, 1)
    ).to_csv(OUT / "sweep.csv", index=False)


if __name__ == "__main__":
    main()
