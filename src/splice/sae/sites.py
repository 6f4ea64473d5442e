"""Where an SAE goes in a model: its TransformerLens `hook_name` as a splice site, and the check
that it fits there.

A hook name resolves only through splice's aliases, which name exactly the same tensor
(`blocks.8.hook_resid_post` is `blocks.8.resid_post`); a hook with no such site
(`hook_embed`, `ln2.hook_normalized`, `hook_mlp_in`, ...) is refused rather than mapped to a
neighbour, since an SAE read on a different tensor silently computes nonsense.
"""

from __future__ import annotations

from typing import Any

from ..engine.autoencoders import fit, hook_name_of, site_of_hook
from ..engine.model import Model
from ..engine.sites import POINT_AXES
from ..errors import SpliceError


def resolve_site(sae_or_hook_name: Any, model: Model | int) -> str:
    """The splice site an SAE's `hook_name` names on a model.

    Args:
        sae_or_hook_name: A hook name (TransformerLens' such as `"blocks.8.hook_resid_post"`, or a
            splice site name), or an SAE whose config has one (`cfg.hook_name`, or SAELens 6's
            `cfg.metadata.hook_name`).
        model: The `splice.Model` (its sites are checked, architecture included), or just its
            number of layers.

    Returns:
        The canonical site name, e.g. `"blocks.8.resid_post"`.

    Raises:
        SpliceError: If there is no hook name, it is a hook with no splice site computing the same
            tensor, a glob, or not a site of the model (layer out of range, say).

    Example:
        >>> resolve_site("blocks.8.hook_resid_post", 12)
        'blocks.8.resid_post'
        >>> resolve_site("blocks.3.attn.hook_z", 12), resolve_site("blocks.0.hook_mlp_out", 12)
        ('blocks.3.attn.z', 'blocks.0.mlp.out')
        >>> resolve_site("blocks.3.ln2.hook_normalized", 12)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: SAE hook_name 'blocks.3.ln2.hook_normalized' has no splice site ...
    """
    if isinstance(sae_or_hook_name, str):
        hook = sae_or_hook_name
    else:
        found = hook_name_of(sae_or_hook_name)
        if found is None:
            raise SpliceError(
                f"{type(sae_or_hook_name).__name__} has no hook_name (in cfg.hook_name or "
                "cfg.metadata.hook_name); name its site yourself"
            )
        hook = found
    if isinstance(model, Model):
        return site_of_hook(hook, model.layout.n_layers, set(model.layout.points)).name
    if isinstance(model, int) and not isinstance(model, bool) and model > 0:
        return site_of_hook(hook, model, set(POINT_AXES)).name
    raise SpliceError(f"resolve_site needs a splice.Model or its number of layers; got {model!r}")


def check_fits(sae: Any, model: Model, site: Any = None) -> str:
    """Check that an SAE reads activations of the width a model's site has, and name the site.

    The width compared with the SAE's `d_in` is the site's last axis; for an SAE with
    `reshape_activations="hook_z"`, the site's heads flattened (`n_heads * d_head` at
    `attn.z`); for one with a `hook_head_index`, one head's last axis.

    Args:
        sae: The SAE: a `SparseAutoencoder` or any module `as_sae` accepts (its `d_in` is read
            from `d_in`, `cfg.d_in`, `activation_dim` or `W_enc`).
        model: The `splice.Model`.
        site: The site (any site key naming one site); None: resolved from the SAE's `hook_name`.

    Returns:
        The canonical site name.

    Raises:
        SpliceError: If the site is unknown or not one site, the SAE's width does not match it,
            the site has no fixed width (`attn.pattern`, `attn.scores`), or the head index is out
            of range.

    Example:
        >>> import splice, transformers
        >>> from splice.sae import SAEConfig, SparseAutoencoder
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())
        >>> sae = SparseAutoencoder(SAEConfig("standard", 16, 64, hook_name="blocks.1.hook_resid_post"))
        >>> check_fits(sae, m)
        'blocks.1.resid_post'
        >>> check_fits(sae, m, "blocks.0.mlp.post")
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: SAE d_in 16 does not fit site 'blocks.0.mlp.post': its activations are 64 wide (shape ('batch', 'pos', 64))
    """
    if not isinstance(model, Model):
        raise SpliceError(f"check_fits needs a splice.Model; got {type(model).__name__}")
    if site is None:
        name = resolve_site(sae, model)
    else:
        names = model.resolve(site)
        if len(names) != 1:
            raise SpliceError(f"an SAE goes at one site; {site!r} names {len(names)}")
        name = names[0]
    site = model.layout.sites_of(name)[0]
    fit(sae, name, model.layout.axes(site), model.layout.shape(site))
    return name
