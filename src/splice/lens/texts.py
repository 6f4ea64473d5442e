"""Text for fitting and evaluating a lens, cut into token windows `[n, seq_len]` (`text_windows`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..engine import tokens as tok
from ..errors import SpliceError
from .checks import check_int

if TYPE_CHECKING:
    from ..engine.model import Model


def check_texts(texts: Any) -> list[str]:
    """`texts` as a list of non-empty strings (one string is a list of one); else a SpliceError."""
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) and t for t in texts):
        return list(texts)
    raise SpliceError(f"texts must be a non-empty list of non-empty strings; got {str(texts)[:80]!r}")


def text_windows(m: Model, texts: str | Sequence[str], seq_len: int) -> torch.Tensor:
    """Cut texts into token windows `[n, seq_len]`: each text is tokenized (the tokenizer's own
    BOS rule) and split into consecutive, non-overlapping windows; a text's shorter tail is
    dropped. Used by `fit_tuned_lens` and `kl_by_layer`.

    Raises:
        SpliceError: No tokenizer, bad texts, or texts too short for even one window.

    Example:
        >>> import splice, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0)
        >>> class Chars:  # a stand-in tokenizer: one token per character
        ...     bos_token_id = None
        ...     def __call__(self, text, add_special_tokens=True):
        ...         return {"input_ids": [ord(c) for c in text]}
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval(), Chars())
        >>> text_windows(m, ["abcdefg", "hijk"], seq_len=3).tolist()
        [[97, 98, 99], [100, 101, 102], [104, 105, 106]]
    """
    texts = check_texts(texts)
    check_int(seq_len, "seq_len", 1)
    if m.tokenizer is None:
        raise SpliceError(
            "texts need a tokenizer: pass one to splice.Model(model, tokenizer) or use splice.load()"
        )
    rows: list[list[int]] = []
    for text in texts:
        ids = tok.token_ids(m.tokenizer, text)
        rows.extend(ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len))
    if not rows:
        longest = max(len(tok.token_ids(m.tokenizer, t)) for t in texts)
        raise SpliceError(
            f"no text has seq_len={seq_len} tokens (the longest has {longest}): pass longer texts or a smaller seq_len"
        )
    return torch.tensor(rows, dtype=torch.long)
