"""The dictionary injection board: a live `splice.Edits` registry, edited while it is in use.

The board edits only layer 3: it zeroes query dims 0-9 (in every head) at token position 4 and
halves the MLP output at every position. Recording `blocks.*.resid_post` shows that:
  * layers 0-2 are bit-identical to a clean run (nothing upstream of an edit can change);
  * every layer from 3 on differs.
Then, inside the same `with`, the MLP edit is deleted from the registry. The very next forward
uses the new board (no re-entering): only the q edit at position 4 is left, so positions 0-3
become bit-identical again at every layer (causal attention never looks ahead), position 4
differs from layer 3, and later positions from layer 4 (once attention reads position 4).
"""

import pandas as pd
import torch

import splice

m = splice.load()
n_layers = m.dims.n_layers
EDIT_LAYER, POS = 3, 4
text = "The board edits layer three and nothing before it."
print("tokens:", m.to_str_tokens(text))

with torch.no_grad(), m.record("blocks.*.resid_post") as clean:
    m(text)


def max_diff(rec, positions=slice(None)):
    """Max |edited - clean| of resid_post per layer, over the given positions."""
    return [
        (rec[f"blocks.{l}.resid_post"][:, positions] - clean[f"blocks.{l}.resid_post"][:, positions])
        .abs()
        .max()
        .item()
        for l in range(n_layers)
    ]


# Table columns: the first board over all positions, then the changed board split by position.
V1, BEFORE, AT, AFTER = (
    "q0+mlp*0.5: all pos",
    f"q0 only: pos<{POS}",
    f"q0 only: pos {POS}",
    f"q0 only: pos>{POS}",
)

board = splice.Edits(
    {
        f"blocks.{EDIT_LAYER}.attn.q": splice.Zero(pos=POS, dims=slice(0, 10)),
        f"blocks.{EDIT_LAYER}.mlp.out": splice.Scale(0.5),
    }
)
print("board:", board)

with torch.no_grad(), m.edit(board) as live, m.record("blocks.*.resid_post") as rec:
    m(text)
    table = pd.DataFrame({V1: max_diff(rec)})

    del live[f"blocks.{EDIT_LAYER}.mlp.out"]  # live change: takes effect on the next forward
    print("board after the live change:", live)
    m(text)
    table[BEFORE] = max_diff(rec, slice(0, POS))
    table[AT] = max_diff(rec, slice(POS, POS + 1))
    table[AFTER] = max_diff(rec, slice(POS + 1, None))

    # A key that names no site is refused on assignment, and the board stays as it was.
    try:
        live["blocks.30.mlp.out"] = splice.Zero()
    except splice.SpliceError as err:
        print("refused:", err)
    assert list(live) == [f"blocks.{EDIT_LAYER}.attn.q"]

table.index.name = "layer"
print("max |edited - clean| of resid_post per layer:")
print(table.to_string(float_format=lambda x: f"{x:.4g}"))

L = EDIT_LAYER
assert (table[V1].iloc[:L] == 0).all(), "layers before the edited one must be bit-identical"
assert (table[V1].iloc[L:] > 0).all(), "every layer from the edited one on must change"
assert (table[BEFORE] == 0).all(), "positions before the edited one must be untouched at every layer"
assert (table[AT].iloc[:L] == 0).all() and (table[AT].iloc[L:] > 0).all()
assert (table[AFTER].iloc[: L + 1] == 0).all() and (table[AFTER].iloc[L + 1 :] > 0).all()

# Leaving the context removes every hook: the model is clean again.
assert m.hook_count == 0
with torch.no_grad(), m.record("blocks.*.resid_post") as after:
    m(text)
assert all(torch.equal(after[s], clean[s]) for s in clean)
print("OK: the board edits only what it names, and live changes apply on the next forward")
