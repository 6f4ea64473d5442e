"""splice.analysis on every family: decompositions sum to the recorded residual (also under
random edits), per-head components sum to the layer's attention, accumulated ends at the target,
frozen-norm direct logit attribution sums to the logit difference HF itself returns, and bad
arguments are refused before any forward."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import CharTokenizer, build
from families import FAMILIES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import splice
from splice import analysis
from splice import strategies as sst

BATCH, SEQ = 2, 9
LEARNED_POSITIONS = {"gpt2", "opt"}  # families that add a learned positional embedding


def close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> bool:
    """Equal within `rel` of the target's largest entry (float32 sums in another order)."""
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max()) <= rel * max(1.0, float(want.abs().max()))


def residual_sites(model) -> list[str]:
    points = ["resid_pre", "resid_post"] + ([] if model.layout.parallel_residual else ["resid_mid"])
    return [f"blocks.{layer}.{p}" for layer in range(model.dims.n_layers) for p in points]


def hf_logit_diff(hf, family, ids, correct, wrong, position=-1):
    """The logit difference from HF's own forward (Gemma2: its soft-cap undone)."""
    with torch.no_grad():
        logits = hf(ids).logits[:, position].double()
    cap = getattr(hf.config, "final_logit_softcapping", None) if family == "gemma2" else None
    if cap:
        logits = cap * torch.atanh(logits / cap)
    return logits[torch.arange(len(ids)), correct] - logits[torch.arange(len(ids)), wrong]


@contextlib.contextmanager
def no_forward(hf):
    """Fail if the model runs inside (errors must come before any forward)."""
    calls = []
    handle = hf.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        yield
    finally:
        handle.remove()
    assert not calls, "the model ran before the error"


# -- decompose -------------------------------------------------------------------------------
@pytest.mark.parametrize("by", ["layers", "heads"])
def test_decomposition_sums_to_every_residual_site(model, ids, by):
    sites = residual_sites(model)
    _, rec = model.run(ids, record=sites)
    for site in sites:
        parts = analysis.decompose(model, ids, upto=site, by=by)
        assert parts.target == site
        assert parts.components.shape[1:] == (BATCH, SEQ, model.dims.d_model)
        assert close(parts.sum(), rec[site]), site
    final = analysis.decompose(model, ids, by=by)
    assert not final.components.requires_grad  # computed without gradients, parameters included
    assert final.target == f"blocks.{model.dims.n_layers - 1}.resid_post"
    assert close(final.sum(), rec[final.target])


def test_components_are_the_recorded_contributions(model, ids):
    n = model.dims.n_layers
    _, rec = model.run(ids, record=["embed", "blocks.*.attn.out", "blocks.*.mlp.out"])
    parts = analysis.decompose(model, ids, upto=("resid_post", -1))
    sublayers = [f"blocks.{layer}.{s}.out" for layer in range(n) for s in ("attn", "mlp")]
    embed = ["embed.token", "embed.pos"] if model.layout.arch.name in LEARNED_POSITIONS else ["embed"]
    assert parts.labels == embed + sublayers
    for name in sublayers:
        assert torch.equal(parts[name], rec[name])
    assert close(sum(parts[label] for label in embed), rec["embed"])


def test_the_embedding_is_split_where_positions_are_learned(model, hf, ids, family):
    parts = analysis.decompose(model, ids, upto="blocks.0.resid_pre")
    if family not in LEARNED_POSITIONS:
        assert parts.labels == ["embed"]
        return
    assert parts.labels == ["embed.token", "embed.pos"]
    assert torch.equal(parts["embed.token"], hf.get_input_embeddings()(ids))
    if family == "gpt2":  # position p reads row p of wpe
        want = hf.transformer.wpe.weight[:SEQ].expand(BATCH, -1, -1)
    else:  # OPT's learned positions are offset by 2
        want = hf.model.decoder.embed_positions.weight[2 : SEQ + 2].expand(BATCH, -1, -1)
    assert close(parts["embed.pos"], want)


def test_heads_sum_to_the_layers_attention(model, ids, family):
    by_layer = analysis.decompose(model, ids)
    by_head = analysis.decompose(model, ids, by="heads")
    for layer in range(model.dims.n_layers):
        heads = [f"blocks.{layer}.attn.head.{h}" for h in range(model.dims.n_heads)]
        assert all(label in by_head.labels for label in heads)
        total = sum(by_head[label] for label in heads)
        if f"blocks.{layer}.attn.bias" in by_head.labels:
            total = total + by_head[f"blocks.{layer}.attn.bias"]
        assert close(total, by_layer[f"blocks.{layer}.attn.out"]), layer
    assert by_head["blocks.0.attn.head.0"].abs().max() > 0


def test_heads_are_z_times_w_o_where_nothing_follows_the_projection(model, ids, family):
    if family == "gemma2":  # its post-attention norm follows: covered by the sum test above
        return
    layer, head = model.dims.n_layers - 1, 1
    _, rec = model.run(ids, record=f"blocks.{layer}.attn.z")
    z = rec[f"blocks.{layer}.attn.z"][:, :, head]
    want = z @ model.W_O[layer, head]
    got = analysis.decompose(model, ids, by="heads")[f"blocks.{layer}.attn.head.{head}"]
    assert close(got, want)


def test_only_the_layers_asked_for_are_split(model, ids):
    parts = analysis.decompose(model, ids, by="heads", layers=[-1])
    last = model.dims.n_layers - 1
    assert not any(p.kind == "head" and p.layer != last for p in parts.parts)
    assert sum(p.kind == "head" for p in parts.parts) == model.dims.n_heads
    assert "blocks.0.attn.out" in parts.labels


def test_accumulated_ends_at_the_target(model, ids):
    n = model.dims.n_layers
    sites = residual_sites(model)
    _, rec = model.run(ids, record=sites)
    acc = analysis.accumulated(model, ids)
    assert acc.labels == tuple(f"blocks.{layer}.resid_pre" for layer in range(n)) + (
        f"blocks.{n - 1}.resid_post",
    )
    for label in acc.labels:
        assert close(acc[label], rec[label]), label
    with_mid = analysis.accumulated(model, ids, upto="blocks.1.resid_post", mid=True)
    if model.layout.parallel_residual:  # no resid_mid
        assert with_mid.labels == ("blocks.0.resid_pre", "blocks.1.resid_pre", "blocks.1.resid_post")
    else:
        assert with_mid.labels == (
            "blocks.0.resid_pre",
            "blocks.0.resid_mid",
            "blocks.1.resid_pre",
            "blocks.1.resid_mid",
            "blocks.1.resid_post",
        )
        assert close(with_mid["blocks.1.resid_mid"], rec["blocks.1.resid_mid"])
    assert close(with_mid.resid[-1], rec["blocks.1.resid_post"])
    pre = analysis.accumulated(model, ids, upto="blocks.1.resid_pre")
    assert pre.labels == ("blocks.0.resid_pre", "blocks.1.resid_pre")


def test_table_lists_every_component(model, ids):
    parts = analysis.decompose(model, ids, by="heads", layers=0)
    table = parts.table()
    assert list(table["component"]) == parts.labels
    assert (table["norm"] >= 0).all() and table["norm"].notna().all()
    assert table.loc[table["kind"] == "head", "head"].tolist() == list(range(model.dims.n_heads))


# -- under edits -----------------------------------------------------------------------------
EDIT_SETTINGS = settings(
    max_examples=6,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def edited_setup(request):
    hf = build(request.param)
    ids = torch.randint(1, 90, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))
    return splice.Model(hf), ids


@EDIT_SETTINGS
@given(data=st.data())
def test_decomposition_sums_under_random_edits(edited_setup, data):
    model, ids = edited_setup
    edits = data.draw(sst.edits(model, SEQ, BATCH, max_sites=3), label="edits")
    target = data.draw(st.sampled_from(residual_sites(model)), label="upto")
    by = data.draw(st.sampled_from(["layers", "heads"]), label="by")
    _, rec = model.run(ids, edits=edits, record=target)
    parts = analysis.decompose(model, ids, upto=target, by=by, edits=edits)
    assert close(parts.sum(), rec[target], rel=2e-5), (edits, target, by)
    assert model.hook_count == 0


@pytest.mark.parametrize(
    "site", ["blocks.1.resid_pre", "blocks.0.resid_post", "blocks.1.attn.out", "embed", "blocks.1.resid_mid"]
)
def test_an_edit_between_components_is_a_component(model, ids, site):
    if site.endswith("resid_mid") and model.layout.parallel_residual:
        return
    v = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(0))
    edits = {site: splice.Add(v, pos=3)}
    _, rec = model.run(ids, edits=edits, record="blocks.1.resid_post")
    parts = analysis.decompose(model, ids, upto="blocks.1.resid_post", by="heads", edits=edits)
    assert close(parts.sum(), rec["blocks.1.resid_post"])
    if site == "embed":  # the edited embedding is one component, not split
        assert parts.labels[0] == "embed"
        return
    name = f"edit:{site}"
    assert name in parts.labels
    change = parts[name]
    assert close(change[:, 3], v.expand(BATCH, -1), rel=1e-4)
    assert float(change[:, [0, 1, 2, 4]].abs().max()) < 1e-4


# -- direct logit attribution ----------------------------------------------------------------
def _data(ids, correct=(3, 5), wrong=(7, 11)):
    return [{"input_ids": row.tolist(), "correct": c, "wrong": w} for row, c, w in zip(ids, correct, wrong)]


@pytest.mark.parametrize("by", ["layers", "heads"])
def test_frozen_attribution_sums_to_hfs_logit_diff(model, hf, ids, family, by):
    table = analysis.logit_attribution(model, _data(ids), by=by, per_prompt=True, pos=[-1, 4])
    want = {
        p: hf_logit_diff(hf, family, ids, torch.tensor([3, 5]), torch.tensor([7, 11]), p) for p in (-1, 4)
    }
    for (prompt, pos), rows in table.groupby(["prompt", "pos"]):
        assert abs(rows["value"].sum() - float(want[pos][prompt])) < 1e-4, (prompt, pos)
        assert abs(rows["model"].iloc[0] - float(want[pos][prompt])) < 1e-4
        assert abs(rows["total"].iloc[0] - rows["value"].sum()) < 1e-4
    mean = analysis.logit_attribution(model, _data(ids), by=by)
    assert abs(mean["value"].sum() - float(want[-1].mean())) < 1e-4
    assert set(mean["metric"]) == {"logit_diff"} and set(mean["pos"]) == {-1}
    kinds = set(mean["kind"])
    assert ("head" in kinds) == (by == "heads") and "mlp" in kinds
    assert ("final_norm.bias" in set(mean["component"])) == (
        family not in {"gemma", "gemma2", "llama", "mistral", "phi3", "qwen2"}
    )
    assert ("lm_head.bias" in set(mean["component"])) == (family == "gptj")


def test_padded_prompts_are_read_at_their_own_positions(model, hf, family):
    rows = [[5, 9, 13, 2, 7, 21], [8, 3, 30]]  # left-padded into one batch
    data = [{"input_ids": r, "correct": 3, "wrong": 7} for r in rows]
    table = analysis.logit_attribution(model, data, by="heads", pos=[0, -1], per_prompt=True)
    for prompt, row in enumerate(rows):
        for pos in (0, -1):
            want = hf_logit_diff(hf, family, torch.tensor([row]), torch.tensor([3]), torch.tensor([7]), pos)
            got = table[(table["prompt"] == prompt) & (table["pos"] == pos)]["value"].sum()
            assert abs(got - float(want[0])) < 1e-4, (prompt, pos)


def test_frozen_attribution_of_a_head_by_hand(model, hf, ids, family):
    """One head's value from the recorded z, W_O and HF's norm modules: its result (for Gemma2
    through the post-attention norm at the real attention output's scale), centred (LayerNorm)
    and divided by the final norm's scale at the real final residual, read along the final norm's
    gain times W_U[c] - W_U[w]."""
    layer, head, last = 1, 2, model.dims.n_layers - 1
    table = analysis.logit_attribution(model, _data(ids), by="heads", per_prompt=True)
    got = table[table["component"] == f"blocks.{layer}.attn.head.{head}"].sort_values("prompt")["value"]
    _, rec = model.run(ids, record=[f"blocks.{layer}.attn.z", f"blocks.{last}.resid_post"])

    def rms_gain(norm):  # Gemma's RMS norms scale by 1 + weight
        return norm.weight.double() + (1.0 if family in {"gemma", "gemma2"} else 0.0)

    def rms_eps(norm):
        return getattr(norm, "eps", getattr(norm, "variance_epsilon", None))

    with torch.no_grad():
        z = rec[f"blocks.{layer}.attn.z"][:, -1].double()  # [batch, head, d_head]
        w_o = model.W_O[layer].double()  # [head, d_head, d_model]
        result = z[:, head] @ w_o[head]
        if family == "gemma2":
            post = hf.model.layers[layer].post_attention_layernorm
            projected = torch.einsum("bhe,hed->bd", z, w_o)
            result = result / (projected.pow(2).mean(-1, keepdim=True) + post.eps).sqrt() * rms_gain(post)
        hidden = rec[f"blocks.{last}.resid_post"][:, -1].double()
        norm = model.layout.module_at(model.layout.points["final_norm"].module)
        w_u = hf.get_output_embeddings().weight.double()  # [vocab, d_model]
        direction = w_u[[3, 5]] - w_u[[7, 11]]
        if isinstance(norm, torch.nn.LayerNorm):
            hidden = hidden - hidden.mean(-1, keepdim=True)
            scale = (hidden.pow(2).mean(-1) + norm.eps).sqrt()
            result, gain = result - result.mean(-1, keepdim=True), norm.weight.double()
        else:
            scale, gain = (hidden.pow(2).mean(-1) + rms_eps(norm)).sqrt(), rms_gain(norm)
        want = (result * gain * direction).sum(-1) / scale
    assert torch.allclose(torch.tensor(got.to_numpy()), want, atol=1e-5), (got, want)


def test_recomputed_puts_each_component_through_the_norm_alone(model, hf, ids):
    table = analysis.logit_attribution(model, _data(ids), norm="recomputed", per_prompt=True)
    parts = analysis.decompose(model, ids)
    norm = model.layout.module_at(model.layout.points["final_norm"].module)
    w_u = hf.get_output_embeddings().weight
    direction = w_u[[3, 5]] - w_u[[7, 11]]
    with torch.no_grad():
        mlp = parts["blocks.0.mlp.out"][:, -1]
        want = ((norm(mlp) - norm(torch.zeros_like(mlp))) * direction).sum(-1)
    got = table[table["component"] == "blocks.0.mlp.out"].sort_values("prompt")["value"].to_numpy()
    assert torch.allclose(torch.tensor(got), want.double(), atol=1e-5)


def test_token_and_tensor_directions(model, hf, ids, family):
    single = analysis.logit_attribution(model, _data(ids), direction=("correct",), per_prompt=True)
    with torch.no_grad():
        logits = hf(ids).logits[:, -1].double()
    if family == "gemma2":
        cap = hf.config.final_logit_softcapping
        logits = cap * torch.atanh(logits / cap)
    sums = single.groupby("prompt")["value"].sum().to_numpy()
    assert set(single["metric"]) == {"logit"}
    assert abs(sums - logits[[0, 1], [3, 5]].numpy()).max() < 1e-4
    pair = analysis.logit_attribution(model, _data(ids), direction=(3, "wrong"), per_prompt=True)
    assert (
        abs(
            pair.groupby("prompt")["value"].sum().to_numpy()
            - (logits[[0, 1], 3] - logits[[0, 1], [7, 11]]).numpy()
        ).max()
        < 1e-4
    )
    vec = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(4))
    along = analysis.logit_attribution(model, _data(ids), direction=vec, per_prompt=True)
    _, rec = model.run(ids, record="final_norm")
    want = (rec["final_norm"][:, -1] @ vec).double().numpy()
    assert set(along["metric"]) == {"direction"}
    assert abs(along.groupby("prompt")["value"].sum().to_numpy() - want).max() < 1e-4


def test_attribution_under_edits_sums_to_the_edited_run(model, ids):
    v = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(5))
    edits = {
        "blocks.0.resid_post": splice.Add(v),
        "final_norm": splice.Scale(0.5),
        "blocks.1.attn.z": splice.Zero(heads=0),
    }
    table = analysis.logit_attribution(model, _data(ids), by="heads", edits=edits, per_prompt=True)
    with torch.no_grad():
        logits, _ = model.run(ids, edits=edits)
    want = (logits[[0, 1], -1, [3, 5]] - logits[[0, 1], -1, [7, 11]]).double()
    if model.layout.logits_transform is not None:  # Gemma2: compare before the soft-cap
        cap = model.hf.config.final_logit_softcapping
        want = cap * torch.atanh(logits[:, -1].double() / cap)
        want = want[[0, 1], [3, 5]] - want[[0, 1], [7, 11]]
    assert abs(table.groupby("prompt")["value"].sum().to_numpy() - want.numpy()).max() < 1e-4
    assert {"edit:blocks.0.resid_post", "edit:final_norm"} <= set(table["component"])
    zeroed = table[table["component"] == "blocks.1.attn.head.0"]["value"]
    assert (zeroed.abs() < 1e-6).all()


def test_pivot_and_grid_lay_heads_out(model, ids):
    table = analysis.logit_attribution(model, _data(ids), by="heads")
    grid = table.pipe(analysis.pivot)
    assert grid.shape == (model.dims.n_layers, model.dims.n_heads)
    heads = table[table["kind"] == "head"]
    assert grid.loc[1, 2] == pytest.approx(
        float(heads[heads["component"] == "blocks.1.attn.head.2"]["value"].iloc[0])
    )
    assert splice.grid(heads, value="value").equals(grid)
    layers = analysis.logit_attribution(model, _data(ids), pos=[-1, 0]).pipe(analysis.pivot, pos=0)
    assert list(layers.columns) == ["attn", "mlp"] and list(layers.index) == list(range(model.dims.n_layers))


# -- hostile input ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "upto, expected",
    [
        ("blocks.99.resid_post", "out of range"),
        ("blocks.0.attn.out", "names blocks.0.attn.out"),
        ("banana", "upto must be 'final'"),
        (3, "got 3"),
        ("blocks.*.resid_post", "names blocks.0.resid_post"),
    ],
)
def test_unknown_upto_is_refused_before_any_forward(model, hf, ids, upto, expected):
    with no_forward(hf), pytest.raises(splice.SpliceError, match="upto must be") as error:
        analysis.decompose(model, ids, upto=upto)
    assert expected in str(error.value)


def test_bad_arguments_are_refused_before_any_forward(model, hf, ids, family):
    data = _data(ids)
    cases = [
        (lambda: analysis.decompose(model, ids, by="head"), "by must be 'layers' or 'heads'; got 'head'"),
        (lambda: analysis.decompose(model, ids, layers=[0]), "needs by='heads'"),
        (
            lambda: analysis.decompose(model, ids, upto="blocks.0.resid_post", by="heads", layers=[1]),
            "after the target",
        ),
        (lambda: analysis.decompose(model, ids, edits={"blocks.0.resid_pots": splice.Zero()}), "resid_pots"),
        (lambda: analysis.accumulated(model, ids, mid="yes"), "mid must be True or False"),
        (
            lambda: analysis.logit_attribution(model, data, norm="freeze"),
            "norm must be 'frozen' or 'recomputed'; got 'freeze'",
        ),
        (lambda: analysis.logit_attribution(model, data, by="neurons"), "by must be"),
        (
            lambda: analysis.logit_attribution(model, data, direction=torch.ones(5)),
            f"[d_model={model.dims.d_model}]",
        ),
        (
            lambda: analysis.logit_attribution(model, data, direction=torch.ones(3, model.dims.d_model)),
            "one row per data row",
        ),
        (
            lambda: analysis.logit_attribution(model, data, direction=torch.ones(4, dtype=torch.long)),
            "floats",
        ),
        (lambda: analysis.logit_attribution(model, data, direction=("correct", "wrng")), "'wrng' is missing"),
        (lambda: analysis.logit_attribution(model, data, direction=("a", "b", "c")), "(correct, wrong)"),
        (lambda: analysis.logit_attribution(model, data, direction=" Mary"), "needs a tokenizer"),
        (
            lambda: analysis.logit_attribution(model, data, direction=[0.5, 1.0]),
            "data field names or token ids",
        ),
        (lambda: analysis.logit_attribution(model, data, direction=(3, 10_000)), "out of range"),
        (lambda: analysis.logit_attribution(model, data, pos=SEQ), f"pos {SEQ} is out of range"),
        (lambda: analysis.logit_attribution(model, data, pos=[]), "non-empty list"),
        (
            lambda: analysis.logit_attribution(model, data, edits={"logits": splice.Zero()}),
            "edit of the 'logits' site",
        ),
        (lambda: analysis.logit_attribution(model, data, batch_size=0), "batch_size"),
        (
            lambda: analysis.logit_attribution(model, [data[0], {"input_ids": [1, 2]}]),
            "missing from data rows [1]",
        ),
    ]
    for call, expected in cases:
        with no_forward(hf), pytest.raises(splice.SpliceError) as error:
            call()
        assert expected in str(error.value), (expected, str(error.value))


def test_a_direction_that_is_not_one_token_is_refused(hf, ids):
    model = splice.Model(hf, CharTokenizer())  # one token per character
    data = [{"prompt": "abc", "correct": "x", "wrong": "yz"}]
    with no_forward(hf), pytest.raises(splice.SpliceError, match=r"'yz' is 2 tokens"):
        analysis.logit_attribution(model, data)
    with no_forward(hf), pytest.raises(splice.SpliceError, match=r"'no' is 2 tokens"):
        analysis.logit_attribution(model, ["abc"], direction="no")
    table = analysis.logit_attribution(model, ["abc", "de"], direction="x")
    assert set(table["metric"]) == {"logit"}
    pair = analysis.logit_attribution(model, [{"prompt": "abc", "correct": "x", "wrong": "y"}])
    assert set(pair["metric"]) == {"logit_diff"}


def test_heads_refuse_training_mode(model, hf, ids):
    hf.train()
    try:
        with no_forward(hf), pytest.raises(splice.SpliceError, match="eval mode"):
            analysis.decompose(model, ids, by="heads")
    finally:
        hf.eval()
