"""Site names: one naming scheme for every architecture, plus the aliases users already know.

A site is an activation, written `embed`, `blocks.<layer>.<point>`, `final_norm` or `logits`.
This module only parses and validates names; where a site lives in a given model is the job of
`splice.architectures`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from functools import cached_property
from typing import TypeAlias

from ..errors import SpliceError, closest, valid_range

SiteKey: TypeAlias = str | tuple[str, int]
"""How a user names a site: a canonical name (`"blocks.3.attn.z"`), a TransformerLens name
(`"blocks.3.hook_resid_post"`), a `get_act_name`-style tuple (`("z", 3)`), or a glob
(`"blocks.*.mlp.out"`)."""

# Per-layer points and the axes of their tensors. The size of each named axis comes from
# `Dims`; "batch" and "pos" vary per forward.
LAYER_POINTS: dict[str, tuple[str, ...]] = {
    "resid_pre": ("batch", "pos", "d_model"),
    "attn.in": ("batch", "pos", "d_model"),
    "attn.q": ("batch", "pos", "head", "d_head"),
    "attn.k": ("batch", "pos", "kv_head", "d_head"),
    "attn.v": ("batch", "pos", "kv_head", "d_head"),
    # Per query head; `pos` selects query positions, `dims` key positions (absolute, cache included).
    "attn.scores": ("batch", "head", "pos", "k_pos"),
    "attn.pattern": ("batch", "head", "pos", "k_pos"),
    "attn.z": ("batch", "pos", "head", "d_head"),
    # Head h's contribution to the output projection's output (attn.out but in Gemma2, whose
    # attn.out is after a norm): z[..., h, :] @ W_O[h], the bias being no head's. Computed only in
    # the layers and forwards that touch it (it is n_heads times the size of attn.out).
    "attn.result": ("batch", "pos", "head", "d_model"),
    "attn.out": ("batch", "pos", "d_model"),
    "resid_mid": ("batch", "pos", "d_model"),
    "mlp.in": ("batch", "pos", "d_model"),
    "mlp.post": ("batch", "pos", "d_mlp"),
    "mlp.out": ("batch", "pos", "d_model"),
    "resid_post": ("batch", "pos", "d_model"),
}
"""Per-layer points (`blocks.<l>.<point>`) and the axis names of their tensors, in forward order."""
GLOBAL_POINTS: dict[str, tuple[str, ...]] = {
    "embed": ("batch", "pos", "d_model"),
    "final_norm": ("batch", "pos", "d_model"),
    "logits": ("batch", "pos", "vocab"),
}
"""Points outside the layers (named without `blocks.<l>.`) and the axis names of their tensors."""
POINT_AXES: dict[str, tuple[str, ...]] = GLOBAL_POINTS | LAYER_POINTS
"""Every point and the axis names of its tensor."""

# Sub-sites of a module spliced in at a site (`splice.SAE`, `Model.attach`): `<site>.sae.acts`
# (the latents), `<site>.sae.recon` (their decoding) and `<site>.sae.error` (input - recon of the
# unedited latents). They exist in a forward only where an SAE is attached.
SAE_PARTS: dict[str, str] = {"sae.acts": "d_sae", "sae.recon": "", "sae.error": ""}
"""Sub-site suffixes of an attached SAE -> the axis that replaces the site's trailing axes ("" keeps them)."""
# SAELens' HookedSAETransformer names for the same tensors (after the SAE's hook name).
SAELENS_PARTS = {
    "hook_sae_acts_post": "sae.acts",
    "hook_sae_recons": "sae.recon",
    "hook_sae_error": "sae.error",
}

# TransformerLens hook names that denote exactly the same tensor as a splice site. Names whose
# TransformerLens tensor differs (hook_embed is the token embedding without positions,
# ln*.hook_normalized is before the norm's weight) are deliberately not aliased.
TL_HOOK_NAMES = {
    "hook_resid_pre": "resid_pre",
    "hook_resid_mid": "resid_mid",
    "hook_resid_post": "resid_post",
    "hook_attn_out": "attn.out",
    "hook_mlp_out": "mlp.out",
    "attn.hook_q": "attn.q",
    "attn.hook_k": "attn.k",
    "attn.hook_v": "attn.v",
    "attn.hook_z": "attn.z",
    "attn.hook_result": "attn.result",
    "attn.hook_pattern": "attn.pattern",
    "attn.hook_attn_scores": "attn.scores",
    "mlp.hook_post": "mlp.post",
}
# Short names accepted by TransformerLens' `utils.get_act_name(name, layer)`.
_ACT_NAMES = {
    "resid_pre": "resid_pre",
    "resid_mid": "resid_mid",
    "resid_post": "resid_post",
    "attn_out": "attn.out",
    "mlp_out": "mlp.out",
    "q": "attn.q",
    "k": "attn.k",
    "v": "attn.v",
    "z": "attn.z",
    "result": "attn.result",
    "pattern": "attn.pattern",
    "attn": "attn.pattern",
    "attn_scores": "attn.scores",
    "scores": "attn.scores",
    "post": "mlp.post",
}
_LAYER_RE = re.compile(r"^blocks\.(-?\d+)\.(.+)$")
_PART_RE = re.compile(
    r"^(.+)\.(sae\.acts|sae\.recon|sae\.error|hook_sae_acts_post|hook_sae_recons|hook_sae_error)$"
)


def split_part(name: str) -> tuple[str, str | None]:
    """(base site name, sub-site part or None): `"blocks.8.resid_post.sae.acts"` ->
    `("blocks.8.resid_post", "sae.acts")`; SAELens' `hook_sae_*` suffixes are read as the same parts.

    Example:
        >>> split_part("blocks.8.hook_resid_post.hook_sae_acts_post")
        ('blocks.8.hook_resid_post', 'sae.acts')
        >>> split_part("blocks.8.resid_post")
        ('blocks.8.resid_post', None)
    """
    m = _PART_RE.match(name)
    if m is None:
        return name, None
    return m.group(1), SAELENS_PARTS.get(m.group(2), m.group(2))


@dataclass(frozen=True)
class Site:
    """One site of one model, parsed and validated (see `parse`).

    Attributes:
        point: The point: a key of `LAYER_POINTS` (`"attn.z"`, `"resid_post"`, ...) or of
            `GLOBAL_POINTS` (`"embed"`, `"final_norm"`, `"logits"`).
        layer: The layer, from 0 (negative layers are resolved by `parse`); None for the
            global points.
        part: None, or for a sub-site of an SAE attached there a key of `SAE_PARTS`
            (`"sae.acts"`, `"sae.recon"`, `"sae.error"`).

    Example:
        >>> Site("attn.z", 3).name
        'blocks.3.attn.z'
        >>> str(Site("embed"))
        'embed'
        >>> Site("resid_post", 8, "sae.acts").name
        'blocks.8.resid_post.sae.acts'
    """

    point: str
    layer: int | None = None
    part: str | None = None

    @cached_property  # read several times per hooked forward
    def name(self) -> str:
        """The canonical name: `blocks.<layer>.<point>`, or the point for a global site, then
        `.<part>` for a sub-site of an attached SAE."""
        base = self.point if self.layer is None else f"blocks.{self.layer}.{self.point}"
        return base if self.part is None else f"{base}.{self.part}"

    @property
    def base(self) -> Site:
        """The site itself for a plain site; for an SAE sub-site, the site the SAE is attached at."""
        return self if self.part is None else Site(self.point, self.layer)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        part = "" if self.part is None else f", part={self.part!r}"
        return f"Site(point={self.point!r}, layer={self.layer!r}{part})"


def is_pattern(key: str) -> bool:
    """Whether a site key is a glob (holds `*`, `?` or `[`) that may match several sites.

    Example:
        >>> is_pattern("blocks.*.attn.z"), is_pattern("blocks.3.attn.z")
        (True, False)
    """
    return any(ch in key for ch in "*?[")


def canonical_name(key: SiteKey) -> str:
    """Translate a site key to splice's canonical spelling, without checking it against a model.

    Aliases are only names for the *same* tensor: TransformerLens' `blocks.l.hook_resid_pre`
    (`_mid`, `_post`), `hook_attn_out`, `hook_mlp_out`, `attn.hook_q/k/v/z`,
    `attn.hook_result`, `attn.hook_pattern`, `attn.hook_attn_scores`, `mlp.hook_post`, and
    `get_act_name`-style tuples such as `("z", 3)`, `("result", 3)` or `("resid_post", 5)`.
    Anything else (canonical names, globs) is returned as it is.

    Args:
        key: A site name (str) or a `(short name, layer)` tuple with an int layer.

    Returns:
        The canonical name (possibly a glob, possibly not a site of any model).

    Raises:
        SpliceError: If `key` is neither a string nor a `(name, int)` tuple.

    Example:
        >>> canonical_name(("z", 3))
        'blocks.3.attn.z'
        >>> canonical_name("blocks.2.hook_resid_post")
        'blocks.2.resid_post'
        >>> canonical_name("blocks.2.attn.hook_result"), canonical_name(("result", 2))
        ('blocks.2.attn.result', 'blocks.2.attn.result')
        >>> canonical_name("blocks.8.hook_resid_post.hook_sae_acts_post")  # SAELens' name
        'blocks.8.resid_post.sae.acts'
        >>> canonical_name(3)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: a site is a string like 'blocks.3.attn.z' or a tuple like ('z', 3); got 3
    """
    if isinstance(key, tuple):
        if len(key) != 2 or not isinstance(key[1], int):
            raise SpliceError(f"a tuple site must be (name, layer), e.g. ('z', 3); got {key!r}")
        short, layer = key
        point = _ACT_NAMES.get(short, short)
        return f"blocks.{layer}.{point}"
    if not isinstance(key, str):
        raise SpliceError(f"a site is a string like 'blocks.3.attn.z' or a tuple like ('z', 3); got {key!r}")
    base, part = split_part(key)
    if part is not None:
        return f"{canonical_name(base)}.{part}"
    m = _LAYER_RE.match(key)
    if m and m.group(2) in TL_HOOK_NAMES:
        return f"blocks.{m.group(1)}.{TL_HOOK_NAMES[m.group(2)]}"
    return key


def all_names(n_layers: int, points: set[str]) -> list[str]:
    """Every site name of a model, in forward order.

    Args:
        n_layers: The model's number of decoder layers.
        points: The points its architecture has (a family without pattern sites lacks
            `attn.scores`/`attn.pattern`, a parallel-residual one lacks `resid_mid`).

    Returns:
        `embed`, then each layer's sites in forward order, then `final_norm` and `logits`
        (each only if the model has it).

    Sub-sites of attached SAEs are not listed: they exist only where an SAE is attached.

    Example:
        >>> all_names(2, {"embed", "resid_post", "attn.z", "logits"})
        ['embed', 'blocks.0.attn.z', 'blocks.0.resid_post', 'blocks.1.attn.z', 'blocks.1.resid_post', 'logits']
    """
    order = list(GLOBAL_POINTS) + list(LAYER_POINTS)
    rank = lambda p: order.index(p) if p in order else len(order)  # noqa: E731
    layer_points = sorted((p for p in points if p not in GLOBAL_POINTS), key=rank)
    names = ["embed"] if "embed" in points else []
    names += [f"blocks.{l}.{p}" for l in range(n_layers) for p in layer_points]
    names += [p for p in ("final_norm", "logits") if p in points]
    return names


def site_axes(site: Site) -> tuple[str, ...]:
    """A site's axis names; an SAE's latents replace the trailing axes by `d_sae`.

    Example:
        >>> site_axes(Site("attn.z", 3, "sae.acts")), site_axes(Site("attn.z", 3, "sae.error"))
        (('batch', 'pos', 'd_sae'), ('batch', 'pos', 'head', 'd_head'))
    """
    axes = POINT_AXES[site.point]
    if site.part is None or not SAE_PARTS[site.part]:
        return axes
    return axes[:2] + (SAE_PARTS[site.part],)


def parse(name: str, n_layers: int, points: set[str]) -> Site:
    """Parse and validate one canonical site name against a model's shape.

    Args:
        name: A canonical name (see `canonical_name` for aliases). Negative layers count from
            the end (`blocks.-1.resid_post` is the last layer).
        n_layers: The model's number of decoder layers.
        points: The points its architecture has.

    Returns:
        The `Site`, with a non-negative layer.

    Raises:
        SpliceError: For an unknown name (with the closest valid names and the valid
            points), a point this model does not have, or a layer out of range.

    Example:
        >>> points = set(POINT_AXES)
        >>> parse("blocks.-1.resid_post", 12, points)
        Site(point='resid_post', layer=11)
        >>> parse("blocks.12.resid_post", 12, points)
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: layer 12 in site 'blocks.12.resid_post' is out of range: this model has 12 layers, valid 0..11 (or -12..-1)
        >>> parse("blocks.-1.resid_post.sae.acts", 12, points)
        Site(point='resid_post', layer=11, part='sae.acts')
    """
    base, part = split_part(name)
    if part is not None:
        site = parse(base, n_layers, points)
        if POINT_AXES[site.point][:2] != ("batch", "pos"):
            raise SpliceError(
                f"{name!r}: an SAE reads one vector per token, and {site.name} has axes "
                f"[{', '.join(POINT_AXES[site.point])}]"
            )
        return Site(site.point, site.layer, part)
    if name in GLOBAL_POINTS or (name in points and "." not in name):
        if name not in points:
            raise SpliceError(f"site {name!r} is not available on this model")
        return Site(name)
    m = _LAYER_RE.match(name)
    if m is None or m.group(2) not in points:
        hints = closest(name, all_names(n_layers, points))
        hint = f"; did you mean {', '.join(repr(h) for h in hints)}?" if hints else ""
        raise SpliceError(
            f"unknown site {name!r}{hint} (sites look like 'blocks.<layer>.<point>' with point one of "
            f"{', '.join(sorted(p for p in points if p not in GLOBAL_POINTS))}, or "
            f"{', '.join(sorted(p for p in points if p in GLOBAL_POINTS))})"
        )
    layer = int(m.group(1))
    if not -n_layers <= layer < n_layers:
        raise SpliceError(
            f"layer {layer} in site {name!r} is out of range: this model has {n_layers} layers, valid {valid_range(n_layers)}"
        )
    return Site(m.group(2), layer % n_layers)


def expand(key: SiteKey, n_layers: int, points: set[str]) -> list[Site]:
    """Resolve any site key (name, alias, tuple or glob) to the sites it names.

    Globs use `fnmatch` rules (`*`, `?`, `[...]`) matched against whole canonical names, so
    `blocks.*.attn.z` is every layer's `attn.z`.

    Args:
        key: See `SiteKey`.
        n_layers: The model's number of decoder layers.
        points: The points its architecture has.

    Returns:
        The sites, in forward order for a glob; one site otherwise.

    Raises:
        SpliceError: For an invalid name (see `parse`) or a glob matching no site.

    Example:
        >>> [site.name for site in expand("blocks.*.attn.z", 2, set(POINT_AXES))]
        ['blocks.0.attn.z', 'blocks.1.attn.z']
        >>> expand(("resid_post", -1), 2, set(POINT_AXES))
        [Site(point='resid_post', layer=1)]
    """
    name = canonical_name(key)
    if not is_pattern(name):
        return [parse(name, n_layers, points)]
    base, part = split_part(name)
    if part is not None:  # a glob of SAE sub-sites: `blocks.*.resid_post.sae.acts`
        return [Site(site.point, site.layer, part) for site in expand(base, n_layers, points)]
    every = all_names(n_layers, points)
    matched = [n for n in every if fnmatch.fnmatchcase(n, name)]
    if not matched:
        hints = closest(name.replace("*", "0"), every)
        raise SpliceError(
            f"site pattern {name!r} matches no site of this model"
            + (f"; close: {', '.join(hints)}" if hints else "")
        )
    return [parse(n, n_layers, points) for n in matched]
