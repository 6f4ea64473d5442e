"""Gemma2 with GQA (6 query heads sharing 2 KV heads): norms before *and after* each sublayer,
embeddings scaled by sqrt(d_model), attention and final-logit soft-capping (defaults kept), eager
attention. Sliding-window layers alternate with global ones; the window is wider than any test
sequence."""

from transformers import Gemma2Config, Gemma2ForCausalLM

VOCAB = 97


def tiny():
    config = Gemma2Config(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        intermediate_size=64,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        sliding_window=128,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return Gemma2ForCausalLM(config)


def layers(hf):
    return hf.model.layers


def norms(hf, layer):
    block = hf.model.layers[layer]
    return block.input_layernorm, block.pre_feedforward_layernorm


def mlp(hf, layer):
    return hf.model.layers[layer].mlp


def after_attn_proj(hf, layer, x):
    return hf.model.layers[layer].post_attention_layernorm(x)


def after_mlp_proj(hf, layer, x):
    return hf.model.layers[layer].post_feedforward_layernorm(x)


def hand_module(hf, point, layer):
    # Gemma2DecoderLayer: r = x + post_attention_layernorm(self_attn(hidden_states=input_layernorm(x))[0]);
    # out = r + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(r))). The residual
    # contributions are the post-norm outputs; the MLP's input is the pre-feedforward norm's output.
    block = hf.model.layers[layer]
    a = block.self_attn
    return {
        "resid_pre": (block, "in"),
        "attn.in": (a, "in"),
        "attn.q": (a.q_proj, "out"),
        "attn.k": (a.k_proj, "out"),
        "attn.v": (a.v_proj, "out"),
        "attn.z": (a.o_proj, "in"),
        "attn.out": (block.post_attention_layernorm, "out"),
        "mlp.in": (block.mlp, "in"),
        "mlp.post": (block.mlp.down_proj, "in"),
        "mlp.out": (block.post_feedforward_layernorm, "out"),
        "resid_post": (block, "out"),
        "final_norm": (hf.model.norm, "out"),
        "logits": (hf, "out"),  # soft-capped after lm_head
    }[point]


def hand_heads(hf, point):
    c = hf.config
    heads = c.num_attention_heads if point in ("attn.q", "attn.z") else c.num_key_value_heads
    return (lambda t: t.reshape(*t.shape[:-1], heads, c.head_dim)), (lambda t, new: new.reshape(t.shape))
