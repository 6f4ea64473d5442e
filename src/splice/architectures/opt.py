"""OPT (`OPTForCausalLM`), pre-norm checkpoints: separate q/k/v projections with bias (`q` is
`q_proj`'s output, before the model multiplies it by d_head**-0.5), `out_proj`, and an MLP that is
not a module: `fc1 -> act -> fc2` directly on the layer.

The MLP runs on tokens flattened to `[batch*pos, ...]` (the layer reshapes the residual before
`final_layer_norm`), so `mlp.in`, `mlp.post` and `mlp.out` have no `[batch, pos, ...]` tensor in
the model; the `Tokens` view unflattens them with the batch and pos of the layer's input.
Post-norm OPT (`do_layer_norm_before=False`, i.e. opt-350m) is refused: its residual stream is
renormalised after each sublayer and it has no final norm."""

from typing import Any

from ..errors import SpliceError
from .table import Architecture, Dims, Point, residual_stream_points
from .views import Heads, Tokens

LAYER = "model.decoder.layers.{l}"
"""Path of decoder layer `{l}`."""


def dims(config: Any) -> Dims:
    """Sizes of a pre-norm `OPTConfig`.

    Raises:
        SpliceError: For post-norm OPT (`do_layer_norm_before=False`, opt-350m) or
            `word_embed_proj_dim != hidden_size`.

    Example:
        >>> import transformers
        >>> config = transformers.OPTConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
        ...                                 ffn_dim=64, word_embed_proj_dim=32, do_layer_norm_before=False)
        >>> dims(config)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: splice supports pre-norm OPT (do_layer_norm_before=True, ...
    """
    if not config.do_layer_norm_before or getattr(config, "_remove_final_layer_norm", False):
        raise SpliceError(
            "splice supports pre-norm OPT (do_layer_norm_before=True, every OPT checkpoint but opt-350m); "
            "this config normalises after each sublayer, so its residual sites do not add up"
        )
    if config.word_embed_proj_dim != config.hidden_size:
        raise SpliceError(
            f"splice does not support OPT with word_embed_proj_dim ({config.word_embed_proj_dim}) != hidden_size "
            f"({config.hidden_size}): the final norm would not feed lm_head directly"
        )
    heads = config.num_attention_heads
    return Dims(
        config.num_hidden_layers,
        config.hidden_size,
        heads,
        heads,
        config.hidden_size // heads,
        config.ffn_dim,
        config.vocab_size,
    )


def points(d: Dims) -> dict[str, Point]:
    """The OPT site table: q/k/v/z around the attention projections, and the MLP's sites on
    `fc1`/`fc2` through the `Tokens` view.

    Example:
        >>> from splice.architectures.table import Dims
        >>> points(Dims(2, 32, 4, 4, 8, 64, 100))["mlp.post"]
        Point(module='model.decoder.layers.{l}.fc2', io='input', view=Tokens(), arg='hidden_states', field=0)
    """
    attn = f"{LAYER}.self_attn"
    table = residual_stream_points(LAYER, attn, f"{LAYER}.fc1", "model.decoder.final_layer_norm")
    table.update(
        {
            "attn.q": Point(f"{attn}.q_proj", "output", Heads(d.n_heads)),
            "attn.k": Point(f"{attn}.k_proj", "output", Heads(d.n_heads)),
            "attn.v": Point(f"{attn}.v_proj", "output", Heads(d.n_heads)),
            "attn.z": Point(f"{attn}.out_proj", "input", Heads(d.n_heads)),
            "mlp.in": Point(f"{LAYER}.fc1", "input", Tokens()),
            "mlp.post": Point(f"{LAYER}.fc2", "input", Tokens()),
            "mlp.out": Point(f"{LAYER}.fc2", "output", Tokens()),
        }
    )
    return table


ARCHITECTURE = Architecture("opt", ("opt",), "model", dims, points)
"""The OPT table (registered in `splice.architectures.ARCHITECTURES`)."""
