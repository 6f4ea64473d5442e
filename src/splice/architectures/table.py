"""The adapter table format: an architecture is data (module paths and views), not code paths.

To add a family, write a module of this package that defines `ARCHITECTURE = Architecture(...)`;
it is registered by being there, and the hook engine needs nothing new. Some points follow from
others and are added to every table (`derived_points`): `attn.result` from `attn.z`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .views import WHOLE, HeadResults, InterleavedHeads, ResidualSum, View


@dataclass(frozen=True)
class Dims:
    """Sizes of a model's named axes (see `splice.engine.sites.LAYER_POINTS`).

    A family's `dims(config)` function reads them from the Hugging Face config; `Model.dims`
    holds them for a loaded model.

    Attributes:
        n_layers: Decoder layers.
        d_model: Width of the residual stream.
        n_heads: Query heads.
        n_kv_heads: Key/value heads (fewer than `n_heads` under GQA, 1 for multi-query).
        d_head: Width of one head.
        d_mlp: Width of the MLP's hidden activation (`mlp.post`).
        vocab: Vocabulary size (width of `logits`).

    Example:
        >>> import transformers
        >>> from splice.architectures import gpt2
        >>> dims = gpt2.dims(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2))
        >>> dims
        Dims(n_layers=2, d_model=16, n_heads=2, n_kv_heads=2, d_head=8, d_mlp=64, vocab=50257)
        >>> dims.size("head"), dims.size("pos")
        (2, None)
    """

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab: int

    def size(self, axis: str) -> int | None:
        """The size of a named axis (`"d_model"`, `"head"`, `"kv_head"`, `"d_head"`, `"d_mlp"`,
        `"vocab"`); None for the axes that vary per forward (`batch`, `pos`, `k_pos`)."""
        return {
            "d_model": self.d_model,
            "head": self.n_heads,
            "kv_head": self.n_kv_heads,
            "d_head": self.d_head,
            "d_mlp": self.d_mlp,
            "vocab": self.vocab,
        }.get(axis)


@dataclass(frozen=True)
class Point:
    """Where one site's tensor lives: a module (path with `{l}` for the layer), whether the site
    is that module's input or output, and the view that cuts the site out of it.

    `arg` is the keyword under which the module receives its input when it is called by keyword
    (Llama's `self_attn(hidden_states=...)`); otherwise the first positional argument is used.
    `field` is where the tensor sits in an output that is not a tensor: an index into a tuple
    (attention modules return `(output, weights)`) or a key of a `ModelOutput` (Gemma2's
    soft-capped `logits` exist only in the model's own output).

    Attributes:
        module: Dotted module path from the `*ForCausalLM`, with `{l}` for the layer index
            (`""` is the model itself).
        io: `"input"` (the module's first argument), `"output"`, or `"attention"` (inside
            the attention function: `attn.scores`/`attn.pattern`, see `splice.engine.attention`).
        view: How the site is cut out of the module tensor (`splice.architectures.views`);
            default `WHOLE`.
        arg: Keyword of the input when the module is called by keyword.
        field: Index or key of the tensor in a non-tensor output.

    Example:
        >>> from splice.architectures.views import Heads
        >>> point = Point("model.layers.{l}.self_attn.o_proj", "input", Heads(9))
        >>> point.needs_layer_input
        False
    """

    module: str
    io: str  # "input" | "output" | "attention" (inside the attention function, see splice.engine.attention)
    view: View = WHOLE
    arg: str = "hidden_states"
    field: int | str = 0

    @property
    def needs_layer_input(self) -> bool:
        """Whether the view needs the layer's residual input (`Tokens`, `ResidualSum`)."""
        return getattr(self.view, "needs_layer_input", False)

    @property
    def needs_call(self) -> bool:
        """Whether the view needs the hooked module and its input (`HeadResults`)."""
        return getattr(self.view, "needs_call", False)


@dataclass(frozen=True)
class Architecture:
    """One model family: which HF `model_type`s it covers, where its decoder lives, its sizes, and
    a function from sizes to its site table (point name -> Point). `logits_transform(config)`
    gives what the model applies to `lm_head`'s output outside any module (Gemma2's soft-cap), or
    None: a sweep that unembeds by hand applies it too.

    A module of `splice.architectures` that defines `ARCHITECTURE = Architecture(...)` is
    registered by being there (see `ARCHITECTURES`). `points` gives the family's table with the
    points that follow from it added (`derived_points`: `attn.result` from `attn.z`), so no
    family writes them.

    Attributes:
        name: The family's name, for messages.
        model_types: The `config.model_type` values it covers.
        decoder: Attribute of the `*ForCausalLM` holding the decoder stack (`"model"`,
            `"transformer"`); a bare decoder is accepted too.
        dims: `dims(config) -> Dims`; raises `SpliceError` for a configuration the table
            cannot describe.
        points: `points(dims) -> {point name: Point}`.
        parallel_residual: `parallel_residual(config) -> bool`: attention and MLP both read
            `resid_pre` (then there is no `resid_mid`); default False.
        logits_transform: `logits_transform(config)` -> a function applied to `lm_head`'s
            output, or None (the default).

    Example:
        >>> from splice.architectures import llama
        >>> arch = Architecture("my_llama", ("my_llama",), "model", llama.dims, llama.points)
        >>> arch.parallel_residual(None), arch.logits_transform(None)
        (False, None)
    """

    name: str
    model_types: tuple[str, ...]
    decoder: str  # attribute of the *ForCausalLM that holds the decoder stack
    # Any: a Hugging Face config (PretrainedConfig), whose attributes are set per family.
    dims: Callable[[Any], Dims]
    points: Callable[[Dims], dict[str, Point]]
    parallel_residual: Callable[[Any], bool] = field(default=lambda config: False)
    logits_transform: Callable[[Any], Callable[[torch.Tensor], torch.Tensor] | None] = field(
        default=lambda config: None
    )

    def __post_init__(self) -> None:
        if not isinstance(self.points, _WithDerived):
            object.__setattr__(self, "points", _WithDerived(self.points))


@dataclass(frozen=True)
class _WithDerived:
    """A family's `points` function, with `derived_points` applied to what it returns."""

    given: Callable[[Dims], dict[str, Point]]

    def __call__(self, dims: Dims) -> dict[str, Point]:
        return derived_points(self.given(dims))


def head_result_point(z: Point) -> Point | None:
    """The `attn.result` point of a table, from its `attn.z` point: the output of the module whose
    input is `attn.z` (the output projection), seen per head through `HeadResults(z.view)`, so
    the weights of each head are cut out of that module by the table's own z view. None when
    `attn.z` is not a module input cut out without the layer input (no family has such a z).

    Example:
        >>> from splice.architectures.views import Heads
        >>> head_result_point(Point("model.layers.{l}.self_attn.o_proj", "input", Heads(9)))
        Point(module='model.layers.{l}.self_attn.o_proj', io='output', view=HeadResults(heads=Heads(heads=9, start=None, stop=None)), arg='hidden_states', field=0)
    """
    if z.io != "input" or z.needs_layer_input or z.needs_call:
        return None
    return Point(z.module, "output", HeadResults(z.view), arg=z.arg)


def derived_points(table: dict[str, Point]) -> dict[str, Point]:
    """A family's table with the points that follow from its other points added: `attn.result`
    from `attn.z` (see `head_result_point`). A point the table already has is kept as written.

    Example:
        >>> import transformers
        >>> from splice.architectures import gpt2
        >>> table = gpt2.points(gpt2.dims(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2)))
        >>> "attn.result" in table, derived_points(table)["attn.result"].module  # gpt2.points: as written
        (False, 'transformer.h.{l}.attn.c_proj')
        >>> "attn.result" in gpt2.ARCHITECTURE.points(gpt2.dims(transformers.GPT2Config()))
        True
    """
    z = table.get("attn.z")
    result = head_result_point(z) if z is not None and "attn.result" not in table else None
    return table if result is None else {**table, "attn.result": result}


def residual_stream_points(
    layer: str, attn: str, mlp: str, final_norm: str, attn_out: str | None = None
) -> dict[str, Point]:
    """The sites every pre-norm decoder family shares, from the paths of its layer, attention
    module, MLP module and final norm. `attn_out` is the module whose output is the attention's
    residual contribution, if not the attention module itself (Gemma2's post-attention norm).

    Start a family's table from it and add (or override) the projection sites: `attn.q/k/v`,
    `attn.z` and `mlp.post` are family-specific.

    Args:
        layer: Path of a decoder layer, with `{l}` (`"model.layers.{l}"`).
        attn: Path of its attention module.
        mlp: Path of its MLP module.
        final_norm: Path of the final norm.
        attn_out: Path of the module whose output joins the residual after attention, if not
            `attn`.

    Returns:
        `{point: Point}` for `embed`, `resid_pre`, `attn.in`, `attn.scores`, `attn.pattern`,
        `attn.out`, `resid_mid`, `mlp.in`, `mlp.out`, `resid_post`, `final_norm`, `logits`.

    Example:
        >>> table = residual_stream_points("model.layers.{l}", "model.layers.{l}.self_attn",
        ...                                "model.layers.{l}.mlp", "model.norm")
        >>> table["resid_post"]
        Point(module='model.layers.{l}', io='output', view=Whole(), arg='hidden_states', field=0)
    """
    attn_out = attn_out or attn
    return {
        "embed": Point(layer.replace("{l}", "0"), "input"),
        "resid_pre": Point(layer, "input"),
        "attn.in": Point(attn, "input"),
        "attn.scores": Point(attn, "attention"),
        "attn.pattern": Point(attn, "attention"),
        "attn.out": Point(attn_out, "output"),
        "resid_mid": Point(attn_out, "output", ResidualSum()),
        "mlp.in": Point(mlp, "input"),
        "mlp.out": Point(mlp, "output"),
        "resid_post": Point(layer, "output"),
        "final_norm": Point(final_norm, "output"),
        "logits": Point("lm_head", "output"),
    }


def interleaved_qkv_points(qkv: str, heads: int) -> dict[str, Point]:
    """q/k/v of a fused projection laid out per head as [q k v] (GPT-NeoX, BLOOM, Falcon).

    Args:
        qkv: Path of the fused projection, with `{l}`.
        heads: Number of heads.

    Example:
        >>> interleaved_qkv_points("gpt_neox.layers.{l}.attention.query_key_value", 4)["attn.k"].view
        InterleavedHeads(heads=4, parts=3, index=1)
    """
    return {
        f"attn.{part}": Point(qkv, "output", InterleavedHeads(heads, 3, i)) for i, part in enumerate("qkv")
    }
