"""Phi-3 (`Phi3ForCausalLM`): fused `qkv_proj` laid out in blocks `[Q (H*d) | K (KV*d) | V (KV*d)]`,
fused `gate_up_proj` feeding `down_proj`. Each sublayer's output passes a residual dropout module
(`resid_attn_dropout`, `resid_mlp_dropout`) before it is added; `attn.out` / `mlp.out` are those
modules' outputs, i.e. exactly what joins the residual stream (identical to the sublayer outputs in
eval mode or with `resid_pdrop=0`)."""

from . import llama
from .table import Architecture, Dims, Point, residual_stream_points
from .views import Heads

LAYER = "model.layers.{l}"
"""Path of decoder layer `{l}`."""


def points(d: Dims) -> dict[str, Point]:
    """The Phi-3 site table: q/k/v are blocks of `qkv_proj`'s output (k and v with the KV-head
    count), `attn.out`/`mlp.out` the residual dropouts' outputs.

    Example:
        >>> from splice.architectures.table import Dims
        >>> points(Dims(2, 32, 4, 2, 8, 64, 100))["attn.k"].view
        Heads(heads=2, start=32, stop=48)
    """
    attn, qkv = f"{LAYER}.self_attn", f"{LAYER}.self_attn.qkv_proj"
    q_width, kv_width = d.n_heads * d.d_head, d.n_kv_heads * d.d_head
    table = residual_stream_points(
        LAYER, attn, f"{LAYER}.mlp", "model.norm", attn_out=f"{LAYER}.resid_attn_dropout"
    )
    table.update(
        {
            "mlp.out": Point(f"{LAYER}.resid_mlp_dropout", "output"),
            "attn.q": Point(qkv, "output", Heads(d.n_heads, 0, q_width)),
            "attn.k": Point(qkv, "output", Heads(d.n_kv_heads, q_width, q_width + kv_width)),
            "attn.v": Point(qkv, "output", Heads(d.n_kv_heads, q_width + kv_width, q_width + 2 * kv_width)),
            "attn.z": Point(f"{attn}.o_proj", "input", Heads(d.n_heads)),
            "mlp.post": Point(f"{LAYER}.mlp.down_proj", "input"),
        }
    )
    return table


ARCHITECTURE = Architecture("phi3", ("phi3",), "model", llama.dims, points)
"""The Phi-3 table (registered in `splice.architectures.ARCHITECTURES`)."""
