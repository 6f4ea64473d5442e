"""Logit lens and tuned lens: read each layer's residual stream as the model's own next-token guess.

The **logit lens** sends a residual-stream activation `h` at a site through the model's own final
norm and unembedding, `m.unembed(m.ln_final(h))`, the same modules (and, for Gemma2, the same logit
soft-cap) that turn the last layer's output into the logits. At the last layer's `resid_post` it is
therefore the model's output itself, which the tests check on every family. The **tuned lens** puts
one affine translator per site in front of that readout, `A_l h + b_l`, trained so that the lens
distribution matches the model's final one (loss KL(final || lens), Adam, identity start); with
identity translators it is the logit lens bit for bit.

    table = logit_lens(m, "The capital of France is")  # tidy: site, layer, pos, rank, token, prob, ...
    splice.plot.lens_heatmap(table, "out/lens.png")  # layer x position, top-1 token in each cell
    tuned = fit_tuned_lens(m, train_texts, steps=200)  # one translator per blocks.*.resid_post
    tuned.save("out/tuned")  # out/tuned.safetensors + out/tuned.json (provenance)
    kl_by_layer(m, held_out_texts, lens=tuned)  # mean KL(final || lens) per layer
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from .engine import tokens as tok
from .engine.files import tensor_sha256
from .engine.sites import Site, SiteKey, canonical_name
from .errors import SpliceError

if TYPE_CHECKING:
    import pandas as pd

    from .engine.model import Inputs, Model

FORMAT = "splice-tuned-lens/1"
"""The `format` field of a saved tuned lens (JSON and safetensors metadata)."""
DEFAULT_SITES = "blocks.*.resid_post"
"""The sites a lens reads unless told otherwise: every layer's output."""

LensFn = Callable[[str, torch.Tensor], torch.Tensor]


# -- sites -------------------------------------------------------------------------------------------
def _lens_sites(m: Model, sites: SiteKey | Sequence[SiteKey]) -> list[Site]:
    """The `[batch, pos, d_model]` sites a lens may read, in the order named (each glob in layer
    order), refusing anything else with what is expected."""
    keys: list[Any] = [sites] if isinstance(sites, (str, tuple)) else list(sites)
    if not keys:
        raise SpliceError(
            f"sites names no site; pass a site, a glob or a list of them (e.g. {DEFAULT_SITES!r})"
        )
    resolved: dict[str, Site] = {}
    for key in keys:
        for site in m.layout.sites_of(key):
            resolved.setdefault(site.name, site)
    for site in resolved.values():
        axes = m.layout.axes(site)
        if site.point == "final_norm":
            raise SpliceError(
                "final_norm is already normalised: a lens applies the final norm itself. Read the model's "
                "own output with m.unembed(cache['final_norm']), or lens 'blocks.-1.resid_post'"
            )
        if axes != ("batch", "pos", "d_model"):
            raise SpliceError(
                f"a lens reads residual-stream sites of shape [batch, pos, d_model]; {site.name} is "
                f"[{', '.join(axes)}]. Use e.g. 'blocks.*.resid_post', 'blocks.*.resid_pre' or 'embed'"
            )
    return list(resolved.values())


def _is_output(m: Model, name: str) -> bool:
    """Whether the logit lens at `name` is the model's output (the last layer's resid_post)."""
    return name == f"blocks.{m.dims.n_layers - 1}.resid_post"


def _check_lens(m: Model, lens: Any, names: list[str]) -> LensFn | None:
    if lens is None:
        return None
    if isinstance(lens, TunedLens):
        lens.check(m, names)
        return lens
    if not callable(lens):
        raise SpliceError(
            f"lens must be a splice.lens.TunedLens, a function (site, resid) -> resid, or None (the logit "
            f"lens); got {type(lens).__name__}"
        )
    return lens


def _check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        upper = f" and at most {high}" if high is not None else ""
        raise SpliceError(f"{name} must be an integer of at least {low}{upper}; got {value!r}")
    return value


# -- reading -----------------------------------------------------------------------------------------
_CHUNK = 1 << 25  # logits per unembedding call (128 MB in float32): sites are read in groups this big


def _groups(names: list[str], rows: int, vocab: int) -> Iterator[list[str]]:
    """`names` in consecutive groups whose lens logits (`rows` per site) fit in `_CHUNK`: one
    unembedding call per group reads the (large) unembedding matrix once for many sites."""
    size = max(1, _CHUNK // max(1, rows * vocab))
    for start in range(0, len(names), size):
        yield names[start : start + size]


def _readout(m: Model, names: list[str], resids: list[torch.Tensor], lens: LensFn | None) -> torch.Tensor:
    """Lens logits `[site, ..., vocab]` of recorded residuals `resids` at sites `names` (one
    shape): the lens' translation if any, then the model's final norm and unembedding."""
    if lens is not None:
        resids = [lens(name, resid) for name, resid in zip(names, resids)]
    return m.unembed(m.ln_final(torch.stack(resids)))


def _record(
    m: Model, batch: dict, names: list[str], edits: Any, need_logits: bool = False
) -> tuple[torch.Tensor | None, Any]:
    """One forward recording `names` under `edits`; without edits it stops after the last site."""
    stop = not edits and not need_logits
    with torch.no_grad():
        logits, rec = m.run(batch, edits=edits, record=names, stop_after_record=stop)
    return logits, rec


def lens_logits(
    m: Model,
    inputs: Inputs,
    sites: SiteKey | Sequence[SiteKey] = DEFAULT_SITES,
    edits: Any = None,
    lens: Any = None,
) -> tuple[torch.Tensor, list[str]]:
    """The lens logits of every site, stacked: what `logit_lens` tabulates, as one tensor.

    Args:
        m: The model.
        inputs: A string, a list of strings (left-padded), token ids or tokenizer output.
        sites: `[batch, pos, d_model]` sites (a name, glob or list; default every layer's
            `resid_post`); `final_norm` and head or MLP-width sites are refused.
        edits: Edits applied to the forward (`Edits`, a dict or None): the lens then reads the
            edited stream (one forward, edits and recording together).
        lens: None (the logit lens), a `TunedLens`, or a function `(site, resid) -> resid`.

    Returns:
        `(logits [site, batch, pos, vocab], site names)`, in the model's dtype. At
        `blocks.-1.resid_post` the logit lens is the model's own output.

    Example:
        >>> import splice, torch, transformers
        >>> _ = torch.manual_seed(0)
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> ids = torch.tensor([[1, 2, 3]])
        >>> logits, names = lens_logits(m, ids)
        >>> logits.shape, names
        (torch.Size([2, 1, 3, 32]), ['blocks.0.resid_post', 'blocks.1.resid_post'])
        >>> torch.allclose(logits[-1], m(ids), atol=1e-6)  # the last layer's lens is the output
        True
    """
    sites_ = _lens_sites(m, sites)
    names = [s.name for s in sites_]
    fn = _check_lens(m, lens, names)
    batch = tok.encode(m.tokenizer, inputs, m.device)
    _, rec = _record(m, batch, names, edits)
    rows = batch["input_ids"].numel()
    with torch.no_grad():
        parts = [
            _readout(m, group, [rec[n] for n in group], fn) for group in _groups(names, rows, m.dims.vocab)
        ]
    return torch.cat(parts), names


def _decoder(m: Model) -> Callable[[int], str]:
    cache: dict[int, str] = {}

    def decode(token: int) -> str:
        if token not in cache:
            cache[token] = str(token) if m.tokenizer is None else m.tokenizer.decode([token])
        return cache[token]

    return decode


def logit_lens(
    m: Model,
    inputs: Inputs,
    sites: SiteKey | Sequence[SiteKey] = DEFAULT_SITES,
    edits: Any = None,
    top_k: int = 5,
    lens: Any = None,
) -> pd.DataFrame:
    """The logit lens (or a tuned lens) of a prompt: each site's top-k next tokens, as a table.

    Each site's activation goes through the model's own final norm and unembedding
    (`m.unembed(m.ln_final(h))`, after `lens` when one is given), so at `blocks.-1.resid_post`
    the table is the model's own prediction.

    Args:
        m: The model (text inputs need its tokenizer; without one, tokens are shown as ids).
        inputs: A string, a list of strings (left-padded), token ids or tokenizer output.
        sites: `[batch, pos, d_model]` sites, as a name, glob or list (default every layer's
            `resid_post`; `embed` and `blocks.*.resid_pre`/`resid_mid` work too).
        edits: Edits applied to the forward: the lens reads the edited residual stream (one
            forward with the edits and the recording).
        top_k: Tokens listed per (site, position), at least 1.
        lens: None (the logit lens), a `TunedLens` (`fit_tuned_lens`) or any function
            `(site, resid) -> resid` applied before the readout.

    Returns:
        A tidy DataFrame, one row per (site, batch row, position, rank): `site`, `layer` (NA for
        `embed`), `batch`, `pos` (counted from the row's first real token; padding is left out),
        `input_token` (the token at that position), `rank` (0 = top), `token`, `token_id`,
        `logit`, `prob` (softmax over the whole vocabulary).

    Raises:
        SpliceError: Before any forward, for a site that is not a residual-stream site, a bad
            `top_k`, a lens that lacks a site or was fitted on another model shape, or bad inputs.

    Example:
        >>> import splice, torch, transformers
        >>> _ = torch.manual_seed(0)
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> table = logit_lens(m, torch.tensor([[1, 2, 3]]), top_k=2)
        >>> list(table.columns)
        ['site', 'layer', 'batch', 'pos', 'input_token', 'rank', 'token', 'token_id', 'logit', 'prob']
        >>> len(table)  # 2 layers x 3 positions x 2 ranks
        12
    """
    import pandas as pd

    sites_ = _lens_sites(m, sites)
    names = [s.name for s in sites_]
    vocab = m.dims.vocab
    _check_int(top_k, "top_k", 1, vocab)
    fn = _check_lens(m, lens, names)
    batch = tok.encode(m.tokenizer, inputs, m.device)
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    _, rec = _record(m, batch, names, edits)
    decode = _decoder(m)
    columns: dict[str, list] = {c: [] for c in _TABLE_COLUMNS}
    layers = {s.name: s.layer for s in sites_}
    with torch.no_grad():
        for group in _groups(names, ids.numel(), vocab):
            logits = _readout(m, group, [rec[n] for n in group], fn).float()
            probs = logits.softmax(-1)
            top = logits.topk(top_k, dim=-1)
            top_p = probs.gather(-1, top.indices)
            _table_rows(
                columns, group, layers, top.values, top.indices, top_p, ids, real, mask is not None, decode
            )
    table = pd.DataFrame(columns)
    table["layer"] = table["layer"].astype("Int64")
    return table


_TABLE_COLUMNS = (
    "site",
    "layer",
    "batch",
    "pos",
    "input_token",
    "rank",
    "token",
    "token_id",
    "logit",
    "prob",
)


def _table_rows(
    columns: dict[str, list],
    group: list[str],
    layers: dict[str, int | None],
    values: torch.Tensor,
    indices: torch.Tensor,
    probs: torch.Tensor,
    ids: torch.Tensor,
    real: torch.Tensor,
    padded: bool,
    decode: Callable[[int], str],
) -> None:
    """Append the rows of one group of sites (`values`/`indices`/`probs`: `[site, batch, pos, k]`)
    to `columns`, skipping padding and counting positions from each row's first real token."""
    for g, name in enumerate(group):
        for b in range(ids.shape[0]):
            first = int((~real[b]).sum()) if padded else 0
            for p in range(first, ids.shape[1]):
                if not real[b, p]:
                    continue
                input_token = decode(int(ids[b, p]))
                for rank, (value, index, prob) in enumerate(
                    zip(values[g, b, p].tolist(), indices[g, b, p].tolist(), probs[g, b, p].tolist())
                ):
                    row = (
                        name,
                        layers[name],
                        b,
                        p - first,
                        input_token,
                        rank,
                        decode(index),
                        index,
                        value,
                        prob,
                    )
                    for column, item in zip(_TABLE_COLUMNS, row):
                        columns[column].append(item)


# -- the tuned lens ----------------------------------------------------------------------------------
class TunedLens:
    """One affine translator per site, `A h + b`, read through the model's final norm and
    unembedding: a tuned lens (`fit_tuned_lens` trains one; `TunedLens.identity` is the logit lens).

    Call it as `lens(site, resid)` to translate a `[..., d_model]` residual; pass it as
    `logit_lens(..., lens=lens)` or `kl_by_layer(..., lens=lens)`. Translators are kept in float32
    on the model's device; the result is cast back to the residual's dtype.

    Attributes:
        sites: The canonical site names it has a translator for, in layer order.
        weights: `{site: A [d_model, d_model]}`.
        biases: `{site: b [d_model]}`.
        provenance: What it was fitted on and how: `model` (`splice.loading.identity`: name,
            revision, weights sha256, dtype), `config_sha256`, `training` (steps, lr, batch size,
            sequence length, seed, texts sha256, tokens seen, seconds), `final_loss` per site,
            `fixed` (sites kept at identity: the last layer's resid_post, whose logit lens is
            already the model's output), splice's version and the time.

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> lens = TunedLens.identity(m)
        >>> lens
        TunedLens(2 sites blocks.0.resid_post .. blocks.1.resid_post, d_model 16, identity)
        >>> h = torch.randn(1, 3, 16)
        >>> torch.equal(lens("blocks.0.resid_post", h), h)
        True
    """

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        biases: dict[str, torch.Tensor],
        provenance: dict[str, Any] | None = None,
    ):
        """Build from `{site: A}` and `{site: b}` (canonical names, the same keys) and a provenance
        record; `fit_tuned_lens`, `identity` and `load` do it for you."""
        if not weights or set(weights) != set(biases):
            raise SpliceError(
                f"a TunedLens needs one weight and one bias per site; got weights for {sorted(weights)} "
                f"and biases for {sorted(biases)}"
            )
        d_model = None
        for name in weights:
            a, b = weights[name], biases[name]
            d = a.shape[-1] if a.dim() == 2 else -1
            if (
                a.dim() != 2
                or a.shape[0] != d
                or list(b.shape) != [d]
                or (d_model is not None and d != d_model)
            ):
                raise SpliceError(
                    f"translator {name}: weight {list(a.shape)} and bias {list(b.shape)}; expected "
                    f"[d_model, d_model] and [d_model], the same d_model for every site"
                )
            if not (a.is_floating_point() and b.is_floating_point()):
                raise SpliceError(f"translator {name} must be floating point; got {a.dtype} and {b.dtype}")
            d_model = d
        self.sites = list(weights)
        self.weights = {k: v.detach().float() for k, v in weights.items()}
        self.biases = {k: biases[k].detach().float() for k in self.sites}
        self.d_model = int(d_model or 0)
        self.provenance: dict[str, Any] = dict(provenance or {})

    def __repr__(self) -> str:
        span = self.sites[0] if len(self.sites) == 1 else f"{self.sites[0]} .. {self.sites[-1]}"
        what = "fitted" if self.provenance.get("training") else "identity"
        return f"TunedLens({len(self.sites)} site{'s' * (len(self.sites) != 1)} {span}, d_model {self.d_model}, {what})"

    @classmethod
    def identity(cls, m: Model, sites: SiteKey | Sequence[SiteKey] = DEFAULT_SITES) -> TunedLens:
        """Identity translators (`A = I`, `b = 0`) for `sites`: the logit lens, bit for bit, and
        the start of `fit_tuned_lens`.

        Example:
            >>> import splice, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> TunedLens.identity(m, "blocks.0.resid_post").sites
            ['blocks.0.resid_post']
        """
        names = [s.name for s in _lens_sites(m, sites)]
        d, device = m.dims.d_model, m.device
        weights = {n: torch.eye(d, device=device) for n in names}
        biases = {n: torch.zeros(d, device=device) for n in names}
        return cls(weights, biases, {"format": FORMAT, "model": _model_identity(m), "d_model": d})

    def __call__(self, site: str, resid: torch.Tensor) -> torch.Tensor:
        """`A_site @ resid + b_site` over the last axis of `resid [..., d_model]`, computed in
        float32 and returned in `resid`'s dtype (gradients flow to `resid`)."""
        name = canonical_name(site)
        if name not in self.weights:
            raise SpliceError(f"this tuned lens has no translator for {site!r}; it has {self._listing()}")
        if (
            not isinstance(resid, torch.Tensor)
            or not resid.is_floating_point()
            or resid.shape[-1:] != (self.d_model,)
        ):
            got = list(resid.shape) if isinstance(resid, torch.Tensor) else type(resid).__name__
            raise SpliceError(
                f"a tuned lens translates [..., d_model={self.d_model}] float tensors; got {got}"
            )
        a, b = self.weights[name], self.biases[name]
        if a.device != resid.device:
            a, b = a.to(resid.device), b.to(resid.device)
        return F.linear(resid.float(), a, b).to(resid.dtype)

    def _listing(self, limit: int = 6) -> str:
        more = f" ... ({len(self.sites)} in all)" if len(self.sites) > limit else ""
        return ", ".join(self.sites[:limit]) + more

    def check(self, m: Model, sites: Sequence[str] | None = None, weights: bool = False) -> None:
        """Refuse a model this lens cannot read: another `d_model`, a site it has no translator
        for (of `sites`, default all of its own), or with `weights=True` other weights than it
        was fitted on (compares `splice.loading.weights_sha256`, ~1 s for a 135M model).

        Raises:
            SpliceError: Naming the mismatch.
        """
        if self.d_model != m.dims.d_model:
            raise SpliceError(
                f"this tuned lens has d_model {self.d_model}; the model has {m.dims.d_model}: it was fitted "
                f"on another model ({self.provenance.get('model', {}).get('name')!r})"
            )
        missing = [s for s in (sites if sites is not None else self.sites) if s not in self.weights]
        if missing:
            raise SpliceError(
                f"this tuned lens has no translator for {missing[:4]}{' ...' if len(missing) > 4 else ''}; "
                f"it has {self._listing()}: pass sites it has, or fit one for these"
            )
        for name in self.sites:
            m.layout.sites_of(name)  # raises for a site this model does not have
        if weights:
            from .loading import weights_sha256

            fitted = self.provenance.get("model", {}).get("weights_sha256")
            if fitted != weights_sha256(m.hf):
                raise SpliceError(
                    f"this tuned lens was fitted on other weights (weights_sha256 {str(fitted)[:12]}..., model "
                    f"{self.provenance.get('model', {}).get('name')!r}) than this model's"
                )

    # -- files -------------------------------------------------------------------------------------
    @staticmethod
    def _paths(path: str | Path) -> tuple[Path, Path]:
        path = Path(path)
        if path.suffix in (".safetensors", ".json"):
            path = path.with_suffix("")
        return path.with_name(path.name + ".safetensors"), path.with_name(path.name + ".json")

    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in self.sites:
            out[f"{name}.weight"] = self.weights[name].detach().cpu().contiguous()
            out[f"{name}.bias"] = self.biases[name].detach().cpu().contiguous()
        return out

    def save(self, path: str | Path) -> tuple[Path, Path]:
        """Write `path.safetensors` (the translators) and `path.json` (sites and provenance,
        with a sha256 of every tensor); returns both paths.

        Example:
            >>> import splice, tempfile, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> lens = TunedLens.identity(m)
            >>> with tempfile.TemporaryDirectory() as folder:
            ...     _ = lens.save(f"{folder}/lens")
            ...     TunedLens.load(f"{folder}/lens", model=m).sites
            ['blocks.0.resid_post', 'blocks.1.resid_post']
        """
        from safetensors.torch import save_file

        tensors_path, meta_path = self._paths(path)
        tensors_path.parent.mkdir(parents=True, exist_ok=True)
        tensors = self._tensors()
        save_file(tensors, str(tensors_path), metadata={"format": FORMAT})
        record = {
            **self.provenance,
            "format": FORMAT,
            "sites": self.sites,
            "d_model": self.d_model,
            "tensors_sha256": {k: tensor_sha256(v) for k, v in tensors.items()},
        }
        meta_path.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str) + "\n")
        return tensors_path, meta_path

    @classmethod
    def load(cls, path: str | Path, model: Model | None = None) -> TunedLens:
        """Read what `save` wrote, checking every tensor against its sha256 in the JSON. With
        `model`, also refuse a lens fitted on other weights (see `check`).

        Raises:
            SpliceError: A missing file, another format, a tensor that does not match its
                checksum, or (with `model`) another model.
        """
        from safetensors.torch import load_file

        tensors_path, meta_path = cls._paths(path)
        for file in (tensors_path, meta_path):
            if not file.exists():
                raise SpliceError(f"tuned lens file {file} does not exist (save writes .safetensors + .json)")
        try:
            record = json.loads(meta_path.read_text())
        except json.JSONDecodeError as error:
            raise SpliceError(f"{meta_path} is not valid JSON: {error}") from None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            got = record.get("format") if isinstance(record, dict) else type(record).__name__
            raise SpliceError(f"{meta_path} is not a splice tuned lens (format {got!r}, expected {FORMAT!r})")
        sites, sums = record.get("sites"), record.get("tensors_sha256")
        if not isinstance(sites, list) or not isinstance(sums, dict):
            raise SpliceError(f"{meta_path} lacks its 'sites' list or 'tensors_sha256' mapping")
        tensors = load_file(str(tensors_path))
        expected = {f"{s}.{part}" for s in sites for part in ("weight", "bias")}
        if set(tensors) != expected:
            raise SpliceError(
                f"{tensors_path} holds {len(tensors)} tensors; {meta_path} lists sites needing {len(expected)}: "
                "the files belong to different lenses"
            )
        for key, tensor in tensors.items():
            if tensor_sha256(tensor) != sums.get(key):
                raise SpliceError(
                    f"{tensors_path}: tensor {key} does not match its checksum in {meta_path}: the files "
                    "belong to different lenses or one was changed"
                )
        provenance = {k: v for k, v in record.items() if k not in ("sites", "tensors_sha256")}
        lens = cls(
            {s: tensors[f"{s}.weight"] for s in sites}, {s: tensors[f"{s}.bias"] for s in sites}, provenance
        )
        if model is not None:
            lens.check(model, weights=True)
            lens.to(model.device)
        return lens

    def to(self, device: torch.device | str) -> TunedLens:
        """Move the translators to `device` (in place); returns the lens."""
        self.weights = {k: v.to(device) for k, v in self.weights.items()}
        self.biases = {k: v.to(device) for k, v in self.biases.items()}
        return self


def _model_identity(m: Model) -> dict[str, Any]:
    from .loading import identity

    return identity(m.hf)


# -- text ------------------------------------------------------------------------------------------
def _check_texts(texts: Any) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) and t for t in texts):
        return list(texts)
    raise SpliceError(f"texts must be a non-empty list of non-empty strings; got {str(texts)[:80]!r}")


def text_windows(m: Model, texts: str | Sequence[str], seq_len: int) -> torch.Tensor:
    """Cut texts into token windows `[n, seq_len]`: each text is tokenized (the tokenizer's own
    BOS rule) and split into consecutive, non-overlapping windows; a text's shorter tail is
    dropped. Used by `fit_tuned_lens` and `kl_by_layer`.

    Raises:
        SpliceError: No tokenizer, bad texts, or texts too short for even one window.

    Example:
        >>> import splice, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0)
        >>> class Chars:  # a stand-in tokenizer: one token per character
        ...     bos_token_id = None
        ...     def __call__(self, text, add_special_tokens=True):
        ...         return {"input_ids": [ord(c) for c in text]}
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval(), Chars())
        >>> text_windows(m, ["abcdefg", "hijk"], seq_len=3).tolist()
        [[97, 98, 99], [100, 101, 102], [104, 105, 106]]
    """
    texts = _check_texts(texts)
    _check_int(seq_len, "seq_len", 1)
    if m.tokenizer is None:
        raise SpliceError(
            "texts need a tokenizer: pass one to splice.Model(model, tokenizer) or use splice.load()"
        )
    rows: list[list[int]] = []
    for text in texts:
        ids = tok.token_ids(m.tokenizer, text)
        rows.extend(ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len))
    if not rows:
        longest = max(len(tok.token_ids(m.tokenizer, t)) for t in texts)
        raise SpliceError(
            f"no text has seq_len={seq_len} tokens (the longest has {longest}): pass longer texts or a smaller seq_len"
        )
    return torch.tensor(rows, dtype=torch.long)


def _log_probs(logits: torch.Tensor) -> torch.Tensor:
    return logits.float().log_softmax(-1)


def _kl(target_logp: torch.Tensor, lens_logp: torch.Tensor) -> torch.Tensor:
    """KL(target || lens) per row, in nats, from log-probabilities `[..., vocab]`."""
    return (target_logp.exp() * (target_logp - lens_logp)).sum(-1)


def _texts_sha256(texts: list[str]) -> str:
    return hashlib.sha256(json.dumps(texts, ensure_ascii=False).encode()).hexdigest()


def fit_tuned_lens(
    m: Model,
    texts: str | Sequence[str],
    sites: SiteKey | Sequence[SiteKey] = DEFAULT_SITES,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 4,
    seq_len: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> TunedLens:
    """Train a tuned lens: one affine translator `A_l h + b_l` per site, so that the final norm and
    unembedding of the translated residual predict what the model finally predicts.

    Each translator starts at the identity (the logit lens). Each step draws `batch_size` random
    windows of `seq_len` tokens from `texts`, runs the model once (recording the sites, no edits),
    and takes one Adam step on the mean over tokens of KL(final distribution || lens distribution)
    for every site; the learning rate decays linearly from `lr` to 0 over the steps. The model is
    never changed: no weight, no `.grad` (gradients are taken with `torch.autograd.grad` for the
    translators only). The last layer's `resid_post` stays at the identity (its logit lens already
    is the model's output; it is listed as `fixed`).

    Cost: each step unembeds `batch_size * seq_len` tokens at every site, forward and backward;
    on SmolLM2-135M (vocab 49152, 30 layers) 32 tokens per step take about 5 s on 2 CPU cores.

    Args:
        m: The model, with a tokenizer (float32 weights recommended).
        texts: Training text: a list of strings (cut into windows by `text_windows`).
        sites: `[batch, pos, d_model]` sites (default every layer's `resid_post`).
        steps: Adam steps (at least 1).
        lr: Adam's initial learning rate (> 0); 1e-3 suits SmolLM2-135M, larger rates overshoot
            in the last layers.
        batch_size: Windows per step.
        seq_len: Tokens per window.
        seed: Seeds the window sampling; the fit is deterministic for a given seed.
        progress: Show a tqdm progress bar over steps (with the current mean KL).

    Returns:
        A `TunedLens` whose provenance records the model's identity, the training config, the
        final loss per site (mean over the last tenth of the steps) and the time taken.

    Raises:
        SpliceError: Before any forward, for bad sites, texts, or settings.

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0)
        >>> class Chars:  # a stand-in tokenizer: one token per character
        ...     bos_token_id = None
        ...     def __call__(self, text, add_special_tokens=True):
        ...         return {"input_ids": [ord(c) % 128 for c in text]}
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval(), Chars())
        >>> lens = fit_tuned_lens(m, ["the quick brown fox jumps over the lazy dog"] * 4, steps=3, seq_len=8, progress=False)
        >>> lens.provenance["fixed"], sorted(lens.provenance["final_loss"])
        (['blocks.1.resid_post'], ['blocks.0.resid_post'])
    """
    from tqdm.auto import tqdm

    names = [s.name for s in _lens_sites(m, sites)]
    texts = _check_texts(texts)
    _check_int(steps, "steps", 1)
    _check_int(batch_size, "batch_size", 1)
    _check_int(seq_len, "seq_len", 1)
    _check_int(seed, "seed", 0)
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise SpliceError(f"lr must be a positive finite number; got {lr!r}")
    windows = text_windows(m, texts, seq_len)
    lens = TunedLens.identity(m, names)
    trained = [n for n in names if not _is_output(m, n)]
    params: dict[str, list[torch.Tensor]] = {}
    for name in trained:
        a = lens.weights[name].clone().requires_grad_(True)
        b = lens.biases[name].clone().requires_grad_(True)
        params[name] = [a, b]
    optimiser = torch.optim.Adam([p for pair in params.values() for p in pair], lr=float(lr))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 1.0 - step / steps)
    generator = torch.Generator().manual_seed(seed)
    history: dict[str, list[float]] = {n: [] for n in trained}
    mean_history: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="tuned lens", unit="step", disable=not progress)
    for _ in bar:
        rows = windows[torch.randint(len(windows), (batch_size,), generator=generator)].to(m.device)
        logits, rec = _record(m, {"input_ids": rows}, names, None, need_logits=True)
        assert logits is not None
        target = _log_probs(logits.detach())
        losses = []
        for group in _groups(trained, rows.numel(), m.dims.vocab):
            translated = []
            for name in group:
                a, b = params[name]
                translated.append(F.linear(rec[name].float(), a, b).to(rec[name].dtype))
            lens_logp = _log_probs(m.unembed(m.ln_final(torch.stack(translated))))
            per_site = _kl(target, lens_logp).flatten(1).mean(1)  # [site]: mean KL over tokens
            group_params = [p for name in group for p in params[name]]
            # The translators' gradients only: nothing accumulates on the model's own parameters.
            grads = torch.autograd.grad(per_site.sum(), group_params)
            for param, grad in zip(group_params, grads):
                param.grad = grad
            for name, loss in zip(group, per_site.tolist()):
                history[name].append(loss)
                losses.append(loss)
        if trained:
            optimiser.step()
            optimiser.zero_grad(set_to_none=True)
            schedule.step()
            mean_history.append(sum(losses) / len(losses))
            bar.set_postfix(kl=f"{mean_history[-1]:.3f}")
    seconds = time.perf_counter() - start
    tail = max(1, steps // 10)
    weights = {n: (params[n][0].detach() if n in params else lens.weights[n]) for n in names}
    biases = {n: (params[n][1].detach() if n in params else lens.biases[n]) for n in names}
    from .steering import config_fingerprint
    from .version import __version__

    provenance = {
        "format": FORMAT,
        "model": _model_identity(m),
        "config_sha256": config_fingerprint(m.hf.config) if hasattr(m.hf, "config") else None,
        "training": {
            "loss": "KL(final || lens), mean over tokens",
            "optimiser": "Adam, learning rate decayed linearly from lr to 0",
            "steps": steps,
            "lr": float(lr),
            "batch_size": batch_size,
            "seq_len": seq_len,
            "seed": seed,
            "n_texts": len(texts),
            "texts_sha256": _texts_sha256(texts),
            "n_windows": len(windows),
            "tokens_seen": steps * batch_size * seq_len,
            "seconds": round(seconds, 2),
        },
        "final_loss": {n: sum(h[-tail:]) / len(h[-tail:]) for n, h in history.items()},
        "mean_loss_history": mean_history,
        "fixed": [n for n in names if n not in params],
        "splice_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return TunedLens(weights, biases, provenance)


def _batches(windows: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    for start in range(0, len(windows), batch_size):
        yield windows[start : start + batch_size]


def kl_by_layer(
    m: Model,
    texts: str | Sequence[str],
    lens: Any = None,
    sites: SiteKey | Sequence[SiteKey] | None = None,
    seq_len: int = 64,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> pd.DataFrame:
    """Mean KL(final distribution || lens distribution) per site over `texts`: how far each layer's
    lens is from what the model finally predicts (0 at the last layer for the logit lens).

    Args:
        m: The model, with a tokenizer.
        texts: Evaluation text (cut into windows by `text_windows`); use text the lens was not
            fitted on for a held-out comparison.
        lens: None (the logit lens), a `TunedLens`, or a function `(site, resid) -> resid`.
        sites: Sites to measure; default the tuned lens' own sites, or every layer's `resid_post`.
        seq_len: Tokens per window.
        batch_size: Windows per forward.
        max_tokens: Use at most this many tokens: windows evenly spaced over all of them
            (None: every window).

    Returns:
        A DataFrame, one row per site: `site`, `layer`, `lens` ("logit", "tuned" or "custom"),
        `kl` (mean nats per token), `n_tokens`.

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=128, bos_token_id=0, eos_token_id=0)
        >>> class Chars:  # a stand-in tokenizer: one token per character
        ...     bos_token_id = None
        ...     def __call__(self, text, add_special_tokens=True):
        ...         return {"input_ids": [ord(c) % 128 for c in text]}
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval(), Chars())
        >>> table = kl_by_layer(m, ["held-out text, long enough for two windows"], seq_len=16)
        >>> table[["site", "lens", "n_tokens"]].values.tolist()
        [['blocks.0.resid_post', 'logit', 32], ['blocks.1.resid_post', 'logit', 32]]
        >>> float(table["kl"].iloc[-1]) < 1e-6  # the last layer's logit lens is the output
        True
    """
    import pandas as pd

    if sites is None:
        sites = lens.sites if isinstance(lens, TunedLens) else DEFAULT_SITES
    sites_ = _lens_sites(m, sites)
    names = [s.name for s in sites_]
    fn = _check_lens(m, lens, names)
    _check_int(batch_size, "batch_size", 1)
    if max_tokens is not None:
        _check_int(max_tokens, "max_tokens", 1)
    windows = text_windows(m, texts, seq_len)
    if max_tokens is not None and max_tokens < windows.numel():
        keep = max(1, max_tokens // seq_len)  # evenly spaced, so every text is represented
        windows = windows[torch.linspace(0, len(windows) - 1, keep).round().long()]
    totals = dict.fromkeys(names, 0.0)
    n_tokens = 0
    with torch.no_grad():
        for rows in _batches(windows, batch_size):
            logits, rec = _record(m, {"input_ids": rows.to(m.device)}, names, None, need_logits=True)
            assert logits is not None
            target = _log_probs(logits)
            for group in _groups(names, rows.numel(), m.dims.vocab):
                kl = _kl(target, _log_probs(_readout(m, group, [rec[n] for n in group], fn)))
                for name, total in zip(group, kl.double().flatten(1).sum(1).tolist()):
                    totals[name] += total
            n_tokens += rows.numel()
    kind = "logit" if lens is None else "tuned" if isinstance(lens, TunedLens) else "custom"
    return pd.DataFrame(
        {
            "site": names,
            "layer": pd.array([s.layer for s in sites_], dtype="Int64"),
            "lens": kind,
            "kl": [totals[n] / n_tokens for n in names],
            "n_tokens": n_tokens,
        }
    )
