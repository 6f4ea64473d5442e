"""Llama family (`LlamaForCausalLM`, GQA): separate q/k/v projections, gated MLP, RMS norms."""

from .table import Architecture, Dims, Point, residual_stream_points
from .views import Heads

LAYER = "model.layers.{l}"


def dims(config) -> Dims:
    heads = config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Dims(
        config.num_hidden_layers,
        config.hidden_size,
        heads,
        kv,
        d_head,
        config.intermediate_size,
        config.vocab_size,
    )


def points(d: Dims) -> dict[str, Point]:
    attn = f"{LAYER}.self_attn"
    table = residual_stream_points(LAYER, attn, f"{LAYER}.mlp", "model.norm")
    table.update(
        {
            "attn.q": Point(f"{attn}.q_proj", "output", Heads(d.n_heads)),
            "attn.k": Point(f"{attn}.k_proj", "output", Heads(d.n_kv_heads)),
            "attn.v": Point(f"{attn}.v_proj", "output", Heads(d.n_kv_heads)),
            "attn.z": Point(f"{attn}.o_proj", "input", Heads(d.n_heads)),
            "mlp.post": Point(f"{LAYER}.mlp.down_proj", "input"),
        }
    )
    return table


ARCHITECTURE = Architecture("llama", ("llama",), "model", dims, points)
