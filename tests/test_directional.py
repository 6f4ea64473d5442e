"""Project, ProjectOut, Clamp and Apply: parity with hand-written hooks doing the same math by
hand (explicit projections, an explicit pinv projection matrix), identities, errors, round trips."""

import pytest
import torch
from handhooks import hand_and_splice

import splice
from splice.engine.directional import Apply, Clamp, Project, ProjectOut
from splice.engine.interventions import Intervention

SITES = ["blocks.1.resid_post", "blocks.1.attn.z", "blocks.1.mlp.post", "embed"]
MASK = torch.tensor([[0, 1, 0, 0, 1, 0, 0, 0, 1], [0, 0, 1, 1, 0, 0, 0, 0, 0]], dtype=torch.bool)


def _directions(d: int, k: int, seed: int) -> torch.Tensor:
    """k random, deliberately non-orthogonal and unnormalised directions of width d."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, d, generator=g)
    if k > 1:
        a[1:] += 2.0 * a[0]  # strongly correlated with the first one
    return a * 3.0


def _projector(a: torch.Tensor) -> torch.Tensor:
    """Orthogonal projector onto the row space of a: pinv(a) @ a, in float64 (independent of the
    library's orthonormalisation)."""
    a = a.double()
    return torch.linalg.pinv(a) @ a


def _on(index, fn):
    """Hand edit of t[index] on the clone the hook already made."""

    def edit(t):
        t[index] = fn(t[index])
        return t

    return edit


def cases(d: int, n_heads: int | None):
    """(intervention, hand-written equivalent, exact?) for a site whose last axis has size d."""
    g = torch.Generator().manual_seed(7)
    u = torch.randn(d, generator=g)
    u = u / u.norm()
    three = _directions(d, min(3, d - 1), 11)
    two = _directions(d, 2, 12)
    p3, p2 = _projector(three), _projector(two)
    out_of = lambda r, p: (r.double() - r.double() @ p).to(r.dtype)  # noqa: E731
    onto = lambda r, p: (r.double() @ p).to(r.dtype)  # noqa: E731
    bound = torch.linspace(-0.02, 0.02, d)
    out = [
        (ProjectOut(u), lambda t: t - (t @ u)[..., None] * u, False),
        (ProjectOut(three, pos=[2, 5]), _on((slice(None), [2, 5]), lambda r: out_of(r, p3)), False),
        (
            ProjectOut([three[0], three[1]], pos=MASK),
            _on(MASK, lambda r: out_of(r, _projector(three[:2]))),
            False,
        ),
        (Project(two, pos=-1), _on((slice(None), -1), lambda r: onto(r, p2)), False),
        (
            Project(u, rows=1, pos=slice(3, None)),
            _on((slice(1, 2), slice(3, None)), lambda r: (r @ u)[..., None] * u),
            False,
        ),
        (Clamp(min=-0.01, max=0.01), lambda t: t.clamp(-0.01, 0.01), True),
        (
            Clamp(max=bound, pos=slice(1, None), dims=slice(0, d // 2)),
            _on(
                (slice(None), slice(1, None), ..., slice(0, d // 2)),
                lambda r: torch.minimum(r, bound[: d // 2]),
            ),
            True,
        ),
        (
            Apply(lambda r: r.flip(-1) * 2.0 + 1.0, pos=3),
            _on((slice(None), 3), lambda r: r.flip(-1) * 2.0 + 1.0),
            True,
        ),
    ]
    if n_heads:
        h = [0, n_heads - 1] if n_heads > 1 else [0]
        out += [
            (ProjectOut(two, heads=h), _on((slice(None), slice(None), h), lambda r: out_of(r, p2)), False),
            (
                Project(u, heads=h[-1], pos=4),
                _on((slice(None), 4, h[-1]), lambda r: (r @ u)[..., None] * u),
                False,
            ),
        ]
    return out


@pytest.mark.parametrize("site", SITES)
def test_directional_edits_match_hand_written_hooks(model, hf, family, ids, site):
    shape = model.sites[site]
    n_heads = shape[-2] if len(shape) == 4 else None
    with torch.no_grad():
        clean = hf(ids).logits
        for intervention, hand, exact in cases(shape[-1], n_heads):
            expected, got = hand_and_splice(model, hf, family, site, intervention, hand, ids)
            if exact:
                assert torch.equal(got, expected), (
                    f"{site} {intervention!r}: max diff {(got - expected).abs().max():.3g}"
                )
            else:  # float32 projection vs float64 projector: rounding only
                torch.testing.assert_close(
                    got, expected, rtol=1e-5, atol=1e-5, msg=f"{site} {intervention!r}"
                )
            assert not torch.equal(expected, clean), f"{site} {intervention!r} changed nothing"
    assert model.hook_count == 0


def test_edited_site_is_the_projection(model, ids):
    """Recorded after the edit, the site has no component along the directions (ProjectOut) or
    nothing outside their span (Project)."""
    site, d = "blocks.1.resid_post", model.dims.d_model
    a = _directions(d, 3, 5)
    p = _projector(a)
    with torch.no_grad():
        _, out = model.run(ids, edits={site: ProjectOut(a)}, record=site)
        _, onto = model.run(ids, edits={site: Project(a)}, record=site)
        _, clean = model.run(ids, record=site)
    assert (out[site].double() @ a.double().T).abs().max() < 1e-4
    torch.testing.assert_close(onto[site] + out[site], clean[site], rtol=0, atol=1e-5)
    torch.testing.assert_close(onto[site].double(), clean[site].double() @ p, rtol=0, atol=1e-5)


@pytest.mark.parametrize("site", ["blocks.1.resid_post", "blocks.1.attn.z"])
def test_identities(model, hf, ids, site):
    d = model.sites[site][-1]
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        clean = hf(ids).logits
        for exact in (
            ProjectOut([]),
            ProjectOut(torch.zeros(0, d)),
            ProjectOut(torch.zeros(0)),
            Clamp(),
            Clamp(pos=2),
            Apply(lambda r: r),
            Clamp(min=-1e30, max=1e30),
        ):
            with model.edit({site: exact}):
                assert torch.equal(hf(ids).logits, clean), exact
        for full in (
            Project(torch.eye(d)),
            Project(torch.randn(d, d, generator=g)),
            Project(torch.randn(d + 3, d, generator=g)),
        ):
            with model.edit({site: full}):
                torch.testing.assert_close(hf(ids).logits, clean, rtol=0, atol=1e-5, msg=repr(full))
        # The span of no direction is {0}: projecting onto it zeroes the selection.
        with model.edit({site: Project([], pos=3)}):
            onto_nothing = hf(ids).logits
        with model.edit({site: splice.Zero(pos=3)}):
            assert torch.equal(onto_nothing, hf(ids).logits)


def test_orthonormalisation_spans_dependent_and_scaled_directions():
    a = _directions(6, 2, 1)
    dependent = torch.cat([a, a[:1] * -4.0 + a[1:] * 0.5])  # third row is in the span of the first two
    assert (
        Project(a).rank == 2
        and Project(dependent).rank == 2
        and Project(a[0]).rank == 1
        and ProjectOut([]).rank == 0
    )
    x = torch.randn(5, 6, dtype=torch.float64)
    at = splice.engine.interventions.At("s", (), (5, 6), False)
    for iv in (Project(dependent), Project(a * 1e-3)):
        torch.testing.assert_close(
            iv.compute(x, at), x @ _projector(a), rtol=0, atol=1e-6
        )  # float32 directions
    # Half-precision activations are projected in float32 and cast back.
    h = torch.randn(4, 6).to(torch.bfloat16)
    assert ProjectOut(a).compute(h, at).dtype == torch.bfloat16


def test_wrong_direction_width_is_caught_before_any_forward(model, hf, ids):
    d = model.dims.d_model
    with pytest.raises(
        splice.SpliceError, match=rf"blocks\.1\.resid_post.*\[{d + 1}\]|\[{d + 1}\].*blocks\.1\.resid_post"
    ):
        with model.edit({"blocks.1.resid_post": ProjectOut(torch.randn(2, d + 1))}):
            pytest.fail("the with body must not run")
    with pytest.raises(splice.SpliceError, match=r"blocks\.1\.attn\.z"):
        with model.edit(
            {"blocks.1.attn.z": Project(torch.randn(d), heads=0)}
        ):  # d_model-wide at a d_head site
            pytest.fail("the with body must not run")
    assert model.hook_count == 0
    with model.edit({"blocks.*.resid_post": ProjectOut(torch.randn(d))}), torch.no_grad():
        hf(ids)  # the right width at every layer passes


def test_apply_with_a_wrong_shape_or_dtype_names_the_site_and_both_shapes(model, hf, ids):
    d = model.dims.d_model
    with torch.no_grad():
        clean = hf(ids).logits
        with pytest.raises(
            splice.SpliceError,
            match=rf"Apply result at blocks\.1\.resid_post has shape \[2, 9, {d - 1}\], expected \[2, 9, {d}\]",
        ):
            with model.edit({"blocks.1.resid_post": Apply(lambda r: r[..., :-1])}):
                hf(ids)
        with pytest.raises(
            splice.SpliceError,
            match=r"Apply result at blocks\.1\.mlp\.out .*\[2, 1, \d+\].*expected \[2, 1, \d+\]",
        ):
            with model.edit({"blocks.1.mlp.out": Apply(lambda r: r.sum(-1, keepdim=True), pos=4)}):
                hf(ids)
        with pytest.raises(
            splice.SpliceError, match=r"Apply result at blocks\.1\.resid_post is torch\.float64"
        ):
            with model.edit({"blocks.1.resid_post": Apply(lambda r: r.double())}):
                hf(ids)
        assert model.hook_count == 0 and torch.equal(hf(ids).logits, clean)


def test_construction_errors():
    with pytest.raises(splice.SpliceError, match="does not take dims="):
        Project(torch.randn(4), dims=1)
    with pytest.raises(splice.SpliceError, match="does not take dims="):
        ProjectOut(torch.randn(4), dims=[0, 1])
    with pytest.raises(splice.SpliceError, match=r"direction\(s\) \[1\] are all zeros"):
        ProjectOut(torch.stack([torch.ones(4), torch.zeros(4)]))
    with pytest.raises(splice.SpliceError, match=r"\[d\] or \[k, d\].*\[2, 3, 4\]"):
        Project(torch.randn(2, 3, 4))
    with pytest.raises(splice.SpliceError, match="one width"):
        Project([torch.randn(4), torch.randn(5)])
    with pytest.raises(splice.SpliceError, match="1-D tensors"):
        Project([1.0, 2.0])
    with pytest.raises(splice.SpliceError, match="floating-point"):
        Project(torch.tensor([1, 0, 0]))
    with pytest.raises(splice.SpliceError, match="NaN"):
        Project(torch.tensor([1.0, float("nan")]))
    with pytest.raises(splice.SpliceError, match="greater than max"):
        Clamp(min=1, max=0)
    with pytest.raises(splice.SpliceError, match="Clamp min must be"):
        Clamp(min="low")
    with pytest.raises(splice.SpliceError, match="needs a function"):
        Apply(3)
    with pytest.raises(TypeError):
        Project()  # directions are required


def test_reprs():
    assert (
        repr(ProjectOut(torch.randn(2, 4), pos=3)) == "ProjectOut(pos=3, directions=<tensor float32 [2, 4]>)"
    )
    assert repr(Project(torch.randn(4))) == "Project(directions=<tensor float32 [4]>)"
    assert repr(ProjectOut([])) == "ProjectOut(directions=<tensor float32 [0, 0]>)"
    assert repr(Clamp()) == "Clamp()"
    assert (
        repr(Clamp(min=-1, max=torch.ones(3), rows=0)) == "Clamp(rows=0, min=-1.0, max=<tensor float32 [3]>)"
    )

    def double(region):
        return region * 2

    assert (
        repr(Apply(double, pos=slice(2, None)))
        == "Apply(test_reprs.<locals>.double, pos=slice(2, None, None))"
    )


def test_round_trips_give_the_same_forward(model, hf, ids, tmp_path):
    d = model.dims.d_model
    a = _directions(d, 3, 2)
    edits = splice.Edits(
        {
            "blocks.0.resid_post": ProjectOut([a[0], a[1]], pos=slice(2, None)),
            "blocks.1.resid_post": Project(a, rows=0),
            "blocks.1.attn.z": [ProjectOut(torch.randn(model.dims.d_head), heads=0), Clamp(min=-0.1)],
            "blocks.1.mlp.out": [
                Clamp(min=-0.05, max=torch.full((d,), 0.05), pos=[1, 4]),
                ProjectOut([]),
                Project(a[2]),
            ],
        }
    )
    for iv in (iv for _, iv in edits.items_flat()):
        again = Intervention.from_dict(iv.to_dict())
        assert type(again) is type(iv) and again == iv and repr(again) == repr(iv)
    edits.save(tmp_path / "e.json")
    edits.save(tmp_path / "e.yaml")
    with torch.no_grad():
        with model.edit(edits):
            expected = hf(ids).logits
        for name in ("e.json", "e.yaml"):
            loaded = splice.Edits.load(tmp_path / name)
            assert [loaded._items[k] for k in loaded] == [edits._items[k] for k in edits]
            with model.edit(loaded):
                assert torch.equal(hf(ids).logits, expected)


def test_apply_is_not_serialisable(tmp_path):
    apply = Apply(lambda r: r * 0.5, pos=1)
    assert not Apply.serialisable
    with pytest.raises(
        splice.SpliceError,
        match=r"Apply\(.*<lambda>, pos=1\) holds a Python function and cannot be serialised",
    ):
        apply.to_dict()
    with pytest.raises(splice.SpliceError, match="cannot be serialised"):
        splice.Edits({"blocks.0.resid_post": [splice.Zero(), apply]}).save(tmp_path / "e.json")
    assert not (tmp_path / "e.json").exists()


def test_gradients_flow_through_projections(model, hf, ids):
    d = model.dims.d_model
    a = _directions(d, 2, 4)
    scale = torch.ones((), requires_grad=True)
    with model.edit(
        {"blocks.0.resid_post": [splice.Scale(scale), ProjectOut(a)], "blocks.1.mlp.out": Clamp(max=0.1)}
    ):
        hf(ids).logits.square().sum().backward()
    assert scale.grad is not None and torch.isfinite(scale.grad) and scale.grad != 0
