"""What a direct logit attribution reads out: a logit difference of two answer tokens, one
token's logit, or any residual-stream direction, resolved and checked before any forward."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..engine import weights
from ..errors import SpliceError

if TYPE_CHECKING:
    from ..engine.model import Model

METRICS = ("logit_diff", "logit", "direction")
"""The table's `metric` for a token pair, a single token, and a tensor direction."""


@dataclass(frozen=True)
class Direction:
    """A resolved readout.

    Attributes:
        metric: `"logit_diff"`, `"logit"` or `"direction"`.
        tokens: `[rows, 2]` (correct, wrong) or `[rows, 1]` token ids per data row, or None.
        vector: `[rows, d_model]` for a tensor direction, or None.
    """

    metric: str
    tokens: torch.Tensor | None
    vector: torch.Tensor | None

    def vectors(self, m: Model, rows: slice) -> torch.Tensor:
        """The residual-stream direction of each row in `rows`, `[rows, d_model]` float32: the
        difference of the two tokens' unembedding columns, one token's column, or the vector."""
        if self.vector is not None:
            return self.vector[rows].float()
        assert self.tokens is not None
        _, w_u, _ = weights.unembedding(m.hf)
        ids = self.tokens[rows].to(w_u.device)
        with torch.no_grad():
            columns = w_u.detach()[:, ids].float().movedim(0, -1)  # [rows, k, d_model]
        return columns[:, 0] - columns[:, 1] if ids.shape[1] == 2 else columns[:, 0]

    def unembed_bias(self, m: Model, rows: slice) -> torch.Tensor | None:
        """lm_head's bias read out per row (`b_U[correct] - b_U[wrong]`, or `b_U[token]`), or
        None where lm_head has no bias or the direction is a tensor."""
        _, _, bias = weights.unembedding(m.hf)
        if bias is None or self.tokens is None:
            return None
        ids = self.tokens[rows].to(bias.device)
        with torch.no_grad():
            values = bias.detach()[ids].float()
        return values[:, 0] - values[:, 1] if ids.shape[1] == 2 else values[:, 0]

    def of_logits(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """The readout of logits `[rows, pos, vocab]`, `[rows, pos]` float32 (token readouts only)."""
        assert self.tokens is not None
        ids = self.tokens[rows].to(logits.device)
        picked = logits.float().gather(-1, ids[:, None, :].expand(-1, logits.shape[1], -1))
        return picked[..., 0] - picked[..., 1] if ids.shape[1] == 2 else picked[..., 0]


def _token(m: Model, value: Any, vocab: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise SpliceError(f"{what} must be a single-token string or a token id; got {value!r}")
    if isinstance(value, str):
        if m.tokenizer is None:
            raise SpliceError(
                f"{what} is the text {value!r}, which needs a tokenizer: pass token ids, or a model with one"
            )
        try:
            value = m.to_single_token(value)
        except SpliceError as error:  # naming the pieces
            raise SpliceError(f"{what}: {error}") from None
    if not 0 <= value < vocab:
        raise SpliceError(f"{what}: token id {value} is out of range; the unembedding has {vocab} columns")
    return int(value)


def _field(m: Model, items: list[dict[str, Any]], key: Any, vocab: int) -> list[int]:
    """One token id per row from data field `key` (or the same id for every row, for an int)."""
    if isinstance(key, int) and not isinstance(key, bool):
        return [_token(m, key, vocab, f"direction token id {key}")] * len(items)
    if not isinstance(key, str):
        raise SpliceError(f"a direction tuple holds data field names or token ids; got {key!r}")
    missing = [i for i, item in enumerate(items) if key not in item]
    if missing:
        fields = sorted({k for item in items for k in item})
        raise SpliceError(
            f"direction field {key!r} is missing from data rows {missing[:5]} (fields: {fields}); a "
            "direction tuple names data fields or token ids, e.g. (m.to_single_token(' Mary'), ...), "
            "and a bare string is one token for every row"
        )
    return [_token(m, item[key], vocab, f"data field {key!r} of row {i}") for i, item in enumerate(items)]


def resolve(m: Model, direction: Any, items: list[dict[str, Any]]) -> Direction:
    """Check and resolve `direction` for the data rows `items` (see `logit_attribution`).

    Raises:
        SpliceError: For a missing field, a string that is not one token, an id out of range,
            or a tensor that is not `[d_model]` or `[rows, d_model]` floats.
    """
    d_model = m.dims.d_model
    vocab = weights.unembedding(m.hf)[1].shape[1]
    if isinstance(direction, torch.Tensor):
        if not direction.is_floating_point():
            raise SpliceError(f"a tensor direction must hold floats; got {direction.dtype}")
        if direction.dim() not in (1, 2) or direction.shape[-1] != d_model:
            raise SpliceError(
                f"a tensor direction must be [d_model={d_model}] or [rows={len(items)}, d_model={d_model}]; "
                f"got shape {list(direction.shape)}"
            )
        if direction.dim() == 2 and direction.shape[0] != len(items):
            raise SpliceError(
                f"a [rows, d_model] direction needs one row per data row ({len(items)}); got {direction.shape[0]}"
            )
        if not bool(torch.isfinite(direction).all()):
            raise SpliceError("a tensor direction must be finite (it holds NaN or inf)")
        vector = direction.detach().to(m.device).expand(len(items), d_model)
        return Direction("direction", None, vector)
    if isinstance(direction, (tuple, list)):
        if len(direction) not in (1, 2):
            raise SpliceError(
                "a direction tuple is (correct, wrong) or (answer,): data field names or token ids; "
                f"got {direction!r}"
            )
        ids = [_field(m, items, key, vocab) for key in direction]
        metric = "logit_diff" if len(ids) == 2 else "logit"
        return Direction(metric, torch.tensor(list(zip(*ids))), None)
    if isinstance(direction, (str, int)) and not isinstance(direction, bool):
        return Direction(
            "logit",
            torch.tensor([_token(m, direction, vocab, f"direction {direction!r}")] * len(items))[:, None],
            None,
        )
    raise SpliceError(
        "direction must be a tuple of data fields or token ids ((correct, wrong) or (answer,)), one "
        f"token (a single-token string or an id), or a [d_model] tensor; got {type(direction).__name__}"
    )
