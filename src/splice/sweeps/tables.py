"""Tidy result tables (pandas): one row per (variant, metric) after the baseline rows."""

from __future__ import annotations


def tidy_table(metrics, variants, value_of, label=repr):
    """One row per (variant, metric), after a baseline row (variant -1) per metric:
    `value_of(variant_id, metric_name)` gives the mean metric value, -1 the unedited run's."""
    import pandas as pd

    rows = []
    for metric in metrics:
        clean = value_of(-1, metric.name)
        rows.append(
            {
                "variant": -1,
                "site": "clean",
                "layer": None,
                "head": None,
                "pos": None,
                "intervention": "none",
                "metric": metric.name,
                "value": clean,
                "clean": clean,
                "effect": 0.0,
                "relative": 0.0,
            }
        )
        for v in variants:
            value = value_of(v.id, metric.name)
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
                    "clean": clean,
                    "effect": value - clean,
                    "relative": (value - clean) / abs(clean) if clean else float("nan"),
                }
            )
    table = pd.DataFrame(rows)
    for column in ("layer", "head", "pos"):
        table[column] = table[column].astype("Int64")
    return table


def patching_table(values, clean_values: dict[str, float]):
    """A sweep table re-labelled for patching: its baseline is the corrupted run; adds the clean
    run's metric and the normalised metric."""
    table = values.rename(columns={"clean": "corrupt"}).drop(columns=["relative"])
    table["clean"] = table["metric"].map(clean_values)
    span = table["clean"] - table["corrupt"]
    table["normalised"] = (table["value"] - table["corrupt"]) / span.where(span != 0)
    table.loc[table.variant == -1, "site"] = "corrupt"
    return table
