"""What `edge_scores` and `evaluate` share: checked data, the clean/corrupted prompt pairs, and
the nodes' outputs of a run stacked in source order."""

from __future__ import annotations

import torch

from ..errors import SpliceError
from ..sweeps.data import PromptBatch, as_items, batches_of, check_aligned, source_batch
from ..sweeps.metrics import Metric

__all__ = ["output_sites", "pairs", "stacked_outputs"]


def pairs(model, data, metric, source: str, batch_size: int) -> list[tuple[PromptBatch, PromptBatch]]:
    """(corrupted batch, clean batch) pairs of `data`, checked before any forward.

    Raises:
        SpliceError: For no metric, no rows, a missing `source` field, or a clean prompt whose
            length in tokens differs from its corrupted prompt's.
    """
    if not isinstance(metric, Metric):
        raise SpliceError(
            f"edge attribution needs one metric (see splice.metrics), e.g. metrics.logit_diff(); got {metric!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise SpliceError(f"batch_size must be a positive int; got {batch_size!r}")
    out = []
    for batch in batches_of(model, as_items(data), batch_size):
        clean = source_batch(model, batch, source)
        check_aligned(
            batch, clean, source, f"edge attribution compares the {source!r} and the corrupted 'prompt' runs"
        )
        out.append((batch, clean))
    return out


def output_sites(n_layers: int) -> list[str]:
    """The sites holding every source node's output: `embed`, each layer's `attn.result` (one
    slice per head) and `mlp.out`."""
    return ["embed"] + [
        f"blocks.{layer}.{p}" for layer in range(n_layers) for p in ("attn.result", "mlp.out")
    ]


def layer_outputs(recording, layer: int) -> torch.Tensor:
    """The outputs of layer `layer`'s sources (heads, then the MLP) `[H + 1, n, pos, d_model]`,
    on the embedding's device (a model split across devices has its layers on several)."""
    device = recording["embed"].device
    heads = recording[f"blocks.{layer}.attn.result"].movedim(2, 0).to(device)
    return torch.cat([heads, recording[f"blocks.{layer}.mlp.out"].unsqueeze(0).to(device)])


def stacked_outputs(recording, n_layers: int) -> torch.Tensor:
    """Every source's output in source order `[sources, n, pos, d_model]`, on the embedding's device."""
    parts = [recording["embed"].unsqueeze(0)] + [layer_outputs(recording, layer) for layer in range(n_layers)]
    return torch.cat(parts)
