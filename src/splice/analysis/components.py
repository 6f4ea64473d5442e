"""The residual stream as a sum of components, read from one recorded forward.

Why it adds up in every family: each decoder layer returns `resid_pre + attn.out + mlp.out`,
whatever its layout, because the tables place `attn.out` / `mlp.out` at what actually joins the
residual stream: the sublayer's output in pre-norm families, the same in parallel-residual ones
(GPT-J, GPT-NeoX, parallel Falcon, where both sublayers read `resid_pre`), the post-sublayer norm's
output in Gemma2, the projections' outputs in BLOOM (whose modules add the residual themselves),
and `fc2`'s output, unflattened, in OPT. So the embedding plus every layer's two contributions is
the residual after that layer, up to float rounding.

Per head, `z[..., h, :] @ W_O[l, h]` summed over heads plus the output bias is the output
projection's output. Where the projection's output reaches the residual unchanged (a dropout, the
attention module returning it) that is `attn.out`; where a norm follows it (Gemma2's
`post_attention_layernorm`), the norm is applied with its statistics frozen at the real
projection output (`splice.analysis.norms`), which is linear, so the heads still sum to `attn.out`.

Under edits the recorded values are the edited ones, so the components are the edited run's. An
edit that changes the stream *between* two components (at `resid_pre`, `resid_mid`,
`resid_post`, or, with heads, between `attn.z` and `attn.out`) is a component of its own,
`edit:<site>`: the difference it made. So the sum holds under any edit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

from ..engine import weights
from ..engine.edits import Edits
from ..errors import SpliceError, valid_range
from . import norms

if TYPE_CHECKING:
    from ..engine.layout import Layout
    from ..engine.model import Model
    from ..engine.recording import Recording

RESIDUAL_POINTS = ("resid_pre", "resid_mid", "resid_post")
"""The points a decomposition can end at (`upto=`)."""

BY = ("layers", "heads")
"""What `by=` accepts."""

_AFTER_Z = ("attn.result", "attn.out")  # per-layer points between attn.z and the residual


@dataclass(frozen=True)
class Target:
    """The residual tensor a decomposition sums to: site `name` = `blocks.<layer>.<point>`."""

    name: str
    point: str
    layer: int


@dataclass(frozen=True)
class Part:
    """What one component is.

    Attributes:
        label: Its name (`"blocks.3.attn.head.5"`, `"embed.pos"`, `"edit:blocks.2.resid_post"`).
        kind: `"embed"`, `"embed.token"`, `"embed.pos"`, `"attn"`, `"head"`, `"attn_bias"`,
            `"mlp"` or `"edit"` (and in `logit_attribution`'s rows no component owns,
            `"norm_bias"` and `"unembed_bias"`).
        layer: Its layer (None for the embedding).
        head: Its head (heads only).
        site: The site it is read from, or computed from (`attn.z` for heads).
        stage: The residual-stream site it is first part of (`"blocks.3.resid_mid"`).
    """

    label: str
    kind: str
    layer: int | None
    head: int | None
    site: str
    stage: str


@dataclass(frozen=True)
class Plan:
    """What to record and the steps that turn the recording into components, in forward order.

    Steps: `("embed",)`, `("attn", l)`, `("heads", l)`, `("edit_attn", l)` (the difference
    between the heads and `attn.out`), `("mlp", l)`, `("edit", site_name)`.
    """

    target: Target
    steps: tuple[tuple[Any, ...], ...]
    record: tuple[str, ...]
    split_embed: bool


def target_of(layout: Layout, upto: Any) -> Target:
    """The residual site `upto` names: `"final"` (the last layer's `resid_post`, before the
    final norm) or a `blocks.L.resid_pre` / `resid_mid` / `resid_post` site (any alias; negative
    layers count from the end).

    Raises:
        SpliceError: For anything else, saying what is accepted.
    """
    n = layout.n_layers
    points = "'blocks.L.resid_pre' or 'blocks.L.resid_post'"
    if not layout.parallel_residual:
        points = "'blocks.L.resid_pre', 'blocks.L.resid_mid' or 'blocks.L.resid_post'"
    expected = (
        f"upto must be 'final' (the last layer's resid_post, before the final norm) or {points} "
        f"with L in {valid_range(n)}"
    )
    if isinstance(upto, str) and upto == "final":
        return Target(f"blocks.{n - 1}.resid_post", "resid_post", n - 1)
    if not isinstance(upto, (str, tuple)):
        raise SpliceError(f"{expected}; got {upto!r}")
    try:
        sites = layout.sites_of(upto)
    except SpliceError as error:
        raise SpliceError(f"{expected}; got {upto!r} ({error})") from None
    if len(sites) != 1 or sites[0].point not in RESIDUAL_POINTS or sites[0].layer is None:
        names = ", ".join(s.name for s in sites[:3]) + (" ..." if len(sites) > 3 else "")
        raise SpliceError(f"{expected}; got {upto!r}, which names {names}")
    site = sites[0]
    assert site.layer is not None  # checked above
    return Target(site.name, site.point, site.layer)


def head_layers(layout: Layout, by: Any, layers: Any, target: Target) -> frozenset[int]:
    """The layers whose attention is split per head: none for `by="layers"`; for `by="heads"`,
    `layers` (an int or a list of them) or every layer whose attention the target includes.

    Raises:
        SpliceError: For an unknown `by`, `layers` without `by="heads"`, a layer out of range
            or after the target.
    """
    if not isinstance(by, str) or by not in BY:
        raise SpliceError(f"by must be 'layers' or 'heads'; got {by!r}")
    last = target.layer - (target.point == "resid_pre")  # the last layer whose attention is included
    if by == "layers":
        if layers is not None:
            raise SpliceError(
                f"layers= chooses the layers split per head; it needs by='heads' (got by={by!r})"
            )
        return frozenset()
    if layers is None:
        return frozenset(range(last + 1))
    chosen = [layers] if isinstance(layers, int) else layers
    if not isinstance(chosen, (list, tuple, range)) or not chosen:
        raise SpliceError(f"layers must be an int or a non-empty list of ints; got {layers!r}")
    out = set()
    for layer in chosen:
        index = weights.layer_index(layer, layout.n_layers)
        if index > last:
            raise SpliceError(
                f"layers={layers!r}: layer {layer} is after the target {target.name}, whose attention "
                f"goes up to layer {last}"
            )
        out.add(index)
    return frozenset(out)


def edited_sites(layout: Layout, edits: Edits) -> set[str]:
    """Canonical names of every site `edits` touches on this model (globs expanded).

    Raises:
        SpliceError: For a key that names no site of this model.
    """
    return {site.name for key, _ in edits.items_flat() for site in layout.sites_of(key)}


def token_embedding(model: nn.Module) -> nn.Module | None:
    """The model's input (token) embedding module, or None if it does not say."""
    get: Callable[[], nn.Module | None] | None = getattr(model, "get_input_embeddings", None)
    return get() if get is not None else None


def positional_embedding(model: nn.Module) -> nn.Module | None:
    """The model's learned positional embedding, if it has exactly one: an `nn.Embedding`
    other than its input (token) embedding (GPT-2's `wpe`, OPT's `embed_positions`). Families
    with rotary or ALiBi positions have none."""
    tokens = token_embedding(model)
    found = [m for m in model.modules() if isinstance(m, nn.Embedding) and m is not tokens]
    return found[0] if len(found) == 1 and tokens is not None else None


def make_plan(
    m: Model, target: Target, heads: frozenset[int], edited: set[str], extra: tuple[str, ...] = ()
) -> Plan:
    """The steps and recorded sites for one decomposition (see `Plan`); `extra` sites are
    recorded too (the caller reads them)."""
    layout = m.layout
    split = positional_embedding(m.hf) is not None and "embed" not in edited
    steps: list[tuple[Any, ...]] = [("embed",)]
    record: list[str] = ["embed"]

    def edit(name: str) -> None:
        if name in edited:
            steps.append(("edit", name))
            record.append(name)

    for layer in range(target.layer + 1):
        edit(f"blocks.{layer}.resid_pre")
        if target.point == "resid_pre" and layer == target.layer:
            break
        if layer in heads:
            steps.append(("heads", layer))
            record.append(f"blocks.{layer}.attn.z")
            if any(f"blocks.{layer}.{p}" in edited for p in _AFTER_Z):
                steps.append(("edit_attn", layer))
                record.append(f"blocks.{layer}.attn.out")
        else:
            steps.append(("attn", layer))
            record.append(f"blocks.{layer}.attn.out")
        if not layout.parallel_residual:
            edit(f"blocks.{layer}.resid_mid")
        if target.point == "resid_mid" and layer == target.layer:
            break
        steps.append(("mlp", layer))
        record.append(f"blocks.{layer}.mlp.out")
        edit(f"blocks.{layer}.resid_post")
    for name in extra:
        if name not in record:
            record.append(name)
    return Plan(target, tuple(steps), tuple(record), split)


def _stage(layout: Layout, layer: int, where: str) -> str:
    if where == "attn" and not layout.parallel_residual:
        return f"blocks.{layer}.resid_mid"
    return f"blocks.{layer}.resid_post"


def _post_norm(layout: Layout) -> bool:
    """Whether a module other than the output projection's path stands between the projection's
    output and `attn.out` (Gemma2's post-attention norm), which must then be applied frozen."""
    out, z = layout.points["attn.out"].module, layout.points["attn.z"].module
    if z == out or z.startswith(out + "."):
        return False  # attn.out is the projection's output, or the attention module returning it
    return not isinstance(layout.module_at(out.replace("{l}", "0")), (nn.Dropout, nn.Identity))


@dataclass(frozen=True)
class _Projection:
    """One layer's output projection, read for per-head components: `W_O [head, d_head,
    d_model]` and `b_O [d_model]` (detached views of the parameters), whether the projection
    has a bias, and the norm that follows it before the residual (Gemma2), if any."""

    w_o: torch.Tensor
    b_o: torch.Tensor
    has_bias: bool
    post: tuple[nn.Module, norms.FrozenNorm] | None

    @property
    def bias_part(self) -> bool:
        """Whether the layer has a bias component (its own, or a post-norm's)."""
        return self.has_bias or (self.post is not None and self.post[1].bias is not None)


def _projection(layout: Layout, layer: int) -> _Projection:
    path = layout.points["attn.z"].module.replace("{l}", str(layer))
    _, bias = weights.in_out(layout.module_at(path), path)
    w_o, b_o = (t.detach() for t in weights.output(layout, layer))
    post = None
    if _post_norm(layout):
        out_path = layout.points["attn.out"].module.replace("{l}", str(layer))
        module = layout.module_at(out_path)
        post = (module, norms.read_norm(module, layout.dims.d_model, f"the post-attention norm {out_path}"))
    return _Projection(w_o, b_o, bias is not None, post)


def _heads_into(out: torch.Tensor, z: torch.Tensor, proj: _Projection) -> None:
    """Write each head's result `z[..., h, :] @ W_O[h]` into `out[h]` (`out`: `[head (+ 1 for
    the bias), batch, pos, d_model]`) and the bias's component into `out[-1]` if there is one;
    with a post-norm, both through it with its scale frozen at the projection's real output."""
    heads, (batch, pos) = z.shape[2], z.shape[:2]
    flat = z.permute(2, 0, 1, 3).reshape(heads, batch * pos, -1)  # [head, batch*pos, d_head]
    torch.bmm(flat, proj.w_o.to(z.dtype), out=out[:heads].view(heads, batch * pos, -1))
    if proj.has_bias:
        out[heads] = proj.b_o.to(z.dtype)
    if proj.post is not None:
        module, norm = proj.post
        projected = out[:heads].sum(0) + proj.b_o.to(z.dtype)  # what the norm really normalised
        norms.check(norm, module, projected)
        sigma = norm.sigma(projected)
        out[:heads] = norm.linear(out[:heads], sigma).to(z.dtype)
        if proj.has_bias or norm.bias is not None:
            offset = norm.linear(out[heads], sigma) if proj.has_bias else torch.zeros_like(projected).float()
            out[heads] = (offset if norm.bias is None else offset + norm.bias).to(z.dtype)


def _count(plan: Plan, split: bool, projections: dict[int, _Projection], n_heads: int) -> int:
    sizes = {"embed": 2 if split else 1}
    return sum(
        n_heads + projections[step[1]].bias_part if step[0] == "heads" else sizes.get(step[0], 1)
        for step in plan.steps
    )


def build(
    m: Model,
    plan: Plan,
    rec: Recording,
    input_ids: torch.Tensor | None,
    select: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[list[Part], torch.Tensor]:
    """The components of `plan` from its recording: their descriptions and one tensor
    `[component, batch, pos, d_model]`, written in place (`select` cuts the positions wanted out
    of each recorded `[batch, pos, ...]` tensor first, e.g. only the last token's).

    Raises:
        SpliceError: For a norm after the output projection that is not a LayerNorm or RMS norm.
    """
    layout = m.layout
    parts: list[Part] = []
    with torch.no_grad():
        embed = select(rec["embed"])
        tokens = token_embedding(m.hf) if plan.split_embed and input_ids is not None else None
        projections = {step[1]: _projection(layout, step[1]) for step in plan.steps if step[0] == "heads"}
        n_heads = layout.dims.n_heads
        out = embed.new_empty((_count(plan, tokens is not None, projections, n_heads), *embed.shape))
        first: dict[int, int] = {}  # layer -> index of its first attention component

        def put(part: Part, value: torch.Tensor | None = None) -> None:
            if value is not None:
                out[len(parts)] = value
            parts.append(part)

        for step in plan.steps:
            kind = step[0]
            if kind == "embed":
                stage = "blocks.0.resid_pre"
                if tokens is not None and input_ids is not None:
                    token = tokens.forward(select(input_ids)).to(embed.dtype)
                    put(Part("embed.token", "embed.token", None, None, "embed", stage), token)
                    put(Part("embed.pos", "embed.pos", None, None, "embed", stage), embed - token)
                else:
                    put(Part("embed", "embed", None, None, "embed", stage), embed)
                continue
            layer = step[1] if kind != "edit" else int(step[1].split(".")[1])
            if kind == "attn":
                name = f"blocks.{layer}.attn.out"
                put(Part(name, "attn", layer, None, name, _stage(layout, layer, "attn")), select(rec[name]))
            elif kind == "heads":
                z_name, stage, proj = (
                    f"blocks.{layer}.attn.z",
                    _stage(layout, layer, "attn"),
                    projections[layer],
                )
                first[layer] = start = len(parts)
                _heads_into(out[start : start + n_heads + proj.bias_part], select(rec[z_name]), proj)
                for head in range(n_heads):
                    put(Part(f"blocks.{layer}.attn.head.{head}", "head", layer, head, z_name, stage))
                if proj.bias_part:
                    put(Part(f"blocks.{layer}.attn.bias", "attn_bias", layer, None, z_name, stage))
            elif kind == "edit_attn":
                name = f"blocks.{layer}.attn.out"
                delta = select(rec[name]) - out[first[layer] : len(parts)].sum(0)
                put(Part(f"edit:{name}", "edit", layer, None, name, _stage(layout, layer, "attn")), delta)
            elif kind == "mlp":
                name = f"blocks.{layer}.mlp.out"
                put(Part(name, "mlp", layer, None, name, f"blocks.{layer}.resid_post"), select(rec[name]))
            else:  # an edit of the residual stream itself: what it changed
                name = step[1]
                delta = select(rec[name]) - out[: len(parts)].sum(0)
                put(Part(f"edit:{name}", "edit", layer, None, name, name), delta)
    assert len(parts) == len(out)
    return parts, out


def decompose_run(
    m: Model,
    batch: dict[str, Any],
    target: Target,
    heads: frozenset[int],
    edits: Edits,
    extra: tuple[str, ...] = (),
    select: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
) -> tuple[list[Part], torch.Tensor, Recording]:
    """One forward of `batch` (model kwargs) under `edits`, recording only what the
    decomposition (and `extra`) needs and stopping after it; returns the parts, the components
    `[component, batch, pos, d_model]` and the recording.

    Raises:
        SpliceError: With per-head components while the model is in training mode (dropout
            after the output projection would not be per head).
    """
    if heads and m.hf.training:
        raise SpliceError(
            "by='heads' needs the model in eval mode (m.hf.eval()): in training mode dropout acts on "
            "the attention output after the heads are summed, so no per-head split adds up"
        )
    plan = make_plan(m, target, heads, edited_sites(m.layout, edits), extra)
    with torch.no_grad():
        _, rec = m.run(
            batch, edits=edits if len(edits) else None, record=list(plan.record), stop_after_record=True
        )
    assert rec is not None
    parts, components = build(m, plan, rec, batch.get("input_ids"), select)
    return parts, components, rec
