"""Record Q/K/V and the MLP hidden activations, in both storage modes.

Shows:
  * `attn.q` is [batch, pos, 9 heads, 64] while `attn.k`/`attn.v` have 3 heads: SmolLM2 uses
    grouped-query attention (each K/V head is shared by 3 query heads);
  * `mlp.post` is the MLP hidden layer [batch, pos, d_mlp=1536], the input of `down_proj`;
  * mode="overwrite" keeps the last forward only, mode="accumulate" keeps one tensor per
    forward, joined with `stack` (same shapes) or `cat` (e.g. along positions);
  * the recorded q equals what an independent plain PyTorch hook on `q_proj` sees, reshaped by
    hand, and the recorded mlp.post equals the gated MLP recomputed from the recorded mlp.in.
"""

import torch

import splice

m = splice.load()
d = m.dims
LAYER = 3
Q, K, V, MLP_IN, POST = (f"blocks.{LAYER}.{p}" for p in ("attn.q", "attn.k", "attn.v", "mlp.in", "mlp.post"))
text = "The quick brown fox jumps over the lazy dog."
n_pos = m.to_tokens(text).shape[1]

# -- overwrite mode, checked against a hand-written hook ------------------------------------------
captured = {}


def grab_q_proj(module, args, output):
    captured["q_proj"] = output.detach().clone()


handle = m.hf.model.layers[LAYER].self_attn.q_proj.register_forward_hook(grab_q_proj)
try:
    with torch.no_grad(), m.record([Q, K, V, MLP_IN, POST], mode="overwrite") as rec:
        m(text)
finally:
    handle.remove()

for site in (Q, K, V, POST):
    print(f"{site:20s} {list(rec[site].shape)}")
assert rec[Q].shape == (1, n_pos, d.n_heads, d.d_head) == (1, n_pos, 9, 64)
assert rec[K].shape == rec[V].shape == (1, n_pos, d.n_kv_heads, d.d_head) == (1, n_pos, 3, 64)
assert rec[POST].shape == (1, n_pos, d.d_mlp) == (1, n_pos, 1536)

# q_proj returns [batch, pos, heads * d_head]; Llama splits the last axis head-major.
by_hand = captured["q_proj"].view(1, n_pos, d.n_heads, d.d_head)
# Same tensor read at the same place, so no tolerance: it must be bit-identical.
torch.testing.assert_close(rec[Q], by_hand, rtol=0, atol=0)
print(f"recorded {Q} == q_proj output reshaped by hand (bit-identical)")

# mlp.post is the gated hidden layer act(gate_proj(x)) * up_proj(x), x = mlp.in; recomputing it
# with the model's own modules repeats the model's exact operations, so again no tolerance.
mlp = m.hf.model.layers[LAYER].mlp
with torch.no_grad():
    hidden = mlp.act_fn(mlp.gate_proj(rec[MLP_IN])) * mlp.up_proj(rec[MLP_IN])
torch.testing.assert_close(rec[POST], hidden, rtol=0, atol=0)
print(f"recorded {POST} == act(gate_proj(mlp.in)) * up_proj(mlp.in) (bit-identical)")

# -- overwrite vs accumulate over several prompts -------------------------------------------------
same_length = ["The cat sat on the mat.", "The dog ran in the park.", "A bird flew over the tree."]
with (
    torch.no_grad(),
    m.record([Q, POST], mode="overwrite") as last_only,
    m.record([Q, POST], mode="accumulate") as every,
):
    for prompt in same_length:
        m(prompt)

print(f"overwrite:  {Q} -> one tensor {list(last_only[Q].shape)} (the last prompt)")
print(f"accumulate: {Q} -> list of {len(every[Q])} tensors; stack -> {list(every.stack(Q).shape)}")
assert isinstance(last_only[Q], torch.Tensor) and len(every[Q]) == len(same_length)
assert every.stack(Q).shape == (len(same_length), 1, 7, d.n_heads, d.d_head)
torch.testing.assert_close(every[Q][-1], last_only[Q], rtol=0, atol=0)  # same forward, same values

# Prompts of different lengths cannot be stacked, but can be concatenated along positions (dim=1).
varied = ["Hello.", "The weather is nice today.", "Activation editing on a small language model."]
lengths = [m.to_tokens(p).shape[1] for p in varied]
with torch.no_grad(), m.record(POST, mode="accumulate") as rec:
    for prompt in varied:
        m(prompt)
joined = rec.cat(POST, dim=1)
print(f"accumulate over lengths {lengths}: cat(dim=1) -> {list(joined.shape)}")
assert joined.shape == (1, sum(lengths), d.d_mlp)
try:
    rec.stack(POST)
except splice.SpliceError as err:
    print(f"stack refuses ragged entries: {err}")
else:
    raise AssertionError("stack should refuse entries of different shapes")

# Each accumulated entry is exactly what a separate forward of that prompt records.
with torch.no_grad(), m.record(POST) as single:
    m(varied[1])
torch.testing.assert_close(rec[POST][1], single[POST], rtol=0, atol=0)
print("OK: recorded activations match an independent hook, and both storage modes agree")
