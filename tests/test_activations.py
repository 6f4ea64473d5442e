"""Activations to disk: `splice.activations.cache_activations` and `ActivationStore`.

The reference is independent of splice's recording: each document's own forward through a
hand-written hook (tests/handhooks.py). Crashes are real: a forked child process is killed with
SIGKILL at chosen points, and the rerun must keep the finished shards untouched and end byte-identical to
an uninterrupted run.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import signal
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer, build
from handhooks import hand_record

import splice
from splice.activations import ActivationStore, cache_activations

# Lengths 4, 4, 4, 4, 1, 0, 12, 30, 9, 12, 200 (200 > the tiny models' context of 64): equal lengths
# share forwards, an empty document gives no row, a long one is truncated.
TEXTS = [
    "abcd",
    "efgh",
    "ijkl",
    "mnop",
    "q",
    "",
    "hello world!",
    "the quick brown fox jumps over",
    "lazy dogs",
    "hello again.",
    "long " * 40,
]
SITES = ["blocks.1.resid_post", "blocks.0.mlp.post"]


def tiny(family: str = "llama", seed: int = 0, tokenizer=None) -> splice.Model:
    return splice.Model(build(family, seed), tokenizer or CharTokenizer())


def char_ids(text: str) -> list[int]:
    return CharTokenizer()(text)["input_ids"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def shard_files(out: Path) -> dict[str, tuple[str, int]]:
    """{shard file: (sha256, mtime_ns)} of every shard on disk."""
    return {p.name: (sha(p), p.stat().st_mtime_ns) for p in sorted(out.glob("shard-*.safetensors"))}


def forward_sizes(model: splice.Model) -> tuple[list[tuple[int, int]], object]:
    """Record the [batch, pos] of every forward of the model (a plain pre-hook)."""
    sizes: list[tuple[int, int]] = []
    handle = model.hf.register_forward_pre_hook(
        lambda mod, args, kwargs: sizes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True
    )
    return sizes, handle


# -- correctness against an independent computation --------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "opt"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_rows_are_each_documents_own_forward_bit_for_bit(tmp_path, family, batch_size):
    model = tiny(family)
    sizes, handle = forward_sizes(model)
    try:
        stores = cache_activations(
            model, TEXTS, SITES, tmp_path, batch_size=batch_size, max_tokens=24, shard_rows=40, progress=False
        )
    finally:
        handle.remove()
    # Equal-length documents shared forwards (and only equal-length ones: nothing was padded).
    assert max(b for b, _ in sizes) == min(batch_size, 4)
    kept = [char_ids(t)[:24] for t in TEXTS]
    assert sum(b * t for b, t in sizes) == sum(map(len, kept))
    for site in SITES:
        store = stores[site]
        assert len(store) == sum(map(len, kept)) == len(store.tokens)  # one row per real token
        for number, ids in enumerate(kept):
            rows = store.documents == number
            assert store.tokens[rows].tolist() == ids
            assert store.positions[rows].tolist() == list(range(len(ids)))
            if ids:
                expected = hand_record(model.hf, family, site, torch.tensor([ids]))[0]
                assert torch.equal(store[rows], expected), (site, number)
    assert store.info["truncated_documents"] == 2  # 30 and 200 tokens > 24
    assert store.n_documents == len(TEXTS) and store.complete
    # Three shards, each with documents of several lengths (4 and 12; 24 and 9; 12 and 24).
    assert [s["documents"] for s in store.info["shards"]] == [7, 2, 2]


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom"])
def test_padded_batches_agree_to_rounding_and_store_no_padding(tmp_path, family):
    model = tiny(family)
    sizes, handle = forward_sizes(model)
    try:
        stores = cache_activations(
            model, TEXTS, SITES, tmp_path, batch_size=4, max_tokens=24, exact=False, progress=False
        )
    finally:
        handle.remove()
    kept = [char_ids(t)[:24] for t in TEXTS]
    assert sum(b * t for b, t in sizes) > sum(map(len, kept))  # pad tokens were computed ...
    assert len(sizes) == 3  # 10 documents with tokens, 4 a forward
    for site in SITES:
        store = stores[site]
        assert len(store) == sum(map(len, kept))  # ... and never stored
        for number, ids in enumerate(kept):
            rows = store.documents == number
            assert store.tokens[rows].tolist() == ids
            if ids:
                expected = hand_record(model.hf, family, site, torch.tensor([ids]))[0]
                torch.testing.assert_close(store[rows], expected, rtol=1e-5, atol=1e-6)


def test_every_corpus_form_gives_the_same_cache(tmp_path):
    model = tiny()
    texts = [t for t in TEXTS if t]
    ids = [char_ids(t)[:64] for t in texts]

    class StreamingDataset:  # what a Hugging Face (iterable) dataset looks like: rows are dicts
        def __iter__(self):
            return iter([{"text": t, "label": 0} for t in texts])

    equal = [i[:4] for i in ids if len(i) >= 4]
    forms = {
        "strings": texts,
        "dict rows": [{"text": t} for t in texts],
        "streamed": StreamingDataset(),
        "generator": (t for t in texts),
        "id lists": ids,
        "id tensors": [torch.tensor(i) for i in ids],
        "input_ids rows": [{"input_ids": torch.tensor([i])} for i in ids],
    }
    digests = {}
    for name, corpus in forms.items():
        store = cache_activations(model, corpus, SITES[0], tmp_path / name, progress=False)[SITES[0]]
        digests[name] = [s["sha256"] for s in store.info["shards"]]
    assert len({tuple(d) for d in digests.values()}) == 1, digests
    # A [documents, tokens] tensor: one document per row.
    store = cache_activations(model, torch.tensor(equal), SITES[0], tmp_path / "tensor", progress=False)[
        SITES[0]
    ]
    assert store.tokens.tolist() == [t for i in equal for t in i]
    assert store.documents.tolist() == [d for d in range(len(equal)) for _ in range(4)]


class BosTokenizer(CharTokenizer):
    """Adds a BOS (id 5, the character '^') in front of text, as Llama's tokenizer does."""

    bos_token_id = 5

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": ([5] if add_special_tokens else []) + ids}


@pytest.mark.parametrize(
    ("prepend_bos", "expected"),
    [
        (None, [[5, 8, 9], [5, 8, 9]]),  # the tokenizer's rule adds one; never a second before "^ab"
        (True, [[5, 8, 9], [5, 8, 9]]),
        (False, [[8, 9], [5, 8, 9]]),  # none added; a BOS written in the text is text and stays
    ],
)
def test_bos_follows_the_rule_and_is_never_doubled(tmp_path, prepend_bos, expected):
    model = tiny(tokenizer=BosTokenizer())
    assert char_ids("^ab") == [5, 8, 9]  # '^' is the BOS id
    store = cache_activations(
        model, ["ab", "^ab"], SITES[0], tmp_path, prepend_bos=prepend_bos, progress=False
    )
    tokens, documents = store[SITES[0]].tokens, store[SITES[0]].documents
    assert [tokens[documents == d].tolist() for d in (0, 1)] == expected


def test_stored_dtype_can_be_chosen(tmp_path):
    model = tiny()
    store = cache_activations(model, TEXTS[:4], SITES[0], tmp_path, dtype="bfloat16", progress=False)[
        SITES[0]
    ]
    expected = hand_record(model.hf, "llama", SITES[0], torch.tensor([char_ids(TEXTS[0])]))[0]
    assert store.dtype == torch.bfloat16 and store.info["dtype"] == "bfloat16"
    assert torch.equal(store[store.documents == 0], expected.to(torch.bfloat16))


# -- bad input, refused before anything is written ----------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"sites": "blocks.1.resid_pots"},
            "unknown site 'blocks.1.resid_pots'; did you mean 'blocks.1.resid_post'",
        ),
        ({"sites": "blocks.0.attn.pattern"}, "no single value per token"),
        ({"sites": []}, "sites is empty"),
        ({"corpus": []}, "the corpus has no documents"),
        ({"corpus": iter([])}, "the corpus has no documents"),
        ({"corpus": "one text"}, "the corpus is one string"),
        ({"corpus": {"train": ["a"]}}, "pass one split"),
        (
            {"corpus": [{"label": 1}]},
            "document 0 is a mapping with keys ['label']; expected a 'text' or 'input_ids'",
        ),
        ({"corpus": [3.5]}, "document 0 is float"),
        ({"corpus": [[1, 2, 500]]}, "document 0 holds token id 500; expected ids in 0..96"),
        (
            {"corpus": [[1, 2]], "prepend_bos": True},
            "prepend_bos=True applies to text; document 0 is token ids",
        ),
        ({"batch_size": 0}, "batch_size must be a positive integer; got 0"),
        ({"max_tokens": 65}, "max_tokens=65 exceeds the model's context length 64"),
        ({"shard_rows": -1}, "shard_rows must be a positive integer"),
        ({"dtype": torch.int8}, "dtype must be one of float32, float16, bfloat16, float64"),
        ({"prepend_bos": "yes"}, "prepend_bos must be None"),
        ({"exact": None}, "exact must be True or False"),
    ],
)
def test_bad_input_is_refused_before_writing(tmp_path, kwargs, message):
    args = {"corpus": TEXTS, "sites": SITES[0], **kwargs}
    with pytest.raises(splice.SpliceError) as caught:
        cache_activations(
            tiny(), args.pop("corpus"), args.pop("sites"), tmp_path / "out", progress=False, **args
        )
    assert message in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_a_model_in_training_mode_is_refused(tmp_path):
    model = tiny()
    model.hf.train()
    with pytest.raises(splice.SpliceError, match=r"training mode .* call model.hf.eval\(\) first"):
        cache_activations(model, TEXTS, SITES[0], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_a_bad_document_is_named_by_its_index(tmp_path):
    with pytest.raises(splice.SpliceError, match=r"document 3\['text'\] is int; expected a string"):
        cache_activations(tiny(), ["a", "b", "c", {"text": 7}], SITES[0], tmp_path, progress=False)


def test_an_out_dir_that_is_not_a_cache_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(
        splice.SpliceError, match=r"holds other files \(notes.txt\) and no activation cache index"
    ):
        cache_activations(tiny(), TEXTS, SITES[0], tmp_path, progress=False)
    with pytest.raises(splice.SpliceError, match="is a file; expected a directory"):
        cache_activations(tiny(), TEXTS, SITES[0], tmp_path / "notes.txt", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.fixture
def cached(tmp_path):
    """A finished cache of TEXTS (llama, seed 0, SITES[0], max_tokens 24, 20-row shards)."""
    out = tmp_path / "acts"
    cache_activations(tiny(), TEXTS, SITES[0], out, max_tokens=24, shard_rows=20, progress=False)
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model": tiny(seed=1)}, "model weights_sha256: cached '"),
        (
            {"sites": SITES},
            "sites: cached ['blocks.1.resid_post'], asked ['blocks.1.resid_post', 'blocks.0.mlp.post']",
        ),
        ({"max_tokens": 32}, "settings max_tokens: cached 24, asked 32"),
        ({"shard_rows": 40}, "settings shard_rows: cached 20, asked 40"),
        ({"dtype": torch.float16}, "dtype: cached 'float32', asked 'float16'"),
        ({"exact": False}, "settings exact: cached True, asked False"),
        (
            {"corpus": TEXTS[:2] + ["other"] + TEXTS[3:]},
            "holds activations of another corpus: documents 0..5 (shard 0)",
        ),
        (
            {"corpus": TEXTS + ["more"]},
            "finished cache of a corpus of 11 documents, and this corpus has more",
        ),
    ],
)
def test_a_cache_of_something_else_is_refused_not_mixed(cached, change, message):
    before = shard_files(cached)
    index_before = (cached / "index.json").read_bytes()
    args = {"model": tiny(), "corpus": TEXTS, "sites": SITES[0], "max_tokens": 24, "shard_rows": 20, **change}
    with pytest.raises(splice.SpliceError) as caught:
        cache_activations(
            args.pop("model"), args.pop("corpus"), args.pop("sites"), cached, progress=False, **args
        )
    assert message in str(caught.value)
    assert shard_files(cached) == before and (cached / "index.json").read_bytes() == index_before


def test_rerunning_a_finished_cache_changes_nothing(cached):
    before = shard_files(cached), (cached / "index.json").stat().st_mtime_ns
    stores = cache_activations(tiny(), TEXTS, SITES[0], cached, max_tokens=24, shard_rows=20, progress=False)
    assert (shard_files(cached), (cached / "index.json").stat().st_mtime_ns) == before
    assert len(stores[SITES[0]]) == sum(min(len(t), 24) for t in TEXTS)


def test_one_writer_per_directory(cached):
    fcntl = pytest.importorskip("fcntl")  # POSIX only; the lock does not exist elsewhere
    with open(cached / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(splice.SpliceError, match="another process is writing the activation cache"):
            cache_activations(tiny(), TEXTS, SITES[0], cached, max_tokens=24, shard_rows=20, progress=False)


def test_progress_is_shown(tmp_path, capsys):
    cache_activations(tiny(), TEXTS, SITES[0], tmp_path, shard_rows=20)
    err = capsys.readouterr().err
    assert "cache_activations" in err and "11/11" in err and "shards=" in err


# -- crash and resume -------------------------------------------------------------------------------
CORPUS = TEXTS * 4


def crash(where: str, at: int, out: str) -> None:
    """In a child process: cache CORPUS into `out` and SIGKILL this process at a chosen point."""
    from splice.activations import index, writer

    model = tiny()
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    if where == "forward":  # in the middle of a shard's forwards
        calls = []

        def count(module, args):
            calls.append(1)
            if len(calls) == at:
                die()

        model.hf.register_forward_pre_hook(count)
    if where == "rename":  # the shard file is written and renamed, the index does not list it yet
        write = index.write
        index.write = lambda out, idx: die() if len(idx["shards"]) == at else write(out, idx)
    if where == "temporary":  # the shard's temporary file is written, not renamed
        replace = writer.os.replace
        writer.os.replace = lambda a, b: die() if str(b).endswith(index.shard_file(at - 1)) else replace(a, b)
    cache_activations(model, CORPUS, SITES[0], out, max_tokens=24, shard_rows=30, progress=False)
    os._exit(0)  # not reached: the test fails on exit code 0


@pytest.mark.parametrize(("where", "at"), [("forward", 20), ("rename", 4), ("temporary", 4)])
def test_a_killed_run_resumes_keeping_finished_shards(tmp_path, where, at):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork() to kill a child process mid-cache without re-importing splice")
    reference = tmp_path / "reference"
    cache_activations(tiny(), CORPUS, SITES[0], reference, max_tokens=24, shard_rows=30, progress=False)
    out = tmp_path / "out"
    child = multiprocessing.get_context("fork").Process(target=crash, args=(where, at, str(out)))
    child.start()
    child.join(timeout=120)
    if child.exitcode is None:
        child.kill()
    assert child.exitcode == -signal.SIGKILL
    crashed = json.loads((out / "index.json").read_text())
    finished = [s["file"] for s in crashed["shards"]]
    assert len(finished) >= 2 and not crashed["complete"]
    on_disk = shard_files(out)
    if where == "rename":  # an unlisted shard is on disk: it must be rewritten, not kept
        assert set(on_disk) - set(finished) == {f"shard-{len(finished):05d}.safetensors"}
    if where == "temporary":
        assert any(p.name.startswith(".shard-") for p in out.iterdir())
    kept = {name: on_disk[name] for name in finished}

    store = cache_activations(tiny(), CORPUS, SITES[0], out, max_tokens=24, shard_rows=30, progress=False)[
        SITES[0]
    ]
    after = shard_files(out)
    assert {
        name: after[name] for name in finished
    } == kept  # finished shards untouched: same bytes, same mtime
    if where == "rename":
        unlisted = f"shard-{len(finished):05d}.safetensors"
        assert after[unlisted][1] != on_disk[unlisted][1]  # rewritten
    assert json.loads((out / "index.json").read_text()) == json.loads((reference / "index.json").read_text())
    assert {n: h for n, (h, _) in after.items()} == {n: h for n, (h, _) in shard_files(reference).items()}
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in reference.iterdir())
    assert store.complete and len(store) == len(ActivationStore(reference))


# -- reading back -------------------------------------------------------------------------------------
def test_store_indexing(cached):
    store = ActivationStore(cached)
    n = len(store)
    every = torch.stack([store[i] for i in range(n)])
    assert every.shape == (n, 48) and store.shape == (48,)
    assert torch.equal(store[:], every) and torch.equal(store[15:45], every[15:45])  # across shards
    assert torch.equal(store[::7], every[::7]) and torch.equal(store[-1], every[-1])
    rows = torch.tensor([50, 3, 3, 96, -2])
    assert torch.equal(store[rows], every[rows]) and torch.equal(store[rows.tolist()], every[rows])
    mask = store.positions == 0
    assert torch.equal(store[mask], every[mask]) and len(store[mask]) == 10  # 11 documents, one empty
    assert torch.equal(store[torch.tensor(5)], every[5])
    with pytest.raises(IndexError, match=f"row {n} is out of range: this store has {n} rows"):
        store[n]
    with pytest.raises(IndexError, match=f"row {-n - 1} is out of range"):
        store[[0, -n - 1]]
    with pytest.raises(splice.SpliceError, match="boolean mask must have one entry per row"):
        store[torch.ones(3, dtype=torch.bool)]
    with pytest.raises(splice.SpliceError, match="rows must be a 1-D integer tensor"):
        store[torch.zeros(2, 2)]
    copy = store[0]
    copy += 1  # a copy: the store is unchanged
    assert torch.equal(store[0], every[0])


def test_store_batches_and_dataset(cached):
    store = ActivationStore(cached)
    every = store[:]
    assert torch.equal(torch.cat(list(store.batches(10))), every)
    shuffled = list(store.batches(10, shuffle=True, seed=3, with_rows=True))
    rows = torch.cat([r for _, r in shuffled])
    assert sorted(rows.tolist()) == list(range(len(store))) and rows.tolist() != sorted(rows.tolist())
    assert all(torch.equal(batch, every[r]) for batch, r in shuffled)
    again = torch.cat([r for _, r in store.batches(10, shuffle=True, seed=3, with_rows=True)])
    other = torch.cat([r for _, r in store.batches(10, shuffle=True, seed=4, with_rows=True)])
    assert torch.equal(rows, again) and not torch.equal(rows, other)
    assert [len(b) for b in store.batches(10, drop_last=True)] == [10] * 9
    loader = torch.utils.data.DataLoader(store, batch_size=8, shuffle=True)
    assert isinstance(store, torch.utils.data.Dataset)
    assert sum(len(b) for b in loader) == len(store) and next(iter(loader)).shape == (8, 48)
    clone = pickle.loads(pickle.dumps(store))  # what a DataLoader worker gets: the mappings reopen
    assert torch.equal(clone[:], every) and len(pickle.dumps(store)) < 20_000


def test_store_is_memory_mapped(cached):
    store = ActivationStore(cached)
    assert store._maps == {}  # opening reads the index only
    store[0]
    assert list(store._maps) == [0]
    maps = Path("/proc/self/maps")
    if not maps.exists():
        pytest.skip("no /proc/self/maps on this system: cannot see the process's file mappings")
    assert str(cached / "shard-00000.safetensors") in maps.read_text()  # mapped, not read
    assert str(cached / "shard-00001.safetensors") not in maps.read_text()


def test_store_chooses_a_site(tmp_path):
    cache_activations(tiny(), TEXTS[:3], SITES, tmp_path, progress=False)
    with pytest.raises(
        splice.SpliceError, match=r"holds 2 sites \(blocks.1.resid_post, blocks.0.mlp.post\): pass site="
    ):
        ActivationStore(tmp_path)
    assert ActivationStore(tmp_path, site="blocks.1.hook_resid_post").site == "blocks.1.resid_post"
    assert ActivationStore(tmp_path, site=("post", 0)).shape == (64,)
    with pytest.raises(splice.SpliceError, match="holds no site 'blocks.2.resid_post'; it holds"):
        ActivationStore(tmp_path, site="blocks.2.resid_post")


def test_store_refuses_a_missing_corrupt_or_altered_cache(cached, tmp_path):
    with pytest.raises(
        splice.SpliceError, match="index.json: no such file; expected an activation cache index"
    ):
        ActivationStore(tmp_path / "nothing")
    index_text = (cached / "index.json").read_text()
    (cached / "index.json").write_text(index_text[:200])
    with pytest.raises(splice.SpliceError, match=r"index.json line \d+: invalid JSON"):
        ActivationStore(cached)
    (cached / "index.json").write_text(index_text.replace('"version": 1', '"version": 9'))
    with pytest.raises(splice.SpliceError, match="index version 9; this splice reads version 1"):
        ActivationStore(cached)
    (cached / "index.json").write_text(index_text)
    shard = cached / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, one byte changed
    shard.write_bytes(bytes(data))
    with pytest.raises(
        splice.SpliceError, match="shard-00001.safetensors: its sha256 is not the one the index holds"
    ):
        ActivationStore(cached).verify()
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(
        splice.SpliceError, match=r"shard-00001.safetensors: shard file is \d+ bytes, the index says"
    ):
        ActivationStore(cached)
    with pytest.raises(splice.SpliceError, match="a finished shard was altered: delete out_dir"):
        cache_activations(tiny(), TEXTS, SITES[0], cached, max_tokens=24, shard_rows=20, progress=False)
    shard.unlink()
    with pytest.raises(splice.SpliceError, match="shard file is missing"):
        ActivationStore(cached)


# -- the embedded model -------------------------------------------------------------------------------
@pytest.mark.real
def test_embedded_model_rows_equal_its_recorded_forwards(smol, tmp_path):
    from pydoc_data.topics import topics

    texts = [topics[k][:80] for k in sorted(topics)[:6]]  # most reach the 16-token cap: shared forwards
    site = "blocks.3.resid_post"
    store = cache_activations(smol, texts, site, tmp_path, batch_size=4, max_tokens=16, progress=False)[site]
    ids = [splice.tokens.token_ids(smol.tokenizer, t)[:16] for t in texts]
    assert len(store) == sum(map(len, ids))
    for number, one in enumerate(ids):
        _, recording = smol.run(torch.tensor([one]), record=site)
        assert torch.equal(store[store.documents == number], recording[site][0])
    assert store.info["spec"] == {"model": "embedded"}
    assert store.info["identity"]["name"].startswith("SmolLM2-135M")
    assert os.path.getsize(tmp_path / "index.json") < 4000
