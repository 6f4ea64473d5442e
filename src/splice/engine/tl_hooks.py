"""TransformerLens' `run_with_cache` and `run_with_hooks` arguments, translated into splice's.

Why: TL code should port by changing the model object only. Nothing here runs a forward:
`splice.Model` turns TL's argument names into a plain `Model.run`, with hook functions as
`Apply` edits (`hook_edits`) and a names filter as the sites to record (`sites_to_cache`).

A hook function `fn(activation, hook)` gets the whole site tensor in TL's layout (`attn.z` is
`[batch, pos, head, d_head]`) as a copy, and returns the new tensor (same shape and dtype) or
None to keep the copy (changes made to it in place count). In a left-padded batch whose rows
differ in length, padding positions read as zeros and what the function writes there is dropped
(splice never edits padding; no real token attends to it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from ..errors import SpliceError
from .directional import Apply
from .edits import Edits
from .interventions import At, Intervention
from .layout import Layout
from .sites import TL_HOOK_NAMES, SiteKey

NameFilter = SiteKey | Sequence[SiteKey] | Callable[[str], bool] | None
"""What `names_filter=` accepts: None (every site), a site name or glob, a list of them, or a
function `name -> bool`."""
HookFn = Callable[[torch.Tensor, "Hook"], torch.Tensor | None]
"""A TransformerLens-style hook function: `fn(activation, hook) -> new activation or None`."""

_TL_ALIAS = {point: tl for tl, point in TL_HOOK_NAMES.items()}

# TransformerLens arguments with no splice meaning, and what to use instead.
_REFUSED = {
    "bwd_hooks": "splice has no backward hooks. Edits are differentiable: to read a gradient at a site, "
    "use m.run(input, edits={site: splice.Apply(fn)}) where fn calls region.register_hook(...) and "
    "returns region.clone(); for attribution patching use splice.patching.attribution",
    "incl_bwd": "splice records forward activations only: see bwd_hooks for gradients at a site",
    "stop_at_layer": "to stop early, record what you need and stop there: "
    "m.run(input, record='blocks.<layer>.resid_pre', stop_after_record=True)",
    "start_at_layer": "splice runs whole forwards: patch the residual stream instead, "
    "m.run(input, edits={'blocks.<layer>.resid_pre': splice.Replace(resid)})",
    "tokens": "pass the ids as the input itself",
    "shortformer_pos_embed": "splice does not split positional embeddings out of the residual stream",
    "past_kv_cache": "pass the Hugging Face cache as past_key_values (or use m.generate)",
    "loss_per_token": "compute the loss from the logits: torch.nn.functional.cross_entropy(...)",
    "remove_batch_dim": "index the batch yourself: cache['<site>'][0]",
    "device": "move what you need: {k: v.to(device) for k, v in cache.items()}",
    "pos_slice": "slice the recorded tensors: cache['<site>'][:, positions]",
}


@dataclass(frozen=True)
class Hook:
    """What a TransformerLens-style hook function receives as `hook`: `hook.name` is the site's
    canonical name (`blocks.3.attn.z`), `hook.layer()` its layer.

    Example:
        >>> Hook("blocks.3.attn.z").layer()
        3
    """

    name: str

    def layer(self) -> int:
        """The site's layer (an error for `embed`, `final_norm` and `logits`, which have none)."""
        prefix, _, rest = self.name.partition(".")
        if prefix != "blocks":
            raise SpliceError(f"{self.name} is not a layer's site: it has no layer")
        return int(rest.split(".", 1)[0])


def _fn_name(fn: Any) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__qualname__", None) or type(inner).__name__


@dataclass(frozen=True, eq=False, repr=False)
class _HookFn(Apply, registered=False):
    """`fn(activation, hook)` at one site, as an `Apply` over the whole site tensor (see the
    module docstring for what the function gets and may return)."""

    hook: Hook = Hook("")

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        if at.masked:
            full = region.new_zeros(at.full_shape)
            full[at.index] = region
        else:
            full = region.clone()
        fn = self.fn
        assert fn is not None  # Apply refuses a non-callable fn when it is built
        out = fn(full, self.hook)
        if out is None:
            out = full
        if not isinstance(out, torch.Tensor) or out.shape != full.shape or out.dtype != full.dtype:
            got = (
                f"a {out.dtype} tensor of shape {list(out.shape)}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise SpliceError(
                f"fwd_hooks function {_fn_name(self.fn)} at {at.site} returned {got}; expected a {full.dtype} "
                f"tensor of shape {list(full.shape)} (the activation it was given), or None to keep it"
            )
        return out[at.index] if at.masked else out


def tl_kwargs(method: str, return_type: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keyword arguments of a TL-style call that go on to the Hugging Face forward.

    TL arguments with no splice meaning are refused, naming what to use instead (unless given
    their do-nothing value); the ones whose TL meaning splice always has are dropped.

    Example:
        >>> tl_kwargs("run_with_cache", "logits", {"incl_bwd": False, "use_cache": False})
        {'use_cache': False}
    """
    rest = dict(kwargs)
    own = [name for name in ("edits", "record", "stop_after_record", "mode") if name in rest]
    if own:
        raise SpliceError(
            f"{method}: {', '.join(own)}= belong(s) to splice's own m.run(inputs, edits=..., record=..., "
            "stop_after_record=...); the TransformerLens-style call takes fwd_hooks / names_filter only"
        )
    for name, hint in _REFUSED.items():
        value = rest.pop(name, None)
        if not (value is None or value is False or (name == "bwd_hooks" and not value)):
            raise SpliceError(f"{method}: TransformerLens' {name}= has no splice equivalent; {hint}")
    reset = rest.pop("reset_hooks_end", True)
    if reset is not True:
        raise SpliceError(
            f"{method}: reset_hooks_end={reset!r}: splice always removes its hooks when the call ends; "
            "to keep edits over several forwards, open `with m.edit({...}):`"
        )
    rest.pop("clear_contexts", None)  # TL hook contexts: splice has none to clear
    side = rest.pop("padding_side", None)
    if side not in (None, "left"):
        raise SpliceError(
            f"{method}: padding_side={side!r}: splice pads batches of text on the left (so pos=-1 is every "
            "row's last token, and positions count from each row's first real token); pass token ids "
            "with an attention_mask for another layout"
        )
    if return_type not in ("logits", None):
        raise SpliceError(
            f"{method}: return_type={return_type!r} is not supported; use 'logits' (or None) and compute "
            "the loss from the logits, e.g. torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), "
            "ids[:, 1:].flatten())"
        )
    return rest


def _names(layout: Layout, key: SiteKey) -> list[str]:
    return [site.name for site in layout.sites_of(key)]


def _accepted(layout: Layout, accept: Callable[[str], bool], what: str) -> list[str]:
    """Sites whose canonical name, or TL name where one exists, `accept` accepts."""
    names = []
    for name in layout.site_names():
        site = layout.sites_of(name)[0]
        alias = _TL_ALIAS.get(site.point) if site.layer is not None else None
        if accept(name) or (alias is not None and accept(f"blocks.{site.layer}.{alias}")):
            names.append(name)
    if not names:
        raise SpliceError(
            f"{what}: the function accepts no site name (it is called with canonical names such as "
            f"{layout.site_names()[1]!r} and TransformerLens names such as 'blocks.0.hook_resid_post')"
        )
    return names


def sites_to_cache(layout: Layout, names_filter: NameFilter) -> list[str]:
    """Canonical names of the sites a TL-style `names_filter` selects, each once, in order.

    A function is called with each site's canonical name and, where one exists, its TL name; a
    site is kept if either is accepted.
    """
    if names_filter is None:
        return layout.site_names()
    if callable(names_filter):
        names = _accepted(layout, names_filter, "names_filter")
    elif isinstance(names_filter, (str, tuple)):
        names = _names(layout, names_filter)
    elif isinstance(names_filter, Sequence):
        names = [n for key in names_filter for n in _names(layout, cast(SiteKey, key))]
    else:
        raise SpliceError(
            "names_filter must be None, a site name or glob, a list of them, or a function name -> bool; "
            f"got {type(names_filter).__name__}"
        )
    if not names:
        raise SpliceError("names_filter selects no site: there would be nothing to cache")
    return list(dict.fromkeys(names))


def hook_edits(layout: Layout, fwd_hooks: Any) -> Edits | None:
    """TL's `fwd_hooks` (`[(site or name -> bool, fn), ...]`) as edits (None for no hooks).

    Several hooks on one site run in the order given.
    """
    if isinstance(fwd_hooks, (str, bytes)) or not isinstance(fwd_hooks, Sequence):
        raise SpliceError(f"fwd_hooks must be a list of (site, fn) pairs; got {type(fwd_hooks).__name__}")
    per_site: dict[str, list[Intervention]] = {}
    for i, entry in enumerate(fwd_hooks):
        if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
            raise SpliceError(f"fwd_hooks[{i}] must be a (site, fn) pair; got {entry!r}")
        key, fn = entry
        if not callable(fn):
            raise SpliceError(
                f"fwd_hooks[{i}]: the hook must be a function (activation, hook) -> tensor or None; "
                f"got {type(fn).__name__}"
            )
        names = _accepted(layout, key, f"fwd_hooks[{i}]") if callable(key) else _names(layout, key)
        for name in names:
            per_site.setdefault(name, []).append(_HookFn(fn, hook=Hook(name)))
    return Edits(per_site) if per_site else None
