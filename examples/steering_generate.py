"""Steer generation with a difference-of-means vector added to the residual stream.

1. Record `blocks.12.resid_post` for a few prompts about weddings and love and a few about anger
   and hate; the steering vector is the difference of their mean activations.
2. Generate greedily from a neutral prompt, without and with `Add(vector, scale=COEF)` at
   `blocks.12.resid_post`, on generated positions only: `pos=slice(n_prompt, None)` uses
   absolute token positions, which splice keeps counting during cached generation.
   (The first new token is predicted at the prompt's last position, so it is never steered.)
3. Assert the steered text differs, and that the prompt's activations were not touched.
"""

import torch

import splice

LAYER, COEF, NEW_TOKENS = 12, 3.0, 24
SITE = f"blocks.{LAYER}.resid_post"
love = [
    "I love weddings, the flowers and the happy couple.",
    "We celebrated our wedding with family, full of joy and love.",
    "The bride smiled at her groom as they exchanged rings.",
    "Love, kindness and romance filled the room.",
]
hate = [
    "I hate you and I am furious with everything.",
    "He screamed in anger and smashed the door.",
    "She was full of rage, bitterness and hatred.",
    "Anger, hate and violence filled the room.",
]

m = splice.load()
print(f"model: {splice.loading.EMBEDDED_NAME}")  # numbers differ from the bf16 release


def mean_activation(prompts):
    """Mean of resid_post over prompts and positions. Position 0 is skipped: in this model the
    first token's residual is huge (an attention sink, norm ~2e4 against ~150 elsewhere) and
    would swamp the difference."""
    with torch.no_grad(), m.record(SITE, mode="accumulate") as rec:
        for prompt in prompts:
            m(prompt)
    return torch.stack([act[0, 1:].mean(0) for act in rec[SITE]]).mean(0)


vector = mean_activation(love) - mean_activation(hate)
print(f"steering vector at {SITE}: norm {vector.norm():.1f}, coefficient {COEF}")

prompt = "I went to the store and"
n_prompt = m.to_tokens(prompt).shape[1]
steer = {SITE: splice.Add(vector, scale=COEF, pos=slice(n_prompt, None))}

unsteered = m.generate(prompt, max_new_tokens=NEW_TOKENS)
with m.record(SITE, mode="accumulate") as rec:  # one entry per forward: the prompt, then each new token
    steered = m.generate(prompt, edits=steer, max_new_tokens=NEW_TOKENS)
anti = m.generate(
    prompt,
    edits={SITE: splice.Add(vector, scale=-COEF, pos=slice(n_prompt, None))},
    max_new_tokens=NEW_TOKENS,
)

print(f"prompt:           {prompt!r}")
print(f"unsteered:        {unsteered!r}")
print(f"steered (+love):  {steered!r}")
print(f"steered (-love):  {anti!r}")
assert steered != unsteered, "the steering vector should change the greedy completion"

# The edit selects generated positions only: the prompt forward (entry 0) matches a clean run bit
# for bit, and later entries cover positions n_prompt, n_prompt + 1, ... one at a time.
with torch.no_grad(), m.record(SITE) as clean:
    m(prompt)
torch.testing.assert_close(rec[SITE][0], clean[SITE], rtol=0, atol=0)
assert rec[SITE][0].shape[1] == n_prompt and all(entry.shape[1] == 1 for entry in rec[SITE][1:])
print(f"prompt activations untouched; {len(rec[SITE]) - 1} generated positions steered")
print("OK: a steering vector at one layer changes generation")
