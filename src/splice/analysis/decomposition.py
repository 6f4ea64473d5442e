"""`decompose` and `accumulated`: the residual stream as labelled components, and as the running
sums of them (TransformerLens' `decompose_resid` and `accumulated_resid`).

How the components are found, and why they add up in every family, is in
`splice.analysis.components`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..engine import tokens as tok
from ..engine.edits import as_edits
from ..errors import SpliceError
from . import components as comp
from .components import Part

if TYPE_CHECKING:
    from ..engine.edits import Edits
    from ..engine.model import Inputs, Model


def _label_index(labels: Sequence[str], label: Any, what: str) -> int:
    if isinstance(label, str) and label in labels:
        return list(labels).index(label)
    shown = ", ".join(labels[:6]) + (f" ... ({len(labels)} in all)" if len(labels) > 6 else "")
    raise SpliceError(f"{label!r} is not a label of this {what}; its labels are {shown}")


@dataclass(frozen=True, repr=False)
class Decomposition:
    """The components of one residual-stream tensor, from `decompose`.

    Attributes:
        components: `[component, batch, pos, d_model]`, summing (over the first axis) to the
            target residual of the run that was decomposed.
        parts: What each component is (`splice.analysis.components.Part`: label, kind, layer,
            head, site, stage).
        target: The residual site summed to (`"blocks.11.resid_post"`).

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> parts = splice.analysis.decompose(m, torch.tensor([[1, 2, 3]]))
        >>> parts.labels
        ['embed.token', 'embed.pos', 'blocks.0.attn.out', 'blocks.0.mlp.out', 'blocks.1.attn.out', 'blocks.1.mlp.out']
        >>> parts.components.shape  # [component, batch, pos, d_model]
        torch.Size([6, 1, 3, 16])
        >>> _, cache = m.run(torch.tensor([[1, 2, 3]]), record="blocks.1.resid_post")
        >>> torch.allclose(parts.sum(), cache["blocks.1.resid_post"], atol=1e-5)
        True
    """

    components: torch.Tensor
    parts: tuple[Part, ...]
    target: str

    @property
    def labels(self) -> list[str]:
        """Each component's label, in order: `embed` (or `embed.token`, `embed.pos` where the
        model adds a learned positional embedding), then per layer `blocks.L.attn.out` (or
        `blocks.L.attn.head.H` ... and `blocks.L.attn.bias`) and `blocks.L.mlp.out`, with an
        `edit:<site>` component wherever an edit changed the stream between two of them."""
        return [p.label for p in self.parts]

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, label: str) -> torch.Tensor:
        """One component `[batch, pos, d_model]` by label."""
        return self.components[_label_index(self.labels, label, "decomposition")]

    def __repr__(self) -> str:
        shape = list(self.components.shape[1:])
        shown = ", ".join(self.labels[:4]) + (f", ... ({len(self)} in all)" if len(self) > 4 else "")
        return f"Decomposition({len(self)} components of {self.target} {shape}: {shown})"

    def sum(self) -> torch.Tensor:
        """The components summed: the target residual `[batch, pos, d_model]` (float rounding apart)."""
        return self.components.sum(0)

    def table(self, pos: int = -1) -> Any:
        """A pandas table, one row per component: `component, kind, layer, head, site, norm`,
        where `norm` is the component's L2 norm at position `pos` (default the last), averaged
        over the batch.

        Raises:
            SpliceError: For a position out of range.
        """
        import pandas as pd

        n_pos = self.components.shape[2]
        if isinstance(pos, bool) or not isinstance(pos, int) or not -n_pos <= pos < n_pos:
            raise SpliceError(f"pos must be an int in -{n_pos}..{n_pos - 1}; got {pos!r}")
        sizes = self.components[:, :, pos].float().norm(dim=-1).mean(1)
        table = pd.DataFrame(
            {
                "component": self.labels,
                "kind": [p.kind for p in self.parts],
                "layer": [p.layer for p in self.parts],
                "head": [p.head for p in self.parts],
                "site": [p.site for p in self.parts],
                "norm": sizes.tolist(),
            }
        )
        for column in ("layer", "head"):
            table[column] = table[column].astype("Int64")
        return table

    def accumulated(self, mid: bool = False) -> Accumulated:
        """The running sums of the components at each residual-stream site: `blocks.L.resid_pre`
        for every layer the target includes, then the target itself (with `mid=True` also each
        `blocks.L.resid_mid`, where the model has one)."""
        if not isinstance(mid, bool):
            raise SpliceError(f"mid must be True or False; got {mid!r}")
        _, layer, _ = self.target.split(".", 2)
        has_mid = any(p.stage.endswith("resid_mid") for p in self.parts)  # none with a parallel residual
        wanted = []
        for index in range(int(layer) + 1):
            wanted.append(f"blocks.{index}.resid_pre")
            if mid and has_mid:
                wanted.append(f"blocks.{index}.resid_mid")
        last = _site_rank(self.target)
        wanted = [name for name in wanted if _site_rank(name) < last] + [self.target]
        sums, labels = [], []
        running = torch.zeros_like(self.components[0])
        index = 0
        for name in wanted:
            rank = _site_rank(name)
            while index < len(self.parts) and _site_rank(self.parts[index].stage) <= rank:
                running = running + self.components[index]
                index += 1
            sums.append(running)
            labels.append(name)
        return Accumulated(torch.stack(sums), tuple(labels))


def _site_rank(name: str) -> int:
    """Forward order of residual sites: resid_pre, resid_mid, resid_post per layer."""
    _, layer, point = name.split(".", 2)
    return 3 * int(layer) + comp.RESIDUAL_POINTS.index(point)


@dataclass(frozen=True, repr=False)
class Accumulated:
    """The residual stream accumulated component by component, from `accumulated`.

    Attributes:
        resid: `[site, batch, pos, d_model]`: entry i is the sum of every component up to site i.
        labels: The residual site each entry is (`"blocks.0.resid_pre"`, ..., the target last).

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> acc = splice.analysis.accumulated(m, torch.tensor([[1, 2, 3]]))
        >>> acc.labels
        ('blocks.0.resid_pre', 'blocks.1.resid_pre', 'blocks.1.resid_post')
        >>> acc.resid.shape  # [site, batch, pos, d_model]
        torch.Size([3, 1, 3, 16])
    """

    resid: torch.Tensor
    labels: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, label: str) -> torch.Tensor:
        """One entry `[batch, pos, d_model]` by its site name."""
        return self.resid[_label_index(self.labels, label, "accumulation")]

    def __repr__(self) -> str:
        shown = ", ".join(self.labels[:3]) + (f", ... ({len(self)} in all)" if len(self) > 3 else "")
        return f"Accumulated({len(self)} sites {list(self.resid.shape[1:])}: {shown})"


def decompose(
    m: Model,
    inputs: Inputs,
    upto: str | tuple[str, int] = "final",
    by: str = "layers",
    edits: Edits | Mapping[Any, Any] | None = None,
    layers: int | Sequence[int] | None = None,
) -> Decomposition:
    """The residual stream at `upto` as a sum of labelled components, from one forward that
    records only what they need (and stops there). No gradients are kept.

    Components, in forward order: the embedding (`embed`; split into `embed.token` and
    `embed.pos` when the model adds a learned positional embedding, as GPT-2 and OPT do, read from
    the model: `embed.pos` is the recorded `embed` minus the token embedding module's output),
    then per layer its attention's contribution and its MLP's (`blocks.L.attn.out`,
    `blocks.L.mlp.out`: what joins the residual stream in every layout, parallel residual and
    Gemma2's post-sublayer norms included). With `by="heads"` a layer's attention is one component
    per head, `z[..., h, :] @ W_O[L, h]` computed from the recorded `attn.z` (and, for Gemma2,
    through the post-attention norm with its scale frozen at the real attention output), plus
    `blocks.L.attn.bias` for the output bias where the projection has one.

    Under `edits` the run decomposed is the edited one, and an edit that changes the stream
    between components (at a `resid_pre`/`resid_mid`/`resid_post` site, or with `by="heads"`
    at `attn.out`) adds a component `edit:<site>` holding the change, so the sum still holds.

    Args:
        m: The `splice.Model`.
        inputs: What `m.run` takes: a string, a list of strings (left-padded), token ids or
            tokenizer output.
        upto: `"final"` (the last layer's `resid_post`, before the final norm), or
            `"blocks.L.resid_pre"`, `"blocks.L.resid_mid"` (not with a parallel residual) or
            `"blocks.L.resid_post"` (negative L counts from the end; aliases work).
        by: `"layers"` (one attention component per layer) or `"heads"`.
        edits: An `Edits` or a dict {site: intervention(s)} applied to the forward.
        layers: With `by="heads"`, only these layers are split per head (the others keep one
            attention component); default every layer up to the target.

    Returns:
        A `Decomposition` (`components`, `labels`, `sum()`, `table()`, `accumulated()`).

    Raises:
        SpliceError: Before any forward, for an unknown `upto`, `by` or layer, or an edit key
            the model does not have; for `by="heads"` in training mode.

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> parts = splice.analysis.decompose(m, torch.tensor([[1, 2, 3]]), upto="blocks.0.resid_post", by="heads")
        >>> parts.labels
        ['embed.token', 'embed.pos', 'blocks.0.attn.head.0', 'blocks.0.attn.head.1', 'blocks.0.attn.bias', 'blocks.0.mlp.out']
        >>> splice.analysis.decompose(m, torch.tensor([[1, 2, 3]]), upto="blocks.2.resid_post")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: upto must be 'final' (the last layer's resid_post, before the final norm) or ...
    """
    target = comp.target_of(m.layout, upto)
    heads = comp.head_layers(m.layout, by, layers, target)
    registry = as_edits(edits)
    comp.edited_sites(m.layout, registry)  # an unknown key is refused before the forward
    batch = tok.encode(m.tokenizer, inputs, m.device)
    parts, components, _ = comp.decompose_run(m, batch, target, heads, registry)
    return Decomposition(components, tuple(parts), target.name)


def accumulated(
    m: Model,
    inputs: Inputs,
    upto: str | tuple[str, int] = "final",
    mid: bool = False,
    edits: Edits | Mapping[Any, Any] | None = None,
) -> Accumulated:
    """The residual stream accumulated layer by layer (TransformerLens' `accumulated_resid`):
    the running sums of `decompose(m, inputs, upto, edits=edits)` at `blocks.0.resid_pre` (the
    embedding), each later `blocks.L.resid_pre`, and the target last.

    Args:
        m: The `splice.Model`.
        inputs: A string, a list of strings, token ids or tokenizer output.
        upto: The target, as for `decompose` (default `"final"`).
        mid: Also give each `blocks.L.resid_mid` (TransformerLens' `incl_mid`); a model with a
            parallel residual has none.
        edits: Applied to the forward, as for `decompose`.

    Returns:
        An `Accumulated` (`resid [site, batch, pos, d_model]`, `labels`); its last entry is the
        target residual.

    Raises:
        SpliceError: As `decompose`.
    """
    if not isinstance(mid, bool):
        raise SpliceError(f"mid must be True or False; got {mid!r}")
    return decompose(m, inputs, upto=upto, edits=edits).accumulated(mid=mid)
