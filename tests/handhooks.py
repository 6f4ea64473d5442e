"""Hand-written torch hooks that edit one site without splice: the independent reference for
edit-parity tests. Deliberately plain: module paths and head reshapes are spelt out per family."""

from __future__ import annotations

import torch


def _module(hf, family, point, layer):
    if family == "gpt2":
        block = hf.transformer.h[layer]
        return {
            "resid_pre": (block, "in"), "attn.in": (block.attn, "in"), "attn.q": (block.attn.c_attn, "out"),
            "attn.k": (block.attn.c_attn, "out"), "attn.v": (block.attn.c_attn, "out"),
            "attn.z": (block.attn.c_proj, "in"), "attn.out": (block.attn, "out"), "mlp.in": (block.mlp, "in"),
            "mlp.post": (block.mlp.c_proj, "in"), "mlp.out": (block.mlp, "out"), "resid_post": (block, "out"),
            "final_norm": (hf.transformer.ln_f, "out"), "logits": (hf.lm_head, "out"),
        }[point]
    block = hf.model.layers[layer]
    a = block.self_attn
    return {
        "resid_pre": (block, "in"), "attn.in": (a, "in"), "attn.q": (a.q_proj, "out"), "attn.k": (a.k_proj, "out"),
        "attn.v": (a.v_proj, "out"), "attn.z": (a.o_proj, "in"), "attn.out": (a, "out"), "mlp.in": (block.mlp, "in"),
        "mlp.post": (block.mlp.down_proj, "in"), "mlp.out": (block.mlp, "out"), "resid_post": (block, "out"),
        "final_norm": (hf.model.norm, "out"), "logits": (hf.lm_head, "out"),
    }[point]


def _edit_site(hf, family, point, tensor, fn):
    """Apply fn to the site's view of a module tensor; returns the new module tensor."""
    cfg = hf.config
    if point in ("attn.q", "attn.k", "attn.v", "attn.z"):
        if family == "gpt2":
            heads, d_head = cfg.n_head, cfg.n_embd // cfg.n_head
            if point == "attn.z":
                parts, which = [tensor], 0
            else:
                parts, which = list(tensor.split(cfg.n_embd, dim=-1)), "qkv".index(point[-1])
        else:
            d_head = cfg.head_dim
            heads = cfg.num_attention_heads if point in ("attn.q", "attn.z") else cfg.num_key_value_heads
            parts, which = [tensor], 0
        b, p, _ = parts[which].shape
        edited = fn(parts[which].reshape(b, p, heads, d_head).clone())
        parts[which] = edited.reshape(b, p, heads * d_head)
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
    return fn(tensor.clone())


def register(hf, family, site: str, fn):
    """Register a hook editing `site` ('embed', 'blocks.L.point', 'final_norm', 'logits') with fn
    (which receives a clone of the site tensor and returns the edited one). Returns the handle."""
    if site == "embed":
        point, layer = "resid_pre", 0
    elif site.startswith("blocks."):
        _, layer, point = site.split(".", 2)
        layer = int(layer)
    else:
        point, layer = site, 0
    module, io = _module(hf, family, point, layer)
    if io == "in":
        def pre(mod, args, kwargs):
            if args:
                return (_edit_site(hf, family, point, args[0], fn),) + args[1:], kwargs
            return args, {**kwargs, "hidden_states": _edit_site(hf, family, point, kwargs["hidden_states"], fn)}
        return module.register_forward_pre_hook(pre, with_kwargs=True)

    def post(mod, args, out):
        if isinstance(out, tuple):
            return (_edit_site(hf, family, point, out[0], fn),) + out[1:]
        return _edit_site(hf, family, point, out, fn)
    return module.register_forward_hook(post)
