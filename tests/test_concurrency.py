"""What is active belongs to the execution context: threads and asyncio tasks see only their own
edits, a forward started inside a forward gets its own positions, and every wrapper of one HF
model shares one engine. Each test here failed on splice 0.1 (see the runtime-v2 issue)."""

import asyncio
import sys
import threading

import pytest
import torch
from conftest import build

import splice

FAMILIES_HERE = [
    "llama",
    "gpt2",
    "bloom",
    "gemma2",
]  # GQA, fused qkv, ALiBi/no position ids, logits on the root
ITERATIONS = 150


@pytest.fixture(params=FAMILIES_HERE)
def pair(request):
    hf = build(request.param)
    return splice.Model(hf), hf


@pytest.fixture
def tiny_switches():
    """Make the interpreter switch threads as often as it can, so races show up."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(before)


def _in_threads(*jobs):
    """Run each job(i) in its own thread, ITERATIONS times, started together; re-raise failures."""
    barrier = threading.Barrier(len(jobs))
    errors = []

    def loop(job):
        try:
            barrier.wait()
            for i in range(ITERATIONS):
                job(i)
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=loop, args=(job,)) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _left_padded(ids):
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_two_threads_running_different_edits_each_get_their_own(pair, ids, tiny_switches):
    model, hf = pair
    edits_a = {"blocks.1.attn.out": splice.Zero(pos=0), "blocks.0.resid_post": splice.Add(1.0)}
    with torch.no_grad():
        clean = hf(ids).logits
        with model.edit(edits_a):
            expected_a = hf(ids).logits
        assert not torch.equal(clean, expected_a)
        wrong = []

        def edited(i):
            logits, _ = model.run(ids, edits=edits_a)
            if not torch.equal(logits, expected_a):
                wrong.append(("edited", i))

        def plain(i):
            if i % 2:
                logits, _ = model.run(ids)
            else:
                logits = hf(ids).logits  # the HF model itself, with nothing open in this thread
            if not torch.equal(logits, clean):
                wrong.append(("plain", i))

        _in_threads(edited, plain)
    assert wrong == []
    # Nothing is left behind: no hooks, and single-threaded use is exactly as before.
    assert model.hook_count == 0 and not model.engine.active_here()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, clean)
        padded = _left_padded(ids)
        with (
            model.edit({"blocks.0.resid_pre": splice.Zero(pos=0)}),
            model.record("blocks.0.resid_pre") as rec,
        ):
            hf(**padded)
        x = rec["blocks.0.resid_pre"]
        assert torch.all(x[0, 3] == 0) and torch.all(x[1, 0] == 0) and not torch.any(x[0, :3] == 0)
        with model.record("blocks.0.resid_post") as once:
            hf(ids)
        with (
            model.edit({"blocks.0.resid_post": splice.Add(1.0)}),
            model.record("blocks.0.resid_post") as plus,
        ):
            hf(ids)
        assert torch.equal(
            plus["blocks.0.resid_post"], once["blocks.0.resid_post"] + 1.0
        )  # applied once, not 4 times
    # generate with a valid position still works (0.1 raised here after the threads).
    steered = model.generate(
        ids,
        edits={"blocks.0.resid_post": splice.Add(1.0, pos=slice(ids.shape[1], None))},
        max_new_tokens=3,
        return_tokens=True,
    )
    assert steered.shape == (2, ids.shape[1] + 3) and model.hook_count == 0


def test_threads_with_open_contexts_and_recordings_never_mix(pair, ids, tiny_switches):
    model, hf = pair
    d = model.dims.d_model
    with torch.no_grad():
        with model.record("blocks.1.resid_post") as ref:
            hf(ids)
    base = ref["blocks.1.resid_post"]
    wrong = []

    def job(value):
        def step(i):
            with (
                torch.no_grad(),
                model.edit({"blocks.1.resid_post": splice.Replace(torch.full((d,), value), pos=1)}),
                model.record("blocks.1.resid_post") as rec,
            ):
                hf(ids)
            got = rec["blocks.1.resid_post"]
            if not (
                torch.all(got[:, 1] == value)
                and torch.equal(got[:, 0], base[:, 0])
                and torch.equal(got[:, 2:], base[:, 2:])
            ):
                wrong.append((value, i))

        return step

    _in_threads(job(1.0), job(2.0), job(3.0))
    assert wrong == [] and model.hook_count == 0


def test_a_thread_with_nothing_open_is_not_edited_by_another_threads_context(pair, ids):
    model, hf = pair
    with torch.no_grad():
        clean = hf(ids).logits
    opened, done = threading.Event(), threading.Event()
    seen = {}

    def editor():
        with model.edit({"blocks.0.mlp.out": splice.Zero()}):
            opened.set()
            done.wait(30)

    def reader():
        opened.wait(30)
        with torch.no_grad():
            seen["logits"] = hf(ids).logits
        seen["hooks"] = model.hook_count
        done.set()

    threads = [threading.Thread(target=editor), threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen["hooks"] > 0  # the other thread's hooks were installed and ran ...
    assert torch.equal(seen["logits"], clean)  # ... and changed nothing here
    assert model.hook_count == 0


def test_asyncio_tasks_see_only_their_own_edits(pair, ids):
    model, hf = pair

    async def edited(gate: asyncio.Event):
        with model.edit({"blocks.0.mlp.out": splice.Zero()}):
            gate.set()
            await asyncio.sleep(0)
            with torch.no_grad():
                return hf(ids).logits

    async def plain(gate: asyncio.Event):
        await gate.wait()
        with torch.no_grad():
            return hf(ids).logits

    async def main():
        gate = asyncio.Event()
        return await asyncio.gather(edited(gate), plain(gate))

    with torch.no_grad():
        clean = hf(ids).logits
        with model.edit({"blocks.0.mlp.out": splice.Zero()}):
            expected = hf(ids).logits
    got_edited, got_plain = asyncio.run(main())
    assert torch.equal(got_edited, expected) and torch.equal(got_plain, clean)
    assert model.hook_count == 0


def _expected_zero_first(model, hf, inputs):
    with torch.no_grad(), model.edit({"blocks.0.resid_post": splice.Zero(pos=0)}):
        return hf(**inputs).logits


@pytest.mark.parametrize("how", ["call", "run", "hf"])
def test_a_forward_inside_an_apply_keeps_the_outer_positions(pair, ids, how):
    """An `Apply` that calls the model (a shorter prompt, so a reset frame would be visible)."""
    model, hf = pair
    inputs = _left_padded(ids)
    short = ids[:1, :4]
    inner = []

    def peek(x):
        if how == "call":
            inner.append(model(short))
        elif how == "run":
            inner.append(model.run(short, edits={"blocks.1.mlp.out": splice.Zero()})[0])
        else:
            inner.append(hf(short).logits)
        return x

    expected = _expected_zero_first(model, hf, inputs)
    with torch.no_grad():
        plain_inner = hf(short).logits
        with model.edit({"blocks.1.mlp.out": splice.Zero()}):
            zeroed_inner = hf(short).logits
        with model.edit({"blocks.0.attn.out": splice.Apply(peek), "blocks.0.resid_post": splice.Zero(pos=0)}):
            got = hf(**inputs).logits
    assert torch.equal(got, expected)
    # The inner forward ran with only what it opened itself: not the outer Zero, not the Apply again.
    assert len(inner) == 1
    assert torch.equal(inner[0], zeroed_inner if how == "run" else plain_inner)
    assert model.hook_count == 0


def test_run_inside_run_keeps_both_frames_and_both_recordings(pair, ids):
    model, hf = pair
    inputs = _left_padded(ids)
    short = ids[:1, :5]
    inner = {}

    def nested(x):
        inner["logits"], inner["rec"] = model.run(
            short, edits={"blocks.0.resid_post": splice.Zero(pos=-1)}, record="blocks.0.resid_post"
        )
        return x

    with torch.no_grad():
        outer_logits, outer_rec = model.run(
            inputs,
            edits={"blocks.0.attn.out": splice.Apply(nested), "blocks.0.resid_post": splice.Zero(pos=0)},
            record="blocks.0.resid_post",
        )
        expected_outer = _expected_zero_first(model, hf, inputs)
        with (
            model.edit({"blocks.0.resid_post": splice.Zero(pos=-1)}),
            model.record("blocks.0.resid_post") as hand_inner,
        ):
            expected_inner = hf(short).logits
    assert torch.equal(outer_logits, expected_outer)
    assert torch.equal(inner["logits"], expected_inner)
    assert torch.equal(inner["rec"]["blocks.0.resid_post"], hand_inner["blocks.0.resid_post"])
    assert (
        outer_rec["blocks.0.resid_post"].shape[:2] == ids.shape
        and inner["rec"]["blocks.0.resid_post"].shape[:2] == short.shape
    )
    assert model.hook_count == 0


def test_an_exception_inside_a_nested_forward_leaves_nothing_behind(pair, ids):
    model, hf = pair

    def boom(x):
        model.run(ids[:1, :3], edits={"blocks.0.mlp.out": splice.Apply(lambda y: 1 / 0)})
        return x

    with torch.no_grad():
        clean = hf(ids).logits
        with pytest.raises(ZeroDivisionError):
            model.run(ids, edits={"blocks.1.attn.out": splice.Apply(boom)})
    assert model.hook_count == 0 and not model.engine.active_here()
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, clean)


def test_two_wrappers_of_one_model_share_one_engine(pair, ids):
    model, hf = pair
    other = splice.Model(hf)
    assert other.engine is model.engine
    add = torch.randn(model.dims.d_model, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        with model.record(["blocks.0.resid_pre", "blocks.0.attn.out"]) as parts:
            hf(ids)
        with (
            model.edit({"blocks.0.attn.out": splice.Add(add)}),
            other.record(["blocks.0.attn.out", "blocks.0.resid_post"]) as rec,
        ):
            hf(ids)
            assert model.hook_count == other.hook_count > 0
    assert torch.equal(rec["blocks.0.attn.out"], parts["blocks.0.attn.out"] + add)  # fully applied, once
    if "blocks.0.resid_mid" in model.sites:
        with (
            torch.no_grad(),
            model.edit({"blocks.0.attn.out": splice.Add(add)}),
            other.record("blocks.0.resid_mid") as mid,
        ):
            hf(ids)
        expected = parts["blocks.0.resid_pre"] + (parts["blocks.0.attn.out"] + add)
        assert torch.allclose(mid["blocks.0.resid_mid"], expected, atol=1e-6, rtol=0)
    assert model.hook_count == other.hook_count == 0


def test_the_engine_registry_does_not_keep_a_dropped_model_alive(ids):
    """One engine per HF model is found from the model itself (a weak mapping): dropping the model
    and its wrappers must free it, also after contexts, recordings and attention routing."""
    import gc
    import weakref

    hf = build("llama")
    model = splice.Model(hf)
    with (
        torch.no_grad(),
        model.edit({"blocks.0.attn.pattern": splice.Scale(0.5)}),
        model.record("blocks.1.resid_post"),
    ):
        hf(ids)
    model.run(ids, edits={"blocks.0.mlp.out": splice.Zero()})
    alive = weakref.ref(hf)
    del model, hf
    gc.collect()
    assert alive() is None
