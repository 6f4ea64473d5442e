"""The lens readout: record residual-stream sites in one forward, then read each through the lens
(if any), the model's final norm and its unembedding, many sites per unembedding call."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..engine import tokens as tok
from ..engine.sites import SiteKey
from ..errors import SpliceError
from .sites import DEFAULT_SITES, lens_sites
from .tuned import TunedLens

if TYPE_CHECKING:
    from ..engine.model import Inputs, Model

LensFn = Callable[[str, torch.Tensor], torch.Tensor]


def check_lens(m: Model, lens: Any, names: list[str]) -> LensFn | None:
    """`lens` as the function applied before the readout (None: the logit lens), checked for `names`."""
    if lens is None:
        return None
    if isinstance(lens, TunedLens):
        lens.check(m, names)
        return lens
    if not callable(lens):
        raise SpliceError(
            f"lens must be a splice.lens.TunedLens, a function (site, resid) -> resid, or None (the logit "
            f"lens); got {type(lens).__name__}"
        )
    return lens


_CHUNK = 1 << 25  # logits per unembedding call (128 MB in float32): sites are read in groups this big


def site_groups(names: list[str], rows: int, vocab: int) -> Iterator[list[str]]:
    """`names` in consecutive groups whose lens logits (`rows` per site) fit in `_CHUNK`: one
    unembedding call per group reads the (large) unembedding matrix once for many sites."""
    size = max(1, _CHUNK // max(1, rows * vocab))
    for start in range(0, len(names), size):
        yield names[start : start + size]


def read_logits(m: Model, names: list[str], resids: list[torch.Tensor], lens: LensFn | None) -> torch.Tensor:
    """Lens logits `[site, ..., vocab]` of recorded residuals `resids` at sites `names` (one
    shape): the lens' translation if any, then the model's final norm and unembedding."""
    if lens is not None:
        resids = [lens(name, resid) for name, resid in zip(names, resids)]
    return m.unembed(m.ln_final(torch.stack(resids)))


def record_sites(
    m: Model, batch: dict, names: list[str], edits: Any, need_logits: bool = False
) -> tuple[torch.Tensor | None, Any]:
    """One forward recording `names` under `edits`; without edits it stops after the last site."""
    stop = not edits and not need_logits
    with torch.no_grad():
        logits, rec = m.run(batch, edits=edits, record=names, stop_after_record=stop)
    return logits, rec


def lens_logits(
    m: Model,
    inputs: Inputs,
    sites: SiteKey | Sequence[SiteKey] = DEFAULT_SITES,
    edits: Any = None,
    lens: Any = None,
) -> tuple[torch.Tensor, list[str]]:
    """The lens logits of every site, stacked: what `logit_lens` tabulates, as one tensor.

    Args:
        m: The model.
        inputs: A string, a list of strings (left-padded), token ids or tokenizer output.
        sites: `[batch, pos, d_model]` sites (a name, glob or list; default every layer's
            `resid_post`); `final_norm` and head or MLP-width sites are refused.
        edits: Edits applied to the forward (`Edits`, a dict or None): the lens then reads the
            edited stream (one forward, edits and recording together).
        lens: None (the logit lens), a `TunedLens`, or a function `(site, resid) -> resid`.

    Returns:
        `(logits [site, batch, pos, vocab], site names)`, in the model's dtype. At
        `blocks.-1.resid_post` the logit lens is the model's own output.

    Example:
        >>> import splice, torch, transformers
        >>> _ = torch.manual_seed(0)
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> logits, names = lens_logits(m, ids)
        >>> logits.shape, names
        (torch.Size([2, 1, 3, 32]), ['blocks.0.resid_post', 'blocks.1.resid_post'])
        >>> torch.allclose(logits[-1], m(ids), atol=1e-6)  # the last layer's lens is the output
        True
    """
    sites_ = lens_sites(m, sites)
    names = [s.name for s in sites_]
    fn = check_lens(m, lens, names)
    batch = tok.encode(m.tokenizer, inputs, m.device)
    _, rec = record_sites(m, batch, names, edits)
    rows = batch["input_ids"].numel()
    with torch.no_grad():
        parts = [
            read_logits(m, group, [rec[n] for n in group], fn)
            for group in site_groups(names, rows, m.dims.vocab)
        ]
    return torch.cat(parts), names
