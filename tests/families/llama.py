"""Llama with GQA (6 query heads sharing 2 KV heads)."""

from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 97


def tiny():
    config = LlamaConfig(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def layers(hf):
    return hf.model.layers


def norms(hf, layer):
    block = hf.model.layers[layer]
    return block.input_layernorm, block.post_attention_layernorm


def mlp(hf, layer):
    return hf.model.layers[layer].mlp


def hand_module(hf, point, layer):
    block = hf.model.layers[layer]
    a = block.self_attn
    return {
        "resid_pre": (block, "in"),
        "attn.in": (a, "in"),
        "attn.q": (a.q_proj, "out"),
        "attn.k": (a.k_proj, "out"),
        "attn.v": (a.v_proj, "out"),
        "attn.z": (a.o_proj, "in"),
        "attn.out": (a, "out"),
        "mlp.in": (block.mlp, "in"),
        "mlp.post": (block.mlp.down_proj, "in"),
        "mlp.out": (block.mlp, "out"),
        "resid_post": (block, "out"),
        "final_norm": (hf.model.norm, "out"),
        "logits": (hf.lm_head, "out"),
    }[point]


def hand_heads(hf, point):
    c = hf.config
    heads = c.num_attention_heads if point in ("attn.q", "attn.z") else c.num_key_value_heads
    d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return (lambda t: t.reshape(*t.shape[:-1], heads, d_head)), (lambda t, new: new.reshape(t.shape))
