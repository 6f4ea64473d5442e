"""How a receiver's residual-stream input becomes what the model feeds it, per receiver.

A head's query input x (before its norm) reaches the model as `view_h(q_proj(norm1(x)))`, and an
MLP's as `norm2(x)`. Edge attribution needs these maps one receiver at a time: to give each head
its own input (exact circuit runs) and to pull a head's gradient back to its own pre-norm input.
The projection modules and their views are in the architecture table (`attn.q/k/v`); the norms
are found once per model by watching a short forward: the norm is the submodule of the layer
whose output *is* the tensor the attention (MLP) module is called with. That covers Falcon's
config-dependent norms (one shared `input_layernorm`, or `ln_attn` / `ln_mlp`) with no table
entry.

The same probe checks, on numbers, what edge attribution assumes: the layer's output is its
input plus every head's `attn.result`, the output projection's bias and `mlp.out` (it is not in
Gemma 2, which normalises the attention output after the projection, nor in any post-norm
variant), and the maps above reproduce the model's own `attn.q/k/v` and `mlp.in`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..errors import SpliceError

__all__ = ["Feeds", "feeds_of"]

_PROBE_TOKENS = 6
# Relative errors allowed in the checks: float32 rounding gives ~1e-6 and half precision ~1e-2,
# while a norm after the projection (Gemma 2) or a post-norm residual is off by O(1).
_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-3}
_HALF_TOLERANCE = 5e-2
# Norm paths found per model: strings only, so the cache never keeps a model alive (a Feeds
# holds the layout, which holds the model, and would pin its weak key).
_CACHE: weakref.WeakKeyDictionary[nn.Module, tuple[str, str]] = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Feeds:
    """The per-receiver input maps of one model.

    Attributes:
        layout: The model's `Layout`.
        attn_norm: Path (with `{l}`) of the norm before attention.
        mlp_norm: Path (with `{l}`) of the norm before the MLP.
    """

    layout: Any
    attn_norm: str
    mlp_norm: str

    def _module(self, path: str, layer: int) -> nn.Module:
        return self.layout.module_at(path.replace("{l}", str(layer)))

    def heads(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """The `attn.{which}` site of `layer` computed from residual inputs `x [R, n, pos, d_model]`,
        one whole site per copy: `[R, n, pos, heads, d_head]` (copy r is what every head would get
        from input r; a caller keeps head r of copy r)."""
        point = self.layout.points[f"attn.{which}"]
        norm = self._module(self.attn_norm, layer)
        projection = self._module(point.module, layer)
        flat = x.flatten(0, 1)
        site = point.view.read(projection(norm(flat)))
        return site.unflatten(0, x.shape[:2])

    def own(self, layer: int, which: str, x: torch.Tensor, heads: list[int]) -> torch.Tensor:
        """Each head's own `attn.{which}` slice from its own residual input: `x [R, n, pos,
        d_model]` (input r for head `heads[r]`) gives `[R, n, pos, d_head]`."""
        site = self.heads(layer, which, x)
        rows = torch.arange(len(heads), device=x.device)
        return site[rows, :, :, torch.tensor(heads, device=x.device)]

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP input (`mlp.in`) of `layer` computed from residual inputs `x [..., d_model]`."""
        return self._module(self.mlp_norm, layer)(x)


def mlp_reads(model, layer: int) -> str:
    """The site holding the residual stream the MLP of `layer` reads (before its norm)."""
    return f"blocks.{layer}.resid_pre" if model.layout.parallel_residual else f"blocks.{layer}.resid_mid"


def feeds_of(model) -> Feeds:
    """The checked `Feeds` of a `splice.Model` (found and checked once per model; one short
    forward of a probe prompt).

    Args:
        model: A `splice.Model`.

    Returns:
        Its `Feeds`.

    Raises:
        SpliceError: For a family whose residual stream is not the sum of the nodes' outputs
            (Gemma 2, post-norm variants), or whose inputs this module cannot reproduce.
    """
    paths = _CACHE.get(model.hf)
    if paths is not None:
        return Feeds(model.layout, *paths)
    found = _check(model, _discover(model))
    _CACHE[model.hf] = (found.attn_norm, found.mlp_norm)
    return found


def _probe(model) -> torch.Tensor:
    ids = torch.arange(1, _PROBE_TOKENS + 1) % model.dims.vocab
    return ids.view(1, -1).to(model.device)


def _called_with(point, args: tuple, kwargs: dict) -> Any:
    return kwargs[point.arg] if point.arg in kwargs else (args[0] if args else None)


def _discover(model) -> Feeds:
    """Find the norms feeding attention and the MLP: the layer-0 submodules whose output is the
    tensor those modules are called with (by identity, else by value)."""
    layout = model.layout
    layer_path = layout.points["resid_pre"].module.replace("{l}", "0")
    layer = layout.module_at(layer_path)
    targets = {key: layout.points[key] for key in ("attn.in", "mlp.in")}
    outputs: list[tuple[str, torch.Tensor]] = []
    received: dict[str, Any] = {}
    handles = []

    def keep(name):
        def hook(module, args, output):
            if isinstance(output, torch.Tensor):
                outputs.append((name, output))

        return hook

    def watch(key):
        def hook(module, args, kwargs):
            received.setdefault(key, _called_with(targets[key], args, kwargs))

        return hook

    try:
        for name, module in layer.named_modules():
            if name:
                handles.append(module.register_forward_hook(keep(name)))
        for key, point in targets.items():
            module = layout.module_at(point.module.replace("{l}", "0"))
            handles.append(module.register_forward_pre_hook(watch(key), with_kwargs=True))
        with torch.no_grad():
            model.hf(input_ids=_probe(model), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()

    def norm_of(key: str) -> str:
        tensor = received.get(key)
        if isinstance(tensor, torch.Tensor):
            same = [n for n, out in outputs if out is tensor]
            equal = [n for n, out in outputs if out.shape == tensor.shape and torch.equal(out, tensor)]
            for names in (same, equal):
                if names:
                    return layout.points["resid_pre"].module + "." + min(names, key=len)
        raise SpliceError(
            f"edge attribution cannot find the norm in front of {targets[key].module} in this "
            f"{layout.arch.name} model: no submodule of {layer_path} outputs the tensor it is called with"
        )

    return Feeds(layout, norm_of("attn.in"), norm_of("mlp.in"))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative error of `a` against `b`, over a tolerance that depends on `b`'s precision (so
    above 1 means too far)."""
    error = (a.float() - b.float().to(a.device)).norm() / b.float().norm().clamp_min(1e-30)
    return float(error) / _TOLERANCE.get(b.dtype, _HALF_TOLERANCE)


def _check(model, feeds: Feeds) -> Feeds:
    """Refuse a model whose residual stream is not the sum of the nodes' outputs, or whose
    inputs the maps of `feeds` do not reproduce."""
    n = model.dims.n_layers
    parallel = model.layout.parallel_residual
    points = ["resid_pre", "attn.q", "attn.k", "attn.v", "attn.result", "mlp.in", "mlp.out", "resid_post"]
    sites = [f"blocks.{layer}.{p}" for layer in range(n) for p in points]
    if not parallel:
        sites += [f"blocks.{layer}.resid_mid" for layer in range(n)]
    with torch.no_grad():
        _, rec = model.run(_probe(model), record=sites, use_cache=False)
        assert rec is not None
        for layer in range(n):
            site = f"blocks.{layer}."
            bias = model.head_weights("b_O", layer).to(rec[site + "resid_pre"])
            total = rec[site + "resid_pre"] + rec[site + "attn.result"].sum(-2) + bias + rec[site + "mlp.out"]
            error = _relative(total, rec[site + "resid_post"])
            if error > 1:
                raise SpliceError(
                    f"edge attribution needs a residual stream that is the sum of the nodes' outputs, and this "
                    f"{model.layout.arch.name} model's is not: blocks.{layer}.resid_post differs from resid_pre + "
                    f"the heads' attn.result + the output bias + mlp.out by {error:.2g} times the tolerance. Families "
                    "that normalise a sublayer's output before adding it (Gemma 2) or normalise the residual "
                    "stream itself (post-norm) have no per-edge decomposition"
                )
            x = rec[site + "resid_pre"].unsqueeze(0)
            for which in "qkv":
                _agree(feeds.heads(layer, which, x)[0], rec[f"{site}attn.{which}"], f"{site}attn.{which}")
            _agree(feeds.mlp(layer, rec[mlp_reads(model, layer)]), rec[site + "mlp.in"], site + "mlp.in")
    return feeds


def _agree(mine: torch.Tensor, theirs: torch.Tensor, site: str) -> None:
    error = _relative(mine, theirs)
    if error > 1:
        raise SpliceError(
            f"edge attribution cannot reproduce {site} from the residual stream in this model (error "
            f"{error:.2g} times the tolerance): the norm found in front of it is not the whole map from residual to input"
        )
