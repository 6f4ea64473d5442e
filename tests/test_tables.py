"""One baseline vocabulary in every table, the grid view, heatmap labels, and model identity."""

import warnings

import pandas as pd
import pytest
import torch
from conftest import CharTokenizer, build

import splice
from splice import metrics
from splice.loading import identity, weights_sha256
from splice.patching import attribution, patch_sweep

PAIRS = [("abcab", "abcbb"), ("bcabc", "bcbbc")]
PATCH_DATA = [{"prompt": corrupt, "clean": clean, "correct": "a", "wrong": "b"} for clean, corrupt in PAIRS]
SWEEP_DATA = [{"prompt": p, "correct": "a", "wrong": "c"} for p in ["abcdefg", "bcdefgh"]]


@pytest.fixture(scope="module")
def model():
    return splice.Model(build("llama"), CharTokenizer())


@pytest.fixture(scope="module")
def head_table(model):
    sweep = splice.Sweep(
        sites="blocks.*.attn.z",
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff(), metrics.kl_from_baseline()],
    )
    return sweep.run(model, SWEEP_DATA, progress=False)


@pytest.fixture(scope="module")
def patch_table(model):
    return patch_sweep(model, PATCH_DATA, "blocks.*.resid_pre", "pos", [metrics.logit_diff()], progress=False)


def _unedited(model, prompts, metric_fn):
    """The metric on the prompts' plain HF forward: the independent baseline."""
    with torch.no_grad():
        values = []
        for p in prompts:
            logits = model.hf(model.to_tokens(p)).logits[0, -1]
            values.append(metric_fn(logits))
    return sum(values) / len(values)


def _logit_diff(model):
    a, b = model.to_single_token("a"), model.to_single_token("b")
    return lambda last: float(last[a] - last[b])


def test_no_table_names_a_column_after_a_prompt(head_table, patch_table, model):
    approx = attribution(model, PATCH_DATA, "blocks.*.resid_pre", "pos", [metrics.logit_diff()])
    for table in (head_table, patch_table, approx):
        assert {"value", "baseline", "effect", "relative"} <= set(table.columns)
        assert not {"clean", "corrupt"} & set(table.columns)
        assert set(table[table.variant == -1].site) == {"baseline"}
        assert (table.effect - (table.value - table.baseline)).abs().max() < 1e-12
    assert {"source", "normalised"} <= set(patch_table.columns) and "source" not in head_table.columns


def test_patching_baseline_is_the_unpatched_prompt_and_source_the_clean_one(model, patch_table):
    metric = _logit_diff(model)
    corrupt = _unedited(model, [d["prompt"] for d in PATCH_DATA], metric)
    clean = _unedited(model, [d["clean"] for d in PATCH_DATA], metric)
    assert patch_table.baseline.iloc[0] == pytest.approx(corrupt, abs=1e-5)
    assert patch_table.source.iloc[0] == pytest.approx(clean, abs=1e-5)
    cells = patch_table[patch_table.variant >= 0]
    expected = (cells.value - cells.baseline) / (cells.source - cells.baseline)
    assert (cells.normalised - expected).abs().max() < 1e-9
    # Patching the whole residual stream at layer 0 turns the corrupted run into the clean one.
    whole = patch_sweep(
        model, PATCH_DATA, "blocks.0.resid_pre", "pos", [metrics.logit_diff()], progress=False
    )
    assert whole[whole.variant >= 0].normalised.notna().all()


def test_kl_from_clean_is_a_deprecated_name_for_kl_from_baseline(head_table):
    with pytest.warns(DeprecationWarning, match="kl_from_baseline"):
        old = metrics.kl_from_clean(2)
    new = metrics.kl_from_baseline(2)
    assert old.name == new.name == "kl_from_baseline" and tuple(old.spec) == tuple(new.spec)
    assert "kl_from_baseline" in set(head_table.metric)


def test_grid_lays_out_the_table_by_layer_and_head(model, head_table):
    grid = splice.grid(head_table, metric="logit_diff")
    d = model.dims
    assert grid.shape == (d.n_layers, d.n_heads)
    assert list(grid.index) == list(range(d.n_layers)) and list(grid.columns) == list(range(d.n_heads))
    for _, row in head_table[(head_table.variant >= 0) & (head_table.metric == "logit_diff")].iterrows():
        assert grid.loc[row.layer, row["head"]] == row.effect
    assert head_table.pipe(splice.grid, metric="logit_diff", value="value").equals(
        splice.grid(head_table, "logit_diff", "value")
    )


def test_grid_over_positions_and_numeric_order(patch_table):
    grid = splice.grid(patch_table, value="normalised")
    assert grid.columns.name == "pos" and list(grid.columns) == sorted(grid.columns)
    # Numeric, not lexical, order of layers: build a table with layers 0..11.
    rows = [
        {
            "variant": -1,
            "metric": "m",
            "layer": None,
            "head": None,
            "pos": None,
            "site": "baseline",
            "effect": 0.0,
        }
    ]
    rows += [
        {
            "variant": i,
            "metric": "m",
            "layer": l,
            "head": 0,
            "pos": None,
            "site": f"blocks.{l}.attn.z",
            "effect": float(l),
        }
        for i, l in enumerate([10, 2, 11, 0, 1])
    ]
    assert list(splice.grid(pd.DataFrame(rows)).index) == [0, 1, 2, 10, 11]


def test_grid_refuses_what_it_cannot_lay_out(head_table, model):
    with pytest.raises(splice.SpliceError, match="metrics .*logit_diff.*kl_from_baseline.*pass metric="):
        splice.grid(head_table)
    with pytest.raises(splice.SpliceError, match="'nope' is not in the table"):
        splice.grid(head_table, metric="nope")
    with pytest.raises(splice.SpliceError, match="missing \\['normalised'\\]"):
        splice.grid(head_table, metric="logit_diff", value="normalised")
    per_site = splice.Sweep(
        sites="blocks.*.mlp.out", interventions=splice.Zero(), metrics=[metrics.logit_diff()]
    ).run(model, SWEEP_DATA, progress=False)
    with pytest.raises(splice.SpliceError, match="neither heads nor positions"):
        splice.grid(per_site)
    two_sites = splice.Sweep(
        sites=["blocks.*.attn.q", "blocks.*.attn.z"],
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff()],
    ).run(model, SWEEP_DATA, progress=False)
    with pytest.raises(splice.SpliceError, match="share a \\(layer, head\\) cell.*attn.q.*attn.z"):
        splice.grid(two_sites)
    with pytest.raises(splice.SpliceError, match="needs a sweep or patching table"):
        splice.grid(pd.DataFrame({"a": [1]}))


def test_heatmap_colour_bar_names_the_baseline_and_the_source(monkeypatch, head_table, patch_table, tmp_path):
    seen = {}
    monkeypatch.setattr(splice.plot, "heatmap", lambda values, path, **kw: seen.update(kw, values=values))
    splice.plot.sweep_heatmap(head_table, tmp_path / "a.png", metric="logit_diff")
    base = head_table[(head_table.variant == -1) & (head_table.metric == "logit_diff")].value.iloc[0]
    assert seen["colorbar"] == f"logit_diff effect (baseline {base:.3g})" and "clean" not in seen["colorbar"]
    splice.plot.sweep_heatmap(patch_table, tmp_path / "b.png", value="normalised", xticklabels=list("abcde"))
    assert seen["colorbar"] == "logit_diff normalised (0 = baseline, 1 = source)"
    assert seen["xticklabels"] == list("abcde") and seen["xlabel"] == "pos"
    with pytest.raises(splice.SpliceError, match="xticklabels has 2 labels for 5 pos columns"):
        splice.plot.sweep_heatmap(patch_table, tmp_path / "c.png", xticklabels=["a", "b"])


def test_sweep_heatmap_writes_a_picture(head_table, tmp_path):
    path = splice.plot.sweep_heatmap(head_table, tmp_path / "heads.png", metric="logit_diff")
    assert path.stat().st_size > 1000


def test_identity_is_the_weights_not_the_path():
    a, b = build("gpt2", seed=0), build("gpt2", seed=0)
    assert weights_sha256(a) == weights_sha256(b) and len(weights_sha256(a)) == 64
    with torch.no_grad():
        b.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3
    assert weights_sha256(a) != weights_sha256(b)
    half = build("gpt2", seed=0).to(torch.bfloat16)
    assert identity(half)["dtype"] == "bfloat16" and identity(a)["dtype"] == "float32"
    assert identity(a)["name"] == "GPT2LMHeadModel" and identity(a)["revision"] is None


def test_a_version_1_steering_file_still_loads(tmp_path):
    import json

    model = splice.Model(build("gpt2"), CharTokenizer())
    sv = splice.steering.contrastive(model, ["ab", "abc"], ["cd", "cde"], "blocks.1.resid_post")
    _, meta = sv.save(tmp_path / "v")
    record = json.loads(meta.read_text())
    record.update(format="splice-steering-vector/1", model="/some/cache/path")
    meta.write_text(json.dumps(record))
    old = splice.steering.SteeringVector.load(tmp_path / "v")
    assert old.model == {"name": "/some/cache/path", "revision": None, "weights_sha256": None, "dtype": None}
    assert torch.equal(old.vector, sv.vector)


@pytest.mark.real
def test_the_embedded_model_says_what_it_is(tmp_path):
    m = splice.load()
    who = identity(m.hf)
    assert who["name"].startswith("SmolLM2-135M-Instruct") and "Q4_1" in who["name"]
    assert who["revision"].startswith("gguf-sha256:") and who["dtype"] == "float32"
    assert "/" not in who["name"].split(" ")[0]  # not a cache path
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sv = splice.steering.contrastive(m, ["I love you"], ["I hate you"], "blocks.3.resid_post")
    assert sv.model == who


def test_plots_leave_the_users_matplotlib_backend_alone(tmp_path):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        splice.plot.heatmap([[0.0, 1.0], [2.0, -1.0]], tmp_path / "h.png", annotate_top=1)
        assert matplotlib.get_backend() == "svg" and (tmp_path / "h.png").stat().st_size > 500
    finally:
        matplotlib.use(before)


def test_rank_correlation_pairs_rows_by_what_they_edit(model, patch_table):
    from splice.patching import rank_correlation

    approx = attribution(model, PATCH_DATA, "blocks.*.resid_pre", "pos", [metrics.logit_diff()])
    rho = rank_correlation(patch_table, approx)
    # Independent: Spearman = Pearson on ranks, computed by hand over the same cells.
    cells = patch_table[patch_table.variant >= 0].merge(
        approx[approx.variant >= 0], on=["site", "pos", "metric"], suffixes=("_e", "_a")
    )
    by_hand = float(cells.effect_e.rank().corr(cells.effect_a.rank()))
    assert rho == pytest.approx(by_hand, abs=1e-12)
    # Renumbering one table's variants changes nothing...
    shuffled = approx.assign(variant=approx.variant.where(approx.variant < 0, 1000 - approx.variant))
    assert rank_correlation(patch_table, shuffled) == pytest.approx(rho, abs=1e-12)
    # ...and tables over different sites are refused instead of paired by number.
    other = patch_sweep(model, PATCH_DATA, "blocks.*.mlp.out", "pos", [metrics.logit_diff()], progress=False)
    with pytest.raises(splice.SpliceError, match="share 0 edited cell"):
        rank_correlation(patch_table, other)
