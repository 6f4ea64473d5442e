"""Logit lens and tuned lens: read each layer's residual stream as the model's own next-token guess.

The **logit lens** sends a residual-stream activation `h` at a site through the model's own final
norm and unembedding, `m.unembed(m.ln_final(h))`, the same modules (and, for Gemma2, the same logit
soft-cap) that turn the last layer's output into the logits. At the last layer's `resid_post` it is
therefore the model's output itself, which the tests check on every family. The **tuned lens** puts
one affine translator per site in front of that readout, `A_l h + b_l`, trained so that the lens
distribution matches the model's final one (loss KL(final || lens), Adam, identity start); with
identity translators it is the logit lens bit for bit.

    table = logit_lens(m, "The capital of France is")  # tidy: site, layer, pos, rank, token, prob, ...
    splice.plot.lens_heatmap(table, "out/lens.png")  # layer x position, top-1 token in each cell
    tuned = fit_tuned_lens(m, train_texts, steps=200)  # one translator per blocks.*.resid_post
    tuned.save("out/tuned")  # out/tuned.safetensors + out/tuned.json (provenance)
    kl_by_layer(m, held_out_texts, lens=tuned)  # mean KL(final || lens) per layer

Modules, each using only those listed before it: `sites` (which sites a lens reads), `checks`
(argument checks), `tuned` (the `TunedLens` object, its files), `readout` (record sites, read
them through a lens: `lens_logits`), `table` (`logit_lens`), `texts` (`text_windows`),
`evaluation` (`kl_by_layer`), `training` (`fit_tuned_lens`).
"""

from .evaluation import kl_by_layer
from .readout import LensFn, lens_logits
from .sites import DEFAULT_SITES
from .table import logit_lens
from .texts import text_windows
from .training import fit_tuned_lens
from .tuned import FORMAT, TunedLens

__all__ = [
    "DEFAULT_SITES",
    "FORMAT",
    "LensFn",
    "TunedLens",
    "fit_tuned_lens",
    "kl_by_layer",
    "lens_logits",
    "logit_lens",
    "text_windows",
]
