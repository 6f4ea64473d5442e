"""Sweep configuration files (YAML, read with the safe loader only) for `splice sweep`.

```yaml
model: smollm2                     # embedded default, a hub name, a local folder, or a mapping:
                                   # {model: ..., dtype: bfloat16, device_map: auto, ...}
data: prompts.jsonl                # or an inline list of strings / dicts with "prompt"
sweep:
  sites: blocks.*.attn.z
  interventions: [{type: Zero}]    # Intervention.to_dict() records
  over: heads
metrics:
  - logit_diff: {correct: correct, wrong: wrong}
run: {batch_size: 8, checkpoint: out/sweep.jsonl}
output: {table: out/sweep.csv, heatmap: out/sweep.png, top: 10}
```

A sweep over SAE latents names the SAE's folder (SAELens' format, relative to the config file):
`sweep: {sites: blocks.8.resid_post.sae.acts, interventions: [{type: Zero}], over: features,
features: "top:50", sae: sae/}`; its picture is a bar chart of the largest effects.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import sae
from .engine import files
from .errors import SpliceError
from .spec import ModelSpec
from .sweeps import metrics as metric_fns
from .sweeps.sweep import Sweep

METRICS: dict[str, Callable[..., metric_fns.Metric]] = {
    "logit_diff": metric_fns.logit_diff,
    "answer_logprob": metric_fns.answer_logprob,
    "loss": metric_fns.loss,
    "kl_from_baseline": metric_fns.kl_from_baseline,
    "kl_from_clean": metric_fns.kl_from_clean,  # deprecated name, warns
}
"""The metrics a config may name, with the functions its arguments are passed to."""
CONFIG = "a sweep config: a YAML mapping with model, data, sweep, metrics (see splice.config)"
KEYS = ("model", "data", "sweep", "metrics", "run", "output", "name")
RUN_KEYS = ("batch_size", "max_rows", "checkpoint", "prefix_reuse", "progress", "executor")
OUTPUT_KEYS = ("table", "heatmap", "top")
ROW = "a prompt string or a mapping with 'prompt' (or 'input_ids') and the metrics' answer fields"
ROWS = "a list of data rows, each " + ROW


@dataclass
class SweepConfig:
    """A sweep config, read and checked by `load_config`.

    Attributes:
        model: What `splice.load` is given: a model spec (a hub name, a local folder, None for
            the embedded SmolLM2-135M, or a mapping with `model`, `dtype`, `device_map`, ...; see
            `splice.spec.ModelSpec`), checked when the file is read.
        data: The data rows (prompt strings or mappings with `prompt`/`input_ids` and fields).
        sweep: The `Sweep` built from `sweep:` and `metrics:` (named by `name:` or the file's
            stem).
        run: Keyword arguments of `Sweep.run` (`batch_size`, `max_rows`, `checkpoint`,
            `prefix_reuse`, `progress`, `executor`: `local` or `ray`).
        output: Where `splice sweep` writes: `table` (CSV path; a JSONL copy beside it),
            `heatmap` (a path, or false for none), `top` (rows printed per metric).
    """

    model: Any
    data: list[Any]
    sweep: Sweep
    run: dict[str, Any] = field(default_factory=dict)
    output: dict[str, Any] = field(default_factory=dict)


def load_config(path: str | os.PathLike[str]) -> SweepConfig:
    """Read a sweep config; every mistake in it (or in its data file) is a SpliceError naming the
    file, the line and what was expected.

    Args:
        path: A YAML file (read with the safe loader; anchors and aliases are refused) in the
            format of this module's docstring. `data:` is an inline list or a file path,
            relative to the config's folder: `.jsonl`, `.json`, `.csv` (a `prompt` column), or
            anything else for one prompt per non-empty line.

    Returns:
        The config, with its `Sweep` built.

    Raises:
        SpliceError: For an unknown key, section, metric or metric argument, a bad
            intervention record or data row, or an unreadable file.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "heads.yaml"
        >>> _ = path.write_text(
        ...     "data: [{prompt: When Mary and John went to the store, John gave a drink to,"
        ...     " correct: ' Mary', wrong: ' John'}]\\n"
        ...     "sweep: {sites: blocks.*.attn.z, interventions: [{type: Zero}], over: heads}\\n"
        ...     "metrics: [logit_diff]\\n"
        ...     "run: {batch_size: 8}\\n"
        ... )
        >>> config = load_config(path)
        >>> config.model, len(config.data), config.run
        (None, 1, {'batch_size': 8})
        >>> _ = path.write_text(path.read_text().replace("[logit_diff]", "[logit_dif]"))
        >>> load_config(path)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: ...heads.yaml line 3 at ['metrics'][0]: unknown metric 'logit_dif'; known: logit_diff, ...
    """
    doc = files.load_yaml(path, CONFIG)
    raw = doc.data
    if not isinstance(raw, dict):
        raise doc.error((), "a sweep config is a mapping with model, data, sweep, metrics")
    _known(doc, (), raw, KEYS)
    sweep = _sweep(doc, raw)
    run, output = _section(doc, raw, "run", RUN_KEYS), _section(doc, raw, "output", OUTPUT_KEYS)
    if run.get("executor", "local") not in ("local", "ray"):
        raise doc.error(("run", "executor"), f"executor is 'local' or 'ray'; got {run['executor']!r}")
    try:
        ModelSpec.parse(raw.get("model"))
    except SpliceError as error:
        raise doc.error(("model",), str(error)) from None
    return SweepConfig(raw.get("model"), _data(doc, raw.get("data")), sweep, run, output)


def _known(doc, keys: tuple, mapping: dict, allowed) -> None:
    unknown = sorted(set(mapping) - set(allowed), key=str)
    if unknown:
        raise doc.error((*keys, unknown[0]), f"unknown keys {unknown}; expected {', '.join(allowed)}")


def _section(doc, raw: dict, key: str, allowed) -> dict:
    value = raw.get(key) or {}
    if not isinstance(value, dict):
        raise doc.error((key,), f"expected a mapping with {', '.join(allowed)}; got {type(value).__name__}")
    _known(doc, (key,), value, allowed)
    return value


def _sweep(doc, raw: dict) -> Sweep:
    spec = raw.get("sweep") or {}
    if not isinstance(spec, dict):
        raise doc.error(
            ("sweep",), f"expected a mapping with sites, interventions, over; got {type(spec).__name__}"
        )
    _known(doc, ("sweep",), spec, ("sites", "interventions", "over", "features", "sae"))
    records = spec.get("interventions")
    if records is None:
        raise doc.error(("sweep",), "sweep.interventions is required, e.g. [{type: Zero}]")
    interventions = [
        files.intervention(doc, k, r) for k, r in files.items_at(("sweep", "interventions"), records)
    ]
    metrics = _metrics(doc, raw.get("metrics"))
    attached = _sae(doc, spec.get("sae"))
    try:
        return Sweep(
            sites=spec.get("sites"),
            interventions=interventions,
            over=spec.get("over"),
            metrics=metrics,
            name=raw.get("name", doc.path.stem),
            features=spec.get("features"),
            sae=attached,
        )
    except (SpliceError, TypeError) as error:
        raise doc.error(("sweep",), str(error)) from None


def _sae(doc, folder):
    """The SAE a feature sweep goes through, read from its folder (relative to the config file)."""
    if folder is None:
        return None
    if not isinstance(folder, str):
        raise doc.error(
            ("sweep", "sae"), f"expected the path of an SAE folder (SAELens' format); got {folder!r}"
        )
    path = Path(folder) if os.path.isabs(folder) else doc.path.parent / folder
    try:
        return sae.load(path)
    except SpliceError as error:
        raise doc.error(("sweep", "sae"), str(error)) from None


def _metrics(doc, entries) -> list:
    if not entries:
        raise doc.error(("metrics",), f"at least one metric is required; known: {', '.join(METRICS)}")
    return [_metric(doc, k, e) for k, e in files.items_at(("metrics",), entries)]


def _metric(doc, keys: tuple, entry):
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise doc.error(keys, f"each metric is a name or a {{name: {{arguments}}}} mapping; got {entry!r}")
    ((name, arguments),) = entry.items()
    if name not in METRICS:
        raise doc.error(keys, f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    if not isinstance(arguments or {}, dict):
        raise doc.error(
            keys,
            f"the arguments of {name} are a mapping, e.g. {{{name}: {{positions: 2}}}}; got {arguments!r}",
        )
    try:
        return METRICS[name](**(arguments or {}))
    except (SpliceError, TypeError) as error:
        raise doc.error(keys, f"{name}: {error}") from None


# -- data -----------------------------------------------------------------------------------------
def _data(doc, value) -> list:
    if isinstance(value, list):
        return _rows(value, lambda i: doc.where(("data", i)))
    if isinstance(value, str):
        path = Path(value) if Path(value).is_absolute() else doc.path.parent / value
        return _data_file(path)
    raise doc.error(
        ("data",),
        f"expected a list of rows or a file path (.jsonl, .json, .csv, .txt); got {type(value).__name__}",
    )


def _data_file(path: Path) -> list:
    """Rows of a data file by its suffix; any other suffix is one prompt per non-empty line."""
    if path.suffix == ".json":
        doc = files.load_json(path, ROWS)
        if not isinstance(doc.data, list):
            raise doc.error((), f"expected {ROWS}; got {type(doc.data).__name__}")
        return _rows(doc.data, lambda i: doc.where((i,)))
    text = files.read_text(path, f"a data file of {ROWS}")
    if path.suffix == ".jsonl":
        numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        rows = [files.parse_json(line, str(path), ROW, line=n) for n, line in numbered]
        return _rows(rows, lambda i: f"{path} line {numbered[i][0]}")
    if path.suffix == ".csv":
        return _rows(_csv(path, text), lambda i: f"{path} row {i + 1}")
    return [line for line in text.splitlines() if line.strip()]


def _csv(path: Path, text: str) -> list:
    import pandas as pd

    try:
        return pd.read_csv(io.StringIO(text)).to_dict("records")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as error:
        raise SpliceError(
            f"{path}: unreadable CSV ({' '.join(str(error).split())}); expected a header row with a 'prompt' column"
        ) from None


def _rows(rows: list, where) -> list:
    """`rows` if each is a prompt or a mapping with one; `where(i)` names row i in errors."""
    for i, row in enumerate(rows):
        if isinstance(row, str) or (isinstance(row, dict) and ({"prompt", "input_ids"} & set(row))):
            continue
        raise SpliceError(f"{where(i)}: expected {ROW}; got {' '.join(repr(row).split())[:80]}")
    return rows
