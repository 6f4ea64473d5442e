"""A contrastive steering vector and a coefficient sweep on the embedded SmolLM2-135M.

1. `contrastive` records `blocks.8.resid_post` over prompts about weddings and love and over
   prompts about anger, and takes the difference of their mean activations (every token but the
   first: SmolLM2's first-token residual is an attention sink ~100x larger than the rest).
2. `coefficient_sweep` completes a neutral prompt greedily with `Add(vector, scale=c)` on the
   generated positions only, for several coefficients c, and tabulates the text and how far the
   steering moved the model's log-probabilities.
3. The vector is saved with its provenance to out/love_vs_anger.{safetensors,json}, reloaded, and
   the script asserts that steering visibly changes the text.
"""

import sys
import time
from pathlib import Path

import pandas as pd

import splice
from splice.steering import SteeringVector, coefficient_sweep, contrastive

SITE = "blocks.8.resid_post"
COEFFICIENTS = [-4.0, 0.0, 2.0, 4.0, 6.0]
PROMPT, NEW_TOKENS = "I went to the store and", 16
OUT = Path(sys.argv[1] if len(sys.argv) > 1 else "out")

love = [
    "I love weddings, the flowers and the happy couple.",
    "We celebrated our wedding with family, full of joy and love.",
    "The bride smiled at her groom as they exchanged rings.",
    "Love, kindness and romance filled the room.",
]
anger = [
    "I hate you and I am furious with everything.",
    "He screamed in anger and smashed the door.",
    "She was full of rage, bitterness and hatred.",
    "Anger, hate and violence filled the room.",
]

start = time.perf_counter()
m = splice.load()
print(f"model: {splice.loading.EMBEDDED_NAME}")  # numbers differ from the bf16 release
sv = contrastive(m, love, anger, SITE, positions=slice(1, None))
print(sv)

table = coefficient_sweep(m, sv, PROMPT, COEFFICIENTS, max_new_tokens=NEW_TOKENS)
with pd.option_context(
    "display.width", 200, "display.max_colwidth", 90, "display.float_format", "{:.3f}".format
):
    print(f"\ngreedy completions of {PROMPT!r}, steered at {SITE} on generated tokens only:")
    print(table.to_string(index=False))

OUT.mkdir(parents=True, exist_ok=True)
tensors, meta = sv.save(OUT / "love_vs_anger")
table.to_csv(OUT / "steering_sweep.csv", index=False)
assert SteeringVector.load(OUT / "love_vs_anger") == sv
print(f"\nsaved {tensors} and {meta} (provenance: site, positions, prompt hashes, model, config fingerprint)")

unsteered = table.loc[table.coefficient == 0, "text"].item()
assert not table.loc[table.coefficient == 0, "changed"].item(), (
    "coefficient 0 must reproduce the unsteered text"
)
assert table.changed.any(), f"no coefficient changed the completion {unsteered!r}"
assert (table.loc[table.coefficient > 0, "logprob_shift"] > 0).all(), (
    "steering should favour what it made the model write"
)
print(
    f"OK: the love - anger vector changes the completion at coefficient(s) "
    f"{table.loc[table.changed, 'coefficient'].tolist()} ({time.perf_counter() - start:.1f} s)"
)
