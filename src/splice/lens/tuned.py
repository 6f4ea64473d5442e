"""The tuned lens object: one affine translator per site with its provenance, called as
`lens(site, resid)`, saved as `.safetensors` + `.json` and loaded with every tensor checked."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..engine.files import tensor_sha256
from ..engine.sites import SiteKey, canonical_name
from ..errors import SpliceError
from .sites import DEFAULT_SITES, lens_sites

if TYPE_CHECKING:
    from ..engine.model import Model

FORMAT = "splice-tuned-lens/1"
"""The `format` field of a saved tuned lens (JSON and safetensors metadata)."""


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
        names = [s.name for s in lens_sites(m, sites)]
        d, device = m.dims.d_model, m.device
        weights = {n: torch.eye(d, device=device) for n in names}
        biases = {n: torch.zeros(d, device=device) for n in names}
        return cls(weights, biases, {"format": FORMAT, "model": model_identity(m), "d_model": d})

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
            from ..loading import weights_sha256

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


def model_identity(m: Model) -> dict[str, Any]:
    """The model's identity for a lens' provenance (`splice.loading.identity`)."""
    from ..loading import identity

    return identity(m.hf)
