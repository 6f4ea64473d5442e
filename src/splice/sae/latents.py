"""Reading and steering with SAE latents: `top_features` turns recorded latents into a table a
researcher can read, and `FeatureSteer` adds a latent's decoder direction to the residual stream.

Both work with any module `as_sae` accepts: a latent's direction is `W_dec[k]` when the SAE
keeps one, else `decode(e_k) - decode(0)` (the same vector for the affine decoders SAEs use).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..engine.autoencoders import as_sae, d_sae_of
from ..engine.interventions import Add
from ..errors import SpliceError

BY = ("cell", "token", "feature")


def feature_direction(sae: Any, feature: int) -> torch.Tensor:
    """Latent `feature`'s decoder direction: `W_dec[feature]` (`[d_in]`), or for a module without a
    `W_dec` of shape `[d_sae, d_in]`, `decode(e_k) - decode(0)`; detached, in the SAE's dtype.

    Raises:
        SpliceError: For a latent index out of range or not an int.

    Example:
        >>> from splice.sae import SAEConfig, SparseAutoencoder
        >>> sae = SparseAutoencoder(SAEConfig("standard", 4, 8))
        >>> feature_direction(sae, 3).shape
        torch.Size([4])
    """
    as_sae(sae)
    d_sae = d_sae_of(sae)
    if (
        not isinstance(feature, int)
        or isinstance(feature, bool)
        or feature < 0
        or (d_sae is not None and feature >= d_sae)
    ):
        raise SpliceError(
            f"feature must be a latent index in 0..{'?' if d_sae is None else d_sae - 1}; got {feature!r}"
        )
    W_dec = getattr(sae, "W_dec", None)
    if isinstance(W_dec, torch.Tensor) and W_dec.dim() == 2 and W_dec.shape[0] == d_sae:
        return W_dec[feature].detach().clone()
    if d_sae is None:
        raise SpliceError(
            f"{type(sae).__name__} says neither W_dec nor d_sae: its latent directions cannot be read"
        )
    param = next(iter(sae.parameters()), None)
    one = torch.zeros(
        2,
        d_sae,
        dtype=param.dtype if param is not None else None,
        device=param.device if param is not None else None,
    )
    one[0, feature] = 1
    with torch.no_grad():
        out = sae.decode(one)
    return (out[0] - out[1]).detach()


def FeatureSteer(sae: Any, feature: int | Sequence[int], scale: float = 1.0, **selection: Any) -> Add:  # noqa: N802 - reads as the intervention it builds
    """Steer with SAE latents: `Add(W_dec[k], scale=scale)` for the site the SAE reads (summed
    directions for a list of latents). Place it at that site, e.g. under `Model.generate` with
    `pos=slice(n_prompt, None)`; no SAE needs to be attached, and the result is an ordinary,
    serialisable `Add`. The same as `Add(scale, dims=k)` at `<site>.sae.acts` with the SAE attached
    (error term kept), without running the SAE.

    Args:
        sae: The SAE (any module `as_sae` accepts).
        feature: A latent index, or a list of them.
        scale: The coefficient (in units of the decoder row: SAELens' convention).
        **selection: `pos=`, `rows=`, ... as for any intervention.

    Raises:
        SpliceError: For a latent out of range or a bad selection.

    Example:
        >>> from splice.sae import SAEConfig, SparseAutoencoder
        >>> sae = SparseAutoencoder(SAEConfig("standard", 4, 8))
        >>> FeatureSteer(sae, 3, scale=8.0, pos=slice(5, None))
        Add(pos=slice(5, None, None), vector=<tensor float32 [4]>, scale=8.0)
    """
    features = [feature] if isinstance(feature, int) else list(feature)
    if not features:
        raise SpliceError("FeatureSteer needs at least one latent")
    direction = sum(feature_direction(sae, k) for k in features)
    assert isinstance(direction, torch.Tensor)
    return Add(direction, scale=scale, **selection)


def top_features(acts: torch.Tensor, k: int = 10, *, tokens: Sequence[str] | None = None, by: str = "cell"):
    """The most active latents of recorded `.sae.acts`, as a pandas table.

    Args:
        acts: Latents `[batch, pos, d_sae]` or `[pos, d_sae]` (as `Recording` returns them).
        k: How many rows (per token with `by="token"`).
        tokens: The prompt's tokens (`Model.to_str_tokens`), for a `token` column; one row's
            worth is used for every row.
        by: `"cell"`: the k largest (row, pos, feature) activations; `"token"`: the k largest
            at each position; `"feature"`: the k latents with the largest activation anywhere,
            with where it is and how many tokens each fires on.

    Returns:
        A DataFrame, largest first: `row, pos, token, feature, activation` (`by="feature"` adds
        `active_tokens`); zero activations are left out.

    Raises:
        SpliceError: For a tensor that is not 2-D or 3-D, k < 1, an unknown `by`, or tokens of
            the wrong length.

    Example:
        >>> import torch
        >>> acts = torch.zeros(1, 3, 5); acts[0, 2, 4] = 2.0; acts[0, 0, 1] = 1.0
        >>> top_features(acts, 5, tokens=["a", "b", "c"])
           row  pos token  feature  activation
        0    0    2     c        4         2.0
        1    0    0     a        1         1.0
    """
    import pandas as pd

    if not isinstance(acts, torch.Tensor) or acts.dim() not in (2, 3):
        raise SpliceError(
            f"top_features takes latents [batch, pos, d_sae] or [pos, d_sae]; got {getattr(acts, 'shape', type(acts))}"
        )
    if not isinstance(k, int) or k < 1:
        raise SpliceError(f"k must be a positive int; got {k!r}")
    if by not in BY:
        raise SpliceError(f"by= takes {BY}; got {by!r}")
    values = (acts[None] if acts.dim() == 2 else acts).detach().float().cpu()
    n, seq, d_sae = values.shape
    if tokens is not None and len(tokens) != seq:
        raise SpliceError(f"tokens has {len(tokens)} entries; the latents have {seq} positions")

    def token(p: int) -> str | None:
        return None if tokens is None else tokens[p]

    rows: list[tuple] = []
    if by == "cell":
        top = torch.topk(values.flatten(), min(k, values.numel()))
        for value, index in zip(top.values.tolist(), top.indices.tolist()):
            r, rest = divmod(index, seq * d_sae)
            p, f = divmod(rest, d_sae)
            rows.append((r, p, token(p), f, value))
    elif by == "token":
        top = torch.topk(values, min(k, d_sae), dim=-1)
        for r in range(n):
            for p in range(seq):
                rows += [
                    (r, p, token(p), f, v)
                    for v, f in zip(top.values[r, p].tolist(), top.indices[r, p].tolist())
                ]
    else:
        peak, where = values.flatten(0, 1).max(0)
        active = (values > 0).flatten(0, 1).sum(0)
        top = torch.topk(peak, min(k, d_sae))
        for value, f in zip(top.values.tolist(), top.indices.tolist()):
            r, p = divmod(int(where[f]), seq)
            rows.append((r, p, token(p), f, value, int(active[f])))
    columns = ["row", "pos", "token", "feature", "activation"] + (
        ["active_tokens"] if by == "feature" else []
    )
    table = pd.DataFrame(rows, columns=columns)
    table = table[table.activation > 0].reset_index(drop=True)
    return table if tokens is not None else table.drop(columns="token")
