"""An SAE spliced into a forward: `SAE`, the edit that attaches one at a site, and the arithmetic
that runs the site tensor through it.

With `x` the site tensor, `a = encode(x)` and `a'` the latents after the edits at
`<site>.sae.acts`, the sub-sites are `recon = decode(a')` and `error = x - decode(a)` (what the
SAE misses of the unedited latents), and the model goes on with `recon + error` (the default) or
`recon` alone (`error_term=False`). With the error term the output is computed as
`x + (decode(a') - decode(a))`, so an SAE whose latents nothing edits returns `x` itself, bit for
bit, and for a decoder that is linear in the latents (one with `linear_decoder()`, such as
`splice.sae.SparseAutoencoder`) the difference costs only the edited features' rows.

The latents are the SAE's own tensor: `Zero(dims=[k])` at `.sae.acts` changes the output by
exactly `-a_k * W_dec[k]` (up to one rounding of the addition). Gradients flow through every path:
under autograd the latents are a node of their own, so `d output / d acts` is the decoder's
Jacobian while `d output / d x` stays the identity, as the function computed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import SpliceError
from .autoencoders import as_sae, d_sae_of, input_layout
from .interventions import At, Intervention

Step = Callable[[torch.Tensor], torch.Tensor]
"""What the plan does at a sub-site: its edits and recorders, returning the tensor the SAE goes
on with (the same object when nothing was edited)."""


@dataclass(frozen=True, eq=False, repr=False)
class SAE(Intervention, registered=False):
    """Attach a sparse autoencoder at the site this edit is placed at.

    `Edits({"blocks.8.resid_post": SAE(sae)})` (or `Model.attach(sae, site=...)`) runs the site
    through `sae` in every forward of the block and adds three sub-sites, which take ordinary
    interventions and recordings: `blocks.8.resid_post.sae.acts` (`[batch, pos, d_sae]`),
    `.sae.recon` and `.sae.error` (the site's shape). SAELens' names for them
    (`<hook_name>.hook_sae_acts_post`, `.hook_sae_recons`, `.hook_sae_error`) are accepted too.
    Edits at the sub-sites run after the edits placed at the site itself. See the module
    docstring for the arithmetic.

    Args:
        sae: Any `nn.Module` with `encode(x)` and `decode(acts)` (see `splice.sae.as_sae`),
            computing in its own dtype and device: the site tensor is cast to it, the result back.
        error_term: True (default): the model goes on with `recon + error`, unchanged when no
            latent is edited. False: with `recon` alone (to measure what the SAE loses).

    Raises:
        SpliceError: For something that is not an SAE, a selection (`pos=`, `dims=`, ...: select
            latents at `.sae.acts` instead), or an SAE whose input width cannot be read. When
            placed: for an SAE whose width does not fit the site, or two SAEs at one site.

    Example:
        >>> import torch
        >>> from splice import SAE
        >>> from splice.sae import SAEConfig, SparseAutoencoder
        >>> SAE(SparseAutoencoder(SAEConfig("topk", 16, 64, k=4)), error_term=False)
        SAE(SparseAutoencoder(topk, d_in=16, d_sae=64, k=4), error_term=False)
        >>> SAE(torch.nn.Linear(2, 2))
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: an SAE is an nn.Module with callable encode(x) and decode(acts); Linear has no encode, decode
    """

    sae: Any
    error_term: bool = True

    serialisable: ClassVar[bool] = False
    refusal: ClassVar[str] = (
        "holds an SAE module and cannot be serialised (to_dict, Edits.save): save the SAE with "
        "splice.sae.save and attach it again in code"
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        as_sae(self.sae)
        chosen = [n for n in ("pos", "heads", "dims", "rows") if getattr(self, n) is not None]
        if chosen:
            raise SpliceError(
                f"SAE(...) runs the whole site through the SAE and takes no {'/'.join(chosen)}=; select "
                "latents with an intervention at '<site>.sae.acts', e.g. Zero(dims=[k], pos=-1)"
            )
        if not isinstance(self.error_term, bool):
            raise SpliceError(f"SAE error_term must be True or False; got {self.error_term!r}")
        input_layout(self.sae)  # an SAE whose width cannot be read is refused here, not mid-forward

    @property
    def d_sae(self) -> int | None:
        """The number of latents, when the SAE says (see `splice.engine.autoencoders.d_sae_of`)."""
        return d_sae_of(self.sae)

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """Not used: the plan runs an attached SAE through `through` (its sub-sites need the plan)."""
        raise SpliceError(f"SAE at {at.site} is applied by the hook engine, not as a region edit")

    def __repr__(self) -> str:
        module = repr(self.sae).replace("\n", " ")
        module = module if len(module) <= 80 else type(self.sae).__name__
        return f"SAE({module}{'' if self.error_term else ', error_term=False'})"


def _read(x: torch.Tensor, head: int | None, sae: Any) -> torch.Tensor:
    """The SAE's input: `[batch, pos, d_in]` (one head's vector, or every trailing axis
    flattened), on the SAE's device (a model split across GPUs computes the site elsewhere)."""
    inp = x[:, :, head] if head is not None else x if x.dim() == 3 else x.flatten(2)
    weight = next(sae.parameters(), None)
    return inp if weight is None or weight.device == inp.device else inp.to(weight.device)


def _placed(like: torch.Tensor, y: torch.Tensor, head: int | None, rest: torch.Tensor | None) -> torch.Tensor:
    """`y` (`[batch, pos, d_in]`) in the site's shape, dtype and device; for a one-head SAE the
    other heads are taken from `rest` (zeros if None)."""
    y = y.to(device=like.device, dtype=like.dtype)
    if head is None:
        return y.view(like.shape)
    out = torch.zeros_like(like) if rest is None else rest.clone()
    out[:, :, head] = y
    return out


def _difference(sae: Any, edited: torch.Tensor, acts: torch.Tensor, exact_graph: bool) -> torch.Tensor:
    """`decode(edited) - decode(acts)`; for a linear decoder, from the changed latents only (all
    of them under autograd, where every latent's gradient is wanted)."""
    rows = sae.linear_decoder() if callable(getattr(sae, "linear_decoder", None)) else None
    if rows is None:
        return sae.decode(edited) - sae.decode(acts)
    change = edited - acts
    if exact_graph:
        return change.to(rows.dtype) @ rows
    changed = (change != 0).flatten(0, -2).any(0).nonzero().flatten()
    return change[..., changed].to(rows.dtype) @ rows[changed]


def through(
    item: SAE,
    head: int | None,
    x: torch.Tensor,
    on_acts: Step | None,
    on_recon: Step | None,
    on_error: Step | None,
) -> torch.Tensor:
    """The site tensor after the attached SAE (see the module docstring).

    Args:
        item: The attached `SAE`.
        head: The head a one-head SAE reads (`splice.engine.autoencoders.fit`), else None.
        x: The site tensor, after the site's own edits.
        on_acts, on_recon, on_error: The plan's steps at the sub-sites, None where the plan has
            nothing there (then nothing is computed for them).

    Returns:
        The tensor the model goes on with: `x` itself when the error term is kept and nothing
        changed.
    """
    if item.error_term and on_acts is None and on_recon is None and on_error is None:
        return x  # nothing reads or edits the SAE: it would add decode(a) - decode(a) = 0
    sae = item.sae
    inp = _read(x, head, sae)
    acts = sae.encode(inp)
    graph = torch.is_grad_enabled()
    latents = acts.clone() if graph else acts  # under autograd: a node whose gradient is d/d(latents)
    edited = on_acts(latents) if on_acts is not None else latents
    if item.error_term and on_recon is None and on_error is None:
        if edited is latents and not graph:
            return x
        return x + _placed(x, _difference(sae, edited, acts, graph), head, None)
    recon = sae.decode(edited)
    clean = recon if edited is latents and not graph else sae.decode(acts)
    placed_recon = _placed(x, recon, head, x)
    recon_site = on_recon(placed_recon) if on_recon is not None else placed_recon
    if not item.error_term:
        return recon_site
    placed_error = _placed(x, inp.to(clean.dtype) - clean, head, None)
    error_site = on_error(placed_error) if on_error is not None else placed_error
    if recon_site is placed_recon and error_site is placed_error:  # only recorded: keep x exact
        return x if recon is clean else x + _placed(x, recon - clean, head, None)
    return recon_site + error_site
