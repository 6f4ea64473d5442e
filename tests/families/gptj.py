"""GPT-J: separate q/k/v projections, partial rotary, parallel residual (attention and MLP both
read ln_1's output; one norm per block)."""

from transformers import GPTJConfig, GPTJForCausalLM

VOCAB = 97
PARALLEL_RESIDUAL = True


def tiny():
    config = GPTJConfig(
        n_layer=3,
        n_embd=48,
        n_head=6,
        rotary_dim=4,
        n_inner=80,
        n_positions=64,
        vocab_size=VOCAB,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    return GPTJForCausalLM(config)


def layers(hf):
    return hf.transformer.h


def norms(hf, layer):
    ln = hf.transformer.h[layer].ln_1
    return ln, ln  # the MLP reads the same normalised tensor as attention


def mlp(hf, layer):
    return hf.transformer.h[layer].mlp


def hand_module(hf, point, layer):
    block = hf.transformer.h[layer]
    a = block.attn
    return {
        "resid_pre": (block, "in"),
        "attn.in": (a, "in"),
        "attn.q": (a.q_proj, "out"),
        "attn.k": (a.k_proj, "out"),
        "attn.v": (a.v_proj, "out"),
        "attn.z": (a.out_proj, "in"),
        "attn.out": (a, "out"),
        "mlp.in": (block.mlp, "in"),
        "mlp.post": (block.mlp.fc_out, "in"),
        "mlp.out": (block.mlp, "out"),
        "resid_post": (block, "out"),
        "final_norm": (hf.transformer.ln_f, "out"),
        "logits": (hf.lm_head, "out"),
    }[point]


def hand_heads(hf, point):
    c = hf.config
    heads, d_head = c.n_head, c.n_embd // c.n_head
    return (lambda t: t.reshape(*t.shape[:-1], heads, d_head)), (lambda t, new: new.reshape(t.shape))
