"""Which sites a lens reads: residual-stream sites `[batch, pos, d_model]`, named by a site, a glob
or a list of them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..engine.sites import Site, SiteKey
from ..errors import SpliceError

if TYPE_CHECKING:
    from ..engine.model import Model

DEFAULT_SITES = "blocks.*.resid_post"
"""The sites a lens reads unless told otherwise: every layer's output."""


def lens_sites(m: Model, sites: SiteKey | Sequence[SiteKey]) -> list[Site]:
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
