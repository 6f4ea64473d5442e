"""Accelerator check: the embedded model's head-ablation sweep as a plain loop and batched, bf16
against float32, and the model split across devices against the single-device run.

With an accelerator (CUDA, or any other torch accelerator) it runs, in well under five minutes on
one GPU:

1. speed: zero each head's output (`blocks.*.attn.z`, 30 layers x 9 heads = 270 variants) of the
   embedded SmolLM2-135M on IOI-style prompts, metric the logit difference of the two names at
   the last token. A plain loop (one forward per head, a hand-written hook on the output
   projection) against `Sweep.run` (variants as rows of one batch, prefix reuse). Reports both
   times, their ratio (benchmarks/sweep.py measured 2.6x on a 2-core CPU; an accelerator should
   be far above it, since the variants fill it) and the largest difference between the tables.
2. bf16: the same sweep with the model loaded in bfloat16, against float32: Spearman rank
   correlation of the effects and their largest difference.
3. split: the model across devices, against the single-device run. (a) The first half of the
   layers computing on the accelerator, the second half and the final norm on the CPU
   (`accelerate.dispatch_model(..., main_device="cpu")`): activations cross devices twice.
   (b) `splice.load` with a `device_map` that offloads a third of the layers to "cpu" and a third
   to "disk" (accelerate streams their weights in; they compute on the accelerator). Each: edited
   logits of several interventions on padded prompts, every recorded site, a Patch from a
   recording of the split model, generation with an edit, a head sweep and a patching sweep across
   the boundaries, and an error inside an edit (no splice hook left, the same logits after).

Without an accelerator it says so and exits 0. `--device cpu` runs every check on the CPU (the
split (a) then has one device only; (b) still offloads to "disk"); `--quick` uses fewer prompts
and two layers' heads, to check that the script runs.

Exit status: 0 when every correctness check passes (timings never fail the run), else 1. Writes
OUT/gpu.json (every number) and OUT/gpu.csv (one row per check), OUT = benchmarks/results; a
`--device cpu` run writes gpu_cpu.json / gpu_cpu.csv instead.

    .venv/bin/python benchmarks/gpu.py                          # on a GPU machine
    .venv/bin/python benchmarks/gpu.py --device cpu --quick --threads 1   # the same code on the CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch
import transformers
from transformers.utils import logging as hf_logging

import splice
from splice import metrics, patching

hf_logging.set_verbosity_error()
OUT = Path(__file__).parent / "results"
CPU_SWEEP_RATIO = 2.6  # benchmarks/sweep.py: batched vs plain loop, GPT-2 small, 2-core CPU
SPLIT_TOL = 2e-3  # |difference| allowed between a split model and the single-device run (fp32 logits):
# layers computing on the CPU instead of the accelerator round differently, nothing else may differ
LOOP_TOL = 1e-3  # |plain loop - batched sweep| per head (fp32; batch shapes change summation order)
BF16_SPEARMAN = 0.9  # bf16 effects must rank the heads as float32 does, at least this well

NAMES = [" Mary", " John", " Tom", " Anna", " James", " Sarah", " David", " Emma", " Alice", " Paul"]
TEMPLATES = [
    "When{a} and{b} went to the {place},{s} gave a {thing} to",
    "After{a} and{b} got to the {place},{s} handed the {thing} to",
    "Later{a} and{b} were at the {place}, so{s} passed a {thing} to",
]
PLACES, THINGS = ["store", "park", "school", "office"], ["drink", "book", "ball", "letter"]


def ioi_data(n: int, seed: int = 0) -> list[dict]:
    """IOI-style rows: the indirect object (`correct`) against the repeated name (`wrong`), and
    `clean`: the same sentence with two other names in the first clause (same length in tokens:
    every name is one token)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b, c, d = rng.sample(NAMES, 4)
        template = TEMPLATES[i % len(TEMPLATES)]
        fill = {"place": rng.choice(PLACES), "thing": rng.choice(THINGS), "s": b}
        rows.append(
            {
                "prompt": template.format(a=a, b=b, **fill),
                "clean": template.format(a=c, b=d, **fill),
                "correct": a,
                "wrong": b,
            }
        )
    return rows


def pick_device(name: str) -> torch.device | None:
    if name != "auto":
        device = torch.device(name)
    elif torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    elif hasattr(torch, "accelerator") and torch.accelerator.is_available():
        device = torch.accelerator.current_accelerator()
    else:
        return None
    return device if device.type == "cpu" or device.index is not None else torch.device(device.type, 0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type != "cpu" and hasattr(torch, "accelerator"):
        torch.accelerator.synchronize()


class Report:
    """Checks and numbers, printed as they come and written at the end."""

    def __init__(self):
        self.rows: list[dict] = []
        self.numbers: dict = {}

    def check(self, section: str, name: str, value, target: str, ok: bool | None) -> None:
        verdict = "info" if ok is None else "PASS" if ok else "FAIL"
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        print(f"  [{verdict}] {section}: {name} = {shown}  ({target})", flush=True)
        self.rows.append(
            {"section": section, "check": name, "value": value, "target": target, "verdict": verdict}
        )

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["verdict"] == "FAIL"]


def head_sites(model: splice.Model, quick: bool) -> list[int]:
    n = model.dims.n_layers
    return [n // 2 - 1, n // 2] if quick else list(range(n))


def sweep_for(layers: list[int]) -> splice.Sweep:
    return splice.Sweep(
        sites=[f"blocks.{layer}.attn.z" for layer in layers],
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff("correct", "wrong")],
        name="head ablation",
    )


def plain_loop(model: splice.Model, data: list[dict], layers: list[int]) -> dict[tuple[int, int], float]:
    """What people write without splice: one forward per head, a hook zeroing that head's slice
    of the output projection's input (Llama layout: heads are contiguous d_head blocks)."""
    from splice.sweeps.data import PromptBatch

    batch = PromptBatch(model, data)
    correct, wrong = batch.token_ids("correct"), batch.token_ids("wrong")
    rows = torch.arange(len(data), device=correct.device)
    d_head, heads = model.dims.d_head, model.dims.n_heads
    values = {}
    for layer in layers:
        projection = model.hf.model.layers[layer].self_attn.o_proj
        for head in range(heads):

            def zero_head(module, args, head=head):
                z = args[0].clone()
                z[..., head * d_head : (head + 1) * d_head] = 0
                return (z,) + args[1:]

            handle = projection.register_forward_pre_hook(zero_head)
            try:
                with torch.no_grad():
                    last = model.hf(**batch.kwargs, use_cache=False).logits[:, -1]
            finally:
                handle.remove()
            values[(layer, head)] = float((last[rows, correct] - last[rows, wrong]).mean())
    return values


def timed(device: torch.device, fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def by_head(table: pd.DataFrame, column: str = "value") -> dict[tuple[int, int], float]:
    rows = table[table.variant >= 0]
    return {(int(r.layer), int(r.head)): float(getattr(r, column)) for r in rows.itertuples()}


def speed(report: Report, model: splice.Model, data, layers, device, repeats) -> pd.DataFrame:
    section = "speed"
    sweep = sweep_for(layers)
    plain_loop(model, data[:2], layers[:1])  # warm-up (kernels, allocator)
    sweep_for(layers[:1]).run(model, data[:2], progress=False)
    plain_s, plain = timed(device, lambda: plain_loop(model, data, layers), repeats)
    batched_s, table = timed(
        device, lambda: sweep.run(model, data, batch_size=len(data), progress=False), repeats
    )
    batched = by_head(table)
    diff = max(abs(plain[k] - batched[k]) for k in plain)
    report.numbers[section] = {
        "variants": len(plain),
        "prompts": len(data),
        "plain_loop_s": plain_s,
        "batched_s": batched_s,
        "ratio": plain_s / batched_s,
        "max_abs_diff": diff,
    }
    report.check(
        section, "plain loop seconds", plain_s, f"{len(plain)} forwards of {len(data)} prompts", None
    )
    report.check(section, "batched sweep seconds", batched_s, "Sweep.run, prefix reuse", None)
    report.check(
        section,
        "speed-up batched vs plain loop",
        plain_s / batched_s,
        f"CPU reference {CPU_SWEEP_RATIO}x",
        None,
    )
    report.check(section, "max |plain - batched| per head", diff, f"<= {LOOP_TOL}", diff <= LOOP_TOL)
    return table


def bf16(report: Report, table32: pd.DataFrame, data, layers, device, device_map) -> None:
    section = "bf16"
    model = splice.load({"model": "embedded", "dtype": "bfloat16", "device_map": device_map})
    assert next(model.hf.parameters()).dtype == torch.bfloat16
    table16 = sweep_for(layers).run(model, data, batch_size=len(data), progress=False)
    rho = patching.rank_correlation(table32, table16)
    a, b = by_head(table32, "effect"), by_head(table16, "effect")
    diff = max(abs(a[k] - b[k]) for k in a)
    spread = max(abs(v) for v in a.values())
    report.numbers[section] = {
        "spearman_effects": rho,
        "max_abs_diff_effects": diff,
        "max_abs_effect_fp32": spread,
    }
    report.check(section, "Spearman(effects bf16, fp32)", rho, f">= {BF16_SPEARMAN}", rho >= BF16_SPEARMAN)
    report.check(section, "max |effect bf16 - fp32|", diff, f"info; largest fp32 effect {spread:.3g}", None)


def split_checks(report: Report, section: str, split: splice.Model, ref: splice.Model, data, layers) -> None:
    """`split` against the single-device `ref` (same weights, float32) around the layers
    `layers` (where the device changes)."""
    n = ref.dims.n_layers
    prompts = [row["prompt"] for row in data]
    others = [row["clean"] for row in data]
    results = {}

    def close(name, got, expected, target=SPLIT_TOL):
        diff = float((got.to(expected.device).double() - expected.double()).abs().max())
        results[name] = diff
        report.check(section, name, diff, f"<= {target}", diff <= target)

    report.check(
        section,
        "inputs go to",
        str(split.device),
        f"the embedding's device, {ref.device}",
        split.device == ref.device,
    )
    with torch.no_grad():
        clean = ref(prompts)
        close("logits", split(prompts), clean)
        wanted = [f"blocks.*.{point}" for point in ("resid_pre", "resid_post", "attn.v", "mlp.out")]
        source = ref.run(others, record=wanted)[1]
        own_source = split.run(others, record="blocks.*.resid_pre")[
            1
        ]  # made on the split model: mixed devices
        vector = torch.linspace(-1, 1, ref.dims.d_model)
        for layer in layers:
            edits = {
                "Zero heads at the last position": {
                    f"blocks.{layer}.attn.z": splice.Zero(heads=[0, 3], pos=-1)
                },
                "Add at positions 2-5 of resid_mid": {
                    f"blocks.{layer}.resid_mid": splice.Add(vector, pos=slice(2, 6))
                },
                "Scale one head's attn.result": {f"blocks.{layer}.attn.result": splice.Scale(0.0, heads=2)},
                "Patch resid and a head's v": {
                    f"blocks.{max(layer - 1, 0)}.resid_post": splice.Patch(source),
                    f"blocks.{layer}.attn.v": splice.Patch(source, heads=1),
                },
                "Mean of mlp.out, Scale of dims": {
                    f"blocks.{layer}.mlp.out": splice.Mean(source[f"blocks.{layer}.mlp.out"]),
                    f"blocks.{layer}.resid_pre": splice.Scale(2.0, dims=[0, 5]),
                },
                "Patch from the split model's own recording": {
                    f"blocks.{layer}.resid_pre": splice.Patch(own_source)
                },
            }
            for label, edit in edits.items():
                expected = ref.run(prompts, edits=edit)[0]
                moved = float((expected - clean).abs().max())
                if moved <= 10 * SPLIT_TOL:
                    report.check(
                        section,
                        f"layer {layer}: {label} changes the logits",
                        moved,
                        "> 10 x tolerance",
                        False,
                    )
                close(f"layer {layer}: {label}", split.run(prompts, edits=edit)[0], expected)
        recorded = split.run(prompts, record="*")[1]
        expected_rec = ref.run(prompts, record="*")[1]
        worst = max(
            float((recorded[k].to(expected_rec[k].device).double() - expected_rec[k].double()).abs().max())
            for k in expected_rec
        )
        report.check(
            section,
            f"every recorded site ({len(expected_rec)})",
            worst,
            f"<= {SPLIT_TOL}",
            worst <= SPLIT_TOL,
        )
    edit = {f"blocks.{layers[0]}.resid_post": splice.Add(vector * 4, pos=slice(8, None))}
    tokens = split.generate(prompts, edits=edit, max_new_tokens=6, return_tokens=True)
    expected_tokens = ref.generate(prompts, edits=edit, max_new_tokens=6, return_tokens=True)
    same = bool(torch.equal(tokens.cpu(), expected_tokens.cpu()))
    report.check(section, "generate with an edit: same tokens", same, "greedy, 6 new tokens", same)
    sweep = sweep_for(sorted({max(layers[0] - 1, 0), *layers, n - 1}))
    got = sweep.run(split, data, batch_size=len(data), max_rows=3 * len(data), progress=False)
    expected = sweep.run(ref, data, batch_size=len(data), max_rows=3 * len(data), progress=False)
    diff = float((got.value - expected.value).abs().max())
    report.check(section, "head sweep table", diff, f"<= {SPLIT_TOL}", diff <= SPLIT_TOL)
    kwargs = dict(
        sites=[f"blocks.{layer}.resid_pre" for layer in layers], over="pos", metrics=[metrics.logit_diff()]
    )
    got = patching.patch_sweep(split, data, batch_size=len(data), progress=False, **kwargs)
    expected = patching.patch_sweep(ref, data, batch_size=len(data), progress=False, **kwargs)
    diff = float((got.value - expected.value).abs().max())
    report.check(section, "patch_sweep table", diff, f"<= {SPLIT_TOL}", diff <= SPLIT_TOL)

    def boom(x):
        raise RuntimeError("deliberate")

    with torch.no_grad():
        before = split(prompts)
        try:
            with split.edit({f"blocks.{layers[-1]}.attn.result": splice.Apply(boom)}):
                split(prompts)
            raised = False
        except RuntimeError:
            raised = True
        after = split(prompts)
    fine = raised and split.hook_count == 0 and bool(torch.equal(before, after))
    report.check(
        section, "error in an edit: no splice hook left, same logits", fine, "raised, 0 hooks, equal", fine
    )
    report.numbers[section] = results


def split_across_devices(report: Report, ref: splice.Model, data, device) -> None:
    """(a): half the layers on the accelerator, half (and the final norm) on the CPU."""
    import accelerate

    model = splice.load("embedded")  # a CPU copy, dispatched in place
    n, here = model.dims.n_layers, str(device)
    device_map = {"model.embed_tokens": here, "model.rotary_emb": here, "lm_head": here, "model.norm": "cpu"}
    device_map |= {f"model.layers.{i}": (here if i < n // 2 else "cpu") for i in range(n)}
    accelerate.dispatch_model(model.hf, device_map=device_map, main_device="cpu")
    split = splice.Model(model.hf, model.tokenizer)
    where = sorted({str(p.device) for p in split.hf.parameters()})
    report.check(
        "split (a) accelerator/CPU",
        "parameter devices",
        ", ".join(where),
        "two devices on an accelerator",
        None,
    )
    split_checks(report, "split (a) accelerator/CPU", split, ref, data, [n // 2])


def split_with_offload(report: Report, ref: splice.Model, data, device) -> None:
    """(b): splice.load with a device_map offloading layers to "cpu" and "disk"."""
    with tempfile.TemporaryDirectory() as folder:
        n, here = ref.dims.n_layers, str(device)
        third = n // 3
        device_map = {
            "model.embed_tokens": here,
            "model.rotary_emb": here,
            "lm_head": here,
            "model.norm": here,
        }
        device_map |= {
            f"model.layers.{i}": here if i < third else "cpu" if i < 2 * third else "disk" for i in range(n)
        }
        split = splice.load({"model": "embedded", "device_map": device_map, "offload_folder": folder})
        meta = sum(p.device.type == "meta" for p in split.hf.parameters())
        report.check("split (b) offload", "parameters resting on meta", meta, "offloaded weights", meta > 0)
        split_checks(report, "split (b) offload", split, ref, data, [third, 2 * third])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="auto", help="auto (the accelerator if any), cuda, cuda:1, cpu, ..."
    )
    parser.add_argument(
        "--quick", action="store_true", help="fewer prompts and layers: checks the script runs"
    )
    parser.add_argument("--prompts", type=int, default=None, help="prompts per sweep (default 24, quick 4)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed runs, best kept (default 2, quick 1)"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="folder for gpu.json / gpu.csv")
    args = parser.parse_args()
    device = pick_device(args.device)
    if device is None:
        print(
            "benchmarks/gpu.py: no accelerator here (torch sees no CUDA or other accelerator device), so "
            "there is nothing to check. On a GPU machine run it as is; `--device cpu --quick` runs the "
            "same checks on the CPU."
        )
        return 0
    started = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    prompts = args.prompts or (4 if args.quick else 24)
    repeats = args.repeats or (1 if args.quick else 2)
    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or device.type
    )
    print(f"device {device} ({name}), torch {torch.__version__}, transformers {transformers.__version__}")
    report = Report()
    report.numbers["environment"] = {
        "device": str(device),
        "device_name": name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "splice": splice.__version__,
        "quick": args.quick,
    }
    data = ioi_data(prompts)
    device_map = str(device)
    ref = splice.load({"model": "embedded", "device_map": device_map})
    layers = head_sites(ref, args.quick)
    print(
        f"model {ref}, {len(data)} prompts, heads of layers {layers[0]}..{layers[-1]} ({len(layers)} layers)"
    )
    print("1. plain loop vs batched sweep")
    table32 = speed(report, ref, data, layers, device, repeats)
    print("2. bf16 vs float32")
    bf16(report, table32, data, layers, device, device_map)
    print("3. split across devices (float32)")
    split_data = data[: 3 if args.quick else 8]
    split_across_devices(report, ref, split_data, device)
    split_with_offload(report, ref, split_data, device)
    total = time.perf_counter() - started
    report.numbers["seconds"] = total
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "gpu" if device.type != "cpu" else "gpu_cpu"
    (args.out / f"{stem}.json").write_text(json.dumps(report.numbers, indent=2, default=str) + "\n")
    pd.DataFrame(report.rows).to_csv(args.out / f"{stem}.csv", index=False)
    failed = report.failed
    print(
        f"{len(report.rows)} rows, {len(failed)} failed, {total:.0f} s; wrote {args.out / stem}.json and .csv"
        + "".join(f"\n  FAILED {r['section']}: {r['check']} = {r['value']}" for r in failed)
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
