"""The logit lens (or a tuned lens) as a table: each site's top-k next tokens at every position of a
prompt (`logit_lens`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..engine import tokens as tok
from ..engine.sites import SiteKey
from .checks import check_int
from .readout import check_lens, read_logits, record_sites, site_groups
from .sites import DEFAULT_SITES, lens_sites

if TYPE_CHECKING:
    import pandas as pd

    from ..engine.model import Inputs, Model


def _decoder(m: Model) -> Callable[[int], str]:
    cache: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in cache:
            cache[token] = str(token) if m.tokenizer is None else m.tokenizer.decode([token])
        return cache[token]

    return decode


def logit_lens(
    m: Model,
    inputs: Inputs,
    sites: SiteKey | Sequence[SiteKey] = DEFAULT_SITES,
    edits: Any = None,
    top_k: int = 5,
    lens: Any = None,
) -> pd.DataFrame:
    """The logit lens (or a tuned lens) of a prompt: each site's top-k next tokens, as a table.

    Each site's activation goes through the model's own final norm and unembedding
    (`m.unembed(m.ln_final(h))`, after `lens` when one is given), so at `blocks.-1.resid_post`
    the table is the model's own prediction.

    Args:
        m: The model (text inputs need its tokenizer; without one, tokens are shown as ids).
        inputs: A string, a list of strings (left-padded), token ids or tokenizer output.
        sites: `[batch, pos, d_model]` sites, as a name, glob or list (default every layer's
            `resid_post`; `embed` and `blocks.*.resid_pre`/`resid_mid` work too).
        edits: Edits applied to the forward: the lens reads the edited residual stream (one
            forward with the edits and the recording).
        top_k: Tokens listed per (site, position), at least 1.
        lens: None (the logit lens), a `TunedLens` (`fit_tuned_lens`) or any function
            `(site, resid) -> resid` applied before the readout.

    Returns:
        A tidy DataFrame, one row per (site, batch row, position, rank): `site`, `layer` (NA for
        `embed`), `batch`, `pos` (counted from the row's first real token; padding is left out),
        `input_token` (the token at that position), `rank` (0 = top), `token`, `token_id`,
        `logit`, `prob` (softmax over the whole vocabulary).

    Raises:
        SpliceError: Before any forward, for a site that is not a residual-stream site, a bad
            `top_k`, a lens that lacks a site or was fitted on another model shape, or bad inputs.

    Example:
        >>> import splice, torch, transformers
        >>> _ = torch.manual_seed(0)
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> table = logit_lens(m, torch.tensor([[1, 2, 3]]), top_k=2)
        >>> list(table.columns)
        ['site', 'layer', 'batch', 'pos', 'input_token', 'rank', 'token', 'token_id', 'logit', 'prob']
        >>> len(table)  # 2 layers x 3 positions x 2 ranks
        12
    """
    import pandas as pd

    sites_ = lens_sites(m, sites)
    names = [s.name for s in sites_]
    vocab = m.dims.vocab
    check_int(top_k, "top_k", 1, vocab)
    fn = check_lens(m, lens, names)
    batch = tok.encode(m.tokenizer, inputs, m.device)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    _, rec = record_sites(m, batch, names, edits)
    decode = _decoder(m)
    columns: dict[str, list] = {c: [] for c in _TABLE_COLUMNS}
    layers = {s.name: s.layer for s in sites_}
    with torch.no_grad():
        for group in site_groups(names, ids.numel(), vocab):
            logits = read_logits(m, group, [rec[n] for n in group], fn).float()
            probs = logits.softmax(-1)
            top = logits.topk(top_k, dim=-1)
            top_p = probs.gather(-1, top.indices)
            _table_rows(
                columns, group, layers, top.values, top.indices, top_p, ids, real, mask is not None, decode
            )
    table = pd.DataFrame(columns)
    table["layer"] = table["layer"].astype("Int64")
    return table


_TABLE_COLUMNS = (
    "site",
    "layer",
    "batch",
    "pos",
    "input_token",
    "rank",
    "token",
    "token_id",
    "logit",
    "prob",
)


def _table_rows(
    columns: dict[str, list],
    group: list[str],
    layers: dict[str, int | None],
    values: torch.Tensor,
    indices: torch.Tensor,
    probs: torch.Tensor,
    ids: torch.Tensor,
    real: torch.Tensor,
    padded: bool,
    decode: Callable[[int], str],
) -> None:
    """Append the rows of one group of sites (`values`/`indices`/`probs`: `[site, batch, pos, k]`)
    to `columns`, skipping padding and counting positions from each row's first real token."""
    for g, name in enumerate(group):
        for b in range(ids.shape[0]):
            first = int((~real[b]).sum()) if padded else 0
            for p in range(first, ids.shape[1]):
                if not real[b, p]:
                    continue
                input_token = decode(int(ids[b, p]))
                for rank, (value, index, prob) in enumerate(
                    zip(values[g, b, p].tolist(), indices[g, b, p].tolist(), probs[g, b, p].tolist())
                ):
                    row = (
                        name,
                        layers[name],
                        b,
                        p - first,
                        input_token,
                        rank,
                        decode(index),
                        index,
                        value,
                        prob,
                    )
                    for column, item in zip(_TABLE_COLUMNS, row):
                        columns[column].append(item)
