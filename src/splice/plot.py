"""Pictures of per-layer results, lenses and token geometry (matplotlib, written to PNG without a
display)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import torch


def heatmap(
    values,
    path,
    title: str = "",
    xlabel: str = "head",
    ylabel: str = "layer",
    cmap: str = "RdBu_r",
    center: float | None = 0.0,
    colorbar: str = "",
    annotate_top: int = 0,
    xticklabels=None,
    cell_text=None,
    limits: tuple[float, float] | None = None,
    figsize: tuple[float, float] | None = None,
):
    """Save a `[rows, cols]` grid as a heatmap PNG (no display needed); returns the path.

    Args:
        values: a 2-D tensor, array or DataFrame (a DataFrame's index and columns label the axes).
        path: where the PNG goes (folders are created).
        title, xlabel, ylabel, colorbar: the texts shown.
        cmap: a matplotlib colour map name.
        center: the value the colour scale is symmetric around (effects of ablations read as
            blue = lower, red = higher); None scales from the data's minimum to its maximum.
        annotate_top: write the values of the k largest cells.
        xticklabels: names for the columns (e.g. the prompt's tokens for a layer x position grid).
        cell_text: a `[rows][cols]` nested list of strings written in the cells (dark text on
            light cells, light on dark), e.g. each cell's top token in a lens picture.
        limits: `(low, high)` of the colour scale (e.g. `(0, 1)` for probabilities); overrides
            `center`.
        figsize: the figure's (width, height) in inches; default from the grid's size.
    """
    # A pyplot-free Figure renders to PNG without touching the user's backend (matplotlib.use
    # would switch a Jupyter kernel away from inline plotting for every later figure).
    import numpy as np
    from matplotlib.figure import Figure

    labels_x = labels_y = None
    if hasattr(values, "to_numpy"):  # DataFrame
        labels_x, labels_y = [str(c) for c in values.columns], [str(i) for i in values.index]
        values = values.to_numpy()
    grid = (
        values.detach().cpu().float().numpy()
        if isinstance(values, torch.Tensor)
        else np.asarray(values, dtype=float)
    )
    rows, cols = grid.shape
    fig = Figure(figsize=figsize or (max(4.0, 0.45 * cols + 2), max(3.0, 0.28 * rows + 1.5)))
    ax = fig.subplots()
    if limits is not None:
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=limits[0], vmax=limits[1])
    elif center is None:
        image = ax.imshow(grid, aspect="auto", cmap=cmap)
    else:
        span = float(np.nanmax(np.abs(grid - center))) or 1.0
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=center - span, vmax=center + span)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    names_x = [str(x) for x in (xticklabels or labels_x or range(cols))]
    upright = xticklabels is None and max((len(x) for x in names_x), default=0) <= 3
    ax.set_xticks(range(cols), names_x, fontsize=7, rotation=0 if upright else 90)
    ax.set_yticks(range(rows), [str(y) for y in (labels_y or range(rows))], fontsize=7)
    fig.colorbar(image, ax=ax, label=colorbar)
    if annotate_top:
        flat = np.argsort(np.nan_to_num(grid, nan=-np.inf), axis=None)[::-1][:annotate_top]
        for r, c in zip(*np.unravel_index(flat, grid.shape)):
            ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=6)
    if cell_text is not None:
        _write_cells(ax, image, grid, cell_text)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def sweep_heatmap(
    table,
    path,
    metric: str | None = None,
    value: str = "effect",
    title: str | None = None,
    xticklabels=None,
):
    """Heatmap of a sweep or patching table (`splice.grid`): layer x head, or layer x position,
    whichever the variants vary; returns the PNG's path.

    The colour bar names the column and what it is relative to: the baseline run's metric value
    for `effect`/`value`/`relative`, and "0 = baseline, 1 = source" for a patching table's
    `normalised`. `xticklabels` names the columns (e.g. `m.to_str_tokens(prompt)` for a
    position sweep; it must have one label per column)."""
    from .errors import SpliceError
    from .sweeps.tables import BASELINE, grid

    metric = metric or table[table["variant"] >= 0]["metric"].iloc[0]  # default: the table's first metric
    values = grid(table, metric=metric, value=value)
    across = values.columns.name
    if xticklabels is not None:
        xticklabels = [str(t) for t in xticklabels]
        if len(xticklabels) != values.shape[1]:
            raise SpliceError(
                f"xticklabels has {len(xticklabels)} labels for {values.shape[1]} {across} columns "
                f"({list(values.columns)})"
            )
    baseline = table[(table["variant"] == -1) & (table["metric"] == metric)]["value"]
    if value == "normalised":
        label = f"{metric} normalised (0 = {BASELINE}, 1 = source)"
    else:
        label = f"{metric} {value}" + (f" ({BASELINE} {baseline.iloc[0]:.3g})" if len(baseline) else "")
    return heatmap(
        values,
        path,
        title=title or f"{metric}: {value} per {across}",
        xlabel=across,
        colorbar=label,
        center=0.0 if value in ("effect", "relative", "normalised") else None,
        xticklabels=xticklabels,
    )


def effect_bars(
    table, path, metric: str | None = None, value: str = "effect", top: int = 20, title: str | None = None
):
    """Bar chart of a sweep table's largest effects (by absolute value), one bar per variant,
    labelled by what it varied (`feature 812`, `L3 H5`, `L2 pos 4`, or the site); returns the
    PNG's path. The picture for a sweep over SAE latents, whose variants have no grid.

    Raises:
        SpliceError: For a metric the table lacks, or a table with no variant rows.
    """
    import numpy as np
    from matplotlib.figure import Figure

    from .errors import SpliceError

    rows = table[table["variant"] >= 0]
    if rows.empty:
        raise SpliceError("effect_bars: the table has no variant rows")
    metric = metric or rows["metric"].iloc[0]
    rows = rows[rows["metric"] == metric]
    if rows.empty:
        raise SpliceError(
            f"effect_bars: no rows for metric {metric!r}; the table has {sorted(set(table['metric']))}"
        )
    chosen = rows.reindex(rows[value].abs().sort_values(ascending=False).index).head(top)
    labels = [_variant_label(r) for r in chosen.itertuples()]
    values = chosen[value].to_numpy(dtype=float)
    title = title or f"{metric}: the {len(values)} largest {value}s"
    fig = Figure(
        figsize=(max(7.0, 0.09 * len(title) + 1.0), max(2.5, 0.28 * len(values) + 1.2))
    )  # room for the title
    ax = fig.subplots()
    ax.barh(np.arange(len(values)), values, color=["#b2182b" if v > 0 else "#2166ac" for v in values])
    ax.set_yticks(np.arange(len(values)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0.0, color="black", linewidth=0.6)
    baseline = float(chosen["baseline"].iloc[0])
    ax.set_xlabel(f"{metric} {value} (baseline {baseline:.3g})")
    ax.set_title(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _variant_label(row) -> str:
    """What a table row varied, shortest first: its latent, its head, its position, else its site."""
    parts = []
    feature = getattr(row, "feature", None)
    if feature is not None and feature == feature and str(feature) != "<NA>":
        parts.append(f"feature {int(feature)}")
    elif row.head is not None and str(row.head) != "<NA>":
        parts.append(f"L{row.layer} H{row.head}")
    elif row.pos is not None and str(row.pos) != "<NA>":
        parts.append(f"L{row.layer} pos {row.pos}")
    return ", ".join(parts) or str(row.site)


def _write_cells(ax, image, grid, cell_text) -> None:
    """Write `cell_text[r][c]` in each cell, dark on light colours and light on dark."""
    from .errors import SpliceError

    rows, cols = grid.shape
    if len(cell_text) != rows or any(len(row) != cols for row in cell_text):
        shape = [len(cell_text), *sorted({len(row) for row in cell_text})]
        raise SpliceError(f"cell_text must be a [{rows}][{cols}] nested list like the grid; got {shape}")
    for r in range(rows):
        for c in range(cols):
            text = cell_text[r][c]
            if text is None or text == "":
                continue
            red, green, blue, _ = image.cmap(image.norm(grid[r, c]))
            light = 0.299 * red + 0.587 * green + 0.114 * blue > 0.5
            ax.text(
                c, r, str(text), ha="center", va="center", fontsize=6, color="black" if light else "white"
            )


def _cell_token(token: str, width: int = 8) -> str:
    """A token as a short cell label: escapes shown (`\\n`), a leading space as `_`."""
    shown = repr(str(token))[1:-1]
    if shown.startswith(" "):
        shown = "_" + shown[1:]
    return shown if len(shown) <= width else shown[: width - 1] + "…"


def lens_heatmap(
    table,
    path,
    batch: int = 0,
    title: str | None = None,
    cmap: str = "Blues",
):
    """Picture of a `splice.lens.logit_lens` table: site (layer) x position, each cell showing the
    lens' top-1 token and coloured by its probability (0 to 1); x labels are the prompt's tokens.
    Returns the PNG's path.

    Args:
        table: A `logit_lens` table (any `top_k`; rank 0 is drawn).
        path: Where the PNG goes (folders are created).
        batch: Which prompt of a batched table.
        title: The title (default says what is drawn).
        cmap: A matplotlib colour map name.

    Example:
        >>> import splice, tempfile, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> from splice.lens import logit_lens
        >>> table = logit_lens(m, torch.tensor([[1, 2, 3]]))
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     lens_heatmap(table, f"{folder}/lens.png").name
        'lens.png'
    """
    import pandas as pd

    from .errors import SpliceError

    needed = {"site", "layer", "batch", "pos", "input_token", "rank", "token", "prob"}
    columns = set(getattr(table, "columns", ()))
    if not needed <= columns:
        raise SpliceError(
            f"lens_heatmap needs a splice.lens.logit_lens table with columns {sorted(needed)}; "
            f"missing {sorted(needed - columns)}"
        )
    top = table[(table["rank"] == 0) & (table["batch"] == batch)]
    if top.empty:
        batches = sorted(set(table["batch"]))
        raise SpliceError(f"the table has no rank-0 rows for batch {batch!r}; its batches are {batches}")
    sites = list(dict.fromkeys(top["site"]))
    positions = sorted(set(top["pos"]))
    points = {s.split(".", 2)[-1] if s.startswith("blocks.") else s for s in sites}
    by_layer = len(points - {"embed"}) == 1
    row_names = [
        str(layer) if by_layer and not pd.isna(layer) else site
        for site, layer in top.drop_duplicates("site")[["site", "layer"]].itertuples(index=False)
    ]
    cells = top.set_index(["site", "pos"])
    grid = pd.DataFrame(
        [[float(cells.loc[(s, p), "prob"]) for p in positions] for s in sites],
        index=pd.Index(row_names, name="layer" if by_layer else "site"),
        columns=positions,
    )
    text = [[_cell_token(cells.loc[(s, p), "token"]) for p in positions] for s in sites]
    inputs = top.drop_duplicates("pos").set_index("pos")["input_token"]
    labels = [f"{p} {str(inputs[p])!r}" for p in positions]  # as geometry.position_labels
    width = max(5.0, 0.8 * len(positions) + 2.5)
    height = max(3.0, 0.26 * len(sites) + 1.8)
    with warnings.catch_warnings():  # a token in a script the font lacks (CJK, ...) is drawn as a box
        warnings.filterwarnings("ignore", message="Glyph .* missing from font")
        return heatmap(
            grid,
            path,
            title=title or "lens: top-1 token per layer and position",
            xlabel="position (input token)",
            ylabel="layer" if by_layer else "site",
            cmap=cmap,
            colorbar="top-1 probability",
            xticklabels=labels,
            cell_text=text,
            limits=(0.0, 1.0),
            figsize=(width, height),
        )


def token_scatter(
    recording,
    site,
    tok_a: int,
    tok_b: int,
    path,
    batch_index: int = 0,
    labels=None,
    title: str | None = None,
    scale: str = "linear",
):
    """Scatter of one prompt's activations at a site, unit by unit: token `tok_a`'s value (x)
    against token `tok_b`'s (y), with the diagonal and their Pearson r. Returns the PNG's path.

    Args:
        recording: A `Recording` in overwrite mode, or a `{site: tensor}` mapping.
        site: A `[batch, pos, ...]` site (trailing axes are flattened into units).
        tok_a, tok_b: Position indices of the two tokens (negative counts from the end).
        path: Where the PNG goes (folders are created).
        batch_index: Which prompt of the batch.
        labels: The prompt's tokens (e.g. `m.to_str_tokens(prompt)`), to name the axes.
        title: The title (default: site, tokens and r).
        scale: "linear" or "symlog" (both axes; symlog shows a few huge units, such as an
            attention sink's, together with the bulk near 0).

    Example:
        >>> import tempfile, torch
        >>> acts = {"blocks.0.resid_post": torch.randn(1, 4, 16)}
        >>> with tempfile.TemporaryDirectory() as folder:
        ...     token_scatter(acts, "blocks.0.resid_post", 0, -1, f"{folder}/scatter.png").name
        'scatter.png'
    """
    from matplotlib.figure import Figure

    from .errors import SpliceError, valid_range
    from .geometry import correlation, position_labels, site_tokens

    if scale not in ("linear", "symlog"):
        raise SpliceError(f'scale must be "linear" or "symlog"; got {scale!r}')
    acts = site_tokens(recording, site, batch_index)
    n = acts.shape[0]
    chosen = []
    for which, index in (("tok_a", tok_a), ("tok_b", tok_b)):
        if isinstance(index, bool) or not isinstance(index, int) or not -n <= index < n:
            raise SpliceError(
                f"{which}={index!r} is not a position of this prompt ({n} tokens: {valid_range(n)})"
            )
        chosen.append(index % n)
    if labels is not None:
        labels = list(labels)
        if len(labels) != n:
            raise SpliceError(
                f"labels has {len(labels)} entries for {n} positions: give one label per position"
            )
        names = position_labels(labels)
    else:
        names = [f"token {i}" for i in range(n)]
    a, b = chosen
    x, y = acts[a].numpy(), acts[b].numpy()
    r = float(correlation(acts[[a, b]])[0, 1])
    fig = Figure(figsize=(4.8, 4.6))
    ax = fig.subplots()
    ax.scatter(x, y, s=6, alpha=0.5, linewidths=0)
    low, high = float(min(x.min(), y.min())), float(max(x.max(), y.max()))
    ax.plot([low, high], [low, high], color="grey", linewidth=0.8, linestyle="--", label="y = x")
    if scale == "symlog":
        ax.set_xscale("symlog")
        ax.set_yscale("symlog")
    ax.set_xlabel(names[a])
    ax.set_ylabel(names[b])
    ax.set_title(
        title or f"{site}: {names[a]} vs {names[b]}\nPearson r = {r:.3f} over {x.size} units", fontsize=9
    )
    ax.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


_HEAD_NODE = re.compile(r"^blocks\.(\d+)\.attn\.(?:([qkv])\.)?h(\d+)$")
_MLP_NODE = re.compile(r"^blocks\.(\d+)\.mlp(?:\.in)?$")
_INPUT_STYLE = {"q": "-", "k": "--", "v": ":"}


def _node_place(name: str, n_heads: int, group: int) -> tuple[float, float, str]:
    """Where a circuit node (or a receiver) sits: x across the heads of a layer, y up the layers
    (a layer's MLP half a row above its heads); and its label. A key/value receiver under
    grouped-query attention sits in the middle of the query heads it feeds."""
    middle = (n_heads - 1) / 2
    if name == "embed":
        return middle, -1.0, "embed"
    if name == "logits":
        return middle, float("inf"), "logits"
    head = _HEAD_NODE.match(name)
    if head is not None:
        layer, part, index = int(head.group(1)), head.group(2), int(head.group(3))
        x = index * group + (group - 1) / 2 if part in ("k", "v") else float(index)
        return x, float(layer), f"L{layer}H{index}" if part in (None, "q") else f"L{layer}KV{index}"
    mlp = _MLP_NODE.match(name)
    if mlp is not None:
        return n_heads + 0.5, int(mlp.group(1)) + 0.5, f"MLP{mlp.group(1)}"
    raise ValueError(name)


def circuit_graph(
    edges,
    path,
    n_heads: int | None = None,
    n_kv_heads: int | None = None,
    title: str = "",
):
    """Draw a circuit (a `splice.circuits` edge table: `source`, `target`, `input`, `score`, or
    a `Circuit`'s `to_frame()`) as a layered graph: the embedding at the bottom, each layer's
    heads in a row with its MLP at the right half a row up, the logits at the top. An edge is
    red where its score is positive (it supports the metric), blue where negative, thicker the
    larger; the line style says which input of a head it enters (q solid, k dashed, v dotted).
    Returns the PNG's path.

    Args:
        edges: The edge table (rows to draw).
        path: Where the PNG goes (folders are created).
        n_heads, n_kv_heads: The model's query and key/value head counts (`model.dims`); by
            default the largest indices named (then a grouped-query model's key/value
            receivers are placed as if ungrouped).
        title: The figure's title.

    Raises:
        SpliceError: For a table without those columns, with no rows, or naming a node that is
            not a circuit node.
    """
    from matplotlib.figure import Figure

    from .errors import SpliceError

    missing = {"source", "target", "score"} - set(getattr(edges, "columns", ()))
    if missing:
        raise SpliceError(
            f"circuit_graph takes an edge table with source, target, score; it lacks {sorted(missing)}"
        )
    if len(edges) == 0:
        raise SpliceError("circuit_graph: the edge table has no rows (an empty circuit has nothing to draw)")
    names = list(edges["source"]) + list(edges["target"])
    heads = [int(m.group(3)) for m in map(_HEAD_NODE.match, names) if m and m.group(2) in (None, "q")]
    kv = [int(m.group(3)) for m in map(_HEAD_NODE.match, names) if m and m.group(2) in ("k", "v")]
    n_heads = n_heads or max(heads + kv + [0]) + 1
    group = max(1, n_heads // (n_kv_heads or n_heads))
    try:
        places = {name: _node_place(name, n_heads, group) for name in set(names)}
    except ValueError as bad:
        raise SpliceError(
            f"circuit_graph: {bad} is not a circuit node (embed, blocks.L.attn.hH, blocks.L.mlp, "
            "logits, or a receiver blocks.L.attn.q|k|v.hH / blocks.L.mlp.in)"
        ) from None
    top = max([y for _, y, _ in places.values() if y != float("inf")] + [0.0]) + 1.0
    places = {n: (x, top if y == float("inf") else y, label) for n, (x, y, label) in places.items()}
    fig = Figure(figsize=(max(6.0, 0.55 * (n_heads + 2)), max(4.0, 0.45 * (top + 2))))
    ax = fig.subplots()
    largest = float(edges["score"].abs().max()) or 1.0
    inputs = edges["input"] if "input" in edges else [""] * len(edges)
    for source, target, kind, score in zip(edges["source"], edges["target"], inputs, edges["score"]):
        (x0, y0, _), (x1, y1, _) = places[source], places[target]
        ax.plot(
            [x0, x1],
            [y0, y1],
            _INPUT_STYLE.get(kind, "-"),
            color="#b2182b" if score > 0 else "#2166ac",
            linewidth=0.4 + 3.0 * abs(float(score)) / largest,
            alpha=0.75,
            zorder=1,
        )
    for x, y, label in set(places.values()):
        ax.annotate(
            label,
            (x, y),
            ha="center",
            va="center",
            fontsize=7,
            bbox={"boxstyle": "round,pad=0.25", "facecolor": "#f7f7f7", "edgecolor": "#444444"},
            zorder=2,
        )
    ax.set_xlim(-1.0, n_heads + 1.5)
    ax.set_ylim(-1.7, top + 0.7)
    ax.set_xticks([])
    ax.set_ylabel("layer")
    ax.set_yticks(range(0, int(top)))
    ax.set_title(title or f"circuit: {len(edges)} edges", fontsize=10)
    ax.set_xlabel("red: supports the metric, blue: opposes it; into q solid, k dashed, v dotted", fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
