"""Weight matrices in TransformerLens' layout, read out of a Hugging Face model through its table.

Why this works for every family without code per family: a q/k/v site is the *output* of a
projection, cut out by the point's view along the last axis. Written as `[d_in, d_out]` (so that
`x @ W + b` is the projection), the projection's weight has that same last axis, so the same view
applied to the weight (and to the bias, `[d_out]`) cuts out the same heads' weights: separate
projections (Llama), blocked fused ones (GPT-2's `[Q|K|V]`, Phi-3) and per-head interleaved ones
(GPT-NeoX, BLOOM, Falcon) alike. `attn.z` is the *input* of the output projection, so the view
applied to the transposed weight's last axis (the input axis) gives each head's rows of W_O.

Everything returned here is a detached copy made under `torch.no_grad()`, in the parameters'
dtype and on their device: changing it never changes the model, and it carries no graph. The
matrices are the raw weights (no LayerNorm folding, no centring, rotary not applied); the one
thing taken as the model computes it is the embedding, read through the embedding module (see
`embedding`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, cast

import torch
import torch.nn as nn
from transformers.pytorch_utils import Conv1D

from ..architectures.table import Point
from ..errors import SpliceError, valid_range
from . import devices
from .layout import Layout

HEAD_WEIGHTS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O")


class _View(Protocol):
    def read(self, full: torch.Tensor, layer_input: torch.Tensor | None = None) -> torch.Tensor: ...


def in_out(module: nn.Module, path: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight as `[d_in, d_out]` and its bias `[d_out]` (or None): views of the
    parameters, not copies (for a module accelerate offloads, of a copy loaded for the read).
    `nn.Linear` stores `[out, in]`, transformers' `Conv1D` (GPT-2)
    `[in, out]`; nothing else is a projection splice knows how to read."""
    if isinstance(module, (nn.Linear, Conv1D)):
        with devices.loaded(module):  # offloaded by accelerate: read from where the weights rest
            weight, bias = module.weight, module.bias
        return (weight.T if isinstance(module, nn.Linear) else weight), bias
    raise SpliceError(
        f"{path} is a {type(module).__name__}; splice reads the weights of nn.Linear and transformers' "
        "Conv1D projections only"
    )


def layer_index(layer: int, n_layers: int) -> int:
    """A layer index (negative counts from the end) checked against the model's layer count."""
    if isinstance(layer, bool) or not isinstance(layer, int):
        raise SpliceError(f"layer must be an int (negative counts from the end); got {layer!r}")
    if not -n_layers <= layer < n_layers:
        raise SpliceError(
            f"layer {layer} is out of range: this model has {n_layers} layers, valid {valid_range(n_layers)}"
        )
    return layer % n_layers


def _projection(layout: Layout, point_name: str, layer: int) -> tuple[nn.Module, str, Point, _View]:
    point = layout.points.get(point_name)
    if point is None:
        raise SpliceError(f"this {layout.arch.name} model has no {point_name} site to read weights from")
    path = point.module.replace("{l}", str(layer))
    return layout.module_at(path), path, point, cast(_View, point.view)


def _expect(tensor: torch.Tensor, shape: tuple[int, ...], what: str, path: str) -> torch.Tensor:
    if tuple(tensor.shape) != shape:
        raise SpliceError(
            f"{what} read from {path} has shape {list(tensor.shape)}, expected {list(shape)}: the table's "
            "view does not cut per-head weights out of this module"
        )
    return tensor


def qkv(layout: Layout, part: str, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`W [heads, d_model, d_head]` and `b [heads, d_head]` of site `attn.<part>` at one layer
    (`heads` is the KV-head count for k and v); b is zeros when the projection has no bias.
    Views of the parameters (callers copy)."""
    module, path, point, view = _projection(layout, f"attn.{part}", layer)
    d = layout.dims
    heads = d.n_heads if part == "q" else d.n_kv_heads
    if point.io != "output" or point.needs_layer_input:
        raise SpliceError(
            f"attn.{part} of this {layout.arch.name} model is not a projection's output in its table "
            f"({point.io} of {path}): its weights cannot be read through the table"
        )
    weight, bias = in_out(module, path)
    w = _expect(view.read(weight), (d.d_model, heads, d.d_head), f"W_{part.upper()}", path)
    if bias is None:
        b = weight.new_zeros(heads, d.d_head)
    else:
        b = _expect(view.read(bias), (heads, d.d_head), f"b_{part.upper()}", path)
    return w.transpose(0, 1), b


def output(layout: Layout, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`W_O [heads, d_head, d_model]` and `b_O [d_model]` at one layer: the output projection is
    the module whose input is `attn.z`; b_O is zeros when it has no bias. Views of the parameters."""
    module, path, point, view = _projection(layout, "attn.z", layer)
    d = layout.dims
    if point.io != "input" or point.needs_layer_input:
        raise SpliceError(
            f"attn.z of this {layout.arch.name} model is not a projection's input in its table "
            f"({point.io} of {path}): W_O cannot be read through the table"
        )
    weight, bias = in_out(module, path)
    rows = _expect(view.read(weight.T), (d.d_model, d.n_heads, d.d_head), "W_O", path)
    b = weight.new_zeros(d.d_model) if bias is None else _expect(bias, (d.d_model,), "b_O", path)
    return rows.permute(1, 2, 0), b


def _per_layer(layout: Layout, name: str, layer: int) -> torch.Tensor:
    if name in ("W_O", "b_O"):
        w, b = output(layout, layer)
    else:
        w, b = qkv(layout, name[-1].lower(), layer)
    return w if name.startswith("W") else b


def head_weights(layout: Layout, name: str, layer: int | None = None, repeat_kv: bool = True) -> torch.Tensor:
    """One of `W_Q W_K W_V W_O b_Q b_K b_V b_O`, every layer stacked on a new first axis (or one
    layer's, without it), as a detached copy. With `repeat_kv` the k/v weights are given per
    query head: query head h reads KV head h // (heads / kv_heads), as HF's `repeat_kv` does."""
    if name not in HEAD_WEIGHTS:
        raise SpliceError(f"unknown head weight {name!r}; expected one of {', '.join(HEAD_WEIGHTS)}")
    if not isinstance(repeat_kv, bool):
        raise SpliceError(f"repeat_kv must be True or False; got {repeat_kv!r}")
    n_layers = layout.dims.n_layers
    layers = range(n_layers) if layer is None else [layer_index(layer, n_layers)]
    with torch.no_grad():
        parts = [_per_layer(layout, name, l) for l in layers]
        out = torch.stack(parts) if layer is None else parts[0].clone()
        if repeat_kv and name[-1] in "KV":
            d = layout.dims
            if d.n_heads % d.n_kv_heads:
                raise SpliceError(f"{d.n_heads} query heads cannot share {d.n_kv_heads} KV heads evenly")
            out = out.repeat_interleave(d.n_heads // d.n_kv_heads, dim=0 if layer is not None else 1)
    return out.detach()


def embedding(model: nn.Module) -> torch.Tensor:
    """`W_E [vocab, d_model]`: the input embedding module's output for every token id, so that
    `W_E[ids]` is exactly what the module gives for `ids`. That is the embedding matrix itself,
    except where the module scales it (Gemma, Gemma2 multiply by sqrt(d_model)), where the scale is
    included, as TransformerLens does. Computed with the module's own `forward` (no hooks run)."""
    module = _embeddings(model, "get_input_embeddings", "input embedding")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise SpliceError(f"the input embedding is a {type(module).__name__} without a 2-D weight")
    with torch.no_grad():
        ids = torch.arange(weight.shape[0], device=devices.execution_device(module) or weight.device)
        return module.forward(ids).detach().clone()


def unembedding(model: nn.Module) -> tuple[nn.Module, torch.Tensor, torch.Tensor | None]:
    """The output embedding module (lm_head), its weight as `[d_model, vocab]` and bias `[vocab]`
    or None (views of the parameters)."""
    module = _embeddings(model, "get_output_embeddings", "output embedding (lm_head)")
    weight, bias = in_out(module, "lm_head")
    return module, weight, bias


def unembedding_weight(model: nn.Module) -> torch.Tensor:
    """`W_U [d_model, vocab]`: the lm_head weight, transposed, as a detached contiguous copy."""
    _, weight, _ = unembedding(model)
    with torch.no_grad():
        return weight.detach().clone(memory_format=torch.contiguous_format)


def unembedding_bias(model: nn.Module) -> torch.Tensor:
    """`b_U [vocab]`: lm_head's bias as a detached copy, or zeros where it has none (so that
    `resid @ W_U + b_U` works for every model)."""
    _, weight, bias = unembedding(model)
    with torch.no_grad():
        return weight.new_zeros(weight.shape[1]) if bias is None else bias.detach().clone()


def _embeddings(model: nn.Module, getter: str, what: str) -> nn.Module:
    get: Callable[[], nn.Module | None] | None = getattr(model, getter, None)
    module = get() if get is not None else None
    if module is None:
        raise SpliceError(
            f"{type(model).__name__} has no {what}: wrap the *ForCausalLM model, not its bare decoder"
        )
    return module
