"""Silent failures of the selection / value layer, each now an error or an exact edit: masks
narrower than the sequence, empty references, values shared with the caller, repeated indices,
non-finite values, and malformed slices, indices and sources. Edits are checked against the
same edit written by hand on a recorded clean activation."""

import dataclasses
import json

import pytest
import torch
from conftest import VOCAB, build
from handhooks import register

import splice
from splice import Add, Clamp, Mean, Patch, Project, ProjectOut, Replace, Resample, Scale, Zero
from splice.engine.interventions import Intervention

FAMILY = "llama"  # the selection layer does not depend on the architecture: one family suffices
SITE = "blocks.1.resid_post"
D = 48  # llama's tiny d_model


@pytest.fixture(scope="module")
def hf():
    return build(FAMILY)


@pytest.fixture(scope="module")
def model(hf):
    return splice.Model(hf)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def _after(model, ids, edit=None, site=SITE, **kwargs):
    """The site as the rest of the model sees it (recorders run after edits)."""
    with torch.no_grad():
        _, rec = model.run(ids, edits={site: edit} if edit is not None else None, record=site, **kwargs)
    return rec[site]


def _refused(model, hf, ids, edit, match, site=SITE, **kwargs):
    """The edit raises a SpliceError matching `match` in a forward, and leaves no hook behind."""
    with pytest.raises(splice.SpliceError, match=match):
        with torch.no_grad(), model.edit({site: edit}):
            hf(ids, **kwargs)
    assert model.hook_count == 0


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# -- 1. bool masks narrower than the sequence ------------------------------------------------------


def test_a_mask_narrower_than_the_sequence_is_refused_naming_both_widths(model, hf, ids):
    narrow = torch.ones(2, 5, dtype=torch.bool)
    _refused(
        model,
        hf,
        ids,
        Zero(pos=narrow),
        r"pos mask at blocks\.1\.resid_post has 5 columns but the sequence has 9 tokens.*5\.\.8.*Pad the mask with False to at least 9",
    )


def test_a_mask_narrower_than_the_longest_padded_row_is_refused(model, hf, ids):
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :2] = 0  # row 1 is left-padded: 7 real tokens, row 0 has 9
    _refused(
        model,
        hf,
        ids,
        Zero(pos=torch.ones(2, 8, dtype=torch.bool)),
        r"8 columns but the sequence has 9 tokens",
        attention_mask=padding,
    )


def test_a_mask_wider_than_the_sequence_edits_exactly_its_true_positions(model, ids):
    wide = torch.zeros(2, 12, dtype=torch.bool)
    wide[0, 3] = wide[1, 7] = wide[:, 10] = True  # column 10 is beyond the 9 tokens: nothing there yet
    clean = _after(model, ids)
    expected = clean.clone()
    expected[0, 3] = 0
    expected[1, 7] = 0
    assert torch.equal(_after(model, ids, Zero(pos=wide)), expected)


def test_a_mask_on_a_left_padded_batch_counts_from_each_rows_first_token(model, ids):
    # Columns of a pos mask are positions counted from each row's first real token, as every
    # other pos selection is; padding is never edited. (A padded row used to crash the gather.)
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :3] = 0  # row 1: 6 real tokens in columns 3..8
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 1] = mask[1, 1] = mask[1, 5] = True
    by_mask = _after(model, ids, Zero(pos=mask), attention_mask=padding)
    by_rows = _after(model, ids, Zero(pos=1, rows=0), attention_mask=padding)
    by_rows = _after(model, ids, Zero(pos=[1, 5], rows=1), attention_mask=padding).where(
        torch.arange(2)[:, None, None] == 1, by_rows
    )
    assert torch.equal(by_mask, by_rows)
    assert (by_mask[1, 3 + 1] == 0).all() and (by_mask[1, 3 + 5] == 0).all() and (by_mask[1, :3] != 0).any()


def test_generation_needs_a_mask_as_wide_as_prompt_plus_new_tokens(model, hf, ids):
    prompt, new = ids[:, :6], 3
    generate = dict(
        max_new_tokens=new,
        min_new_tokens=new,
        do_sample=False,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    with pytest.raises(
        splice.SpliceError,
        match=r"6 columns but the sequence has 7 tokens.*prompt length plus the new tokens",
    ):
        with torch.no_grad(), model.edit({SITE: Zero(pos=torch.ones(2, 6, dtype=torch.bool))}):
            hf.generate(prompt, **generate)
    wide = torch.zeros(2, 6 + new, dtype=torch.bool)
    wide[:, 6] = True  # the first generated token only
    with torch.no_grad(), model.edit({SITE: Zero(pos=wide)}), model.record(SITE, mode="accumulate") as rec:
        hf.generate(prompt, **generate)
    steps = rec[SITE]
    assert steps[0].abs().sum() > 0 and torch.all(steps[1] == 0) and steps[2].abs().sum() > 0
    assert model.hook_count == 0


# -- 2. Mean (and every source) of nothing ---------------------------------------------------------


@pytest.mark.parametrize(
    "reference, match",
    [
        (torch.zeros(0, 9, D), r"Mean source for this site is empty \(shape \[0, 9, 48\]\).*NaN"),
        (torch.zeros(3, 0, D), r"Mean source for this site is empty \(shape \[3, 0, 48\]\)"),
        ({SITE: torch.zeros(0, 9, D)}, r"Mean source for blocks\.1\.resid_post is empty"),
        (
            {SITE: [torch.randn(2, 9, D), torch.zeros(2, 0, D)]},
            r"Mean source for blocks\.1\.resid_post is empty \(shape \[2, 0, 48\]\)",
        ),
        ({SITE: []}, r"Mean source for blocks\.1\.resid_post holds no forwards"),
        ({}, r"Mean source holds no sites"),
    ],
    ids=["no-rows", "no-positions", "dict-no-rows", "one-empty-forward", "no-forwards", "no-sites"],
)
@pytest.mark.parametrize("per_position", [False, True])
def test_mean_of_an_empty_reference_is_refused_when_built(reference, match, per_position):
    with pytest.raises(splice.SpliceError, match=match):
        Mean(reference, per_position=per_position)


def test_mean_of_a_recording_that_never_ran_is_refused_when_built(model):
    with model.record(SITE, mode="accumulate") as rec:
        pass
    with pytest.raises(splice.SpliceError, match="Mean source holds no sites"):
        Mean(rec)


@pytest.mark.parametrize("make", [Patch, Resample], ids=["patch", "resample"])
def test_a_source_with_no_rows_is_refused_when_built(make):
    # Before: Patch divided by zero rows mid-forward, Resample failed inside torch.randint.
    with pytest.raises(
        splice.SpliceError, match=r"source for blocks\.1\.resid_post is empty \(shape \[0, 9, 48\]\)"
    ):
        make({SITE: torch.zeros(0, 9, D)})


# -- 3. interventions own their values --------------------------------------------------------------


def _projected_out(x, u):
    u = u.double() / u.double().norm()
    return (x.double() - (x.double() @ u)[..., None] * u).float()


OWNED = [  # (shape of the user's tensor t, build from t, the edit by hand on the clean site with t's value at build time, exact?)
    ("add", (D,), lambda t: Add(t), lambda c, t: c + t, True),
    ("replace", (D,), lambda t: Replace(t), lambda c, t: t.expand_as(c), True),
    ("scale", (D,), lambda t: Scale(t), lambda c, t: c * t, True),
    ("clamp-bound", (D,), lambda t: Clamp(max=t), lambda c, t: c.clamp(max=t), True),
    ("project-out", (D,), lambda t: ProjectOut(t), _projected_out, False),
    ("patch-tensor", (2, 9, D), lambda t: Patch(t), lambda c, t: t, True),
    ("resample-tensor", (1, 9, D), lambda t: Resample(t), lambda c, t: t.expand_as(c), True),
]


@pytest.mark.parametrize("name, shape, make, hand, exact", OWNED, ids=[o[0] for o in OWNED])
def test_changing_the_users_tensor_after_building_does_not_change_the_edit(
    model, ids, name, shape, make, hand, exact
):
    t = _randn(*shape, seed=4)
    original = t.clone()
    edit = make(t)
    t.add_(1.0)  # the caller reuses their buffer
    got = _after(model, ids, edit)
    expected = hand(_after(model, ids), original)
    if exact:
        assert torch.equal(got, expected), f"{name}: max diff {(got - expected).abs().max():.3g}"
    else:
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "make, field",
    [(Add, "vector"), (Patch, "source"), (Resample, "reference")],
    ids=["add", "patch", "resample"],
)
def test_a_value_is_copied_once_not_again_when_a_sweep_rebuilds_the_intervention(make, field):
    v = torch.ones(2, 9, D)
    edit = make(v)
    assert getattr(edit, field) is not v and torch.equal(getattr(edit, field), v)
    assert getattr(dataclasses.replace(edit, pos=3), field) is getattr(
        edit, field
    )  # no copy per sweep variant


@pytest.mark.parametrize("as_recording", [True, False], ids=["recording", "dict"])
@pytest.mark.parametrize("make", [Patch, Resample], ids=["patch", "resample"])
def test_a_recording_changed_in_place_after_building_is_refused(model, hf, ids, make, as_recording):
    _, rec = model.run(ids, record=SITE)
    source = rec if as_recording else {SITE: rec[SITE]}
    edit = make(source)
    assert torch.equal(_after(model, ids, edit), rec[SITE])  # shared, not copied: patching itself is exact
    rec[SITE][:, 3] = 0.0
    _refused(
        model,
        hf,
        ids,
        edit,
        rf"{make.__name__} source for blocks\.1\.resid_post was changed in place after the {make.__name__} was built",
    )
    assert torch.equal(_after(model, ids, make(source)), rec[SITE])  # rebuilt: takes the new values


def test_gradients_reach_the_users_tensor_through_the_copy(model, hf, ids):
    """Replace values and Clamp bounds are copied with clone, which keeps autograd: the gradient
    equals that of a hand-written hook using the user's tensor directly."""

    def grads(use_splice):
        value = _randn(D, seed=5).requires_grad_(True)
        bound = torch.full((D,), 0.05, requires_grad=True)
        if use_splice:
            edits = {SITE: Replace(value, pos=2), "blocks.0.resid_post": Clamp(max=bound)}
            with model.edit(edits):
                loss = hf(ids).logits.square().sum()
        else:

            def replace(t):
                t[:, 2] = value
                return t

            handles = [
                register(hf, FAMILY, SITE, replace),
                register(hf, FAMILY, "blocks.0.resid_post", lambda t: torch.clamp(t, max=bound)),
            ]
            try:
                loss = hf(ids).logits.square().sum()
            finally:
                for h in handles:
                    h.remove()
        loss.backward()
        return value.grad, bound.grad

    (v_got, b_got), (v_ref, b_ref) = grads(True), grads(False)
    assert v_got.abs().sum() > 0 and b_got.abs().sum() > 0
    torch.testing.assert_close(v_got, v_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b_got, b_ref, rtol=1e-6, atol=1e-7)


# -- 4. repeated indices --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "selection, match",
    [
        ({"heads": [1, 1]}, r"heads \[1, 1\] lists 1 twice"),
        ({"pos": [2, 5, 2]}, r"pos \[2, 5, 2\] lists 2 twice"),
        ({"dims": (0, 3, 3)}, r"dims \[0, 3, 3\] lists 3 twice"),
        ({"rows": [0, 0]}, r"rows \[0, 0\] lists 0 twice"),
        ({"heads": torch.tensor([2, 2])}, r"heads \[2, 2\] lists 2 twice"),
    ],
    ids=["heads", "pos", "dims", "rows", "heads-tensor"],
)
def test_a_repeated_index_is_refused_when_built(selection, match):
    with pytest.raises(splice.SpliceError, match=match + r".*edited once.*list each index once"):
        Add(1.0, **selection)


def test_positions_that_only_coincide_at_run_time_are_refused_in_the_forward(model, hf, ids):
    _refused(
        model,
        hf,
        ids,
        Add(1.0, pos=[1, -8]),
        r"pos \[1, -8\] at blocks\.1\.resid_post names one element twice: 1 and -8 both mean index 1 of a 9-token sequence",
    )
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :2] = 0  # per-row positions: row 0 has 9 tokens (1 == -8), row 1 has 7
    _refused(
        model,
        hf,
        ids,
        Add(1.0, pos=[1, -8]),
        r"pos \[1, -8\] at blocks\.1\.resid_post names one element twice.*of row 0 \(9 tokens\)",
        attention_mask=padding,
    )


def test_heads_that_coincide_on_the_site_are_refused_before_any_forward(model, hf, ids):
    n = model.dims.n_heads
    with pytest.raises(
        splice.SpliceError,
        match=rf"head \[0, -{n}\] at blocks\.1\.attn\.z names one element twice: 0 and -{n} both mean index 0",
    ):
        with model.edit({"blocks.1.attn.z": Zero(heads=[0, -n])}):
            pytest.fail("the with body must not run")
    assert model.hook_count == 0


def test_source_pos_may_repeat_a_source_position(model, ids):
    source = _randn(2, 12, D, seed=6)
    clean = _after(model, ids)
    expected = clean.clone()
    expected[:, 3] = source[:, 10]
    expected[:, 4] = source[:, 10]
    assert torch.equal(_after(model, ids, Patch({SITE: source}, pos=[3, 4], source_pos=[10, 10])), expected)


def test_listed_positions_pair_with_values_in_the_order_given(model, ids):
    """pos=[5, 2] with two rows of values writes the first to token 5 (NumPy's x[[5, 2]] = v),
    and source_pos pairs as written; before, positions were sorted and the pairing swapped."""
    values, source = _randn(2, D, seed=7), _randn(2, 12, D, seed=8)
    clean = _after(model, ids)
    replaced, patched = clean.clone(), clean.clone()
    replaced[:, [5, 2]] = values
    patched[:, 4], patched[:, 3] = source[:, 10], source[:, 11]
    assert torch.equal(_after(model, ids, Replace(values, pos=[5, 2])), replaced)
    assert torch.equal(_after(model, ids, Patch({SITE: source}, pos=[4, 3], source_pos=[10, 11])), patched)


# -- 5. one non-finite policy -----------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")
REFUSED = [
    ("scale-nan", lambda: Scale(NAN), r"Scale factor is NaN: NaN is refused in every intervention value"),
    (
        "scale-inf",
        lambda: Scale(INF),
        r"Scale factor is \+/-inf: infinite values are accepted only by Replace",
    ),
    (
        "add-nan",
        lambda: Add(torch.tensor([0.0, NAN, NAN])),
        r"Add vector contains NaN \(2 of 3 values, first at index \(1,\)\)",
    ),
    (
        "add-inf",
        lambda: Add(torch.tensor([0.0, -INF])),
        r"Add vector contains \+/-inf \(1 of 2 values, first at index \(1,\)\)",
    ),
    ("add-scale", lambda: Add(torch.ones(3), scale=INF), r"Add scale is \+/-inf"),
    (
        "replace-nan",
        lambda: Replace(torch.tensor([[1.0], [NAN]])),
        r"Replace value contains NaN \(1 of 2 values, first at index \(1, 0\)\)",
    ),
    ("clamp-nan", lambda: Clamp(min=NAN), r"Clamp min is NaN"),
    ("clamp-tensor-nan", lambda: Clamp(max=torch.tensor([1.0, NAN])), r"Clamp max contains NaN"),
    ("project-inf", lambda: Project(torch.tensor([1.0, INF])), r"Project directions contains \+/-inf"),
    ("project-out-nan", lambda: ProjectOut(torch.tensor([1.0, NAN])), r"ProjectOut directions contains NaN"),
]


@pytest.mark.parametrize("name, make, match", REFUSED, ids=[r[0] for r in REFUSED])
def test_non_finite_values_are_refused_when_built(name, make, match):
    with pytest.raises(splice.SpliceError, match=match):
        make()


def test_minus_inf_replace_masks_a_key_exactly_like_a_masked_softmax(model, ids):
    site = "blocks.0.attn.scores"  # layer 0's scores do not depend on the edit
    with torch.no_grad():
        _, clean = model.run(ids, record=site)
        _, edited = model.run(ids, edits={site: Replace(-INF, dims=1)}, record="blocks.0.attn.pattern")
    scores = clean[site].clone()
    scores[..., 1] = -INF  # query 0 still sees key 0, so no row is all -inf
    expected = scores.softmax(-1)
    pattern = edited["blocks.0.attn.pattern"]
    assert torch.all(pattern[..., 1] == 0)
    torch.testing.assert_close(pattern, expected, rtol=0, atol=1e-6)


def test_infinite_clamp_bounds_mean_no_bound(model, ids):
    clean = _after(model, ids)
    assert torch.equal(_after(model, ids, Clamp(min=-INF, max=0.1)), clean.clamp(max=0.1))
    assert torch.equal(_after(model, ids, Clamp(min=torch.full((D,), -0.1), max=INF)), clean.clamp(min=-0.1))


def test_an_infinite_replace_round_trips_through_json():
    edit = Replace(torch.tensor([-INF, 0.5]), dims=[0, 1])
    again = Intervention.from_dict(json.loads(json.dumps(edit.to_dict())))
    assert again == edit


# -- other silent failures of the selection / value layer ---------------------------------------


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: Zero(dims=slice(0.5, 4)),
            r"dims slice\(0\.5, 4, None\): the slice start must be an int or None; got 0\.5",
        ),
        (
            lambda: Zero(heads=slice(0, 2, 0)),
            r"heads slice\(0, 2, 0\): slices must step forward \(step >= 1\); got step 0",
        ),
        (lambda: Zero(pos=slice(None, None, -1)), r"pos slice\(None, None, -1\): slices must step forward"),
        (
            lambda: Patch(torch.ones(1, 9, D), source_pos=slice(5, 0, -1)),
            r"source_pos slice\(5, 0, -1\): slices must step forward",
        ),
        (lambda: Zero(pos=slice(4, 4)), r"pos slice\(4, 4, None\) selects nothing on any axis"),
        (lambda: Zero(dims=slice(-2, -5)), r"dims slice\(-2, -5, None\) selects nothing on any axis"),
        (lambda: Zero(heads=1.0), r"heads must be an int, slice or list of ints; got 1\.0 \(float\)"),
        (
            lambda: Zero(dims=[0, 2.0]),
            r"dims must be an int, slice or list of ints; \[0, 2\.0\] holds 2\.0 \(float\)",
        ),
        (
            lambda: Zero(heads=torch.tensor([True, False])),
            r"heads got a bool tensor \[2\]: heads takes indices; a \[batch, pos\] bool mask is only for pos=",
        ),
        (
            lambda: Zero(dims=torch.tensor([0.0, 1.0])),
            r"dims must be an int, slice or list of ints; got a torch\.float32 tensor",
        ),
        (lambda: Add([1.0, 2.0]), r"Add vector must be a number or a tensor; got list"),
        (lambda: Scale(True), r"Scale factor must be a number or a tensor; got bool"),
        (
            lambda: Clamp(min=torch.tensor([0.0, 2.0]), max=torch.tensor([1.0, 1.0])),
            r"Clamp min is greater than max at 1 of 2 element\(s\), first at index \(1,\) \(min 2 > max 1\)",
        ),
        (lambda: Clamp(min=0.5, max=torch.tensor([1.0, 0.2])), r"Clamp min is greater than max at 1 of 2"),
        (
            lambda: Patch(
                {SITE: torch.ones(1, 9, D)}, pos=torch.ones(1, 9, dtype=torch.bool), source_pos=[1]
            ),
            r"source_pos= pairs source positions with a list or slice of pos=, not with a bool mask",
        ),
    ],
    ids=[
        "float-slice",
        "step-0",
        "negative-step",
        "source-pos-negative-step",
        "empty-slice",
        "empty-negative-slice",
        "float-index",
        "float-in-list",
        "bool-tensor-heads",
        "float-tensor-dims",
        "list-value",
        "bool-value",
        "clamp-crossed-tensors",
        "clamp-crossed-mixed",
        "source-pos-with-mask",
    ],
)
def test_malformed_selections_and_values_are_refused_when_built(make, match):
    with pytest.raises(splice.SpliceError, match=match):
        make()


def test_integer_tensors_and_numpy_integers_select_like_ints(model, ids):
    np = pytest.importorskip("numpy")
    expected = _after(model, ids, Zero(heads=3, pos=[np.int64(2)]), site="blocks.1.attn.z")
    assert torch.equal(
        _after(model, ids, Zero(heads=torch.tensor(3), pos=torch.tensor([2])), site="blocks.1.attn.z"),
        expected,
    )
    clean = _after(model, ids, site="blocks.1.attn.z")
    clean[:, 2, 3] = 0
    assert torch.equal(expected, clean)


@pytest.mark.parametrize(
    "site, edit, match",
    [
        (
            "blocks.1.attn.z",
            Zero(dims=slice(0, 12)),
            r"dim slice\(0, 12, None\) reaches beyond the axis at blocks\.1\.attn\.z: it has size 8",
        ),
        (
            "blocks.1.attn.z",
            Zero(heads=slice(-9, None)),
            r"head slice\(-9, None, None\) reaches beyond the axis at blocks\.1\.attn\.z: it has size 6",
        ),
        (
            SITE,
            Zero(rows=slice(1, 4)),
            r"row slice\(1, 4, None\) reaches beyond the axis at blocks\.1\.resid_post: it has size 2",
        ),
    ],
    ids=["dims", "heads", "rows"],
)
def test_a_slice_beyond_a_fixed_axis_is_refused(model, hf, ids, site, edit, match):
    _refused(model, hf, ids, edit, match, site=site)


def test_key_position_slices_are_still_clipped_to_the_keys_there_are(model, ids):
    site = "blocks.0.attn.scores"
    clean = _after(model, ids, site=site)
    expected = clean.clone()
    expected[..., 5:] = -1.0
    expected = torch.where(clean == clean.min(), clean, expected)  # masked pairs stay masked
    got = _after(model, ids, Replace(-1.0, dims=slice(5, 20)), site=site)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("make", [Patch, Resample], ids=["patch", "resample"])
def test_a_one_position_source_is_not_broadcast_over_a_longer_forward(model, hf, ids, make):
    # Before: a source recorded from one token was silently written to every position.
    _refused(
        model,
        hf,
        ids,
        make({SITE: _randn(2, 1, D, seed=9)}),
        r"source for blocks\.1\.resid_post has 1 positions but this forward has 9.*source_pos=",
    )


def test_a_mean_over_positions_is_still_broadcast_but_a_per_position_one_is_not(model, hf, ids):
    reference = _randn(3, 1, D, seed=10)
    clean = _after(model, ids)
    expected = reference.double().mean(0).float().expand_as(clean)
    assert torch.equal(_after(model, ids, Mean({SITE: reference})), expected)
    _refused(
        model,
        hf,
        ids,
        Mean({SITE: reference}, per_position=True),
        r"Mean source for blocks\.1\.resid_post has 1 positions but this forward has 9",
    )


@pytest.mark.parametrize("dtype", ["Tensor", "Size", "nope", 3])
def test_a_saved_tensor_with_an_unknown_dtype_is_refused(dtype):
    record = Add(torch.ones(3)).to_dict()
    record["vector"]["dtype"] = dtype
    with pytest.raises(
        splice.SpliceError, match=rf"cannot decode a tensor with dtype {dtype!r}: expected a torch dtype name"
    ):
        Intervention.from_dict(record)


def test_a_source_recorded_under_inference_mode_can_be_patched_from(model, hf, ids):
    """Regression (found by the peer parity benchmark): inference-mode tensors keep no version
    counter, so the in-place check must not read one."""
    with torch.inference_mode():
        _, source = model.run(ids, record="blocks.1.resid_post")
        patched, _ = model.run(ids, edits={"blocks.1.resid_post": splice.Patch(source)})
        clean = hf(ids).logits
    assert torch.equal(patched, clean)
