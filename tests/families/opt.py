"""OPT (pre-norm): separate q/k/v with bias, out_proj, and fc1 -> act -> fc2 directly on the layer
(no MLP module), run on tokens flattened to [batch*pos, ...]."""

from transformers import OPTConfig, OPTForCausalLM

VOCAB = 97
FLAT_MLP = True  # MLP module tensors are [batch*pos, ...]; tests/handhooks.py unflattens them


def tiny():
    config = OPTConfig(
        num_hidden_layers=3,
        hidden_size=48,
        num_attention_heads=6,
        ffn_dim=80,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        do_layer_norm_before=True,
        dropout=0.1,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return OPTForCausalLM(config)


def layers(hf):
    return hf.model.decoder.layers


def norms(hf, layer):
    block = hf.model.decoder.layers[layer]
    return block.self_attn_layer_norm, block.final_layer_norm


def mlp(hf, layer):
    """OPT has no MLP module: fc1 -> activation -> fc2 by hand (dropout is off in eval)."""
    block = hf.model.decoder.layers[layer]
    return lambda x: block.fc2(block.activation_fn(block.fc1(x)))


def _flat(t):
    return t.reshape(-1, t.shape[-1])


def hand_module(hf, point, layer):
    block = hf.model.decoder.layers[layer]
    a = block.self_attn
    return {
        "resid_pre": (block, "in"),
        "attn.in": (a, "in"),
        "attn.q": (a.q_proj, "out"),
        "attn.k": (a.k_proj, "out"),
        "attn.v": (a.v_proj, "out"),
        "attn.z": (a.out_proj, "in"),
        "attn.out": (a, "out"),
        # The layer flattens tokens before its MLP: these module tensors are [batch*pos, ...].
        "mlp.in": (block.fc1, "in"),
        "mlp.post": (block.fc2, "in"),
        "mlp.out": (block.fc2, "out"),
        "resid_post": (block, "out"),
        "final_norm": (hf.model.decoder.final_layer_norm, "out"),
        "logits": (hf.lm_head, "out"),
    }[point]


def hand_heads(hf, point):
    c = hf.config
    heads, d_head = c.num_attention_heads, c.hidden_size // c.num_attention_heads
    return (lambda t: t.reshape(*t.shape[:-1], heads, d_head)), (lambda t, new: new.reshape(t.shape))
