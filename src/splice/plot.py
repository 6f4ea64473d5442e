"""Pictures of per-layer results (matplotlib, written to PNG without a display)."""

from __future__ import annotations

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
    fig = Figure(figsize=(max(4.0, 0.45 * cols + 2), max(3.0, 0.28 * rows + 1.5)))
    ax = fig.subplots()
    if center is None:
        image = ax.imshow(grid, aspect="auto", cmap=cmap)
    else:
        span = float(np.nanmax(np.abs(grid - center))) or 1.0
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=center - span, vmax=center + span)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    names_x = [str(x) for x in (xticklabels or labels_x or range(cols))]
    ax.set_xticks(range(cols), names_x, fontsize=7, rotation=90 if xticklabels else 0)
    ax.set_yticks(range(rows), [str(y) for y in (labels_y or range(rows))], fontsize=7)
    fig.colorbar(image, ax=ax, label=colorbar)
    if annotate_top:
        flat = np.argsort(np.nan_to_num(grid, nan=-np.inf), axis=None)[::-1][:annotate_top]
        for r, c in zip(*np.unravel_index(flat, grid.shape)):
            ax.text(c, r, f"{grid[r, c]:.2f}", ha="center", va="center", fontsize=6)
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
