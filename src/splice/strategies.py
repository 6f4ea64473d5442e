"""Hypothesis strategies over a model's sites, selections and interventions, so users can
property-test their own edits the way splice tests itself:

    from hypothesis import given
    from splice import strategies as sst

    @given(sst.edits(model, seq=8, batch=2))
    def test_my_metric_is_finite(edits): ...

Requires `hypothesis` (the `test` extra)."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

import torch
from hypothesis import strategies as st

from .engine.directional import Clamp, ProjectOut
from .engine.edits import Edits
from .engine.interventions import Add, Intervention, Replace, Scale, Zero

if TYPE_CHECKING:
    from .engine.model import Model


def sites(model: Model, points: Collection[str] | None = None) -> st.SearchStrategy[str]:
    """Site names of `model`, optionally only those whose point is in `points`.

    Args:
        model: The model whose sites are drawn.
        points: Points to keep (`{"attn.z", "resid_post"}`); None keeps every site.

    Example:
        >>> from hypothesis import find
        >>> import transformers, splice
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32,
        ...                                  vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> model = splice.Model(transformers.GPT2LMHeadModel(config))  # tiny, random weights
        >>> find(sites(model, points={"attn.z"}), lambda name: True)
        'blocks.0.attn.z'
    """
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


def positions(
    seq: int, batch: int, min_pos: int = 0, negative: bool = True
) -> st.SearchStrategy[int | list[int] | slice | torch.Tensor | None]:
    """`pos=` values selecting only positions >= min_pos of a seq-long input (None means all).
    negative=False leaves out negative indices (they are refused during generation).

    Draws ints, lists of distinct ints, slices (with steps), `[batch, seq]` bool masks and,
    when `min_pos` is 0, None and (with `negative`) negative ints.

    Args:
        seq: Tokens in the input.
        batch: Rows in the input (the masks' first axis).
        min_pos: Smallest position drawn (e.g. the prompt length, for edits of generated tokens).
        negative: Also draw negative positions.

    Example:
        >>> from hypothesis import find
        >>> find(positions(8, 2, min_pos=3), lambda pos: isinstance(pos, int)) >= 3
        True
    """
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


def selections(
    model: Model, site: str, seq: int, batch: int, min_pos: int = 0, negative: bool = True
) -> st.SearchStrategy[dict[str, Any]]:
    """dict(pos=, heads=, dims=, rows=) valid for `site` on a [batch, seq] input.

    `heads` is drawn only at head sites; `dims` over the site's last axis (key positions of a
    `seq`-long input at `attn.scores`/`attn.pattern`); `rows` only when `batch` > 1.

    Args:
        model: The model.
        site: A canonical site name of it.
        seq: Tokens in the input.
        batch: Rows in the input.
        min_pos: Smallest position drawn (see `positions`).
        negative: Also draw negative indices.

    Example:
        >>> from hypothesis import find
        >>> import transformers, splice
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32,
        ...                                  vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> model = splice.Model(transformers.GPT2LMHeadModel(config))  # tiny, random weights
        >>> selection = find(selections(model, "blocks.0.attn.z", seq=4, batch=2), lambda sel: True)
        >>> sorted(selection)
        ['dims', 'heads', 'pos', 'rows']
    """
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
    model: Model,
    site: str,
    seq: int,
    batch: int,
    min_pos: int = 0,
    identity: bool = False,
    negative: bool = True,
) -> st.SearchStrategy[Intervention]:
    """Interventions valid at `site`. With identity=True, only ones that must change nothing
    (Scale(1), Add(0), ProjectOut of no directions, an unbounded Clamp), for no-op properties.

    Otherwise draws `Zero`, `Scale`, `Add`, `Replace`, `Clamp` and `ProjectOut` with values
    that fit the site and a selection from `selections`.

    Args:
        model: The model.
        site: A canonical site name of it.
        seq: Tokens in the input.
        batch: Rows in the input.
        min_pos: Smallest position drawn (see `positions`).
        identity: Draw only interventions that leave the output bit-identical.
        negative: Also draw negative indices.

    Example:
        >>> from hypothesis import find
        >>> import transformers, splice
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32,
        ...                                  vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> model = splice.Model(transformers.GPT2LMHeadModel(config))  # tiny, random weights
        >>> no_op = find(interventions(model, "blocks.0.resid_post", seq=4, batch=2, identity=True), lambda iv: True)
        >>> type(no_op).__name__ in {"Scale", "Add", "Clamp", "ProjectOut"}
        True
    """
    last = model.sites[site][-1]
    # Per-key-position values change width as a sequence grows: scalars only there.
    vector: st.SearchStrategy[Any] = st.floats(-2, 2, width=32) if last == "k_pos" else _vector(last)

    def build(sel):
        if identity:
            zeros = 0.0 if last == "k_pos" else torch.zeros(last)
            options = [Scale(1.0, **sel), Add(0.0, **sel), Add(zeros, scale=3.0, **sel), Clamp(**sel)]
            if sel["dims"] is None:  # projections act on the whole last axis and refuse dims=
                options.append(ProjectOut([], **sel))
            return st.sampled_from(options)
        drawn: list[st.SearchStrategy[Intervention]] = [
            st.just(Zero(**sel)),
            st.floats(-4, 4, allow_nan=False, width=32).map(lambda f: Scale(f, **sel)),
            vector.map(lambda v: Add(v, scale=2.0, **sel)),
            st.one_of(st.floats(-3, 3, width=32), vector).map(lambda v: Replace(v, **sel)),
            st.floats(0, 1, width=32).map(lambda b: Clamp(min=-b, max=b, **sel)),
        ]
        if last != "k_pos" and sel["dims"] is None:  # a direction spans the whole last axis
            drawn.append(vector.filter(lambda v: bool(v.any())).map(lambda v: ProjectOut(v, **sel)))
        return st.one_of(*drawn)

    return selections(model, site, seq, batch, min_pos, negative).flatmap(build)


def edits(
    model: Model,
    seq: int,
    batch: int,
    max_sites: int = 3,
    min_pos: int = 0,
    identity: bool = False,
    points: Collection[str] | None = None,
    negative: bool = True,
) -> st.SearchStrategy[Edits]:
    """An `Edits` registry of 0..max_sites sites with one intervention each (negative=False:
    no negative positions, e.g. for edits used during generation).

    Args:
        model: The model.
        seq: Tokens in the input the edits will run on.
        batch: Rows in that input.
        max_sites: At most this many distinct sites (default 3).
        min_pos: Smallest position drawn (see `positions`).
        identity: Only interventions that leave the output bit-identical.
        points: Only sites of these points (see `sites`).
        negative: Also draw negative indices.

    Example:
        >>> from hypothesis import given, settings
        >>> from splice import Edits
        >>> import transformers, splice
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32,
        ...                                  vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> model = splice.Model(transformers.GPT2LMHeadModel(config))  # tiny, random weights
        >>> @settings(max_examples=10, database=None, deadline=None)
        ... @given(edits(model, seq=4, batch=2))
        ... def test_edits_run(edits):
        ...     assert isinstance(edits, Edits)
        ...     model.run(torch.ones(2, 4, dtype=torch.long), edits=edits)
        >>> test_edits_run()
    """
    site_lists = st.lists(sites(model, points), min_size=0, max_size=max_sites, unique=True)

    def fill(names):
        return st.tuples(
            *[interventions(model, n, seq, batch, min_pos, identity, negative) for n in names]
        ).map(lambda ivs: Edits(dict(zip(names, ivs))))

    return site_lists.flatmap(fill)
