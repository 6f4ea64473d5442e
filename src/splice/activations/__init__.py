"""Activations to disk: record sites over a corpus, then read the rows back memory-mapped.

`cache_activations(model, corpus, sites, out_dir)` runs the corpus through the model in bounded
memory and writes, in `out_dir`:

- `shard-00000.safetensors`, `shard-00001.safetensors`, ...: whole documents each, one row per
  real token (padding is never stored), holding one tensor per site (`"blocks.3.resid_post"`:
  `[rows, *row shape]`, in the stored dtype) and three int64 arrays `[rows]`: `tokens` (the token
  id), `documents` (the document's index in the corpus) and `positions` (the token's position in
  its document). Rows are in document order, then position order.
- `index.json`: the format and version, the model's spec (`m.spec`) and identity (name, revision,
  weights digest, dtype), the sites with their row axes and shapes, the stored dtype, the settings
  (token cap, BOS rule, batch and shard sizes), the totals (rows, documents, truncated documents,
  whether the corpus was finished) and, per shard, its file, rows, first document and document
  count, size, sha256 and a digest of its documents' tokens.

`ActivationStore(out_dir, site=None)` reads one site back as a torch `Dataset` of rows, with
random access, shuffled batches and the per-row arrays; nothing is loaded until it is read.

Example:
    ```python
    m = splice.load()
    splice.cache_activations(m, texts, "blocks.3.resid_post", "acts", max_tokens=128)
    store = splice.ActivationStore("acts")
    for batch in store.batches(4096, shuffle=True, seed=0):
        ...  # [4096, 576] float32
    ```
"""

from .store import ActivationStore
from .writer import cache_activations

__all__ = ["ActivationStore", "cache_activations"]
