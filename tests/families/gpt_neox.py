"""GPT-NeoX / Pythia: fused query_key_value viewed per head as [q_h | k_h | v_h], partial rotary
(a quarter of each head), parallel residual (attention and MLP both read resid_pre)."""

import torch
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

VOCAB = 97
PARALLEL_RESIDUAL = True


def tiny():
    config = GPTNeoXConfig(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        intermediate_size=80,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        use_parallel_residual=True,
        rotary_pct=0.25,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPTNeoXForCausalLM(config)


def layers(hf):
    return hf.gpt_neox.layers


def norms(hf, layer):
    block = hf.gpt_neox.layers[layer]
    return block.input_layernorm, block.post_attention_layernorm


def mlp(hf, layer):
    return hf.gpt_neox.layers[layer].mlp


def hand_module(hf, point, layer):
    block = hf.gpt_neox.layers[layer]
    a = block.attention
    return {
        "resid_pre": (block, "in"),
        "attn.in": (a, "in"),
        "attn.q": (a.query_key_value, "out"),
        "attn.k": (a.query_key_value, "out"),
        "attn.v": (a.query_key_value, "out"),
        "attn.z": (a.dense, "in"),
        "attn.out": (a, "out"),
        "mlp.in": (block.mlp, "in"),
        "mlp.post": (block.mlp.dense_4h_to_h, "in"),
        "mlp.out": (block.mlp, "out"),
        "resid_post": (block, "out"),
        "final_norm": (hf.gpt_neox.final_layer_norm, "out"),
        "logits": (hf.lm_head, "out"),
    }[point]


def hand_heads(hf, point):
    """(read, write) between the module tensor and [batch, pos, head, d_head]."""
    c = hf.config
    heads, d_head = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    if point == "attn.z":
        return (lambda t: t.reshape(*t.shape[:-1], heads, d_head)), (lambda t, new: new.reshape(t.shape))
    which = "qkv".index(point[-1])

    # As the model does: view (..., heads, 3*d_head), then chunk the last axis into q, k, v.
    def read(t):
        return t.view(*t.shape[:-1], heads, 3 * d_head).chunk(3, dim=-1)[which]

    def write(t, new):
        parts = list(t.view(*t.shape[:-1], heads, 3 * d_head).chunk(3, dim=-1))
        parts[which] = new
        return torch.cat(parts, dim=-1).reshape(t.shape)

    return read, write
