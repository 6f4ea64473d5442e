"""Steering vectors: difference of mean activations between two prompt sets, with provenance.

    sv = contrastive(model, love_prompts, anger_prompts, "blocks.12.resid_post", positions=slice(1, None))
    n = model.to_tokens(prompt).shape[1]
    model.generate(prompt, edits=sv.edit(4.0, pos=slice(n, None)))   # steer generated tokens only
    sv.save("out/love")            # out/love.safetensors (the vector) + out/love.json (provenance)
    SteeringVector.load("out/love")

`positions` chooses which tokens of each prompt are averaged, counted from the prompt's first real
token (prompts are left-padded in batches; padding is never included): "last" (the last token of
each prompt, the default), "all" (every real token, pooled: each token weighs the same), an int
(negative counts from the end), or a slice. In some models the first token's residual is huge (an
attention sink; SmolLM2's is ~100x the others) and dominates an "all" mean: use `slice(1, None)`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from .engine import tokens as tok
from .engine.codec import decode, encode
from .engine.edits import Edits
from .engine.files import tensor_sha256
from .engine.interventions import Add
from .errors import SpliceError
from .loading import identity

FORMAT = "splice-steering-vector/2"
READABLE_FORMATS = ("splice-steering-vector/1", FORMAT)  # /1 recorded only a model name


def _sha256_texts(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(list(texts), ensure_ascii=False).encode()).hexdigest()


def config_fingerprint(config) -> str:
    """sha256 of a model config, without the fields that name where or how it was loaded."""
    record = {
        k: v
        for k, v in config.to_dict().items()
        if not k.startswith("_") and k not in ("transformers_version", "torch_dtype", "dtype")
    }
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _check_positions(positions):
    if positions in ("last", "all"):
        return positions
    if isinstance(positions, int) and not isinstance(positions, bool):
        return positions
    if isinstance(positions, slice):
        if positions.step is not None and positions.step <= 0:
            raise SpliceError(f"positions slice must step forward; got {positions}")
        return positions
    raise SpliceError(f'positions must be "last", "all", an int or a slice; got {positions!r}')


def _check_prompts(prompts, which: str) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) and p for p in prompts):
        raise SpliceError(f"{which} prompts must be a non-empty list of non-empty strings")
    return prompts


def _selected(mask: torch.Tensor, positions, prompts: list[str]) -> torch.Tensor:
    """[batch, seq] bool: the tokens of each (left-padded) row that `positions` picks."""
    lengths = mask.sum(1)
    rel = mask.cumsum(1) - 1  # position counted from each row's first real token
    real = mask.bool()
    if positions == "all":
        return real
    if positions == "last":
        return real & (rel == (lengths - 1)[:, None])
    if isinstance(positions, int):
        target = lengths + positions if positions < 0 else torch.full_like(lengths, positions)
        bad = [p for p, t, n in zip(prompts, target.tolist(), lengths.tolist()) if not 0 <= t < n]
        if bad:
            raise SpliceError(
                f"position {positions} is outside {len(bad)} prompt(s), e.g. {bad[0]!r} ({int(lengths[prompts.index(bad[0])])} tokens)"
            )
        return real & (rel == target[:, None])
    picked = torch.zeros_like(real)
    for row, n in enumerate(lengths.tolist()):
        chosen = list(range(n))[positions]
        if not chosen:
            raise SpliceError(
                f"positions {positions} selects no token of prompt {prompts[row]!r} ({n} tokens)"
            )
        picked[row] = real[row] & torch.isin(rel[row], torch.tensor(chosen, device=rel.device))
    return picked


def _mean_activation(
    model, prompts: list[str], site: str, positions, batch_size: int
) -> tuple[torch.Tensor, torch.dtype]:
    masks = []
    with torch.no_grad(), model.record(site, mode="accumulate") as rec:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start : start + batch_size]
            batch = tok.encode(model.tokenizer, chunk, model.device)
            masks.append((batch.get("attention_mask", torch.ones_like(batch["input_ids"])), chunk))
            model(batch)
    total, count, dtype = None, 0, None
    for act, (mask, chunk) in zip(rec[site], masks):
        picked = _selected(mask.to(act.device), positions, chunk)
        chosen = act[picked].double()  # [n_tokens, *trailing]
        total = chosen.sum(0) if total is None else total + chosen.sum(0)
        count += chosen.shape[0]
        dtype = act.dtype
    if total is None or dtype is None:  # _check_prompts refuses empty lists; this cannot happen
        raise SpliceError(f"no activation was recorded at {site} for {len(prompts)} prompt(s)")
    return total / count, dtype


@dataclass(frozen=True, eq=False)
class SteeringVector:
    """A steering vector for one site, and where it came from.

    `vector` has the site's trailing shape (`[d_model]` for residual sites). The other fields are
    its provenance: the site, which positions were averaged, the model's identity
    (`splice.loading.identity`: name, revision, weights sha256, dtype), a config fingerprint, the
    sha256 of each prompt list and its size, the vector's norm, splice's version and the time.
    Made by `contrastive`; saved and loaded with `save`/`load`; applied with `edit`."""

    vector: torch.Tensor
    site: str
    positions: Any = "last"
    model: dict = field(
        default_factory=dict
    )  # `splice.loading.identity`: name, revision, weights_sha256, dtype
    config_sha256: str = ""
    positive_sha256: str = ""
    negative_sha256: str = ""
    n_positive: int = 0
    n_negative: int = 0
    norm: float = 0.0
    splice_version: str = ""
    created: str = ""

    def __repr__(self):
        pos = self.positions if isinstance(self.positions, str) else repr(self.positions)
        return (
            f"SteeringVector({self.site}, {list(self.vector.shape)} norm {self.norm:.4g}, positions={pos}, "
            f"{self.n_positive}+{self.n_negative} prompts, model={self.model.get('name')!r})"
        )

    def __eq__(self, other):
        if not isinstance(other, SteeringVector):
            return NotImplemented
        return torch.equal(self.vector.cpu(), other.vector.cpu()) and self.provenance() == other.provenance()

    __hash__ = object.__hash__

    def provenance(self) -> dict:
        """Everything but the vector, JSON-safe (the model's identity as a plain mapping): what
        `save` writes next to the tensor."""
        record = {
            f.name: encode(getattr(self, f.name)) for f in fields(self) if f.name not in ("vector", "model")
        }
        return {**record, "model": dict(self.model)}

    def edit(self, coefficient: float = 1.0, pos=None, rows=None) -> Edits:
        """`Edits({site: Add(vector, scale=coefficient, pos=pos)})`, ready for `edits=`
        (`m.generate(p, edits=sv.edit(4.0, pos=slice(n_prompt, None)))` steers only generated
        tokens); `sv.edit(...)[sv.site]` is the bare `Add`. Like every `Add`, it computes in the
        dtype of the model it runs in: the vector and the coefficient are cast to it (a float32
        vector steers a bfloat16 model as `resid + v.to(bfloat16) * c`)."""
        return Edits({self.site: Add(self.vector, scale=float(coefficient), pos=pos, rows=rows)})

    # -- files ---------------------------------------------------------------------------------
    @staticmethod
    def _paths(path) -> tuple[Path, Path]:
        path = Path(path)
        if path.suffix in (".safetensors", ".json"):
            path = path.with_suffix("")
        return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")

    def save(self, path) -> tuple[Path, Path]:
        """Write `path.safetensors` (the vector) and `path.json` (provenance); returns both paths."""
        from safetensors.torch import save_file

        tensors, meta = self._paths(path)
        tensors.parent.mkdir(parents=True, exist_ok=True)
        vector = self.vector.detach().cpu().contiguous()
        save_file({"vector": vector}, str(tensors), metadata={"format": FORMAT, "site": self.site})
        record = {
            "format": FORMAT,
            **self.provenance(),
            "shape": list(vector.shape),
            "dtype": str(vector.dtype).removeprefix("torch."),
            "vector_sha256": tensor_sha256(vector),
        }
        meta.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        return tensors, meta

    @classmethod
    def load(cls, path) -> SteeringVector:
        """Read what `save` wrote; the vector must match the checksum in the JSON."""
        from safetensors.torch import load_file

        tensors, meta = cls._paths(path)
        for file in (tensors, meta):
            if not file.exists():
                raise SpliceError(
                    f"steering vector file {file} does not exist (save writes .safetensors + .json)"
                )
        record = json.loads(meta.read_text())
        if record.get("format") not in READABLE_FORMATS:
            raise SpliceError(
                f"{meta} is not a splice steering vector (format {record.get('format')!r}, expected {FORMAT!r})"
            )
        model = record.get("model")
        if isinstance(model, str):  # format /1: a name (often a cache path) and nothing else
            model = {"name": model, "revision": None, "weights_sha256": None, "dtype": None}
        if not isinstance(model, dict):
            raise SpliceError(
                f"{meta}: 'model' must be a mapping (name, revision, weights_sha256, dtype); got {model!r}"
            )
        vector = load_file(str(tensors))["vector"]
        if tensor_sha256(vector) != record.get("vector_sha256"):
            raise SpliceError(
                f"{tensors} does not match the checksum in {meta}: the files belong to different vectors"
            )
        names = {f.name for f in fields(cls)} - {"vector"}
        values = {k: decode(v) for k, v in record.items() if k in names and k != "model"}
        return cls(vector=vector, model=model, **values)


def contrastive(
    model, positive_prompts, negative_prompts, site, positions="last", batch_size: int = 16
) -> SteeringVector:
    """Mean activation at `site` over `positive_prompts` minus the mean over `negative_prompts`.

    Args:
        model: a `splice.Model` with a tokenizer.
        positive_prompts, negative_prompts: non-empty lists of non-empty strings (or one string).
        site: one `[batch, pos, ...]` site of fixed width (a name, alias or tuple; not a glob
            that names several).
        positions: which tokens of each prompt are averaged: "last", "all", an int (negative
            from the end) or a forward slice, counted from the prompt's first real token.
        batch_size: prompts per forward.

    Returns:
        A `SteeringVector` with its provenance.

    Activations are recorded with `model.record(site, mode="accumulate")` over left-padded batches;
    padding is excluded and `positions` (see the module docstring) counts from each prompt's first
    real token. Means are taken in float64 and the result cast to the activations' dtype."""
    positive = _check_prompts(positive_prompts, "positive")
    negative = _check_prompts(negative_prompts, "negative")
    positions = _check_positions(positions)
    names = model.resolve(site)
    if len(names) != 1:
        raise SpliceError(f"{site!r} names {len(names)} sites; a steering vector lives at one site")
    name = names[0]
    resolved = model.layout.sites_of(name)[0]
    axes, shape = model.layout.axes(resolved), model.layout.shape(resolved)
    if axes[:2] != ("batch", "pos") or any(s is None for s in shape[2:]):
        raise SpliceError(
            f"{name} has axes [{', '.join(axes)}]; a steering vector needs a [batch, pos, ...] site of fixed width"
        )
    with torch.no_grad():
        mean_pos, dtype = _mean_activation(model, positive, name, positions, batch_size)
        mean_neg, _ = _mean_activation(model, negative, name, positions, batch_size)
    vector = (mean_pos - mean_neg).to(dtype).cpu()
    from .version import __version__

    return SteeringVector(
        vector=vector,
        site=name,
        positions=positions,
        model=identity(model.hf),
        config_sha256=config_fingerprint(model.hf.config),
        positive_sha256=_sha256_texts(positive),
        negative_sha256=_sha256_texts(negative),
        n_positive=len(positive),
        n_negative=len(negative),
        norm=float(vector.double().norm()),
        splice_version=__version__,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
    )


def _new_token_logprobs(model, full: torch.Tensor, n_prompt: int, edits=None) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model.run(full, edits=edits)
    logprobs = logits[0, n_prompt - 1 : -1].double().log_softmax(-1)
    return logprobs.gather(-1, full[0, n_prompt:, None])[:, 0]


def coefficient_sweep(
    model, sv: SteeringVector, prompt: str, coefficients, max_new_tokens: int = 20, pos="generated"
):
    """Greedy completions of `prompt` steered by `sv` at each coefficient, as a pandas DataFrame.

    `pos`: "generated" (default) steers the generated tokens only (`slice(n_prompt, None)`; the
    first new token is predicted at the prompt's last position, so it is never steered), "all"
    every position, or any `pos=` value. Columns: coefficient, text, changed (differs from the
    unsteered completion), n_tokens, logprob_shift (mean over the completion's tokens of their
    log-probability under the steered model minus under the unsteered one: how far steering moved the
    model towards what it wrote) and baseline_logprob_shift (the same for the unsteered
    completion: how strongly steering pushes away from what the model would have said)."""
    import pandas as pd

    if model.tokenizer is None:
        raise SpliceError("coefficient_sweep needs a tokenizer to decode completions")
    ids = tok.encode(model.tokenizer, prompt, model.device)["input_ids"]
    n_prompt = ids.shape[1]
    where = slice(n_prompt, None) if pos == "generated" else None if pos == "all" else pos

    def complete(edits):
        with torch.no_grad(), model.edit(edits):
            out = model.hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id(model.tokenizer),
            )
        return out[:, : n_prompt + max_new_tokens]

    def logprobs(full, edits=None):
        return _new_token_logprobs(model, full, n_prompt, edits) if full.shape[1] > n_prompt else None

    def shift(steered, clean):
        return float("nan") if steered is None else float((steered - clean).mean())

    baseline = complete(None)
    baseline_text = model.tokenizer.decode(baseline[0, n_prompt:].tolist(), skip_special_tokens=True)
    baseline_clean = logprobs(baseline)
    rows = []
    for c in coefficients:
        edits = sv.edit(c, pos=where)
        full = complete(edits)
        text = model.tokenizer.decode(full[0, n_prompt:].tolist(), skip_special_tokens=True)
        rows.append(
            {
                "coefficient": float(c),
                "text": text,
                "changed": text != baseline_text,
                "n_tokens": full.shape[1] - n_prompt,
                "logprob_shift": shift(logprobs(full, edits), logprobs(full)),
                "baseline_logprob_shift": shift(logprobs(baseline, edits), baseline_clean),
            }
        )
    return pd.DataFrame(
        rows,
        columns=["coefficient", "text", "changed", "n_tokens", "logprob_shift", "baseline_logprob_shift"],
    )
