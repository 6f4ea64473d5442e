"""Token geometry (`splice.geometry`, `splice.plot.token_scatter`): the token x token correlation
equals numpy's and torch's corrcoef computed independently, labels and batch rows are honoured,
and bad input is refused with what was expected."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import build

import splice
from splice.geometry import correlation, position_labels, site_tokens, token_correlation

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("site", ["blocks.1.resid_post", "blocks.0.mlp.post", "blocks.1.attn.z", "embed"])
def test_correlation_matches_numpy_and_torch(model, ids, site):
    _, cache = model.run(ids, record=site)
    assert cache is not None
    for row in (0, 1):
        acts = cache[site][row].reshape(ids.shape[1], -1)  # [pos, units]
        corr = token_correlation(cache, site, batch_index=row)
        expected = np.corrcoef(acts.double().numpy())
        assert corr.shape == (ids.shape[1], ids.shape[1])
        np.testing.assert_allclose(corr.to_numpy(), expected, rtol=0, atol=1e-12)
        np.testing.assert_allclose(corr.to_numpy(), torch.corrcoef(acts.double()).numpy(), rtol=0, atol=1e-12)
        np.testing.assert_allclose(np.diag(corr.to_numpy()), 1.0, atol=1e-12)


def test_labels_name_rows_and_columns_by_position_and_token():
    m = splice.Model(build("gpt2"))
    ids = torch.tensor([[4, 5, 6]])
    _, cache = m.run(ids, record="blocks.0.resid_post")
    assert cache is not None
    corr = token_correlation(cache, "blocks.0.resid_post", labels=["The", " cat", " cat"])
    assert list(corr.index) == list(corr.columns) == ["0 'The'", "1 ' cat'", "2 ' cat'"]
    assert position_labels(["a", "\n"]) == ["0 'a'", "1 '\\n'"]
    plain = token_correlation(cache, ("resid_post", 0))  # aliases name the same site
    assert list(plain.index) == [0, 1, 2]
    np.testing.assert_array_equal(plain.to_numpy(), corr.to_numpy())
    assert token_correlation(dict(cache), "blocks.0.hook_resid_post").equals(plain)  # a plain dict works


def test_negative_batch_index_and_constant_rows():
    acts = torch.randn(3, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    acts[2, 1] = 7.0  # constant over units: no correlation is defined
    recording = {"blocks.0.resid_post": acts}
    np.testing.assert_allclose(
        token_correlation(recording, "blocks.0.resid_post", batch_index=-2).to_numpy(),
        np.corrcoef(acts[1].numpy()),
        atol=1e-12,
    )
    corr = token_correlation(recording, "blocks.0.resid_post", batch_index=2).to_numpy()
    assert np.isnan(corr[1]).all() and not np.isnan(np.delete(np.delete(corr, 1, 0), 1, 1)).any()
    np.testing.assert_allclose(correlation(torch.tensor([[1.0, 2.0], [2.0, 4.0]])).numpy(), 1.0, atol=1e-15)


def test_bad_input_is_refused_with_what_was_expected():
    m = splice.Model(build("llama"))
    ids = torch.tensor([[1, 2, 3]])
    with m.record(["blocks.0.resid_post", "blocks.0.attn.pattern"]) as cache:
        m(ids)
    with m.record("blocks.0.resid_post", mode="accumulate") as accumulated:
        m(ids)
    with pytest.raises(splice.SpliceError, match=r"\[batch, head, pos, k_pos\]"):
        token_correlation(cache, "blocks.0.attn.pattern")
    with pytest.raises(splice.SpliceError, match="accumulate"):
        token_correlation(accumulated, "blocks.0.resid_post")
    with pytest.raises(splice.SpliceError, match="batch_index 1 is out of range"):
        token_correlation(cache, "blocks.0.resid_post", batch_index=1)
    with pytest.raises(splice.SpliceError, match="labels has 2 entries for 3 positions"):
        token_correlation(cache, "blocks.0.resid_post", labels=["a", "b"])
    with pytest.raises(splice.SpliceError, match="not in the recording"):
        token_correlation(dict(cache), "blocks.1.resid_post")
    with pytest.raises(splice.SpliceError, match="Recording or a"):
        token_correlation(torch.zeros(1, 3, 4), "blocks.0.resid_post")  # type: ignore[arg-type]
    with pytest.raises(splice.SpliceError, match="tok_b=3 is not a position"):
        splice.plot.token_scatter(cache, "blocks.0.resid_post", 0, 3, "x.png")


def test_scatter_and_heatmap_write_pngs(tmp_path):
    m = splice.Model(build("qwen2"))
    ids = torch.tensor([[7, 8, 9, 10]])
    _, cache = m.run(ids, record="blocks.1.resid_post")
    assert cache is not None
    labels = ["a", "b", "c", "d"]
    scatter = splice.plot.token_scatter(
        cache, "blocks.1.resid_post", 0, -1, tmp_path / "geo" / "scatter.png", labels=labels
    )
    assert scatter.read_bytes()[:8] == PNG
    corr = token_correlation(cache, "blocks.1.resid_post", labels=labels)
    assert isinstance(corr, pd.DataFrame)
    picture = splice.plot.heatmap(corr, tmp_path / "geo" / "corr.png", xlabel="token", ylabel="token")
    assert picture.read_bytes()[:8] == PNG
    assert site_tokens(cache, "blocks.1.resid_post").dtype == torch.float64
