"""Analysis parity: splice's per-head results, residual decomposition and frozen-norm direct logit
attribution against TransformerLens 3.9's `stack_head_results`, `decompose_resid` and
`apply_ln_to_stack`, side by side in one process on the shared random GPT-2-small weights.

    .venv/bin/python benchmarks/peers/analysis_parity.py   # after `bash benchmarks/peers/setup.sh tl3`

It re-runs itself in the tl3 venv (which holds splice too), prints one table, writes
`results/analysis_parity.csv`, and exits 1 if any cell differs by more than 1e-4. TL is loaded
without LayerNorm folding or weight centring (`libs.TL3`), so both libraries read the same raw
weights; TL's `apply_ln_to_stack` then centres and divides by the final LayerNorm's scale only,
so its result is multiplied by `ln_f.weight` here before projecting on W_U[:, a] - W_U[:, b]
(splice's frozen-norm attribution applies the whole norm; its bias is a row of its own)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TL3_PYTHON = HERE / ".venvs" / "tl3" / "bin" / "python"
TOL = 1e-4
BATCH, SEQ = 4, 24
A, B = 11, 22  # the logit-difference tokens


def max_diff(a, b) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max())


def compare() -> list[dict]:
    sys.path.insert(0, str(HERE))
    import common as C
    import libs
    import torch

    import splice
    from splice import analysis

    C.quiet_transformers()
    torch.set_num_threads(2)
    ours, tl = libs.Splice(), libs.TL3()
    m, model = ours.m, tl.model
    n_layers = ours.n_layer
    ids = C.make_inputs(BATCH, SEQ, ours.config.vocab_size, ours.config.n_embd).ids
    rows = []

    def row(what, tl_name, diff, scale):
        rows.append(
            {"quantity": what, "TransformerLens 3.9": tl_name, "max_abs_diff": diff, "max_abs_value": scale}
        )

    with torch.no_grad():
        _, cache = model.run_with_cache(ids)
        # 1. per-head results, every layer: [layer*head, batch, pos, d_model] in both
        theirs = cache.stack_head_results(layer=-1)
        _, rec = m.run(ids, record="blocks.*.attn.result")
        mine = rec.stack("blocks.*.attn.result").permute(0, 3, 1, 2, 4).reshape(theirs.shape)
        row(
            "blocks.*.attn.result",
            "cache.stack_head_results(layer=-1)",
            max_diff(mine, theirs),
            float(theirs.abs().max()),
        )

        # 2. the final residual as embed, pos_embed, then each layer's attn_out and mlp_out
        theirs, labels = cache.decompose_resid(layer=None, mode="all", incl_embeds=True, return_labels=True)
        parts = analysis.decompose(m, ids, upto="final", by="layers")
        order = {"embed": "embed.token", "pos_embed": "embed.pos"}
        for l in range(n_layers):
            order[f"{l}_attn_out"] = f"blocks.{l}.attn.out"
            order[f"{l}_mlp_out"] = f"blocks.{l}.mlp.out"
        mine = torch.stack([parts[order[label]] for label in labels])
        row(
            "analysis.decompose(upto='final')",
            "cache.decompose_resid(mode='all')",
            max_diff(mine, theirs),
            float(theirs.abs().max()),
        )

        # 3. frozen-norm direct logit attribution of logit(A) - logit(B) at the last position, per prompt
        stack = cache.apply_ln_to_stack(
            theirs[:, :, -1], layer=None, pos_slice=-1
        )  # [component, batch, d_model]
        direction = model.W_U[:, A] - model.W_U[:, B]
        theirs_dla = (stack * model.ln_final.w) @ direction  # [component, batch]
        data = [{"input_ids": r, "a": A, "b": B} for r in ids.tolist()]
        table = analysis.logit_attribution(m, data, direction=("a", "b"), by="layers", per_prompt=True)
        by_component = {c: g.sort_values("prompt")["value"].to_numpy() for c, g in table.groupby("component")}
        mine_dla = torch.tensor([list(by_component[order[label]]) for label in labels])
        row(
            "analysis.logit_attribution(norm='frozen')",
            "cache.apply_ln_to_stack(...) * ln_f.w @ dW_U",
            max_diff(mine_dla, theirs_dla),
            float(theirs_dla.abs().max()),
        )
        # ... and what is left over in splice's own rows (final-norm bias) closes the sum to the logits
        logits = ours.hf(ids).logits[:, -1]
        total = torch.tensor([float(v) for v in table.groupby("prompt")["value"].sum().sort_index()])
        row(
            "logit_attribution rows summed",
            "the model's logit(A) - logit(B)",
            max_diff(total, logits[:, A] - logits[:, B]),
            float((logits[:, A] - logits[:, B]).abs().max()),
        )
    for r in rows:
        r.update(
            splice=splice.__version__,
            transformer_lens=libs._dist_version("transformer-lens"),
            weights=C.weights_digest(ours.hf)[:12],
        )
    return rows


def main() -> int:
    if Path(sys.prefix).resolve() != TL3_PYTHON.parent.parent.resolve():
        if not TL3_PYTHON.exists():
            print("analysis_parity: run `bash benchmarks/peers/setup.sh tl3` first", file=sys.stderr)
            return 2
        return subprocess.run(
            [str(TL3_PYTHON), __file__], env={**os.environ, "PYTHONWARNINGS": "ignore"}
        ).returncode
    import pandas as pd

    table = pd.DataFrame(compare())
    (HERE / "results").mkdir(exist_ok=True)
    table.to_csv(HERE / "results" / "analysis_parity.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60):
        print(table.to_string(index=False))
    bad = table[table.max_abs_diff > TOL]
    if len(bad):
        print(f"\nMISMATCH above {TOL}: {list(bad.quantity)}")
    return 1 if len(bad) else 0


if __name__ == "__main__":
    sys.exit(main())
