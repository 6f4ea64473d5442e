"""What splice accepts as an SAE: any `nn.Module` with `encode` and `decode`, taken as it is.

SAELens' `SAE`, dictionary_learning's and EleutherAI sparsify's autoencoders and a user's own all
have that shape, so none needs converting (and splice needs none of those libraries). This module
also reads the few facts splice needs from such an object (its input width, its hook name), from
whichever attribute its library keeps them in, and checks that it fits a site of a model (`fit`).
It sits in the engine because attaching an SAE (`splice.SAE`) is checked when a plan is built.
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn as nn

from ..errors import SpliceError
from .sites import TL_HOOK_NAMES, Site, canonical_name, is_pattern, parse


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


_ALIASES = ", ".join(f"blocks.<l>.{name}" for name in TL_HOOK_NAMES)


def site_of_hook(hook: str, n_layers: int, points: set[str]) -> Site:
    """The splice site a TransformerLens hook name (an SAE's `hook_name`) names.

    Only splice's aliases are followed, since they name exactly the same tensor: a hook with no
    such site (`hook_embed`, `ln2.hook_normalized`, `hook_mlp_in`, ...) is refused rather than
    mapped to a neighbour, because an SAE read on a different tensor silently computes nonsense.

    Raises:
        SpliceError: For a glob, a hook with no splice site, or a site the model lacks.

    Example:
        >>> from splice.engine.sites import POINT_AXES
        >>> site_of_hook("blocks.8.hook_resid_post", 12, set(POINT_AXES)).name
        'blocks.8.resid_post'
    """
    name = canonical_name(hook)
    if is_pattern(name):
        raise SpliceError(f"SAE hook_name {hook!r} is a pattern; expected one site")
    if "hook_" in name:
        raise SpliceError(
            f"SAE hook_name {hook!r} has no splice site computing the same tensor; the TransformerLens "
            f"hooks that have one are {_ALIASES} (name the site yourself if you know where it belongs)"
        )
    try:
        return parse(name, n_layers, points)
    except SpliceError as error:
        raise SpliceError(f"SAE hook_name {hook!r}: {error}") from None


def fit(sae: Any, name: str, axes: tuple[str, ...], shape: tuple[int | None, ...]) -> int | None:
    """Check that an SAE reads activations as wide as a site's, and say how it reads them.

    The width compared with the SAE's `d_in` is the site's last axis; at a head site (`attn.z`,
    `attn.q`, ...) the heads flattened (`n_heads * d_head`, what SAELens' `reshape_activations=
    "hook_z"` reads), or one head's last axis for an SAE with a `hook_head_index`.

    Args:
        sae: The SAE (its `d_in` is read as `input_layout` says).
        name: The site's name, for messages.
        axes: The site's axis names (`Layout.axes`).
        shape: The site's shape (`Layout.shape`), axes after `[batch, pos]` known.

    Returns:
        The head the SAE reads (its `hook_head_index`), or None if it reads every trailing
        axis (flattened when there are several).

    Raises:
        SpliceError: If the widths differ, the site has no fixed width (`attn.pattern`), or the
            head index is out of range or given for a site without heads.

    Example:
        >>> class Mine(nn.Module):
        ...     d_in = 16
        ...     def encode(self, x): return x.relu()
        ...     def decode(self, acts): return acts
        >>> fit(Mine(), "blocks.0.attn.z", ("batch", "pos", "head", "d_head"), (None, None, 4, 4)) is None
        True
        >>> fit(Mine(), "blocks.0.mlp.post", ("batch", "pos", "d_mlp"), (None, None, 64))
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: SAE d_in 16 does not fit site 'blocks.0.mlp.post': its activations are 64 wide (shape ('batch', 'pos', 64))
    """
    d_in, reshape, head = input_layout(sae)
    shown = tuple(axis if size is None else size for axis, size in zip(axes, shape))  # for messages
    if axes[:2] != ("batch", "pos") or any(size is None for size in shape[2:]):
        raise SpliceError(f"site {name!r} has no fixed width (shape {shown}); an SAE cannot read it")
    trailing = [int(size) for size in shape[2:] if size is not None]
    heads = len(axes) == 4 and axes[2] in ("head", "kv_head")
    if (reshape == "hook_z" or head is not None) and not heads:
        how = "reshape_activations 'hook_z'" if reshape == "hook_z" else f"hook_head_index {head}"
        raise SpliceError(f"an SAE with {how} reads attention heads; site {name!r} has none (shape {shown})")
    if head is not None:
        if not 0 <= head < trailing[0]:
            raise SpliceError(
                f"SAE hook_head_index {head} is out of range: site {name!r} has {trailing[0]} heads"
            )
        width, what = trailing[1], f"{trailing[1]} wide for one head"
    elif heads:
        width, what = trailing[0] * trailing[1], f"{trailing[0]} heads x {trailing[1]} flattened"
        if d_in == trailing[1]:
            what += " (an SAE of one head's vectors needs a hook_head_index)"
    else:
        width, what = trailing[0], f"{trailing[0]} wide"
    if width != d_in:
        raise SpliceError(
            f"SAE d_in {d_in} does not fit site {name!r}: its activations are {what} (shape {shown})"
        )
    return head


def d_sae_of(sae: Any) -> int | None:
    """An SAE's number of latents, if it says: `d_sae`, `cfg.d_sae`, `dict_size`
    (dictionary_learning), `num_latents` (sparsify), or `W_dec.shape[0]`; None otherwise (then a
    feature index is checked when the latents exist, in the forward).

    Example:
        >>> from splice.sae import SAEConfig, SparseAutoencoder
        >>> d_sae_of(SparseAutoencoder(SAEConfig("standard", 4, 32))), d_sae_of(nn.Linear(2, 2))
        (32, None)
    """
    for found in (
        getattr(sae, "d_sae", None),
        _cfg_value(sae, "d_sae"),
        getattr(sae, "dict_size", None),
        getattr(sae, "num_latents", None),
    ):
        if isinstance(found, int) and not isinstance(found, bool):
            return found
    shape = getattr(getattr(sae, "W_dec", None), "shape", None)
    return int(shape[0]) if shape is not None and len(shape) == 2 else None
