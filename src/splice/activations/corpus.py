"""The corpus side of `cache_activations`: documents in, one list of token ids per document out.

A corpus may be larger than memory, so documents are read lazily, one at a time, and each is
checked as it is reached (its index in the corpus names it in errors). Text is tokenized under
splice's BOS rule (`splice.tokens`: never a double BOS); token ids are used as given. Every
document is then cut to at most `max_tokens` tokens: rows of one forward must fit the model's
context, and a cap keeps one batch's memory bounded.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import torch

from ..engine import tokens as tok
from ..errors import SpliceError

FORMS = (
    "a list (or any iterable) of documents, each a string, a mapping with a 'text' (string) or "
    "'input_ids' (token ids) field such as a Hugging Face dataset's rows, or token ids (a list of "
    "ints or a 1-D integer tensor)"
)
"""What a corpus may hold, for messages."""


class Document(NamedTuple):
    """One document, tokenized and capped.

    Attributes:
        ids: Its token ids, at most `max_tokens` of them.
        length: How many tokens it had before the cap (`length > len(ids)`: it was truncated).
    """

    ids: list[int]
    length: int


def context_length(hf_model: Any) -> int | None:
    """The most positions the model takes (`config.max_position_embeddings`), or None when its
    config states no limit (Bloom's ALiBi, for one).

    Example:
        >>> import transformers
        >>> config = transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=32, vocab_size=16)
        >>> context_length(transformers.GPT2LMHeadModel(config))
        32
    """
    value = getattr(getattr(hf_model, "config", None), "max_position_embeddings", None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def documents(
    corpus: Any, tokenizer: Any, vocab: int, prepend_bos: bool | None, max_tokens: int | None
) -> Iterator[Document]:
    """The corpus's documents, tokenized lazily, in corpus order.

    Args:
        corpus: See `FORMS`; read once, front to back.
        tokenizer: For text documents (None is fine for a corpus of token ids).
        vocab: The model's vocabulary size: token ids must lie in `0..vocab-1`.
        prepend_bos: The BOS rule for text (see `splice.tokens`); token ids are used as given,
            so anything but None is refused for them.
        max_tokens: Keep at most this many tokens of each document (the first ones); None keeps all.

    Raises:
        SpliceError: When the corpus is not iterable or is a single string or mapping, or when a
            document (named by its index) is of no accepted form or holds invalid ids.

    Example:
        >>> [d.ids for d in documents([[5, 6, 7], {"input_ids": [8]}], None, 16, None, max_tokens=2)]
        [[5, 6], [8]]
        >>> next(documents("one string", None, 16, None, None))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: the corpus is one string: expected a list (or any iterable) of documents, ...
    """
    if isinstance(corpus, (str, bytes)):
        raise SpliceError(f"the corpus is one string: expected {FORMS}; wrap a single text as [text]")
    if isinstance(corpus, Mapping):
        raise SpliceError(
            f"the corpus is a mapping (keys {sorted(map(str, corpus))[:5]}): expected {FORMS}; "
            "for a dataset with splits pass one split, e.g. dataset['train']"
        )
    if isinstance(corpus, torch.Tensor) and corpus.dim() != 2:
        raise SpliceError(
            f"a tensor corpus holds one document per row ([documents, tokens]); got shape {list(corpus.shape)}"
        )
    if not isinstance(corpus, Iterable):
        raise SpliceError(f"expected {FORMS}; got {type(corpus).__name__}")
    for number, item in enumerate(corpus):
        ids = _ids(number, item, tokenizer, vocab, prepend_bos)
        yield Document(ids if max_tokens is None else ids[:max_tokens], len(ids))


def _ids(number: int, item: Any, tokenizer: Any, vocab: int, prepend_bos: bool | None) -> list[int]:
    where = f"document {number}"
    if isinstance(item, Mapping):
        if "text" in item:
            item = item["text"]
            where += "['text']"
            if not isinstance(item, str):
                raise SpliceError(f"{where} is {type(item).__name__}; expected a string")
        elif "input_ids" in item:
            item = item["input_ids"]
            where += "['input_ids']"
        else:
            raise SpliceError(
                f"{where} is a mapping with keys {sorted(map(str, item))[:8]}; expected a 'text' or "
                "'input_ids' field"
            )
    if isinstance(item, str):
        if tokenizer is None:
            raise SpliceError(
                f"{where} is text, but the model has no tokenizer: pass one to splice.Model(model, "
                "tokenizer), or give token ids"
            )
        return tok.token_ids(tokenizer, item, prepend_bos)
    if prepend_bos is not None:
        raise SpliceError(
            f"prepend_bos={prepend_bos} applies to text; {where} is token ids, used as given: add or "
            "remove the BOS id yourself, or pass the text"
        )
    return _checked_ids(where, item, vocab)


def _checked_ids(where: str, item: Any, vocab: int) -> list[int]:
    if hasattr(item, "__array__") and not isinstance(item, torch.Tensor):  # a numpy array
        item = torch.as_tensor(item)
    if isinstance(item, torch.Tensor):
        if item.dim() == 2 and item.shape[0] == 1:  # a tokenizer's [1, pos] output
            item = item[0]
        if item.dim() != 1 or item.is_floating_point() or item.is_complex() or item.dtype == torch.bool:
            raise SpliceError(
                f"{where} is a {item.dtype} tensor of shape {list(item.shape)}; expected a 1-D integer tensor of token ids"
            )
        ids = item.tolist()
    elif isinstance(item, Sequence) and not isinstance(item, (str, bytes)):
        try:
            ids = [operator.index(i) for i in item]
        except TypeError:
            bad = next(i for i in item if not hasattr(i, "__index__"))
            raise SpliceError(f"{where} holds {bad!r}; expected integer token ids") from None
    else:
        raise SpliceError(f"{where} is {type(item).__name__}; expected {FORMS}")
    bad_ids = [i for i in ids if not 0 <= i < vocab]
    if bad_ids:
        raise SpliceError(
            f"{where} holds token id {bad_ids[0]}; expected ids in 0..{vocab - 1} (the vocabulary)"
        )
    return ids


def digest(docs: Iterable[Sequence[int]]) -> str:
    """sha256 of documents' token ids (each document's length, then its ids, as int64): the
    fingerprint a shard keeps of the documents it holds, so a resumed run can tell the same corpus.

    Example:
        >>> digest([[1, 2], [3]]) == digest([[1, 2], [3]]) != digest([[1], [2, 3]])
        True
    """
    hasher = hashlib.sha256()
    for ids in docs:
        hasher.update(torch.tensor([len(ids), *ids], dtype=torch.int64).numpy().tobytes())
    return hasher.hexdigest()
