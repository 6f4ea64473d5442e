"""Parity: the same five edits in splice, TransformerLens (HookedTransformer 3.9, TransformerBridge
4.3), nnsight and pyvene, on the same random GPT-2-small weights, must give the same logits.

    .venv/bin/python benchmarks/peers/parity.py      # after `bash benchmarks/peers/setup.sh`

Run from the main venv, it starts one worker process per venv: the main venv's compares splice
with hand-written torch hooks on the HF modules (and the recording with the layers' outputs);
each peer venv's (`benchmarks/peers/.venvs/<peer>`, which also holds splice) compares the peer
with splice in the same process, and checks splice against the hand hooks there too. A cell is
the max |difference| over every logit (or, for the recording, over all 12 layers' `resid_post`);
anything above 1e-4 is a mismatch and the script exits 1. An edit a peer cannot express prints
"cannot express: <reason>" and is not a mismatch. The "edit effect" column is max |edited -
unedited| of splice's logits: it shows that the 1e-4 tolerance is far below what an edit changes.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

TOL = 1e-4
BATCH, SEQ = 4, 24
MAIN_VENV = HERE.parent.parent / ".venv"
VENVS = {"tl3": "tl3", "tl4": "tl4", "nnsight": "nnsight", "pyvene": "pyvene"}


def max_diff(a, b) -> float:
    import torch

    if isinstance(a, list):
        if len(a) != len(b):
            return float("inf")
        return max(max_diff(x, y) for x, y in zip(a, b))
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max())


def worker(peer: str) -> dict:
    """Runs inside one venv; returns the cells as JSON-able data."""
    import common as C
    import libs
    import torch
    import transformers

    C.quiet_transformers()
    torch.set_num_threads(2)
    report = {
        "peer": peer,
        "python": sys.executable,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cells": {},
        "splice_vs_hand": {},
        "effect": {},
    }
    splice_lib = libs.Splice()
    hand = libs.HandHooks()
    report["splice"] = splice_lib.version
    report["digest"] = C.weights_digest(splice_lib.hf)
    inp = C.make_inputs(BATCH, SEQ, splice_lib.config.vocab_size, splice_lib.config.n_embd)
    with torch.inference_mode():
        ours = {edit: splice_lib.call(edit)(inp) for edit in C.EDITS}
        for edit in C.EDITS:
            report["splice_vs_hand"][edit] = max_diff(ours[edit], hand.call(edit)(inp))
        if peer == "splice":
            report["label"], report["version"] = "splice vs hand-written torch hooks", splice_lib.version
            clean = hand.hf(inp.ids).logits
            # the recording vs HF's own hidden states for the 11 layers whose output HF returns raw
            hidden = hand.hf(inp.ids, output_hidden_states=True).hidden_states
            report["record_vs_hidden_states"] = max_diff(ours["record_resid"][:-1], list(hidden[1:-1]))
            for edit in C.EDITS[:-1]:
                report["effect"][edit] = max_diff(ours[edit], clean)
            report["cells"] = {e: {"diff": d} for e, d in report["splice_vs_hand"].items()}
            return report
        lib = libs.PEERS[peer]()
        report["label"], report["version"] = lib.label, lib.version
        for edit in C.EDITS:
            try:
                fn = lib.call(edit)
            except NotImplementedError as e:
                report["cells"][edit] = {"cannot": str(e)}
                continue
            try:
                report["cells"][edit] = {"diff": max_diff(fn(inp), ours[edit])}
            except Exception as e:  # a failure is reported (and fails the run), not hidden
                traceback.print_exc()
                report["cells"][edit] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return report


def run_worker(peer: str, python: Path) -> dict:
    if not python.exists():
        return {"peer": peer, "failed": f"{python} missing: run `bash benchmarks/peers/setup.sh` first"}
    proc = subprocess.run(
        [str(python), str(Path(__file__).resolve()), "--worker", peer],
        stdout=subprocess.PIPE,
        text=True,
        cwd=str(HERE),
    )
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    if proc.returncode or not lines:
        return {"peer": peer, "failed": f"worker exited {proc.returncode}"}
    return json.loads(lines[-1])


def cell_text(cell: dict) -> str:
    if "cannot" in cell:
        return f"cannot express: {cell['cannot']}"
    if "error" in cell:
        return f"ERROR {cell['error']}"
    return f"{cell['diff']:.1e}" + ("" if cell["diff"] <= TOL else " MISMATCH")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--peers", nargs="*", default=list(VENVS), help="peers to compare (default: all)")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker)))
        return 0

    import common as C

    reports = [run_worker("splice", MAIN_VENV / "bin" / "python")]
    for peer in args.peers:
        reports.append(run_worker(peer, HERE / ".venvs" / VENVS[peer] / "bin" / "python"))

    bad = []
    for r in reports:
        if "failed" in r:
            bad.append(f"{r['peer']}: {r['failed']}")
            continue
        for edit, cell in r["cells"].items():
            if "error" in cell or ("diff" in cell and not cell["diff"] <= TOL):
                bad.append(f"{r['label']}: {edit}")
        for edit, d in r["splice_vs_hand"].items():
            if not d <= TOL:
                bad.append(f"splice vs hand hooks in the {r['peer']} venv: {edit}")
    digests = {r.get("digest") for r in reports if "failed" not in r}

    ok = [r for r in reports if "failed" not in r]
    effect = ok[0]["effect"] if ok and ok[0]["peer"] == "splice" else {}
    header = ["edit", "edit effect"] + [
        r["label"] if r["peer"] == "splice" else f"{r['label']} {r['version']}" for r in ok
    ]
    rows = [
        [C.EDIT_LABELS[e], f"{effect[e]:.2f}" if e in effect else ""] + [cell_text(r["cells"][e]) for r in ok]
        for e in C.EDITS
    ]
    print(
        f"max abs difference of logits (recording: of resid_post), {BATCH} x {SEQ} random tokens, "
        f"tolerance {TOL:g}; peers are compared with splice in the same process\n"
    )
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    for r in ok:
        worst = max(r["splice_vs_hand"].values())
        print(
            f"{r['peer']:8s} torch {r['torch']}, transformers {r['transformers']}, splice {r['splice']}, "
            f"weights {r['digest']}; splice vs hand hooks there: max {worst:.1e}"
        )
    if ok and ok[0]["peer"] == "splice":
        print(
            f"splice's recording vs HF output_hidden_states (layers 0-10): {ok[0]['record_vs_hidden_states']:.1e}"
        )
    if len(digests) > 1:
        bad.append(f"processes loaded different weights: {digests}")
    if bad:
        print("\nFAILED:\n  " + "\n  ".join(bad))
        return 1
    print("\nall libraries agree within", TOL)
    return 0


if __name__ == "__main__":
    sys.exit(main())
