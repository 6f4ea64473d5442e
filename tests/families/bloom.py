"""BLOOM: fused query_key_value viewed per head as [q k v], ALiBi, and sublayers that return the
residual sum themselves (attention -> resid_mid, MLP -> resid_post): the residual contributions are
the outputs of self_attention.dense and mlp.dense_4h_to_h."""

import torch
from transformers import BloomConfig, BloomForCausalLM

VOCAB = 97


def tiny():
    config = BloomConfig(
        n_layer=3, hidden_size=48, n_head=6, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    return BloomForCausalLM(config)


def layers(hf):
    return hf.transformer.h


def norms(hf, layer):
    block = hf.transformer.h[layer]
    return block.input_layernorm, block.post_attention_layernorm


def mlp(hf, layer):
    """The MLP's contribution (BloomMLP itself also adds the residual)."""
    m = hf.transformer.h[layer].mlp
    return lambda x: m.dense_4h_to_h(m.gelu_impl(m.dense_h_to_4h(x)))


def hand_module(hf, point, layer):
    block = hf.transformer.h[layer]
    a, m = block.self_attention, block.mlp
    return {
        "resid_pre": (block, "in"),
        "attn.in": (a, "in"),
        "attn.q": (a.query_key_value, "out"),
        "attn.k": (a.query_key_value, "out"),
        "attn.v": (a.query_key_value, "out"),
        "attn.z": (a.dense, "in"),
        "attn.out": (a.dense, "out"),
        "mlp.in": (m, "in"),
        "mlp.post": (m.dense_4h_to_h, "in"),
        "mlp.out": (m.dense_4h_to_h, "out"),
        "resid_post": (block, "out"),
        "final_norm": (hf.transformer.ln_f, "out"),
        "logits": (hf.lm_head, "out"),
    }[point]


def hand_heads(hf, point):
    """Following BloomAttention._reshape: view (..., heads, 3, d_head)."""
    c = hf.config
    heads, d_head = c.n_head, c.hidden_size // c.n_head
    if point == "attn.z":
        return (lambda t: t.reshape(*t.shape[:-1], heads, d_head)), (lambda t, new: new.reshape(t.shape))
    which = "qkv".index(point[-1])

    def read(t):
        return t.view(*t.shape[:-1], heads, 3, d_head)[..., which, :]

    def write(t, new):
        parts = list(t.view(*t.shape[:-1], heads, 3, d_head).unbind(-2))
        parts[which] = new
        return torch.stack(parts, dim=-2).reshape(t.shape)

    return read, write
