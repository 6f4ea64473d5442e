"""Which SAE latents a feature sweep varies (`Sweep(over="features", features=...)`): a list, every
latent of the attached SAE, or the `top:N` most active on the sweep's own data.

The SAE a sweep goes through is found once, before any work: passed as `sae=` or attached in
the calling context (`Model.attach`). It travels with the sweep's job (`Job.attach`), so a Ray
worker runs the same SAE, and its weights enter the checkpoint's fingerprint, so a checkpoint
written through one SAE is never resumed through another.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from typing import Any

import torch

from ..engine.autoencoders import d_sae_of
from ..engine.spliced import SAE
from ..errors import SpliceError

_TOP = re.compile(r"^top:(\d+)$")
Features = list[int] | int | None
"""A checked `features=`: a list of latents, N for "top:N", or None for every latent."""


def parse_features(features: Any) -> Features:
    """Check `features=` when the sweep is built.

    Raises:
        SpliceError: For anything but None, a list of distinct non-negative ints, or "top:N".

    Example:
        >>> parse_features("top:50"), parse_features([3, 1]), parse_features(None)
        (50, [3, 1], None)
        >>> parse_features("top:0")
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: features= takes a list of latent indices, 'top:N' (N >= 1) or None (every latent); got 'top:0'
    """
    message = (
        f"features= takes a list of latent indices, 'top:N' (N >= 1) or None (every latent); got {features!r}"
    )
    if features is None:
        return None
    if isinstance(features, str):
        found = _TOP.match(features)
        if found is None or int(found.group(1)) < 1:
            raise SpliceError(message)
        return int(found.group(1))
    if isinstance(features, int) and not isinstance(features, bool):
        features = [features]
    if not isinstance(features, Sequence) or not features:
        raise SpliceError(message)
    out = []
    for k in features:
        if isinstance(k, torch.Tensor) and k.dim() == 0:
            k = int(k)
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise SpliceError(message)
        out.append(k)
    if len(set(out)) != len(out):
        raise SpliceError(f"features= lists a latent twice: {out}")
    return out


def attachments(model, bases: Sequence[str], sae: Any) -> dict[str, SAE]:
    """{site: the `SAE` edit a feature sweep goes through}: `sae=` (a module or a `splice.SAE`)
    at the one site it names, else what the calling context has attached at each.

    Raises:
        SpliceError: If no SAE is attached at a site whose latents the sweep edits, or `sae=` is
            given for sub-sites of several sites.
    """
    if sae is not None:
        if len(bases) != 1:
            raise SpliceError(
                f"sae= attaches one SAE, but the sweep edits sub-sites of {len(bases)} sites ({', '.join(bases)}); "
                "attach each with model.attach(...) around the run instead"
            )
        return {bases[0]: sae if isinstance(sae, SAE) else SAE(sae)}
    out = {}
    for base in bases:
        action = model.engine.plan_here().get(base)
        if action is None or action.attached is None:
            raise SpliceError(
                f"the sweep edits latents of an SAE at {base}, but none is attached: pass sae= to the Sweep "
                f"or run it inside `with model.attach(sae, site={base!r})`"
            )
        out[base] = action.attached.sae
    return out


def resolve(model, site: str, features: Features, attached: SAE, batches: Sequence[Any]) -> list[int]:
    """The latents to vary at `site` (an `.sae.acts` sub-site): the list as given (checked against
    `d_sae`), every latent, or the N with the largest summed activation over every real token of
    the data (padding excluded), most active first.

    Raises:
        SpliceError: For a latent beyond `d_sae`, or every latent of an SAE that does not say
            how many it has.
    """
    d_sae = d_sae_of(attached.sae)
    if isinstance(features, list):
        if d_sae is not None and max(features) >= d_sae:
            raise SpliceError(
                f"features= names latent {max(features)}; the SAE at {site} has {d_sae} (0..{d_sae - 1})"
            )
        return features
    if features is None:
        if d_sae is None:
            raise SpliceError(
                f"the SAE at {site} does not say how many latents it has (d_sae): list them in features="
            )
        return list(range(d_sae))
    total = None
    with (
        torch.no_grad(),
        model.edit({model.layout.sites_of(site)[0].base.name: attached}),
        model.record(site) as rec,
    ):
        for batch in batches:
            model.hf(**batch.kwargs, use_cache=False)
            acts = rec[site].float()
            mask = batch.kwargs.get("attention_mask")
            if mask is not None:
                acts = acts * mask[..., None].to(acts.device, acts.dtype)
            summed = acts.sum((0, 1)).cpu()
            total = summed if total is None else total + summed
    assert total is not None  # a sweep has at least one batch
    n = min(features, total.numel())
    return [int(k) for k in torch.topk(total, n, sorted=True).indices]


def digest(attach: dict[str, SAE]) -> dict[str, Any]:
    """What identifies the attached SAEs in a checkpoint's fingerprint: class, error term and a
    hash of every parameter and buffer."""
    out = {}
    for site, item in sorted(attach.items()):
        h = hashlib.sha256()
        for name, tensor in sorted(item.sae.state_dict().items()):
            h.update(name.encode())
            h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out[site] = [type(item.sae).__name__, item.error_term, h.hexdigest()]
    return out
