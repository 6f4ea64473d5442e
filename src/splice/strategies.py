"""Hypothesis strategies over a model's sites, selections and interventions, so users can
property-test their own edits the way splice tests itself:

    from hypothesis import given
    from splice import strategies as sst

    @given(sst.edits(model, seq=8, batch=2))
    def test_my_metric_is_finite(edits): ...

Requires `hypothesis` (the `test` extra)."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from .engine.directional import Clamp, ProjectOut
from .engine.edits import Edits
from .engine.interventions import Add, Replace, Scale, Zero


def sites(model, points=None):
    """Site names of `model`, optionally only those whose point is in `points`."""
    names = [n for n in model.sites if points is None or n.split(".", 2)[-1] in points]
    return st.sampled_from(names)


def _axis(size: int, negative: bool = True):
    return st.one_of(
        st.none(),
        st.integers(-size if negative else 0, size - 1),
        st.lists(st.integers(0, size - 1), min_size=1, max_size=min(size, 4), unique=True),
        st.tuples(st.integers(0, size - 1), st.integers(1, size))
        .filter(lambda t: t[0] < t[1])
        .map(lambda t: slice(*t)),
    )


def positions(seq: int, batch: int, min_pos: int = 0, negative: bool = True):
    """`pos=` values selecting only positions >= min_pos of a seq-long input (None means all).
    negative=False leaves out negative indices (they are refused during generation)."""
    options = [
        st.integers(min_pos, seq - 1),
        st.lists(st.integers(min_pos, seq - 1), min_size=1, max_size=4, unique=True),
        st.integers(min_pos, seq - 1).map(lambda p: slice(p, None)),
        st.integers(min_pos, seq - 1).flatmap(lambda p: st.integers(1, 3).map(lambda k: slice(p, None, k))),
        st.lists(st.lists(st.booleans(), min_size=seq, max_size=seq), min_size=batch, max_size=batch).map(
            lambda rows: torch.tensor(
                [[b and i >= min_pos for i, b in enumerate(r)] for r in rows], dtype=torch.bool
            )
        ),
    ]
    if min_pos == 0:
        options.append(st.none())
        if negative:
            options.append(st.integers(-seq, -1))
    return st.one_of(*options)


def selections(model, site: str, seq: int, batch: int, min_pos: int = 0, negative: bool = True):
    """dict(pos=, heads=, dims=, rows=) valid for `site` on a [batch, seq] input."""
    sizes = dict(zip(model.layout.axes(model.layout.sites_of(site)[0]), model.sites[site]))
    head = sizes.get("head", sizes.get("kv_head"))
    last = list(sizes.values())[-1]
    heads = st.none() if head is None else _axis(head)
    dims = _axis(seq, negative) if last == "k_pos" else _axis(last)  # key positions of a seq-long input
    rows = st.one_of(st.none(), _axis(batch, negative)) if batch > 1 else st.none()
    return st.fixed_dictionaries(
        {"pos": positions(seq, batch, min_pos, negative), "heads": heads, "dims": dims, "rows": rows}
    )


def _vector(last: int):
    return st.integers(0, 2**16).map(
        lambda seed: torch.randn(last, generator=torch.Generator().manual_seed(seed))
    )


def interventions(
    model, site: str, seq: int, batch: int, min_pos: int = 0, identity: bool = False, negative: bool = True
):
    """Interventions valid at `site`. With identity=True, only ones that must change nothing
    (Scale(1), Add(0), ProjectOut of no directions, an unbounded Clamp), for no-op properties."""
    last = model.sites[site][-1]
    # Per-key-position values change width as a sequence grows: scalars only there.
    vector = st.floats(-2, 2, width=32) if last == "k_pos" else _vector(last)

    def build(sel):
        if identity:
            zeros = 0.0 if last == "k_pos" else torch.zeros(last)
            options = [Scale(1.0, **sel), Add(0.0, **sel), Add(zeros, scale=3.0, **sel), Clamp(**sel)]
            if sel["dims"] is None:  # projections act on the whole last axis and refuse dims=
                options.append(ProjectOut([], **sel))
            return st.sampled_from(options)
        options = [
            st.just(Zero(**sel)),
            st.floats(-4, 4, allow_nan=False, width=32).map(lambda f: Scale(f, **sel)),
            vector.map(lambda v: Add(v, scale=2.0, **sel)),
            st.one_of(st.floats(-3, 3, width=32), vector).map(lambda v: Replace(v, **sel)),
            st.floats(0, 1, width=32).map(lambda b: Clamp(min=-b, max=b, **sel)),
        ]
        if last != "k_pos" and sel["dims"] is None:  # a direction spans the whole last axis
            options.append(vector.filter(lambda v: bool(v.any())).map(lambda v: ProjectOut(v, **sel)))
        return st.one_of(*options)

    return selections(model, site, seq, batch, min_pos, negative).flatmap(build)


def edits(
    model,
    seq: int,
    batch: int,
    max_sites: int = 3,
    min_pos: int = 0,
    identity: bool = False,
    points=None,
    negative: bool = True,
):
    """An `Edits` registry of 0..max_sites sites with one intervention each (negative=False:
    no negative positions, e.g. for edits used during generation)."""
    site_lists = st.lists(sites(model, points), min_size=0, max_size=max_sites, unique=True)

    def fill(names):
        return st.tuples(
            *[interventions(model, n, seq, batch, min_pos, identity, negative) for n in names]
        ).map(lambda ivs: Edits(dict(zip(names, ivs))))

    return site_lists.flatmap(fill)
