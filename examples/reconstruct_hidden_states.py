"""Rebuild Hugging Face's hidden states from splice sites, and check how they fit together.

For every layer l of this pre-norm (Llama) model:
    resid_post[l] == resid_pre[l] + attn.out[l] + mlp.out[l]
    resid_post[l] == HF output_hidden_states[l + 1]     (l < 29; HF's last entry is normed)
    embed         == HF output_hidden_states[0]
and at the top:
    HF output_hidden_states[-1] == final_norm == m.hf.model.norm(resid_post[29])
    logits == lm_head(final_norm)

These hold *bit for bit* when we repeat the model's own float32 operations in the model's order
(same inputs, same kernels, same shapes), so they are asserted with zero tolerance. Adding the
same three terms in another order rounds differently; that check uses a tolerance derived from
float32 rounding, shown at the end.
"""

import torch

import splice

m = splice.load()
n_layers = m.dims.n_layers
text = "Hidden states are sums of what every layer writes into the residual stream."
ids = m.to_tokens(text)

sites = [
    "embed",
    "blocks.*.resid_pre",
    "blocks.*.attn.out",
    "blocks.*.mlp.out",
    "blocks.*.resid_post",
    "final_norm",
    "logits",
]
with torch.no_grad(), m.record(sites) as rec:
    out = m.hf(ids, output_hidden_states=True)
hs = out.hidden_states
print(f"{len(hs)} HF hidden states for {n_layers} layers, {ids.shape[1]} tokens; {len(rec)} sites recorded")
assert len(hs) == n_layers + 1


def exact(a, b, what):
    torch.testing.assert_close(a, b, rtol=0, atol=0, msg=lambda detail: f"{what}: {detail}")


exact(rec["embed"], hs[0], "embed vs hidden_states[0]")
for l in range(n_layers):
    pre, attn, mlp, post = (
        rec[f"blocks.{l}.{p}"] for p in ("resid_pre", "attn.out", "mlp.out", "resid_post")
    )
    # The decoder layer does `h = resid + attn_out; h = h + mlp_out`: the same two additions.
    exact((pre + attn) + mlp, post, f"layer {l}: resid_pre + attn.out + mlp.out vs resid_post")
    if l < n_layers - 1:
        exact(post, hs[l + 1], f"layer {l}: resid_post vs hidden_states[{l + 1}]")
print(f"resid_post[l] == resid_pre[l] + attn.out[l] + mlp.out[l] for all {n_layers} layers (bit-identical)")
print(f"resid_post[l] == hidden_states[l+1] for l = 0..{n_layers - 2}; embed == hidden_states[0]")

last = rec[f"blocks.{n_layers - 1}.resid_post"]
gap = (last - hs[-1]).abs().max().item()
print(
    f"resid_post[{n_layers - 1}] vs hidden_states[-1]: max |diff| = {gap:.1f} (HF's last entry is after the final norm)"
)
assert gap > 0
exact(hs[-1], rec["final_norm"], "hidden_states[-1] vs final_norm")
with torch.no_grad():
    exact(m.hf.model.norm(last), rec["final_norm"], "model.norm(resid_post[-1]) vs final_norm")
    exact(m.hf.lm_head(rec["final_norm"]), rec["logits"], "lm_head(final_norm) vs logits")
exact(rec["logits"], out.logits, "recorded logits vs HF logits")
print(
    "hidden_states[-1] == final_norm == model.norm(resid_post[29]); logits == lm_head(final_norm) (bit-identical)"
)

# Another summation order: a + (b + c) differs from (a + b) + c by float32 rounding. Each of the
# two additions rounds by at most eps/2 of a partial sum no larger than |a| + |b| + |c|, so the
# gap is bounded by eps * (|a| + |b| + |c|); we allow twice that.
eps = torch.finfo(torch.float32).eps
worst = 0.0
for l in range(n_layers):
    pre, attn, mlp, post = (
        rec[f"blocks.{l}.{p}"] for p in ("resid_pre", "attn.out", "mlp.out", "resid_post")
    )
    diff = (pre + (attn + mlp) - post).abs()
    bound = 2 * eps * (pre.abs() + attn.abs() + mlp.abs())
    assert torch.all(diff <= bound), f"layer {l}: reordered sum off by {diff.max():.3g}, beyond rounding"
    worst = max(worst, diff.max().item())
print(f"reordered sum resid_pre + (attn.out + mlp.out): max |diff| = {worst:.3g}, within float32 rounding")
print("OK: the residual stream decomposes exactly into splice's sites")
