"""Text <-> tokens helpers in the shape TransformerLens users expect, on a plain HF tokenizer.

Batches of strings are padded on the left, so position -1 is every row's last real token, and
get explicit `position_ids` counting from each row's first real token (the convention splice
uses for `pos=`, see README).

**The BOS rule** (`prepend_bos`, wherever text is tokenized):

- `None` (default): the tokenizer's own rule, i.e. what `tokenizer(text)` gives. GPT-2's tokenizer
  adds no BOS (nor any special token); the embedded SmolLM2's adds none either (its BOS,
  `<|im_start|>`, is written only by the chat template); Llama, Gemma and Mistral tokenizers add
  theirs. TransformerLens prepends a BOS by default whatever the tokenizer does: pass
  `prepend_bos=True` to get its tokens for GPT-2 or SmolLM2.
- `True`: the ids start with exactly one BOS (added unless they already start with one).
- `False`: no BOS is added (one the tokenizer's rule adds is removed). A BOS written in the text
  itself is text, and stays.

Never a double BOS: a BOS the rule would add in front of text that already starts with one is
dropped, so `"<s>Hi"` gives one `<s>` under every setting.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SpliceError


def _need(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise SpliceError(
            "this needs a tokenizer: pass one to splice.Model(model, tokenizer) or use splice.load()"
        )
    return tokenizer


def pad_token_id(tokenizer: Any) -> int:
    """The id used for left padding: the tokenizer's pad token, else its EOS, else 0."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def bos_token_id(tokenizer: Any) -> int | None:
    """The tokenizer's BOS id, or None if it has none."""
    return getattr(tokenizer, "bos_token_id", None)


def _check_prepend_bos(prepend_bos: Any) -> None:
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise SpliceError(
            f"prepend_bos must be None (the tokenizer's own rule), True or False; got {prepend_bos!r}"
        )


def token_ids(tokenizer: Any, text: str, prepend_bos: bool | None = None) -> list[int]:
    """The ids of one string under the BOS rule (module docstring).

    Args:
        tokenizer: A Hugging Face tokenizer (anything with `__call__(text, add_special_tokens=)`
            returning `{"input_ids": [...]}` and a `bos_token_id`).
        text: The string.
        prepend_bos: None (the tokenizer's rule), True (exactly one leading BOS) or False (none
            added).

    Example:
        ```python
        tokenizer = splice.load().tokenizer  # SmolLM2's: adds no BOS; its BOS is <|im_start|> (id 1)
        token_ids(tokenizer, "Hello")  # [19556]
        token_ids(tokenizer, "Hello", prepend_bos=True)  # [1, 19556]
        token_ids(tokenizer, "<|im_start|>Hello", prepend_bos=True)  # [1, 19556]: never two
        ```
    """
    tokenizer = _need(tokenizer)
    _check_prepend_bos(prepend_bos)
    if not isinstance(text, str):
        raise SpliceError(f"expected a string to tokenize; got {type(text).__name__}")
    ids = list(tokenizer(text)["input_ids"])
    bos = bos_token_id(tokenizer)
    if bos is None:
        if prepend_bos:
            raise SpliceError(
                f"prepend_bos=True, but this tokenizer ({type(tokenizer).__name__}) has no BOS token "
                "(bos_token_id is None): pass prepend_bos=None or False, or set tokenizer.bos_token"
            )
        return ids
    added = False
    if ids[:1] == [bos]:  # the rule may have added it, or the text starts with it: ask
        plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        added = ids[1 : 1 + len(plain)] == plain
    body = ids[1:] if added else ids
    want = added if prepend_bos is None else prepend_bos
    return [bos] + body if want and body[:1] != [bos] else body


def left_pad(rows: list[list[int]], pad: int, device=None) -> dict:
    """Model kwargs for token rows of different lengths: left padding, an attention mask and
    position ids counting from each row's first real token (no mask when all rows are full)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    if all(len(r) == width for r in rows):
        return {"input_ids": ids.to(device)}
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": position_ids.to(device),
    }


def encode(tokenizer: Any, inputs: Any, device=None, prepend_bos: bool | None = None) -> dict:
    """Model keyword arguments for a string, list of strings, token tensor or tokenizer output.

    Strings are tokenized under the BOS rule (`prepend_bos`, module docstring) and left-padded;
    token ids and tokenizer output are used as given (prepend_bos other than None is refused for
    them: they are tokens already)."""
    _check_prepend_bos(prepend_bos)
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        tokenizer = _need(tokenizer)
        rows = [token_ids(tokenizer, text, prepend_bos) for text in inputs]
        if not all(rows):
            raise SpliceError(
                f"text {inputs[[bool(r) for r in rows].index(False)]!r} has no tokens: a forward needs at least one"
            )
        return left_pad(rows, pad_token_id(tokenizer), device)
    if prepend_bos is not None:
        raise SpliceError(
            f"prepend_bos={prepend_bos} applies to text; these inputs ({type(inputs).__name__}) are token ids "
            "already and are used as given: add or remove the BOS id yourself, or pass the text"
        )
    if isinstance(inputs, torch.Tensor):
        if inputs.dtype not in (torch.long, torch.int, torch.int32):
            raise SpliceError(f"token tensors must be integer ids; got dtype {inputs.dtype}")
        ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
        return {"input_ids": ids.to(device)}
    if (
        hasattr(inputs, "keys")
        and "input_ids" in inputs
        or hasattr(inputs, "keys")
        and "inputs_embeds" in inputs
    ):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(inputs).items()}
    raise SpliceError(
        f"inputs must be a string, list of strings, token id tensor or tokenizer output; got {type(inputs).__name__}"
    )


def to_tokens(
    tokenizer: Any, text: str | list[str], device=None, prepend_bos: bool | None = None
) -> torch.Tensor:
    """Token ids `[batch, pos]` of a string or a list of strings (left-padded).

    Args:
        tokenizer: A Hugging Face tokenizer.
        text: A string (batch of 1) or a list of strings.
        device: Where the ids go (default: CPU).
        prepend_bos: None (the tokenizer's rule), True or False (module docstring).

    Example:
        ```python
        tokenizer = splice.load().tokenizer  # SmolLM2's: adds no BOS; its BOS is <|im_start|> (id 1)
        to_tokens(tokenizer, ["Hi", "Hello there"], prepend_bos=True)
        # tensor([[2, 1, 26843], [1, 19556, 665]]): BOS per row, then left padding (pad id 2)
        ```
    """
    if not (
        isinstance(text, str) or isinstance(text, list) and text and all(isinstance(t, str) for t in text)
    ):
        raise SpliceError(
            f"to_tokens takes a string or a non-empty list of strings; got {type(text).__name__}"
        )
    return encode(tokenizer, text, device, prepend_bos)["input_ids"]


def to_str_tokens(tokenizer: Any, text: Any, prepend_bos: bool | None = None) -> list:
    """Each token as a string: of a string (a list), of a list of strings (one list per string,
    without padding), or of token ids (a 1-D tensor or list; a `[1, pos]` tensor is flattened).

    Example:
        ```python
        tokenizer = splice.load().tokenizer  # SmolLM2's: adds no BOS; its BOS is <|im_start|> (id 1)
        to_str_tokens(tokenizer, " Mary and John")  # [' Mary', ' and', ' John']
        ```
    """
    tokenizer = _need(tokenizer)
    if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
        return [to_str_tokens(tokenizer, t, prepend_bos) for t in text]
    if isinstance(text, str):
        ids = token_ids(tokenizer, text, prepend_bos)
    else:
        if prepend_bos is not None:
            raise SpliceError(f"prepend_bos={prepend_bos} applies to text; token ids are used as given")
        ids = torch.as_tensor(text).reshape(-1).tolist()
    return [tokenizer.decode([int(i)]) for i in ids]


def to_single_token(tokenizer: Any, text: str) -> int:
    """The id of a string that is exactly one token (no special tokens added).

    Raises:
        SpliceError: `text` is several tokens (or none), naming them.

    Example:
        ```python
        tokenizer = splice.load().tokenizer  # SmolLM2's: adds no BOS; its BOS is <|im_start|> (id 1)
        to_single_token(tokenizer, " Mary")  # 5099 (mind the leading space)
        to_single_token(tokenizer, "Mary Jane")  # SpliceError: 'Mary Jane' is 2 tokens ['Mary', ' Jane'], ...
        ```
    """
    ids = _need(tokenizer)(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise SpliceError(
            f"{text!r} is {len(ids)} tokens {pieces}, not one: expected a string that is a single token "
            "(mind the leading space, e.g. ' Mary')"
        )
    return ids[0]


def to_string(tokenizer: Any, ids: Any) -> str | list[str]:
    """Decode ids: a 0-D or 1-D tensor/list gives a string, a `[batch, pos]` one a list of strings.

    Example:
        ```python
        tokenizer = splice.load().tokenizer  # SmolLM2's: adds no BOS; its BOS is <|im_start|> (id 1)
        to_string(tokenizer, to_tokens(tokenizer, "Hi")[0])  # 'Hi'
        ```
    """
    tokenizer = _need(tokenizer)
    ids = torch.as_tensor(ids)
    if ids.dim() <= 1:
        return tokenizer.decode(ids.reshape(-1).tolist())
    return [tokenizer.decode(row.tolist()) for row in ids]
