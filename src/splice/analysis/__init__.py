"""Residual-stream analysis: what each part of the model writes into the residual stream, and
what that does to the logits.

- `decompose(m, inputs, upto="final", by="layers" | "heads")`: the residual stream at a site as
  labelled components (embedding, each layer's attention or each head, each MLP) that sum to it,
  in every family's layout (`Decomposition`).
- `accumulated(m, inputs, ...)`: the running sums of those components at each residual site
  (`Accumulated`; TransformerLens' `accumulated_resid`).
- `logit_attribution(m, data, direction=("correct", "wrong"), by=..., norm="frozen" |
  "recomputed")`: each component's direct contribution to a logit difference through the final
  norm, as a tidy table; `pivot` lays it out as layer x head.

Modules: `components` (what is recorded and how it becomes components), `decomposition` (the
results), `norms` (a norm applied with frozen statistics), `directions` (what is read out),
`attribution` (direct logit attribution).
"""

from .attribution import logit_attribution, pivot
from .decomposition import Accumulated, Decomposition, accumulated, decompose

__all__ = ["Accumulated", "Decomposition", "accumulated", "decompose", "logit_attribution", "pivot"]
