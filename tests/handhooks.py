"""Hand-written torch hooks that edit one site without splice: the independent reference for
edit-parity tests. Module paths and head reshapes come from tests/families/<family>.py."""

from __future__ import annotations

import torch
from families import FAMILIES
from transformers.utils import ModelOutput

HEAD_POINTS = ("attn.q", "attn.k", "attn.v", "attn.z")


def _split(site: str):
    if site == "embed":
        return "resid_pre", 0
    if site.startswith("blocks."):
        _, layer, point = site.split(".", 2)
        return point, int(layer)
    return site, 0


def register(hf, family, site: str, fn):
    """Hook `site` ('embed', 'blocks.L.point', 'final_norm', 'logits') so that fn (given a clone of
    the site tensor, returning the edited one) edits it. Returns the handle."""
    spec = FAMILIES[family]
    point, layer = _split(site)
    if getattr(spec, "FLAT_MLP", False) and point.startswith("mlp."):
        # The layer runs its MLP on tokens flattened to [batch*pos, ...] (OPT): unflatten with the
        # batch and pos of the layer's input, remembered by a second hook.
        tokens = {}

        def remember(mod, args, kwargs):
            tokens["shape"] = (args[0] if args else kwargs["hidden_states"]).shape[:-1]

        first = spec.layers(hf)[layer].register_forward_pre_hook(remember, with_kwargs=True)
        flat_fn = fn
        fn = lambda t: flat_fn(t.reshape(*tokens["shape"], t.shape[-1])).reshape(t.shape)  # noqa: E731
        return _Handles(first, _register(hf, spec, point, layer, fn))
    return _register(hf, spec, point, layer, fn)


class _Handles:
    def __init__(self, *handles):
        self.handles = handles

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _register(hf, spec, point, layer, fn):
    module, io = spec.hand_module(hf, point, layer)

    def edit(tensor):
        if point in HEAD_POINTS:
            read, write = spec.hand_heads(hf, point)
            return write(tensor, fn(read(tensor).clone()))
        return fn(tensor.clone())

    if io == "in":

        def pre(mod, args, kwargs):
            if args:
                return (edit(args[0]),) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, out):
        if isinstance(out, ModelOutput):
            return type(out)(**{**out, "logits": edit(out["logits"])})
        if isinstance(out, tuple):
            return (edit(out[0]),) + out[1:]
        return edit(out)

    return module.register_forward_hook(post)


def read_site(hf, family, site: str, tensor):
    """The site view of a module tensor, by hand."""
    point, _ = _split(site)
    return FAMILIES[family].hand_heads(hf, point)[0](tensor) if point in HEAD_POINTS else tensor


def hand_and_splice(model, hf, family, site, intervention, hand, ids):
    """(logits with the hand-written hook, logits with the splice edit) for the same input."""
    handle = register(hf, family, site, hand)
    try:
        expected = hf(ids).logits
    finally:
        handle.remove()
    with model.edit({site: intervention}):
        got = hf(ids).logits
    return expected, got


def hand_record(hf, family, site, ids) -> torch.Tensor:
    """The site tensor of a forward, captured by a hand-written hook (no splice involved)."""
    seen = []

    def keep(t):
        seen.append(t.clone())
        return t

    handle = register(hf, family, site, keep)
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        handle.remove()
    return seen[0]


def eager_attentions(hf, ids):
    """HF's own attention probabilities (`output_attentions=True` under eager attention), the
    model's attention implementation restored afterwards."""
    original = hf.config._attn_implementation
    hf.set_attn_implementation("eager")
    try:
        return hf(ids, output_attentions=True)
    finally:
        hf.set_attn_implementation(original)
