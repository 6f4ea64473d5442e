"""How far a lens is from the model's final prediction: mean KL(final || lens) per site over texts
(`kl_by_layer`), and the KL that fitting a tuned lens minimises."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..engine.sites import SiteKey
from .checks import check_int
from .readout import check_lens, read_logits, record_sites, site_groups
from .sites import DEFAULT_SITES, lens_sites
from .texts import text_windows
from .tuned import TunedLens

if TYPE_CHECKING:
    import pandas as pd

    from ..engine.model import Model


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-probabilities over the vocabulary (last axis), in float32."""
    return logits.float().log_softmax(-1)


def kl_divergence(target_logp: torch.Tensor, lens_logp: torch.Tensor) -> torch.Tensor:
    """KL(target || lens) per row, in nats, from log-probabilities `[..., vocab]`."""
    return (target_logp.exp() * (target_logp - lens_logp)).sum(-1)


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(windows), batch_size):
        yield windows[start : start + batch_size]


def kl_by_layer(
    m: Model,
    texts: str | Sequence[str],
    lens: Any = None,
    sites: SiteKey | Sequence[SiteKey] | None = None,
    seq_len: int = 64,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> pd.DataFrame:
    """Mean KL(final distribution || lens distribution) per site over `texts`: how far each layer's
    lens is from what the model finally predicts (0 at the last layer for the logit lens).

    Args:
        m: The model, with a tokenizer.
        texts: Evaluation text (cut into windows by `text_windows`); use text the lens was not
            fitted on for a held-out comparison.
        lens: None (the logit lens), a `TunedLens`, or a function `(site, resid) -> resid`.
        sites: Sites to measure; default the tuned lens' own sites, or every layer's `resid_post`.
        seq_len: Tokens per window.
        batch_size: Windows per forward.
        max_tokens: Use at most this many tokens: windows evenly spaced over all of them
            (None: every window).

    Returns:
        A DataFrame, one row per site: `site`, `layer`, `lens` ("logit", "tuned" or "custom"),
        `kl` (mean nats per token), `n_tokens`.

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0)
        >>> class Chars:  # a stand-in tokenizer: one token per character
        ...     bos_token_id = None
        ...     def __call__(self, text, add_special_tokens=True):
        ...         return {"input_ids": [ord(c) % 128 for c in text]}
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval(), Chars())
        >>> table = kl_by_layer(m, ["held-out text, long enough for two windows"], seq_len=16)
        >>> table[["site", "lens", "n_tokens"]].values.tolist()
        [['blocks.0.resid_post', 'logit', 32], ['blocks.1.resid_post', 'logit', 32]]
        >>> float(table["kl"].iloc[-1]) < 1e-6  # the last layer's logit lens is the output
        True
    """
    import pandas as pd

    if sites is None:
        sites = lens.sites if isinstance(lens, TunedLens) else DEFAULT_SITES
    sites_ = lens_sites(m, sites)
    names = [s.name for s in sites_]
    fn = check_lens(m, lens, names)
    check_int(batch_size, "batch_size", 1)
    if max_tokens is not None:
        check_int(max_tokens, "max_tokens", 1)
    windows = text_windows(m, texts, seq_len)
    if max_tokens is not None and max_tokens < windows.numel():
        keep = max(1, max_tokens // seq_len)  # evenly spaced, so every text is represented
        windows = windows[torch.linspace(0, len(windows) - 1, keep).round().long()]
    totals = dict.fromkeys(names, 0.0)
    n_tokens = 0
    with torch.no_grad():
        for rows in _batches(windows, batch_size):
            logits, rec = record_sites(m, {"input_ids": rows.to(m.device)}, names, None, need_logits=True)
            assert logits is not None
            target = log_probs(logits)
            for group in site_groups(names, rows.numel(), m.dims.vocab):
                kl = kl_divergence(target, log_probs(read_logits(m, group, [rec[n] for n in group], fn)))
                for name, total in zip(group, kl.double().flatten(1).sum(1).tolist()):
                    totals[name] += total
            n_tokens += rows.numel()
    kind = "logit" if lens is None else "tuned" if isinstance(lens, TunedLens) else "custom"
    return pd.DataFrame(
        {
            "site": names,
            "layer": pd.array([s.layer for s in sites_], dtype="Int64"),
            "lens": kind,
            "kl": [totals[n] / n_tokens for n in names],
            "n_tokens": n_tokens,
        }
    )
