"""Positions are absolute during generation: cached and uncached decoding agree under any edit,
suffix edits steer every generated token, prompt edits apply once, padding is never edited."""

import pytest
import torch
from conftest import build
from families import FAMILIES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import Cache, DynamicCache

import splice
from splice import strategies as sst
from splice.engine.frame import Frame

PROMPT, NEW = 6, 5


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def gen(request):
    hf = build(request.param)
    with torch.no_grad():  # sharpen the output distribution so greedy choices have clear margins
        hf.get_output_embeddings().weight.mul_(8)
    return splice.Model(hf), hf


def _generate(hf, ids, **kwargs):
    mask = kwargs.pop("attention_mask", torch.ones_like(ids))
    with torch.no_grad():
        return hf.generate(
            ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs
        )


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_cached_and_uncached_generation_agree_under_any_edit(gen, data):
    model, hf = gen
    ids = torch.randint(
        1, 90, (2, PROMPT), generator=torch.Generator().manual_seed(data.draw(st.integers(0, 99)))
    )
    edits = data.draw(sst.edits(model, PROMPT + NEW, 2, max_sites=2, negative=False))
    with model.edit(edits):
        cached = _generate(hf, ids, use_cache=True)
        uncached = _generate(hf, ids, use_cache=False)
    assert torch.equal(cached, uncached), edits


def test_suffix_edit_steers_every_generated_token(gen):
    model, hf = gen
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    marker = torch.full((model.dims.d_model,), 0.25)
    with (
        model.edit({"blocks.1.resid_post": splice.Replace(marker, pos=slice(PROMPT, None))}),
        model.record("blocks.1.resid_post", mode="accumulate") as rec,
    ):
        _generate(hf, ids)
    steps = rec["blocks.1.resid_post"]
    assert len(steps) == NEW and steps[0].shape[1] == PROMPT  # prefill, then one token per step
    assert not torch.any(steps[0] == 0.25)  # the prompt is untouched
    for step in steps[1:]:
        assert step.shape[1] == 1 and torch.all(step == 0.25)


def test_prompt_edit_applies_once_and_persists_through_the_cache(gen):
    model, hf = gen
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(1))
    edit = {"blocks.0.resid_post": splice.Replace(torch.full((model.dims.d_model,), 3.0), pos=2)}
    with (
        model.edit(edit),
        model.record(["blocks.0.resid_post", "blocks.1.resid_post"], mode="accumulate") as rec,
    ):
        steered = _generate(hf, ids)
    steps = rec["blocks.0.resid_post"]
    assert torch.all(steps[0][:, 2] == 3.0) and not torch.any(steps[0][:, 3:] == 3.0)
    assert all(not torch.any(step == 3.0) for step in steps[1:])  # not re-applied while decoding
    # ... yet its effect persists: later tokens attend to the edited position through the cache.
    with model.record("blocks.1.resid_post", mode="accumulate") as clean:
        plain = _generate(hf, ids)
    if torch.equal(plain, steered):
        for a, b in zip(rec["blocks.1.resid_post"][1:], clean["blocks.1.resid_post"][1:]):
            assert not torch.allclose(a, b)
    with model.edit(edit):
        assert torch.equal(steered, _generate(hf, ids, use_cache=False))


def test_left_padded_batch_counts_positions_per_row_and_never_edits_padding(gen):
    model, hf = gen
    g = torch.Generator().manual_seed(2)
    short, long = torch.randint(1, 90, (1, 4), generator=g), torch.randint(1, 90, (1, 7), generator=g)
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = (torch.arange(7) >= torch.tensor([[3], [0]])).long()
    edit = {
        "blocks.1.resid_post": splice.Add(
            torch.randn(model.dims.d_model, generator=g) * 3, pos=[1, slice(5, None).start]
        )
    }
    with model.edit(edit):
        together = _generate(hf, batch, attention_mask=mask)
        alone_short = _generate(hf, short)
        alone_long = _generate(hf, long)
    assert torch.equal(together[0, 3:], alone_short[0])
    assert torch.equal(together[1], alone_long[0])
    with torch.no_grad(), model.record("blocks.0.resid_pre") as clean:
        hf(batch, attention_mask=mask)
    with (
        torch.no_grad(),
        model.edit({"blocks.0.resid_pre": splice.Zero()}),
        model.record("blocks.0.resid_pre") as rec,
    ):
        hf(batch, attention_mask=mask)
    x = rec["blocks.0.resid_pre"]
    assert torch.equal(x[0, :3], clean["blocks.0.resid_pre"][0, :3])  # padding untouched
    assert torch.all(x[0, 3:] == 0) and torch.all(x[1] == 0)


def test_negative_positions_are_refused_while_generating(gen):
    model, hf = gen
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(3))
    with pytest.raises(splice.SpliceError, match="negative positions are ambiguous while generating"):
        with model.edit({"blocks.0.resid_post": splice.Zero(pos=-1)}):
            _generate(hf, ids)
    assert model.hook_count == 0
    with torch.no_grad(), model.edit({"blocks.0.resid_post": splice.Zero(pos=-1)}):
        hf(ids)  # fine in a plain forward: -1 is the last token


def test_pattern_edits_cannot_reach_future_keys(gen):
    """Regression (found by the property above): adding to a query's pattern row must leave its
    future keys at 0, or uncached decoding would let early tokens read later ones."""
    model, hf = gen
    if "blocks.0.attn.pattern" not in model.sites:  # inline-attention families: asserted, not skipped
        assert "attn.pattern" not in model.layout.points
        return
    ids = torch.randint(1, 90, (2, PROMPT), generator=torch.Generator().manual_seed(4))
    edits = {"blocks.0.attn.pattern": splice.Add(1.0, pos=0, scale=2.0)}
    with model.edit(edits):
        cached = _generate(hf, ids, use_cache=True)
        uncached = _generate(hf, ids, use_cache=False)
        with model.record("blocks.0.attn.pattern") as rec, torch.no_grad():
            hf(ids)
    assert torch.equal(cached, uncached)
    pattern = rec["blocks.0.attn.pattern"]
    assert torch.all(pattern[:, :, 0, 0] == 3.0)  # query 0 attends only to key 0 (1.0), plus 2.0
    assert torch.all(pattern.triu(1) == 0)  # what the recording shows is what the model used


def _prefill_cache(hf, ids):
    """The KV cache after a prompt, whichever name this transformers release returns it under."""
    with torch.no_grad():
        out = hf(ids, use_cache=True)
    cache = out.get("cache", None) or out.get("past_key_values", None)
    assert isinstance(cache, Cache) and cache.get_seq_length() == ids.shape[1]
    return cache


def test_generate_never_treats_a_decoding_step_as_position_0(gen):
    """Regression (transformers 5.24 renamed the cache keyword and BLOOM's steps carry no
    positions): an edit at pos=0 hits the prompt's first token once, and pos=PROMPT the first
    generated one, never a decoding step's token by mistake."""
    model, hf = gen
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(5))
    first, step = torch.full((model.dims.d_model,), 0.5), torch.full((model.dims.d_model,), 0.75)
    edits = {"blocks.0.resid_post": [splice.Replace(first, pos=0), splice.Replace(step, pos=PROMPT)]}
    with model.edit(edits), model.record("blocks.0.resid_post", mode="accumulate") as rec:
        _generate(hf, ids)
    steps = rec["blocks.0.resid_post"]
    assert len(steps) == NEW and torch.all(steps[0][:, 0] == 0.5) and not torch.any(steps[0][:, 1:] == 0.5)
    assert torch.all(steps[1] == 0.75)
    assert all(not torch.any(s == 0.5) and not torch.any(s == 0.75) for s in steps[2:])


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("keyword", ["cache", "past_key_values"])
def test_a_decoding_step_carrying_only_the_cache_gets_its_absolute_position(gen, keyword):
    """Both spellings of the cache keyword (`past_key_values` up to transformers 5.23, `cache`
    from 5.24), with nothing else to go on: no position_ids, cache_position or attention mask."""
    model, hf = gen
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(6))
    marker = torch.full((model.dims.d_model,), 0.5)
    for pos, hit in ((PROMPT, True), (0, False), (PROMPT - 1, False)):
        cache = _prefill_cache(hf, ids)
        with (
            torch.no_grad(),
            model.edit({"blocks.1.resid_post": splice.Replace(marker, pos=pos)}),
            model.record("blocks.1.resid_post") as rec,
        ):
            hf(input_ids=ids[:, :1], use_cache=True, **{keyword: cache})  # the token at position PROMPT
        assert bool(torch.all(rec["blocks.1.resid_post"] == 0.5)) is hit, (keyword, pos)


def test_past_length_is_read_from_any_cache_object_or_refused():
    cache = DynamicCache()
    k = torch.zeros(1, 2, 4, 8)
    cache.update(k, k, 0)
    ids = torch.ones(1, 1, dtype=torch.long)
    for kwargs, args in (
        ({"cache": cache}, ()),
        ({"past_key_values": cache}, ()),
        ({"kv_state_2030": cache}, ()),
        ({}, (ids, cache)),
    ):
        frame = Frame.from_call(args, {"input_ids": ids, **kwargs})
        assert frame.past == 4 and frame.cached and int(frame.positions()[0][0, 0]) == 4
    # A cache splice cannot read and nothing else to go on: refused, not assumed to start at 0.
    legacy = ((k, k),)
    with pytest.raises(splice.SpliceError, match=r"past_key_values.*cannot tell how many tokens came before"):
        Frame.from_call((), {"input_ids": ids, "past_key_values": legacy})
    assert (
        Frame.from_call(
            (), {"input_ids": ids, "past_key_values": legacy, "cache_position": torch.tensor([4])}
        ).past
        == 4
    )
    mask = torch.ones(1, 5, dtype=torch.long)
    assert Frame.from_call((), {"input_ids": ids, "cache": legacy, "attention_mask": mask}).past == 4
    assert Frame.from_call((), {"input_ids": ids, "use_cache": True}).past == 0  # a plain forward


def test_generate_refuses_an_edit_at_a_position_it_never_reaches(gen):
    """`run` refuses a position beyond the sequence; `generate` knows where it ends, so it refuses
    one beyond prompt + max_new_tokens before it starts instead of never applying it."""
    model, hf = gen
    ids = torch.randint(1, 90, (1, PROMPT), generator=torch.Generator().manual_seed(7))
    last = PROMPT + NEW - 1
    for pos in (last + 1, [2, last + 4], slice(last + 1, None)):
        with pytest.raises(
            splice.SpliceError,
            match=rf"selects position {last + 1 if pos != [2, last + 4] else last + 4}.*ends at position {last}",
        ):
            model.generate(ids, edits={"blocks.0.resid_post": splice.Zero(pos=pos)}, max_new_tokens=NEW)
        assert model.hook_count == 0
    out = model.generate(
        ids, edits={"blocks.0.resid_post": splice.Zero(pos=[2, last])}, max_new_tokens=NEW, return_tokens=True
    )
    assert out.shape == (1, PROMPT + NEW)
