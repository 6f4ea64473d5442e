"""Token geometry: how the activations of a prompt's tokens relate to each other at one site.

`token_correlation` is the token x token Pearson correlation over a site's units (each token's
activation vector is one variable's sample over the units); `splice.plot.heatmap` draws it and
`splice.plot.token_scatter` shows one pair, unit by unit.

    _, cache = m.run(prompt, record="blocks.10.resid_post")
    corr = token_correlation(cache, "blocks.10.resid_post", labels=m.to_str_tokens(prompt))
    splice.plot.heatmap(corr, "out/corr.png", xlabel="token", ylabel="token", center=0.0)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .engine.sites import LAYER_POINTS, POINT_AXES, SiteKey, canonical_name
from .errors import SpliceError, valid_range

if TYPE_CHECKING:
    import pandas as pd


def position_labels(tokens: Sequence[Any]) -> list[str]:
    """Axis labels for a prompt's positions: the position and the token's repr (so that leading
    spaces show), e.g. `["0 'The'", "1 ' cat'"]`.

    Example:
        >>> position_labels(["The", " cat"])
        ["0 'The'", "1 ' cat'"]
    """
    return [f"{i} {str(t)!r}" for i, t in enumerate(tokens)]


def _point(name: str) -> str | None:
    """The point of a canonical site name (`blocks.3.attn.z` -> `attn.z`), None if unknown."""
    if name in POINT_AXES:
        return name
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blocks" and parts[2] in LAYER_POINTS:
        return parts[2]
    return None


def site_tokens(recording: Mapping[Any, Any], site: SiteKey, batch_index: int = 0) -> torch.Tensor:
    """One prompt's activations at a `[batch, pos, ...]` site as `[pos, units]` (the trailing
    axes flattened: `attn.z`'s heads x d_head are one axis of units), a float64 copy.

    Args:
        recording: A `Recording` in overwrite mode (or a `{site: tensor}` dict).
        site: The site (a name, alias or `("z", 3)` tuple; not a glob).
        batch_index: Which prompt of the batch (negative counts from the end).

    Raises:
        SpliceError: An accumulate-mode entry list, a site whose axes are not `[batch, pos, ...]`
            (attention scores and patterns are `[batch, head, pos, k_pos]`), a site not recorded,
            or a batch index out of range.

    Example:
        >>> acts = {"blocks.0.resid_post": torch.arange(12.0).reshape(1, 3, 4)}
        >>> site_tokens(acts, "blocks.0.resid_post").shape
        torch.Size([3, 4])
    """
    name = canonical_name(site)
    point = _point(name)
    if point is not None and POINT_AXES[point][:2] != ("batch", "pos"):
        raise SpliceError(
            f"{name} has axes [{', '.join(POINT_AXES[point])}]: token geometry needs a [batch, pos, ...] site "
            "(e.g. blocks.L.resid_post, blocks.L.mlp.post, blocks.L.attn.z)"
        )
    if not isinstance(recording, Mapping):
        raise SpliceError(
            f"recording must be a splice Recording or a {{site: tensor}} mapping; got {type(recording).__name__}"
        )
    try:
        value = recording[name] if name in recording else recording[site]
    except (KeyError, TypeError):
        raise SpliceError(f"{name} is not in the recording; it holds {list(recording)[:8]}") from None
    if isinstance(value, list):
        raise SpliceError(
            f"{name} was recorded in accumulate mode ({len(value)} entries): record it in overwrite mode, "
            "or pass {site: recording.cat(site)} to treat the forwards as one batch"
        )
    if not isinstance(value, torch.Tensor) or value.dim() < 3:
        shape = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise SpliceError(f"{name}: expected a [batch, pos, ...] tensor; got {shape}")
    n = value.shape[0]
    if isinstance(batch_index, bool) or not isinstance(batch_index, int) or not -n <= batch_index < n:
        raise SpliceError(
            f"batch_index {batch_index!r} is out of range: the batch has {n} rows ({valid_range(n)})"
        )
    return value[batch_index].detach().reshape(value.shape[1], -1).to("cpu", torch.float64)


def correlation(x: torch.Tensor) -> torch.Tensor:
    """Pearson correlation between the rows of `x [n, units]`, in float64 (`[n, n]`, clipped to
    [-1, 1]; NaN for a row with zero variance), as `numpy.corrcoef(x)`.

    Example:
        >>> correlation(torch.tensor([[1.0, 2.0, 3.0], [2.0, 4.0, 6.5], [3.0, 2.0, 1.0]])).round(decimals=3)
        tensor([[ 1.0000,  0.9980, -1.0000],
                [ 0.9980,  1.0000, -0.9980],
                [-1.0000, -0.9980,  1.0000]], dtype=torch.float64)
    """
    x = x.to(torch.float64)
    centred = x - x.mean(dim=1, keepdim=True)
    norms = centred.norm(dim=1)
    return ((centred @ centred.T) / (norms[:, None] * norms[None, :])).clamp(-1.0, 1.0)


def token_correlation(
    recording: Mapping[Any, Any],
    site: SiteKey,
    batch_index: int = 0,
    labels: Sequence[Any] | None = None,
) -> pd.DataFrame:
    """Token x token Pearson correlation of one prompt's activations over a site's units.

    Each position's activation (`[d_model]` for residual sites, heads x d_head flattened for
    `attn.z`) is correlated with every other position's: entry (i, j) is the correlation, across
    units, of token i's vector with token j's.

    Args:
        recording: A `Recording` in overwrite mode (e.g. from `m.run(prompt, record=site)`) or a
            `{site: tensor}` mapping.
        site: A `[batch, pos, ...]` site (a name, alias or tuple).
        batch_index: Which prompt of the batch.
        labels: One label per position (e.g. `m.to_str_tokens(prompt)`): rows and columns are
            then named by `position_labels` (`"3 ' France'"`); without them, by position.

    Returns:
        A `[pos x pos]` DataFrame of float64 correlations (symmetric, ones on the diagonal).

    Example:
        >>> import splice, torch, transformers
        >>> _ = torch.manual_seed(0)
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> _, cache = m.run(torch.tensor([[1, 2, 3]]), record="blocks.1.resid_post")
        >>> corr = token_correlation(cache, "blocks.1.resid_post", labels=["a", "b", "c"])
        >>> list(corr.index), corr.shape
        (["0 'a'", "1 'b'", "2 'c'"], (3, 3))
    """
    import pandas as pd

    acts = site_tokens(recording, site, batch_index)
    n = acts.shape[0]
    if labels is not None:
        labels = list(labels)
        if len(labels) != n:
            raise SpliceError(
                f"labels has {len(labels)} entries for {n} positions: give one label per position"
            )
        names: list[Any] = position_labels(labels)
    else:
        names = list(range(n))
    index = pd.Index(names, name="token")
    return pd.DataFrame(correlation(acts).numpy(), index=index, columns=pd.Index(names, name="token"))
