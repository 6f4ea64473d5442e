"""GPT-2: fused c_attn = [Q|K|V], Conv1D projections."""

from transformers import GPT2Config, GPT2LMHeadModel

VOCAB = 97


def tiny():
    config = GPT2Config(
        n_layer=3, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0
    )
    return GPT2LMHeadModel(config)


def layers(hf):
    return hf.transformer.h


def norms(hf, layer):
    block = hf.transformer.h[layer]
    return block.ln_1, block.ln_2


def mlp(hf, layer):
    return hf.transformer.h[layer].mlp


def hand_module(hf, point, layer):
    block = hf.transformer.h[layer]
    return {
        "resid_pre": (block, "in"),
        "attn.in": (block.attn, "in"),
        "attn.q": (block.attn.c_attn, "out"),
        "attn.k": (block.attn.c_attn, "out"),
        "attn.v": (block.attn.c_attn, "out"),
        "attn.z": (block.attn.c_proj, "in"),
        "attn.out": (block.attn, "out"),
        "mlp.in": (block.mlp, "in"),
        "mlp.post": (block.mlp.c_proj, "in"),
        "mlp.out": (block.mlp, "out"),
        "resid_post": (block, "out"),
        "final_norm": (hf.transformer.ln_f, "out"),
        "logits": (hf.lm_head, "out"),
    }[point]


def hand_heads(hf, point):
    """(read, write) between the module tensor and [batch, pos, head, d_head]."""
    c = hf.config
    heads, d_head, width = c.n_head, c.n_embd // c.n_head, c.n_embd
    if point == "attn.z":
        return (lambda t: t.reshape(*t.shape[:-1], heads, d_head)), (lambda t, new: new.reshape(t.shape))
    which = "qkv".index(point[-1])

    def read(t):
        return t.split(width, dim=-1)[which].reshape(*t.shape[:-1], heads, d_head)

    def write(t, new):
        parts = list(t.split(width, dim=-1))
        parts[which] = new.reshape(*t.shape[:-1], width)
        return __import__("torch").cat(parts, dim=-1)

    return read, write
