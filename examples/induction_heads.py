"""Find induction heads in the embedded SmolLM2-135M.

Feed sequences of random tokens repeated twice. An induction head, at a token in the second copy,
attends to the token right after that token's first occurrence. Score each head by the mean
attention it puts there, rank the heads, draw a layer x head heatmap, and check the finding
causally: ablating the top heads hurts next-token loss on the repeated half far more than ablating
as many random heads.
"""

import sys
from pathlib import Path

import torch

import splice
from splice.plot import heatmap

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
torch.manual_seed(0)
model = splice.load()
print(f"model: {splice.loading.EMBEDDED_NAME}")  # numbers differ from the bf16 release
d = model.dims
BATCH, HALF = 8, 24

tokens = torch.randint(1000, 10000, (BATCH, HALF))
ids = torch.cat([tokens, tokens], dim=1)  # [batch, 2 * HALF]

with torch.no_grad():
    logits, rec = model.run(ids, record="blocks.*.attn.pattern")

# Query at position HALF + i looks for key position i + 1 (the token after the earlier copy).
queries = torch.arange(HALF, 2 * HALF - 1)
scores = torch.stack(
    [
        rec[f"blocks.{layer}.attn.pattern"][:, :, queries, queries - HALF + 1].mean(dim=(0, 2))
        for layer in range(d.n_layers)
    ]
)  # [layer, head]

top = scores.flatten().topk(10)
ranked = [(int(i) // d.n_heads, int(i) % d.n_heads, float(v)) for v, i in zip(top.values, top.indices)]
print("Top induction heads (layer.head: score)")
for layer, head, value in ranked:
    print(f"  {layer:2d}.{head}: {value:.3f}")
path = heatmap(
    scores,
    OUT / "induction_heads.png",
    title="Induction score (SmolLM2-135M)",
    center=None,
    cmap="viridis",
    colorbar="mean attention to the token after the previous occurrence",
    annotate_top=5,
)
print(f"heatmap: {path}")


def repeated_half_loss(edits=None):
    with torch.no_grad():
        out, _ = model.run(ids, edits=edits)
    logprobs = out[:, HALF:-1].log_softmax(-1)
    return float(-logprobs.gather(-1, ids[:, HALF + 1 :, None]).mean())


def ablate(heads):
    edits = splice.Edits()
    for layer, head in heads:
        key = f"blocks.{layer}.attn.z"
        previous = edits.get(key)
        edits[key] = splice.Zero(heads=sorted({head} | set(previous.heads if previous else ())))
    return edits


clean = repeated_half_loss()
top_heads = [(layer, head) for layer, head, _ in ranked[:5]]
generator = torch.Generator().manual_seed(1)
random_heads = [
    (int(l), int(h))
    for l, h in zip(
        torch.randint(0, d.n_layers, (5,), generator=generator),
        torch.randint(0, d.n_heads, (5,), generator=generator),
    )
]
top_loss, random_loss = repeated_half_loss(ablate(top_heads)), repeated_half_loss(ablate(random_heads))
print(
    f"loss on the repeated half: clean {clean:.3f}, top-5 induction heads ablated {top_loss:.3f}, "
    f"5 random heads ablated {random_loss:.3f}"
)

assert ranked[0][2] > 0.3, "expected at least one strong induction head"
assert top_loss - clean > 2 * max(random_loss - clean, 0.01), (
    "ablating induction heads should hurt in-context copying most"
)
