"""Tidy result tables (pandas): one row per (variant, metric) after the baseline rows.

One vocabulary for every table splice returns, sweeps and patching alike, so a column means the
same run wherever it appears: `value` is the metric under the variant's edit; `baseline` is the
metric of the same prompts run unedited (its own row: variant -1, site "baseline"); `effect` =
value - baseline; `relative` = effect / |baseline|. Patching tables add `source`, the metric of
the run the activations come from, and `normalised` = (value - baseline) / (source - baseline).
"clean" and "corrupt" name prompts in the data, never a column: in a noising experiment the
unedited run is the clean one, so a column named after either would lie half the time."""

from __future__ import annotations

BASELINE = "baseline"


def tidy_table(metrics, variants, value_of, label=repr):
    """One row per (variant, metric), after a baseline row (variant -1) per metric:
    `value_of(variant_id, metric_name)` gives the mean metric value, -1 the unedited run's (a
    number or a one-element tensor of any dtype: the table holds float64). A sweep over SAE
    latents adds a `feature` column after `pos`."""
    import pandas as pd

    rows = []
    for metric in metrics:
        # Python floats (float64 columns), whatever the values were computed in.
        baseline = float(value_of(-1, metric.name))
        rows.append(
            {
                "variant": -1,
                "site": BASELINE,
                "layer": None,
                "head": None,
                "pos": None,
                "intervention": "none",
                "metric": metric.name,
                "value": baseline,
                "baseline": baseline,
                "effect": 0.0,
                "relative": 0.0,
            }
        )
        for v in variants:
            value = float(value_of(v.id, metric.name))
            rows.append(
                {
                    "variant": v.id,
                    "site": v.site,
                    "layer": v.layer,
                    "head": v.head,
                    "pos": v.pos,
                    "intervention": label(v.intervention),
                    "metric": metric.name,
                    "value": value,
                    "baseline": baseline,
                    "effect": value - baseline,
                    "relative": (value - baseline) / abs(baseline) if baseline else float("nan"),
                }
            )
    table = pd.DataFrame(rows)
    if any(getattr(v, "feature", None) is not None for v in variants):
        by_id = {v.id: v.feature for v in variants}
        table.insert(table.columns.get_loc("pos") + 1, "feature", [by_id.get(i) for i in table["variant"]])
    for column in ("layer", "head", "pos", "feature"):
        if column in table:
            table[column] = table[column].astype("Int64")
    return table


def patching_table(values, source_values: dict[str, float]):
    """A sweep table with the patching columns: `source` (each metric on the unedited run the
    activations are patched from) and `normalised` (0 = the patch changes nothing, 1 = it
    restores the source run's value; NaN where the two runs agree)."""
    table = values.copy()
    table["source"] = table["metric"].map(source_values)
    span = table["source"] - table["baseline"]
    table["normalised"] = (table["value"] - table["baseline"]) / span.where(span != 0)
    return table


def grid(table, metric: str | None = None, value: str = "effect"):
    """A sweep or patching table as a `[layer x head]` or `[layer x pos]` DataFrame, whichever the
    variants vary (heads win if both do), for one metric and one column.

    Args:
        table: a table from `Sweep.run`, `patching.patch_sweep` or `patching.attribution`.
        metric: which metric's rows; None = the table's only metric (several: refused, name one).
        value: the column to lay out: `effect` (default), `value`, `relative`, `normalised`, ...

    Rows are layers, columns heads or positions, both in numeric order; a cell no variant
    covered is NaN, and cells several variants share (e.g. two sites of one layer) are refused
    rather than averaged. Works as `table.pipe(splice.grid, value="normalised")`.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"variant": [-1, 0, 1], "metric": "m", "layer": [None, 0, 1],
        ...                   "head": [None, 0, 0], "pos": None, "site": ["baseline", "a", "b"],
        ...                   "effect": [0.0, -1.5, 0.25]})
        >>> grid(t).values.tolist()
        [[-1.5], [0.25]]
    """
    from ..errors import SpliceError

    columns = list(getattr(table, "columns", ()))
    needed = {"variant", "metric", "layer", "head", "pos", value}
    if not needed <= set(columns):
        raise SpliceError(
            f"splice.grid needs a sweep or patching table with columns {sorted(needed)}; "
            f"missing {sorted(needed - set(columns))} (it has {columns})"
        )
    rows = table[table["variant"] >= 0]
    metrics = list(dict.fromkeys(rows["metric"]))
    if metric is None:
        if len(metrics) != 1:
            raise SpliceError(f"the table has metrics {metrics}; pass metric= to choose one")
        metric = metrics[0]
    elif metric not in metrics:
        raise SpliceError(f"metric {metric!r} is not in the table; it has {metrics}")
    rows = rows[rows["metric"] == metric]
    across = "head" if rows["head"].notna().any() else "pos" if rows["pos"].notna().any() else None
    if across is None:
        raise SpliceError(
            "the sweep varies neither heads nor positions (one variant per site): there is no grid; "
            "read the table directly"
        )
    cells = rows[["layer", across]]
    repeated = cells[cells.duplicated(keep=False)]
    if len(repeated):
        first = repeated.iloc[0]
        sites = sorted(set(rows.loc[repeated.index, "site"]))
        raise SpliceError(
            f"{len(repeated)} variants share a (layer, {across}) cell, e.g. layer {first['layer']} {across} "
            f"{first[across]} from sites {sites}: filter the table to one site (or intervention) first"
        )
    out = rows.pivot(index="layer", columns=across, values=value).sort_index().sort_index(axis=1)
    out.index, out.columns = out.index.astype(int), out.columns.astype(int)
    out.index.name, out.columns.name = "layer", across
    return out.astype(float)
