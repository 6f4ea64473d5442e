"""Phi-3 with GQA (6 query heads sharing 2 KV heads), so the fused qkv_proj blocks have unequal
widths: [Q (6*8) | K (2*8) | V (2*8)]. Fused gate_up_proj; residual dropout modules (identity here)."""

import torch
from transformers import Phi3Config, Phi3ForCausalLM

from .llama import layers, mlp, norms  # noqa: F401  (same layer / norm / MLP paths as Llama)

VOCAB = 97


def tiny():
    config = Phi3Config(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        original_max_position_embeddings=64,
        sliding_window=None,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return Phi3ForCausalLM(config)


def hand_module(hf, point, layer):
    # Phi3DecoderLayer: r = x + resid_attn_dropout(self_attn(hidden_states=input_layernorm(x))[0]);
    # out = r + resid_mlp_dropout(mlp(post_attention_layernorm(r))); mlp = down_proj(up * act(gate)),
    # gate|up = gate_up_proj(h).chunk(2). q, k, v are consecutive blocks of qkv_proj's output.
    block = hf.model.layers[layer]
    a = block.self_attn
    return {
        "resid_pre": (block, "in"),
        "attn.in": (a, "in"),
        "attn.q": (a.qkv_proj, "out"),
        "attn.k": (a.qkv_proj, "out"),
        "attn.v": (a.qkv_proj, "out"),
        "attn.z": (a.o_proj, "in"),
        "attn.out": (block.resid_attn_dropout, "out"),
        "mlp.in": (block.mlp, "in"),
        "mlp.post": (block.mlp.down_proj, "in"),
        "mlp.out": (block.resid_mlp_dropout, "out"),
        "resid_post": (block, "out"),
        "final_norm": (hf.model.norm, "out"),
        "logits": (hf.lm_head, "out"),
    }[point]


def hand_heads(hf, point):
    c = hf.config
    d_head = c.hidden_size // c.num_attention_heads
    sizes = [c.num_attention_heads * d_head, c.num_key_value_heads * d_head, c.num_key_value_heads * d_head]
    if point == "attn.z":
        return (lambda t: t.reshape(*t.shape[:-1], c.num_attention_heads, d_head)), (
            lambda t, new: new.reshape(t.shape)
        )
    which = "qkv".index(point[-1])

    def read(t):
        part = t.split(sizes, dim=-1)[which]
        return part.reshape(*part.shape[:-1], -1, d_head)

    def write(t, new):
        parts = list(t.split(sizes, dim=-1))
        parts[which] = new.reshape(*t.shape[:-1], sizes[which])
        return torch.cat(parts, dim=-1)

    return read, write
