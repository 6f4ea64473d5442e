"""GPT-2 (`GPT2LMHeadModel`): fused `c_attn` = [Q|K|V] on the last axis, Conv1D projections."""

from .table import Architecture, Dims, Point, residual_stream_points
from .views import Heads

LAYER = "transformer.h.{l}"


def dims(config) -> Dims:
    d_model, heads = config.n_embd, config.n_head
    return Dims(
        config.n_layer,
        d_model,
        heads,
        heads,
        d_model // heads,
        config.n_inner or 4 * d_model,
        config.vocab_size,
    )


def points(d: Dims) -> dict[str, Point]:
    qkv, width = f"{LAYER}.attn.c_attn", d.n_heads * d.d_head
    table = residual_stream_points(LAYER, f"{LAYER}.attn", f"{LAYER}.mlp", "transformer.ln_f")
    table.update(
        {
            "attn.q": Point(qkv, "output", Heads(d.n_heads, 0, width)),
            "attn.k": Point(qkv, "output", Heads(d.n_heads, width, 2 * width)),
            "attn.v": Point(qkv, "output", Heads(d.n_heads, 2 * width, 3 * width)),
            "attn.z": Point(f"{LAYER}.attn.c_proj", "input", Heads(d.n_heads)),
            "mlp.post": Point(f"{LAYER}.mlp.c_proj", "input"),
        }
    )
    return table


ARCHITECTURE = Architecture("gpt2", ("gpt2",), "transformer", dims, points)
