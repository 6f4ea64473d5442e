"""Direct logit attribution: each component's direct contribution to a logit, a logit
difference or any residual-stream direction, through the final norm; and `pivot`, its
`[layer x head]` or `[layer x sublayer]` view.

Through the final norm in two ways:

- `norm="frozen"` (TransformerLens' `apply_ln_to_stack`): the norm's divisor (and, for LayerNorm
  families, its centring) is taken from the real final residual at each position and applied,
  linearly, to every component. The norm's bias is no component's: it is its own row,
  `final_norm.bias` (LayerNorm families), as is lm_head's bias (`lm_head.bias`, GPT-J). The rows
  then add up to the model's own value.
- `norm="recomputed"`: each component alone through the final norm (its own statistics), as a
  logit lens of that component. Not additive: the rows do not sum to the model's value.

Gemma2 soft-caps its logits after lm_head: the attribution is of the logits *before* the cap
(the cap is not linear), and so is the `model` column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..engine import weights
from ..engine.edits import as_edits
from ..errors import SpliceError
from ..sweeps.data import as_items, batches_of
from . import components as comp
from . import directions, norms
from .components import Part

if TYPE_CHECKING:
    import pandas as pd

    from ..engine.edits import Edits
    from ..engine.model import Model

NORMS = ("frozen", "recomputed")
"""What `norm=` accepts."""

COLUMNS = [
    "variant",
    "site",
    "component",
    "kind",
    "layer",
    "head",
    "pos",
    "metric",
    "value",
    "total",
    "model",
]
"""The table's columns (`prompt` is added after `variant` with `per_prompt=True`)."""


def _positions(pos: Any) -> list[int]:
    chosen = [pos] if isinstance(pos, int) and not isinstance(pos, bool) else pos
    if (
        not isinstance(chosen, (list, tuple, range))
        or not chosen
        or not all(isinstance(p, int) and not isinstance(p, bool) for p in chosen)
    ):
        raise SpliceError(
            f"pos must be an int or a non-empty list of ints (-1 = the last token); got {pos!r}"
        )
    if len(set(chosen)) != len(chosen):
        raise SpliceError(f"pos {pos!r} lists a position twice")
    return list(chosen)


def _index(batch: Any, positions: list[int], first_row: int) -> torch.Tensor:
    """`[rows, k]` indices into the padded batch of each requested position (a position >= 0
    counts from the row's first real token, a negative one from its end).

    Raises:
        SpliceError: For a position a prompt does not have.
    """
    ids = batch.input_ids
    width = ids.shape[1]
    mask = batch.kwargs.get("attention_mask")
    lengths = mask.sum(-1).tolist() if mask is not None else [width] * ids.shape[0]
    rows = []
    for row, n in enumerate(lengths):
        n = int(n)
        out = []
        for p in positions:
            if not -n <= p < n:
                raise SpliceError(
                    f"pos {p} is out of range for data row {first_row + row}, which has {n} tokens "
                    f"(valid {-n}..{n - 1})"
                )
            out.append(width - n + p if p >= 0 else width + p)
        rows.append(out)
    return torch.tensor(rows, device=ids.device)


def _extras(
    m: Model, norm: norms.FrozenNorm, direction: directions.Direction, vec: torch.Tensor, rows: slice
) -> list[tuple[Part, torch.Tensor]]:
    """The rows no component owns, read out along `vec [rows, d_model]`: the final norm's bias
    and lm_head's bias, each `[rows]`."""
    out = []
    final = f"blocks.{m.dims.n_layers - 1}.resid_post"
    if norm.bias is not None:
        out.append(
            (
                Part("final_norm.bias", "norm_bias", None, None, "final_norm", final),
                vec @ norm.bias.to(vec.device),
            )
        )
    bias = direction.unembed_bias(m, rows)
    if bias is not None:
        out.append((Part("lm_head.bias", "unembed_bias", None, None, "logits", final), bias))
    return out


def logit_attribution(
    m: Model,
    data: Any,
    direction: Any = ("correct", "wrong"),
    by: str = "layers",
    norm: str = "frozen",
    pos: int | Sequence[int] = -1,
    edits: Edits | Mapping[Any, Any] | None = None,
    layers: int | Sequence[int] | None = None,
    batch_size: int = 16,
    per_prompt: bool = False,
) -> pd.DataFrame:
    """Each component's direct contribution to a logit difference (or a logit, or a direction)
    through the final norm, as a tidy table; see the module docstring for `norm`.

    The components are those of `decompose(..., upto="final")` at the positions asked for
    (computed at those positions only), plus the rows no component owns. Everything is
    checked before the first forward.

    Args:
        m: The `splice.Model`.
        data: Rows as for a sweep: prompt strings, or dicts with `"prompt"` (or `"input_ids"`)
            and the answer fields; a DataFrame works too. Prompts are left-padded in batches.
        direction: `("correct", "wrong")` (default): the logit difference of two data fields
            per row (each field a single-token string or a token id); a token id in place of a
            field is that token for every row. `("answer",)`: one field's logit. A string
            (`" Paris"`, exactly one token) or an int: that token's logit for every row. A
            tensor `[d_model]` (or `[rows, d_model]`): the final norm's output projected on it.
        by: `"layers"` or `"heads"` (as `decompose`).
        norm: `"frozen"` (additive: sums to the model's value) or `"recomputed"` (not additive).
        pos: The position(s) read: an int or a list; -1 (default) is each prompt's last token,
            a position >= 0 counts from the prompt's first real token.
        edits: Applied to every forward (the attribution is of the edited run). An edit of the
            final norm is its own row (`edit:final_norm`); an edit of `logits` is refused.
        layers: With `by="heads"`, the layers split per head (default all).
        batch_size: Prompts per forward.
        per_prompt: One row per prompt (a `prompt` column) instead of the mean over prompts.

    Returns:
        A DataFrame with one row per (component, position): `variant` (the component's index),
        `site`, `component`, `kind`, `layer`, `head`, `pos` (as asked, e.g. -1), `metric`
        (`logit_diff`, `logit` or `direction`), `value` (its contribution, mean over prompts),
        `total` (the rows' sum) and `model` (the model's own value: its logit difference,
        pre-soft-cap). With `norm="frozen"`, `total` equals `model` to float rounding. Kinds:
        `embed`, `embed.token`, `embed.pos`, `attn`, `head`, `attn_bias`, `mlp`, `edit`,
        `norm_bias`, `unembed_bias`. `pivot` lays it out as layer x head.

    Raises:
        SpliceError: Before any forward, for an unknown `by`, `norm`, `pos` or layer, a
            direction field missing from the data, a string that is not one token, a tensor
            direction of the wrong width, or an edit of `logits`.

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> data = [{"input_ids": [1, 2, 3], "correct": 4, "wrong": 5}]
        >>> table = splice.analysis.logit_attribution(m, data, by="heads")
        >>> list(table["component"][:3]), int(table["layer"][2]), int(table["head"][2])
        (['embed.token', 'embed.pos', 'blocks.0.attn.head.0'], 0, 0)
        >>> bool(abs(table["value"].sum() - table["model"].iloc[0]) < 1e-4)  # frozen: the rows add up
        True
        >>> splice.analysis.logit_attribution(m, data, direction=torch.ones(8))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: a tensor direction must be [d_model=16] or [rows=1, d_model=16]; got shape [8]
    """
    layout = m.layout
    if not isinstance(norm, str) or norm not in NORMS:
        raise SpliceError(f"norm must be 'frozen' or 'recomputed'; got {norm!r}")
    positions = _positions(pos)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpliceError(f"batch_size must be a positive int; got {batch_size!r}")
    if not isinstance(per_prompt, bool):
        raise SpliceError(f"per_prompt must be True or False; got {per_prompt!r}")
    target = comp.target_of(layout, "final")
    heads = comp.head_layers(layout, by, layers, target)
    registry = as_edits(edits)
    edited = comp.edited_sites(layout, registry)
    if "logits" in edited:
        raise SpliceError(
            "logit_attribution reads the logits that the final norm and lm_head compute; an edit of "
            "the 'logits' site comes after both and belongs to no component: edit 'final_norm' or "
            "the residual stream instead"
        )
    items = as_items(data)
    readout = _Readout(m, norm, directions.resolve(m, direction, items), "final_norm" in edited)
    batches = batches_of(m, items, batch_size)
    starts = [sum(len(b) for b in batches[:i]) for i in range(len(batches))]
    indices = [_index(b, positions, s) for b, s in zip(batches, starts)]  # bad positions: refused now

    parts: list[Part] = []
    values, models = [], []
    for batch, start, index in zip(batches, starts, indices):
        arange = torch.arange(len(batch), device=index.device)[:, None]

        def select(
            t: torch.Tensor, arange: torch.Tensor = arange, index: torch.Tensor = index
        ) -> torch.Tensor:
            return t[arange, index]  # [batch, pos, ...] -> [batch, positions asked, ...]

        found, stack, rec = comp.decompose_run(
            m, batch.kwargs, target, heads, registry, ("final_norm", target.name), select
        )
        rows = slice(start, start + len(batch))
        parts, value, model = readout(found, stack, select(rec[target.name]), select(rec["final_norm"]), rows)
        values.append(value.cpu())
        models.append(model.cpu())
    return _table(
        parts, torch.cat(values, 1), torch.cat(models), positions, readout.direction.metric, per_prompt
    )


class _Readout:
    """Components `[component, rows, k, d_model]` to their contributions `[row, rows, k]` along
    a direction through the final norm, with the rows no component owns appended."""

    def __init__(self, m: Model, norm: str, direction: directions.Direction, norm_edited: bool):
        self.m, self.norm, self.direction, self.norm_edited = m, norm, direction, norm_edited
        layout = m.layout
        self.module = layout.module_at(layout.points["final_norm"].module)
        self.final_norm = norms.read_norm(self.module, m.dims.d_model, "the final norm")
        self.lm_head = weights.unembedding(m.hf)[0]
        self.final = f"blocks.{m.dims.n_layers - 1}.resid_post"

    def __call__(
        self, parts: list[Part], stack: torch.Tensor, resid: torch.Tensor, normed: torch.Tensor, rows: slice
    ) -> tuple[list[Part], torch.Tensor, torch.Tensor]:
        """(parts, values `[part, rows, k]`, the model's own value `[rows, k]`) from the
        components, the real final residual and the final norm's recorded output (`[rows, k, d]`)."""
        m, module, final_norm = self.m, self.module, self.final_norm
        vec = self.direction.vectors(m, rows)  # [rows, d_model]
        with torch.no_grad():
            norms.check(final_norm, module, resid)
            if self.norm == "frozen":
                pulled = final_norm.direction(vec)
                value = torch.einsum("nbkd,bd->nbk", stack.float(), pulled) / final_norm.sigma(resid)[..., 0]
            else:
                alone = module.forward(stack) - module.forward(torch.zeros_like(stack[:1]))
                value = torch.einsum("nbkd,bd->nbk", alone.float(), vec)
            extra = _extras(m, final_norm, self.direction, vec, rows)
            more = [v[:, None].expand(-1, resid.shape[1]) for _, v in extra]
            parts = parts + [p for p, _ in extra]
            if self.norm_edited:
                change = normed.float() - module.forward(resid).float()
                more.append(torch.einsum("bkd,bd->bk", change, vec))
                parts.append(Part("edit:final_norm", "edit", None, None, "final_norm", self.final))
            if more:
                value = torch.cat([value, torch.stack(more)])
            if self.direction.metric == "direction":
                model = torch.einsum("bkd,bd->bk", normed.float(), vec)
            else:  # lm_head's own output: the logits before any soft-cap
                model = self.direction.of_logits(self.lm_head.forward(normed), rows)
        return parts, value, model


def _table(
    parts: list[Part],
    value: torch.Tensor,
    model: torch.Tensor,
    positions: list[int],
    metric: str,
    per_prompt: bool,
) -> pd.DataFrame:
    """The tidy table of `value [part, prompt, k]` and `model [prompt, k]`: one row per (part,
    position), per prompt or averaged over prompts."""
    import pandas as pd

    total = value.sum(0)
    if not per_prompt:
        value, total, model = (
            value.mean(1, keepdim=True),
            total.mean(0, keepdim=True),
            model.mean(0, keepdim=True),
        )
    n_prompts = value.shape[1]
    records = [
        {
            "variant": c,
            "prompt": p,
            "site": part.site,
            "component": part.label,
            "kind": part.kind,
            "layer": part.layer,
            "head": part.head,
            "pos": position,
            "metric": metric,
            "value": float(value[c, p, j]),
            "total": float(total[p, j]),
            "model": float(model[p, j]),
        }
        for c, part in enumerate(parts)
        for p in range(n_prompts)
        for j, position in enumerate(positions)
    ]
    table = pd.DataFrame.from_records(records, columns=COLUMNS[:1] + ["prompt"] + COLUMNS[1:])
    for column in ("layer", "head", "pos"):
        table[column] = table[column].astype("Int64")
    return table if per_prompt else table.drop(columns="prompt")


def pivot(table: pd.DataFrame, value: str = "value", pos: int | None = None) -> pd.DataFrame:
    """A `logit_attribution` table as a grid: `[layer x head]` of the head rows when it has
    them, else `[layer x sublayer]` (columns `attn`, `mlp`); per-prompt rows are averaged.
    Works as `table.pipe(splice.analysis.pivot)`, and its result goes to `splice.plot.heatmap`.

    `splice.grid` takes the head rows too: `table[table["kind"] == "head"].pipe(splice.grid,
    value="value")` (one position).

    Args:
        table: From `logit_attribution`.
        value: The column laid out (default `value`).
        pos: Which position, when the table has several.

    Raises:
        SpliceError: For a table without the attribution columns, several positions and no
            `pos`, or no head or layer rows.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"kind": ["embed", "head", "head", "mlp"], "layer": [None, 0, 0, 0],
        ...                   "head": [None, 0, 1, None], "pos": -1, "value": [0.5, 1.0, -2.0, 3.0]})
        >>> pivot(t).values.tolist()
        [[1.0, -2.0]]
    """
    columns = set(getattr(table, "columns", ()))
    needed = {"kind", "layer", "head", "pos", value}
    if not needed <= columns:
        raise SpliceError(
            f"pivot needs a logit_attribution table with columns {sorted(needed)}; missing {sorted(needed - columns)}"
        )
    available = sorted(set(table["pos"].dropna().astype(int)))
    if pos is None:
        if len(available) > 1:
            raise SpliceError(f"the table has positions {available}; pass pos= to choose one")
    elif pos not in available:
        raise SpliceError(f"pos {pos!r} is not in the table; it has positions {available}")
    else:
        table = table[table["pos"] == pos]
    heads = table[table["kind"] == "head"]
    if len(heads):
        out = heads.pivot_table(index="layer", columns="head", values=value, aggfunc="mean")
    else:
        layers = table[table["kind"].isin(["attn", "mlp"])]
        if not len(layers):
            raise SpliceError("the table has no head, attn or mlp rows to lay out")
        out = layers.pivot_table(index="layer", columns="kind", values=value, aggfunc="mean")
    out = out.sort_index().sort_index(axis=1)
    out.index = out.index.astype(int)
    if len(heads):
        out.columns = out.columns.astype(int)
    return out.astype(float)
