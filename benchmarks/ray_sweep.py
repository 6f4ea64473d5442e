"""The Ray executor on this machine: the same sweep locally, on 1 Ray worker and on 2, in one
process, with the startup (workers loading the model) timed apart from the sweep itself.

Model: the embedded SmolLM2-135M (float32). Task: zero every head of the last 6 layers
(6 x 9 = 54 variants) on 16 IOI-style prompts, logit difference, batch_size 8 (2 prompt batches).
Ray: a local cluster with as many CPUs as the machine (`ray.init(num_cpus=...)`). The local run
uses all cores as torch threads; one worker gets all cores; two workers get half each. Every
Ray table is checked against the local one (1e-6).

    .venv/bin/python benchmarks/ray_sweep.py        # ~3 min on a 2-core CPU
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pandas as pd
import torch

import splice
from splice import metrics
from splice.sweeps.ray_executor import RayExecutor

OUT = Path(__file__).parent / "results"
NAMES = [(" Mary", " John"), (" Tom", " Anna"), (" Sarah", " David"), (" Paul", " Lisa")]
PLACES = ["store", "park", "office", "station"]


def data():
    rows = []
    for a, b in NAMES:
        for place in PLACES:
            prompt = f"When{a} and{b} went to the {place},{b} gave a drink to"
            rows.append({"prompt": prompt, "correct": a, "wrong": b})
    return rows


def main() -> None:
    import ray

    cores = os.cpu_count() or 2
    torch.set_num_threads(cores)
    model = splice.load()
    layers = model.dims.n_layers
    sweep = splice.Sweep(
        sites=[f"blocks.{i}.attn.z" for i in range(layers - 6, layers)],
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff()],
    )
    rows, run = data(), {"batch_size": 8, "progress": False}
    sweep.run(model, rows[:2], **run)  # warm-up
    started = time.perf_counter()
    local = sweep.run(model, rows, **run)
    results = [
        {
            "executor": "local",
            "workers": 0,
            "threads_per_worker": cores,
            "startup_s": 0.0,
            "sweep_s": time.perf_counter() - started,
        }
    ]
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
    try:
        for workers in (1, 2):
            executor = RayExecutor(num_workers=workers, num_cpus=cores / workers, keep_workers=True)
            started = time.perf_counter()
            first = sweep.run(model, rows[:2], executor=executor, **run)  # starts the workers
            startup = time.perf_counter() - started
            assert len(first)
            started = time.perf_counter()
            table = sweep.run(model, rows, executor=executor, **run)
            elapsed = time.perf_counter() - started
            executor.shutdown()
            assert table[["variant", "metric"]].equals(local[["variant", "metric"]])
            diff = float((table["value"] - local["value"]).abs().max())
            assert diff <= 1e-6, diff
            results.append(
                {
                    "executor": "ray",
                    "workers": workers,
                    "threads_per_worker": max(1, cores // workers),
                    "startup_s": startup,
                    "sweep_s": elapsed,
                    "max_abs_diff_vs_local": diff,
                }
            )
    finally:
        ray.shutdown()
    table = pd.DataFrame(results)
    local_s = table.loc[0, "sweep_s"]
    table["vs_local"] = table["sweep_s"] / local_s
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    OUT.mkdir(exist_ok=True)
    table.to_csv(OUT / "ray_sweep.csv", index=False)
    (OUT / "ray_sweep.json").write_text(
        json.dumps(
            {"cores": cores, "variants": len(local) - 1, "prompts": len(rows), "rows": results}, indent=1
        )
    )


if __name__ == "__main__":
    main()
