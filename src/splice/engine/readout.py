"""The model's own readout, applied to residual-stream tensors outside a forward: its final norm,
its unembedding, and the unembedding directions of tokens.

Why: a logit lens or a direct logit attribution is only right if it computes what the model
computes. So `unembed` and `ln_final` call the model's own modules (their `forward`, so no hooks
run and gradients flow) and add what the model adds after lm_head (Gemma2's logit soft-cap),
instead of re-implementing them from weights.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from ..errors import SpliceError
from . import devices, weights
from . import tokens as tok
from .layout import Layout


def _check_resid(resid: Any, module: nn.Module, what: str, d_model: int) -> None:
    """Refuse what `module` cannot take as a residual-stream tensor, saying what it needs."""
    if not isinstance(resid, torch.Tensor) or not resid.is_floating_point():
        got = f"a {resid.dtype} tensor" if isinstance(resid, torch.Tensor) else type(resid).__name__
        raise SpliceError(f"{what} takes a floating-point [..., d_model={d_model}] tensor; got {got}")
    if resid.dim() == 0 or resid.shape[-1] != d_model:
        raise SpliceError(
            f"{what}: resid has shape {list(resid.shape)}; expected [..., d_model={d_model}] "
            "(a residual-stream tensor such as cache['final_norm'])"
        )
    param = next(module.parameters(), None)
    device = devices.execution_device(module)  # not "meta" for weights accelerate offloads
    if param is not None and (resid.dtype != param.dtype or (device is not None and resid.device != device)):
        raise SpliceError(
            f"{what}: resid is {resid.dtype} on {resid.device}, the module computes in {param.dtype} on "
            f"{device}: pass resid.to({str(device)!r}, {param.dtype})"
        )


def unembed(layout: Layout, resid: torch.Tensor) -> torch.Tensor:
    """Logits `[..., vocab]` of `resid [..., d_model]`: lm_head, then the model's logits
    transform if it has one, so that unembedding the `final_norm` site gives the model's logits."""
    module, _, _ = weights.unembedding(layout.model)
    _check_resid(resid, module, "unembed", layout.dims.d_model)
    logits = module.forward(resid)
    transform = layout.logits_transform
    return transform(logits) if transform is not None else logits


def ln_final(layout: Layout, resid: torch.Tensor) -> torch.Tensor:
    """The module of the `final_norm` site applied to `resid [..., d_model]`."""
    point = layout.points.get("final_norm")
    if point is None:
        raise SpliceError(f"this {layout.arch.name} model has no final norm site")
    module = layout.module_at(point.module)
    _check_resid(resid, module, "ln_final", layout.dims.d_model)
    return module.forward(resid)


def token_directions(model: nn.Module, tokenizer: Any, tokens: Any) -> torch.Tensor:
    """The columns of `W_U` for `tokens` (see `Model.tokens_to_residual_directions` for what
    `tokens` may be), as `[*ids.shape, d_model]`, a detached copy."""
    ids = _token_ids(tokenizer, tokens)
    _, weight, _ = weights.unembedding(model)
    vocab = weight.shape[1]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
        raise SpliceError(
            f"tokens_to_residual_directions: token id {bad} is out of range; the unembedding has "
            f"{vocab} columns (valid 0..{vocab - 1})"
        )
    with torch.no_grad():
        return weight[:, ids.to(weight.device)].movedim(0, -1).contiguous()


def _token_ids(tokenizer: Any, tokens: Any) -> torch.Tensor:
    if isinstance(tokens, str):
        return torch.tensor(tok.to_single_token(tokenizer, tokens))
    if isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens):
        return torch.tensor([tok.to_single_token(tokenizer, t) for t in tokens])
    if isinstance(tokens, int) and not isinstance(tokens, bool):
        return torch.tensor(tokens)
    if (
        isinstance(tokens, list)
        and tokens
        and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
    ):
        return torch.tensor(tokens)
    if (
        isinstance(tokens, torch.Tensor)
        and not (tokens.is_floating_point() or tokens.is_complex())
        and tokens.dtype != torch.bool
    ):
        return tokens.long()
    got = f"a {tokens.dtype} tensor" if isinstance(tokens, torch.Tensor) else repr(tokens)[:80]
    raise SpliceError(
        "tokens_to_residual_directions takes a single-token string, a token id, a non-empty list of "
        f"either, or an integer tensor of ids; got {got}"
    )
