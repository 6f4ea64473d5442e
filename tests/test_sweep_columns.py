"""Sweeps whose metrics read only named vocabulary columns (a logit difference) unembed only those
(`splice.sweeps.columns`): the same table as the reference path on every family, the columns
really are all that is unembedded, and a hook or edit on the logits turns the shortcut off."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

import splice
from splice import metrics, patching
from splice.sweeps.columns import NarrowBatch, read_columns
from splice.sweeps.data import batches_of
from splice.sweeps.replay import PrefixReplay, plain_linear

DATA = [
    {"prompt": p, "clean": c, "correct": a, "wrong": b}
    for p, c, a, b in [
        ("abcdefg", "gfedcba", "a", "c"),
        ("bcdef", "fedcb", "d", "a"),
        ("cdefgh", "hgfedc", "e", "f"),
    ]
]
EVERY_COLUMN = dataclasses.replace(metrics.logit_diff(), vocab=None)


def _values(table):
    return torch.tensor(table.value.to_numpy(), dtype=torch.float64)


@pytest.mark.parametrize("reuse", [True, "layers"])
def test_a_logit_difference_sweep_equals_the_reference_on_every_family(char_model, reuse):
    narrow = patching.patch_sweep(
        char_model, DATA, metrics=metrics.logit_diff(), prefix_reuse=reuse, progress=False
    )
    reference = patching.patch_sweep(
        char_model, DATA, metrics=EVERY_COLUMN, prefix_reuse=False, progress=False
    )
    torch.testing.assert_close(_values(narrow), _values(reference), rtol=1e-5, atol=1e-5)
    assert char_model.hook_count == 0


def test_only_the_metrics_columns_are_unembedded(char_gpt2, monkeypatch):
    widths = []
    real = torch.nn.functional.linear

    def counting(x, weight, bias=None):
        if weight.shape[1] == char_gpt2.dims.d_model and weight.shape[0] <= char_gpt2.dims.vocab:
            widths.append(weight.shape[0])
        return real(x, weight, bias)

    monkeypatch.setattr(torch.nn.functional, "linear", counting)
    patching.patch_sweep(char_gpt2, DATA, metrics=metrics.logit_diff(), progress=False)
    batch = batches_of(char_gpt2, DATA, 3)[0]
    columns = read_columns([metrics.logit_diff()], batch)
    assert columns is not None and len(columns) < char_gpt2.dims.vocab
    # The model's own forwards (baselines, recordings) unembed every column; every replay only
    # the columns the logit difference reads.
    assert widths.count(len(columns)) > 0 and set(widths) <= {len(columns), char_gpt2.dims.vocab}


def test_replayed_columns_are_the_full_unembeddings_columns(char_gpt2):
    batch = batches_of(char_gpt2, DATA, 3)[0]
    prefix = PrefixReplay(char_gpt2, batch.kwargs, tail=2)
    columns = torch.tensor([0, 5, 17])
    with torch.no_grad():
        part = prefix.replay([1], 2, columns=columns)
        full = prefix.replay([1], 2)
    assert part.shape == (*full.shape[:-1], 3)
    torch.testing.assert_close(part, full[..., columns], rtol=1e-6, atol=1e-6)


def test_a_hook_or_edit_on_the_logits_holds_in_every_replay(char_gpt2):
    unembed = char_gpt2.hf.get_output_embeddings()
    assert plain_linear(unembed)
    bump = torch.zeros(char_gpt2.dims.vocab)
    bump[char_gpt2.to_single_token("c")] = 3.0  # the wrong answer of one prompt in three
    plain = patching.patch_sweep(char_gpt2, DATA, metrics=metrics.logit_diff(), progress=False)

    def under(context):
        with context():
            narrow = patching.patch_sweep(char_gpt2, DATA, metrics=metrics.logit_diff(), progress=False)
            reference = patching.patch_sweep(
                char_gpt2, DATA, metrics=EVERY_COLUMN, prefix_reuse=False, progress=False
            )
        torch.testing.assert_close(_values(narrow), _values(reference), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(_values(narrow), _values(plain))

    @contextlib.contextmanager
    def torch_hook():  # the user's own hook, changing what the unembedding returns
        handle = unembed.register_forward_hook(lambda module, args, out: out + bump)
        try:
            assert not plain_linear(unembed)
            yield
        finally:
            handle.remove()

    under(torch_hook)
    under(lambda: char_gpt2.edit({"logits": splice.Add(bump)}))  # an edit of the logits site
    assert char_gpt2.hook_count == 0 and plain_linear(unembed)


def test_metrics_that_read_any_column_get_every_column(char_gpt2):
    batch = batches_of(char_gpt2, DATA, 3)[0]
    assert read_columns([metrics.logit_diff(), metrics.answer_logprob("correct")], batch) is None
    assert read_columns([metrics.custom(lambda logits, base, b: logits[:, -1, 0], tail=1)], batch) is None
    ids = read_columns([metrics.logit_diff()], batch)
    narrow = NarrowBatch(batch, ids)
    assert torch.equal(ids[narrow.token_ids("correct")], batch.token_ids("correct"))
    assert len(narrow) == len(batch) and narrow.items is batch.items


def test_a_missing_answer_field_is_still_named(char_gpt2):
    rows = [{k: v for k, v in row.items() if k != "wrong"} for row in DATA]
    with pytest.raises(splice.SpliceError, match="'wrong'.*fields"):
        patching.patch_sweep(char_gpt2, rows, metrics=metrics.logit_diff(), progress=False)
