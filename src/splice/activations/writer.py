"""`cache_activations`: record sites over a corpus into safetensors shards, in bounded memory,
resumably.

The work is cut into shards of whole documents. Documents are tokenized until a shard's row
budget is reached; then they run through the model in batches of documents of one length (or,
with `exact=False`, sorted by length and padded on the right, which a causal model's real tokens
never see), their real rows are copied into the shard's tensors in document order, and the shard
is written to a temporary file, synced and renamed into place before the index lists it. Memory is
one shard plus one batch, whatever the size of the corpus.

A rerun in the same directory continues: it checks that the cache is of the same model, sites and
settings (and refuses it otherwise), that the corpus still has the documents of every finished
shard (by their token digest), removes whatever the index does not list (a shard killed half-way
is rewritten from its first document), and carries on from the first document not yet stored.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..engine import tokens as tok
from ..errors import SpliceError
from ..loading import identity
from ..version import __version__
from . import index
from .corpus import Document, context_length, digest, documents
from .store import ActivationStore

if TYPE_CHECKING:
    from ..engine.model import Model

SHARD_BYTES = 256 * 2**20
"""The size a shard aims at when `shard_rows` is not given (activations of every site plus the
row arrays): the bulk of the memory `cache_activations` holds."""


def cache_activations(
    model: Model,
    corpus: Any,
    sites: Any,
    out_dir: str | os.PathLike[str],
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
    shard_rows: int | None = None,
    dtype: torch.dtype | str | None = None,
    prepend_bos: bool | None = None,
    exact: bool = True,
    progress: bool = True,
) -> dict[str, ActivationStore]:
    """Record `sites` on every token of a corpus into `out_dir`: safetensors shards and a JSON index.

    Why: a probe or a sparse autoencoder trains on millions of activation rows, more than memory
    holds and more than one wants to recompute per epoch. Rows are written once, in bounded memory,
    and read back memory-mapped by `ActivationStore`.

    Each forward stops after the last recorded site (`stop_after_record`). Rows are stored per
    token, padding never: a document of n tokens gives n rows, with its token ids, its index in
    the corpus and each token's position (see `splice.activations`). A rerun after a crash keeps
    the finished shards and continues; a directory holding another cache is refused.

    Args:
        model: The `splice.Model`.
        corpus: The documents, read once, lazily: a list or any iterable of strings, of mappings
            with a `"text"` or `"input_ids"` field (the rows of a Hugging Face dataset), or of token
            ids (lists of ints, 1-D tensors; used as given).
        sites: A site key or glob, or a list of them; every site must have one value per token
            (`resid_post`, `attn.z`, `mlp.post`, ...; not `attn.pattern`).
        out_dir: The cache directory: new, empty, or a cache of the same model, sites and settings
            to continue.
        batch_size: Documents per forward (at most; one forward holds documents of one length).
        max_tokens: Keep the first `max_tokens` tokens of each document (longer ones are truncated
            and counted in the index). Default: the model's context length
            (`config.max_position_embeddings`), or no cap when the config states none; more than
            the context length is refused. To keep all of a long text, split it into documents first.
        shard_rows: Rows per shard (a shard holds whole documents, so one longer document makes a
            longer shard). Default: about 256 MiB of rows. Memory held is about one shard.
        dtype: The stored dtype (`torch.float16`, `"bfloat16"`, ...); default the model's.
        prepend_bos: The BOS rule for text (`splice.tokens`): None follows the tokenizer, True
            gives exactly one leading BOS, False none.
        exact: True: a forward holds documents of one length only, so nothing is padded and each
            row is what the document's own forward gives, bit for bit (on kernels whose results do
            not depend on the batch size, as on CPU; batch_size=1 is exact everywhere). False: the
            shard's documents are sorted by length and right-padded together, `batch_size` per
            forward: fewer, fuller forwards (faster when lengths vary, above all on a GPU), rows
            equal to float rounding (~1e-7) since attention then runs over longer sequences.
            Padding is never stored either way.
        progress: Show a tqdm bar over documents.

    Returns:
        {site name: `ActivationStore`}, one per site, reading the cache.

    Raises:
        SpliceError: Before any forward, for a model in training mode, an unknown site or one
            without a value per token, an empty corpus, a bad argument, or an `out_dir` holding
            something else (another cache, other files); during the run, for a document of no
            accepted form (named by its index) or a corpus that is not the one a continued cache
            was started on.

    Example:
        ```python
        m = splice.load()
        stores = splice.cache_activations(m, ["The cat sat.", "Hello there"], "blocks.3.resid_post", "acts")
        store = stores["blocks.3.resid_post"]  # or splice.ActivationStore("acts")
        len(store), store[0].shape  # (6, torch.Size([576])): one row per token (4 + 2)
        ```
    """
    from ..engine.model import Model

    if not isinstance(model, Model):
        raise SpliceError(f"cache_activations takes a splice.Model; got {type(model).__name__}")
    if model.hf.training:
        raise SpliceError(
            "the model is in training mode (dropout active: rows would be random draws); expected a model "
            "in eval mode: call model.hf.eval() first"
        )
    names, shapes = _sites(model, sites)
    _check_count("batch_size", batch_size)
    context = context_length(model.hf)
    if max_tokens is not None:
        _check_count("max_tokens", max_tokens)
        if context is not None and max_tokens > context:
            raise SpliceError(
                f"max_tokens={max_tokens} exceeds the model's context length {context}: expected at most "
                f"{context} (split longer texts into several documents)"
            )
    cap = max_tokens if max_tokens is not None else context
    if shard_rows is not None:
        _check_count("shard_rows", shard_rows)
    stored = index.parse_dtype(dtype if dtype is not None else next(model.hf.parameters()).dtype)
    if not isinstance(exact, bool):
        raise SpliceError(f"exact must be True or False; got {exact!r}")
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise SpliceError(
            f"prepend_bos must be None (the tokenizer's own rule), True or False; got {prepend_bos!r}"
        )
    if not isinstance(out_dir, (str, os.PathLike)):
        raise SpliceError(f"out_dir must be a directory path; got {type(out_dir).__name__}")
    out = Path(out_dir)
    _check_dir(out)
    docs = documents(corpus, model.tokenizer, model.dims.vocab, prepend_bos, cap)
    first = next(docs, None)
    if first is None:
        raise SpliceError("the corpus has no documents: expected at least one text or list of token ids")
    row_bytes = 3 * 8 + sum(math.prod(shapes[n]) * stored.itemsize for n in names)
    settings = {
        "max_tokens": cap,
        "prepend_bos": prepend_bos,
        "batch_size": batch_size,
        "exact": exact,
        "shard_rows": shard_rows or max(1, SHARD_BYTES // row_bytes),
    }
    spec = model.spec.to_dict() if getattr(model, "spec", None) is not None else None
    axes = {n: list(model.layout.axes(model.layout.sites_of(n)[0])[2:]) for n in names}
    sites_info = {n: {"axes": axes[n], "shape": list(shapes[n])} for n in names}
    wanted = index.new(spec, identity(model.hf), sites_info, stored, settings, __version__)
    try:
        total: int | None = len(corpus)
    except TypeError:  # a generator or a streaming dataset
        total = None
    with _Lock(out):
        current = _open(out, wanted)
        _Writer(model, names, stored, out, current, total, progress).run(itertools.chain([first], docs))
    return {name: ActivationStore(out, site=name) for name in names}


def _check_count(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise SpliceError(f"{name} must be a positive integer; got {value!r}")


def _sites(model: Model, sites: Any) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Canonical names of the sites asked for, each checked to have one value per token, and
    each one's row shape."""
    if isinstance(sites, (str, tuple)):
        keys = [sites]
    else:
        try:
            keys = list(sites)
        except TypeError:
            raise SpliceError(
                f"sites must be a site key or glob, or a list of them; got {type(sites).__name__}"
            ) from None
    if not keys:
        raise SpliceError(
            "sites is empty: expected a site key or glob (e.g. 'blocks.3.resid_post'), or a list of them"
        )
    names: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for key in keys:
        for site in model.layout.sites_of(key):
            axes = model.layout.axes(site)
            if axes[:2] != ("batch", "pos") or "k_pos" in axes:
                raise SpliceError(
                    f"{site.name} has axes {list(axes)}: it has no single value per token, so it cannot be "
                    "cached as rows; expected a site with axes [batch, pos, ...] such as resid_post, "
                    "attn.z or mlp.post"
                )
            if site.name not in shapes:
                names.append(site.name)
                shapes[site.name] = tuple(int(n) for n in model.layout.shape(site)[2:] if n is not None)
    return names, shapes


def _ours(name: str) -> bool:
    """Whether a file in a cache directory is one `cache_activations` writes."""
    return (
        name in (index.INDEX_FILE, ".lock")
        or index.is_shard_file(name)
        or name.startswith((".shard-", f".{index.INDEX_FILE}.tmp"))
    )


def _check_dir(out: Path) -> None:
    """Refuse, before anything is written, an out_dir that is a file or holds files that are not
    an activation cache."""
    if out.exists() and not out.is_dir():
        raise SpliceError(
            f"out_dir {out} is a file; expected a directory (new, empty, or an activation cache)"
        )
    if out.is_dir() and not (out / index.INDEX_FILE).exists():
        foreign = sorted(p.name for p in out.iterdir() if not _ours(p.name))
        if foreign:
            raise SpliceError(
                f"out_dir {out} holds other files ({', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}) "
                "and no activation cache index: expected a new or empty directory, or an activation cache to continue"
            )


class _Lock:
    """One writer per cache directory: an exclusive `flock` on `out_dir/.lock`, held for the run
    (released by the OS if the process dies). Where `fcntl` does not exist (Windows) nothing is locked."""

    def __init__(self, out: Path):
        self.out = out
        self.handle: Any = None

    def __enter__(self) -> _Lock:
        try:
            self.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SpliceError(f"cannot create out_dir {self.out}: {error.strerror or error}") from None
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return self
        self.handle = open(self.out / ".lock", "a")  # noqa: SIM115 - held until __exit__
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.handle.close()
            raise SpliceError(
                f"another process is writing the activation cache in {self.out}; wait for it to finish, "
                "or use another out_dir"
            ) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.close()


def _open(out: Path, wanted: dict[str, Any]) -> dict[str, Any]:
    """The index to continue: the one in `out` if it is a cache of the same thing (finished shards
    checked to be there, whole), else a fresh one, written. Files it does not list are removed."""
    if (out / index.INDEX_FILE).exists():
        current = index.read(out)
        different = index.difference(current, wanted)
        if different is not None:
            raise SpliceError(
                f"out_dir {out} holds an activation cache of something else ({different}); expected a "
                "cache of the same model, sites and settings to continue: use another out_dir, or delete this one"
            )
        for shard in current["shards"]:
            index.check_shard_size(
                out / shard["file"], shard, "a finished shard was altered: delete out_dir and cache again"
            )
    else:
        _check_dir(out)
        current = wanted
        index.write(out, current)
    listed = {shard["file"] for shard in current["shards"]}
    for path in out.iterdir():
        if _ours(path.name) and path.name not in listed and path.name not in (index.INDEX_FILE, ".lock"):
            path.unlink(missing_ok=True)  # an unfinished shard, or a temporary file of a killed run
    return current


class _Writer:
    """Fills and writes the shards of one run (`cache_activations` checks the arguments)."""

    def __init__(
        self,
        model: Model,
        names: list[str],
        dtype: torch.dtype,
        out: Path,
        current: dict[str, Any],
        total: int | None,
        progress: bool,
    ):
        self.model, self.names, self.dtype, self.out, self.index = model, names, dtype, out, current
        settings = current["settings"]
        self.batch_size, self.shard_rows = settings["batch_size"], settings["shard_rows"]
        self.exact = settings["exact"]
        tokenizer = model.tokenizer
        self.pad = tok.pad_token_id(tokenizer) if tokenizer is not None else 0
        self.total, self.progress = total, progress
        self.shapes = {name: tuple(current["sites"][name]["shape"]) for name in names}

    def run(self, docs: Iterator[Document]) -> None:
        """Check the finished shards against the corpus, then cache the rest of it."""
        from tqdm.auto import tqdm

        for number, shard in enumerate(self.index["shards"]):
            held = list(itertools.islice(docs, shard["documents"]))
            if len(held) < shard["documents"] or digest(d.ids for d in held) != shard["tokens_sha256"]:
                first, last = shard["first_document"], shard["first_document"] + shard["documents"] - 1
                raise SpliceError(
                    f"out_dir {self.out} holds activations of another corpus: documents {first}..{last} "
                    f"(shard {number}) have other tokens than this corpus's (or it has fewer documents); "
                    "expected the same corpus to continue: use another out_dir, or delete this one"
                )
        if self.index["complete"]:
            if next(docs, None) is not None:
                raise SpliceError(
                    f"out_dir {self.out} holds the finished cache of a corpus of {self.index['documents']} "
                    "documents, and this corpus has more; expected the same corpus: use another out_dir"
                )
            return
        self.bar = tqdm(
            total=self.total,
            initial=self.index["documents"],
            desc="cache_activations",
            unit="doc",
            disable=not self.progress,
        )
        try:
            pending: list[Document] = []
            rows = 0
            for doc in docs:
                if pending and rows + len(doc.ids) > self.shard_rows:
                    self._write(pending, last=False)
                    pending, rows = [], 0
                pending.append(doc)
                rows += len(doc.ids)
            if pending:
                self._write(pending, last=True)
            else:  # every document was in a finished shard
                self.index["complete"] = True
                index.write(self.out, self.index)
        finally:
            self.bar.close()

    def _write(self, docs: list[Document], last: bool) -> None:
        """Run one shard's documents, then write the shard and the index naming it."""
        first = self.index["documents"]
        lengths = [len(d.ids) for d in docs]
        starts = [0, *itertools.accumulate(lengths)]
        n = starts[-1]
        row_fields = {
            "tokens": torch.tensor([i for d in docs for i in d.ids], dtype=torch.int64),
            "documents": torch.repeat_interleave(
                torch.arange(first, first + len(docs), dtype=torch.int64),
                torch.tensor(lengths, dtype=torch.int64),
            ),
            "positions": torch.cat([torch.arange(k, dtype=torch.int64) for k in lengths]),
        }
        acts = {name: torch.empty((n, *self.shapes[name]), dtype=self.dtype) for name in self.names}
        for chunk in self._batches(lengths):
            self._forward(chunk, docs, starts, acts)
            self.bar.update(len(chunk))
        self.bar.update(lengths.count(0))
        number = len(self.index["shards"])
        path = self.out / index.shard_file(number)
        # One metadata key: safetensors writes several in no fixed order, and shards must be
        # byte-identical whenever their contents are (a resumed run equals an uninterrupted one).
        about = {"format": index.FORMAT, "version": index.VERSION, "shard": number, "first_document": first}
        metadata = {"splice": json.dumps(about, sort_keys=True)}
        size, sha = _save(path, {**row_fields, **acts}, metadata)
        self.index["shards"].append(
            {
                "file": path.name,
                "rows": n,
                "first_document": first,
                "documents": len(docs),
                "truncated_documents": sum(d.length > len(d.ids) for d in docs),
                "bytes": size,
                "sha256": sha,
                "tokens_sha256": digest(d.ids for d in docs),
            }
        )
        self.index["rows"] += n
        self.index["documents"] += len(docs)
        self.index["truncated_documents"] += self.index["shards"][-1]["truncated_documents"]
        self.index["complete"] = last
        index.write(self.out, self.index)
        self.bar.set_postfix(shards=number + 1, rows=self.index["rows"])

    def _batches(self, lengths: list[int]) -> Iterator[list[int]]:
        """The shard's documents (their indices) in forwards: of one length each when exact, else
        sorted by length and cut every `batch_size` (documents without tokens run nowhere)."""
        if self.exact:
            by_length: dict[int, list[int]] = {}
            for j, k in enumerate(lengths):
                if k:
                    by_length.setdefault(k, []).append(j)
            groups = [by_length[k] for k in sorted(by_length, reverse=True)]
        else:
            groups = [sorted((j for j, k in enumerate(lengths) if k), key=lambda j: -lengths[j])]
        for members in groups:
            for i in range(0, len(members), self.batch_size):
                yield members[i : i + self.batch_size]

    def _forward(
        self, chunk: list[int], docs: list[Document], starts: list[int], acts: dict[str, torch.Tensor]
    ) -> None:
        """One forward over documents (padded on the right to the longest: a causal model's real
        tokens never see what follows them); their real rows go to their places in `acts`."""
        width = max(len(docs[j].ids) for j in chunk)
        rows = [docs[j].ids + [self.pad] * (width - len(docs[j].ids)) for j in chunk]
        with torch.no_grad():
            _, recording = self.model.run(
                torch.tensor(rows, dtype=torch.long),
                record=self.names,
                stop_after_record=True,
                use_cache=False,
            )
        assert recording is not None
        for name in self.names:
            value = recording[name]
            expected = (len(chunk), width, *self.shapes[name])
            if tuple(value.shape) != expected:
                raise SpliceError(
                    f"{name} was recorded with shape {list(value.shape)}; expected {list(expected)} "
                    "[batch, pos, ...]: this site cannot be cached as rows on this model"
                )
            for row, j in enumerate(chunk):
                acts[name][starts[j] : starts[j + 1]] = value[row, : starts[j + 1] - starts[j]]


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[int, str]:
    """Write a safetensors file whole or not at all (temporary file, fsync, rename); its size and sha256."""
    from safetensors.torch import save_file

    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(temporary), metadata=metadata)
        hasher = hashlib.sha256()
        with open(temporary, "rb") as handle:
            os.fsync(handle.fileno())
            for block in iter(lambda: handle.read(1 << 22), b""):
                hasher.update(block)
        size = temporary.stat().st_size
        os.replace(temporary, path)
    except OSError as error:
        raise SpliceError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)
    return size, hasher.hexdigest()
