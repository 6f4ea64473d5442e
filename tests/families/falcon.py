"""Falcon-7b style: multi-query (6 query heads, one K/V head) in a fused query_key_value laid out
[Q | K | V], rotary, parallel attention (attention and MLP both read input_layernorm's output)."""

from transformers import FalconConfig, FalconForCausalLM

VOCAB = 97
PARALLEL_RESIDUAL = True


def tiny():
    config = FalconConfig(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        ffn_hidden_size=80,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        multi_query=True,
        parallel_attn=True,
        new_decoder_architecture=False,
        alibi=False,
        bias=False,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return FalconForCausalLM(config)


def layers(hf):
    return hf.transformer.h


def norms(hf, layer):
    block, c = hf.transformer.h[layer], hf.config
    if c.new_decoder_architecture and c.num_ln_in_parallel_attn == 2:
        return block.ln_attn, block.ln_mlp
    if c.parallel_attn or c.new_decoder_architecture:
        return block.input_layernorm, block.input_layernorm
    return block.input_layernorm, block.post_attention_layernorm


def mlp(hf, layer):
    return hf.transformer.h[layer].mlp


def hand_module(hf, point, layer):
    block = hf.transformer.h[layer]
    a = block.self_attention
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
        "final_norm": (hf.transformer.ln_f, "out"),
        "logits": (hf.lm_head, "out"),
    }[point]


def hand_heads(hf, point):
    """(read, write) between the module tensor and [batch, pos, head, d_head], following
    FalconAttention._split_heads."""
    c = hf.config
    heads, d_head = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    if point == "attn.z":
        return (lambda t: t.reshape(*t.shape[:-1], heads, d_head)), (lambda t, new: new.reshape(t.shape))
    which = "qkv".index(point[-1])
    kv = c.num_kv_heads if c.new_decoder_architecture else (1 if c.multi_query else heads)
    if kv == 1:  # rows of d_head: heads query rows, then one key row, then one value row
        rows = [slice(0, heads), slice(heads, heads + 1), slice(heads + 1, heads + 2)][which]

        def read(t):
            return t.view(*t.shape[:-1], heads + 2, d_head)[..., rows, :]

        def write(t, new):
            out = t.view(*t.shape[:-1], heads + 2, d_head).clone()
            out[..., rows, :] = new
            return out.reshape(t.shape)

        return read, write

    def read(t):  # (heads, 3, d_head): per head q, k, v
        return t.view(*t.shape[:-1], heads, 3, d_head)[..., which, :]

    def write(t, new):
        out = t.view(*t.shape[:-1], heads, 3, d_head).clone()
        out[..., which, :] = new
        return out.reshape(t.shape)

    return read, write
