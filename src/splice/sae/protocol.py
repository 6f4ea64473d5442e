"""What splice accepts as an SAE: any `nn.Module` with `encode` and `decode`, taken as it is.

SAELens' `SAE`, dictionary_learning's and EleutherAI sparsify's autoencoders and a user's own all
have that shape, so none needs converting (and splice needs none of those libraries). This module
also reads the few facts splice needs from such an object (its input width, its hook name), from
whichever attribute its library keeps them in.
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from ..errors import SpliceError
from .modules import SparseAutoencoder


def as_sae(obj: Any) -> nn.Module:
    """Accept an SAE: an `nn.Module` with callable `encode(x)` and `decode(acts)`.

    It is returned as it is (not copied, wrapped or converted): a SAELens `SAE`,
    dictionary_learning's `AutoEncoder`, EleutherAI sparsify's `Sae`, a `SparseAutoencoder`,
    or any module of your own with those two methods.

    Args:
        obj: The candidate.

    Returns:
        `obj`.

    Raises:
        SpliceError: If `obj` is a path (use `splice.sae.load`), not an `nn.Module`, or lacks a
            callable `encode` or `decode`.

    Example:
        >>> import torch.nn as nn
        >>> class Mine(nn.Module):
        ...     def encode(self, x): return x.relu()
        ...     def decode(self, f): return f
        >>> sae = Mine()
        >>> as_sae(sae) is sae
        True
        >>> as_sae(nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: an SAE is an nn.Module with callable encode(x) and decode(acts); Linear has no encode, decode
    """
    if isinstance(obj, (str, os.PathLike)):
        raise SpliceError(
            f"as_sae takes an SAE module, not a path ({obj!r}); read an SAE folder with splice.sae.load(path)"
        )
    if not isinstance(obj, nn.Module):
        raise SpliceError(
            f"an SAE is an nn.Module with callable encode(x) and decode(acts); got {type(obj).__name__}"
        )
    missing = [name for name in ("encode", "decode") if not callable(getattr(obj, name, None))]
    if missing:
        raise SpliceError(
            "an SAE is an nn.Module with callable encode(x) and decode(acts); "
            f"{type(obj).__name__} has no {', '.join(missing)}"
        )
    return obj


def _cfg_value(sae: Any, key: str) -> Any:
    """`sae.cfg.<key>`, else `sae.cfg.metadata.<key>` (where SAELens 6 keeps hook names), else None."""
    cfg = getattr(sae, "cfg", None)
    value = getattr(cfg, key, None)
    if value is None:
        metadata = getattr(cfg, "metadata", None)
        value = metadata.get(key) if isinstance(metadata, dict) else getattr(metadata, key, None)
    return value


def hook_name_of(sae: Any) -> str | None:
    """The hook name an SAE says it was trained on, or None.

    Read from `cfg.hook_name` (splice, SAELens < 6) or `cfg.metadata.hook_name` (SAELens 6).

    Example:
        >>> from splice.sae import SAEConfig, SparseAutoencoder
        >>> hook_name_of(SparseAutoencoder(SAEConfig("standard", 4, 8, hook_name="blocks.2.hook_resid_pre")))
        'blocks.2.hook_resid_pre'
    """
    value = _cfg_value(sae, "hook_name")
    return value if isinstance(value, str) else None


def input_layout(sae: Any) -> tuple[int, str, int | None]:
    """What an SAE reads: `(d_in, reshape_activations, hook_head_index)`.

    `d_in` comes from `sae.d_in`, `sae.cfg.d_in`, `sae.activation_dim` (dictionary_learning) or
    `sae.W_enc.shape[0]`; `reshape_activations` is `"hook_z"` for an SAE on flattened
    attention heads, else `"none"`; `hook_head_index` a single head, or None.

    Raises:
        SpliceError: If no input width can be found on the object.

    Example:
        >>> from splice.sae import SAEConfig, SparseAutoencoder
        >>> input_layout(SparseAutoencoder(SAEConfig("standard", 16, 64, reshape_activations="hook_z")))
        (16, 'hook_z', None)
    """
    if isinstance(sae, SparseAutoencoder):
        return sae.d_in, sae.cfg.reshape_activations, sae.cfg.hook_head_index
    d_in: Any = None
    for found in (
        getattr(sae, "d_in", None),
        _cfg_value(sae, "d_in"),
        getattr(sae, "activation_dim", None),
    ):
        if isinstance(found, int) and not isinstance(found, bool):
            d_in = found
            break
    if d_in is None:
        W_enc = getattr(sae, "W_enc", None)
        shape = getattr(W_enc, "shape", None)
        if shape is not None and len(shape) == 2:
            d_in = int(shape[0])
    if d_in is None:
        raise SpliceError(
            f"cannot tell the input width of {type(sae).__name__}: give it a d_in attribute "
            "(or cfg.d_in, or W_enc of shape [d_in, d_sae])"
        )
    reshape = _cfg_value(sae, "reshape_activations")
    head = _cfg_value(sae, "hook_head_index")
    return d_in, reshape if reshape == "hook_z" else "none", head if isinstance(head, int) else None
