"""Sweep configuration files (YAML, read with the safe loader only) for `splice sweep`.

    model: smollm2                     # embedded default, a hub name, or a local folder
    data: prompts.jsonl                # or an inline list of strings / dicts with "prompt"
    sweep:
      sites: blocks.*.attn.z
      interventions: [{type: Zero}]    # Intervention.to_dict() records
      over: heads
    metrics:
      - logit_diff: {correct: correct, wrong: wrong}
    run: {batch_size: 8, checkpoint: out/sweep.jsonl}
    output: {table: out/sweep.csv, heatmap: out/sweep.png, top: 10}
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from . import metrics as metric_fns
from .errors import SpliceError
from .interventions import Intervention
from .sweep import Sweep

METRICS = {"logit_diff": metric_fns.logit_diff, "answer_logprob": metric_fns.answer_logprob,
           "loss": metric_fns.loss, "kl_from_clean": metric_fns.kl_from_clean}


@dataclass
class SweepConfig:
    model: str | None
    data: list
    sweep: Sweep
    run: dict = field(default_factory=dict)
    output: dict = field(default_factory=dict)


def _data(value, base: Path) -> list:
    if isinstance(value, list):
        return value
    if isinstance(value, str):
        path = (base / value) if not Path(value).is_absolute() else Path(value)
        text = path.read_text()
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        if path.suffix == ".json":
            return json.loads(text)
        if path.suffix == ".csv":
            import pandas as pd

            return pd.read_csv(path).to_dict("records")
        return [line for line in text.splitlines() if line.strip()]
    raise SpliceError(f"data: expected a list or a file path (.jsonl, .json, .csv, .txt); got {type(value).__name__}")


def _metric(entry):
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise SpliceError(f"each metric is a name or a {{name: {{arguments}}}} mapping; got {entry!r}")
    (name, arguments), = entry.items()
    if name not in METRICS:
        raise SpliceError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    return METRICS[name](**(arguments or {}))


def load_config(path) -> SweepConfig:
    import yaml

    path = Path(path)
    raw = yaml.safe_load(path.read_text())
    if not isinstance(raw, dict):
        raise SpliceError(f"{path}: a sweep config is a mapping with model, data, sweep, metrics")
    unknown = set(raw) - {"model", "data", "sweep", "metrics", "run", "output", "name"}
    if unknown:
        raise SpliceError(f"{path}: unknown keys {sorted(unknown)}")
    spec = dict(raw.get("sweep") or {})
    records = spec.pop("interventions", None)
    if records is None:
        raise SpliceError(f"{path}: sweep.interventions is required, e.g. [{{type: Zero}}]")
    records = records if isinstance(records, list) else [records]
    interventions = [Intervention.from_dict(r) for r in records]
    sweep = Sweep(sites=spec.pop("sites", None), interventions=interventions, over=spec.pop("over", None),
                  metrics=[_metric(m) for m in raw.get("metrics") or []], name=raw.get("name", path.stem))
    if spec:
        raise SpliceError(f"{path}: unknown sweep keys {sorted(spec)}")
    return SweepConfig(raw.get("model"), _data(raw.get("data"), path.parent), sweep, raw.get("run") or {}, raw.get("output") or {})
