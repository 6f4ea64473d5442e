"""Falcon (`FalconForCausalLM`). The fused `query_key_value` layout follows the KV-head count:
multi-query (falcon-7b; also the new decoder architecture with one KV head) is `[Q | K | V]` with
one K and one V head; full multi-head attention (falcon-rw; the new architecture with as many KV
heads as heads) is laid out per head as `[q k v]`. The new architecture with 1 < KV heads < heads
(falcon-40b/180b) groups `[q ... q k v]` per KV head, which no view expresses yet: refused.

Parallel attention (`parallel_attn`, always with the new architecture): attention and MLP read the
block input through their norms (one shared `input_layernorm`, or `ln_attn`/`ln_mlp`) and the
block returns `resid_pre + attn.out + mlp.out`; otherwise the block is sequential like GPT-2.
Rotary and ALiBi variants share the table (sites are taken before rotary)."""

from ..errors import SpliceError
from .table import Architecture, Dims, Point, residual_stream_points
from .views import Heads, InterleavedHeads

LAYER = "transformer.h.{l}"


def _kv_heads(config) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def dims(config) -> Dims:
    heads, kv = config.num_attention_heads, _kv_heads(config)
    if kv not in (1, heads):
        raise SpliceError(
            f"splice does not support Falcon's grouped query_key_value yet ({kv} KV heads for {heads} heads, "
            "laid out [q ... q k v] per KV head); multi-query and full multi-head Falcon are supported"
        )
    return Dims(
        config.num_hidden_layers,
        config.hidden_size,
        heads,
        kv,
        config.hidden_size // heads,
        config.ffn_hidden_size,
        config.vocab_size,
    )


def points(d: Dims) -> dict[str, Point]:
    attn = f"{LAYER}.self_attention"
    qkv, width = f"{attn}.query_key_value", d.n_heads * d.d_head
    table = residual_stream_points(LAYER, attn, f"{LAYER}.mlp", "transformer.ln_f")
    if d.n_kv_heads == 1:  # multi-query: [Q (heads) | K (one head) | V (one head)]
        views = (
            Heads(d.n_heads, 0, width),
            Heads(1, width, width + d.d_head),
            Heads(1, width + d.d_head, width + 2 * d.d_head),
        )
    else:  # per head [q k v]
        views = tuple(InterleavedHeads(d.n_heads, 3, i) for i in range(3))
    table.update(
        {
            "attn.q": Point(qkv, "output", views[0]),
            "attn.k": Point(qkv, "output", views[1]),
            "attn.v": Point(qkv, "output", views[2]),
            "attn.z": Point(f"{attn}.dense", "input", Heads(d.n_heads)),
            "mlp.post": Point(f"{LAYER}.mlp.dense_4h_to_h", "input"),
        }
    )
    return table


ARCHITECTURE = Architecture(
    "falcon",
    ("falcon",),
    "transformer",
    dims,
    points,
    parallel_residual=lambda config: bool(config.parallel_attn or config.new_decoder_architecture),
)
