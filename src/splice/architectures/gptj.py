"""GPT-J (`GPTJForCausalLM`): separate bias-free q/k/v projections (rotary applied after them),
and a parallel residual: attention and MLP both read `ln_1`'s output and the block returns
`resid_pre + attn.out + mlp.out` (there is no second norm and no resid_mid)."""

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
    attn = f"{LAYER}.attn"
    table = residual_stream_points(LAYER, attn, f"{LAYER}.mlp", "transformer.ln_f")
    table.update(
        {
            "attn.q": Point(f"{attn}.q_proj", "output", Heads(d.n_heads)),
            "attn.k": Point(f"{attn}.k_proj", "output", Heads(d.n_heads)),
            "attn.v": Point(f"{attn}.v_proj", "output", Heads(d.n_heads)),
            "attn.z": Point(f"{attn}.out_proj", "input", Heads(d.n_heads)),
            "mlp.post": Point(f"{LAYER}.mlp.fc_out", "input"),
        }
    )
    return table


ARCHITECTURE = Architecture(
    "gptj", ("gptj",), "transformer", dims, points, parallel_residual=lambda config: True
)
