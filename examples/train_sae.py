"""Train a small TopK sparse autoencoder on SmolLM2-135M's residual stream, then study it with splice.

1. Corpus: the Python documentation in the standard library (`pydoc_data.topics`, ~110k tokens of
   English prose and code, nothing downloaded), cut into 128-token documents; every 8th topic is
   held out for evaluation.
2. `cache_activations` writes `blocks.8.resid_post` of every token to out/acts (held-out text to
   out/acts_eval), and the `ActivationStore` serves shuffled batches from disk. Layer 8 of 30 is
   where examples/steering_sweep.py steers: early-middle, so features still read as words and
   phrases on a prompt, and caching stops after 9 of 30 layers. Position 0 is left out of
   training: SmolLM2's first-token residual is an attention sink several times larger than the
   rest and would dominate the squared error.
3. A TopK SAE (`splice.sae.SparseAutoencoder`, 8 x 576 = 4608 features, k = 32) is trained in
   plain PyTorch: unit-norm decoder rows (renormalised after each step), the encoder their
   transpose, `b_dec` at the data's geometric median, Adam. Saved in SAELens' format, reloaded.
4. On held-out text: explained variance, L0, dead features, and the next-token loss of the bare
   model, of the model running on the SAE's reconstruction (`m.attach(sae, error_term=False)`) and
   with the site zeroed (in this bias-free model a zero residual stays zero: uniform logits, loss
   ln(vocab)); the fraction of loss recovered is (L_zero - L_sae) / (L_zero - L_clean).
5. The prompt's most active features (`splice.sae.top_features`), then one sweep
   (`over="features"`) zeroing each of the last token's top features there, ranked by the change
   in logit(" executed") - logit(" terminated"), the two likeliest next tokens; bars in
   out/feature_ablation.png.

Asserts: the reloaded SAE encodes identically; held-out L0 == k; explained variance and loss
recovered above a floor (lower with --quick: ~3k training tokens, a few seconds); attaching with
the error term leaves the logits unchanged; zeroing gives loss ln(vocab); some single feature moves
the logit difference by more than a floor, and the sweep agrees with a one-off `m.edit` ablation.

    .venv/bin/python examples/train_sae.py [OUT_DIR] [--quick]
"""

import argparse
import math
import time
from pathlib import Path
from pydoc_data.topics import topics

import pandas as pd
import torch
import torch.nn.functional as F

import splice
from splice import metrics
from splice.plot import effect_bars
from splice.sae import SAEConfig, SparseAutoencoder

SITE, HOOK = "blocks.8.resid_post", "blocks.8.hook_resid_post"
D_MODEL, EXPANSION, K = 576, 8, 32
CHUNK = 128  # tokens per document
PROMPT = "If the condition is false, the body of the while loop is not"
ANSWER, OTHER = " executed", " terminated"  # the two likeliest next tokens
# (train documents, optimiser steps, batch rows, held-out documents, of which scored for loss, features swept)
FULL = dict(train_docs=None, steps=400, batch=1024, eval_docs=None, loss_docs=12, features=16)
QUICK = dict(train_docs=24, steps=40, batch=256, eval_docs=8, loss_docs=2, features=8)
# minimum explained variance, fraction of loss recovered, largest single-feature ablation effect
FLOORS = {"full": (0.8, 0.8, 0.1), "quick": (0.5, 0.4, 0.1)}


def documents(names: list[str], tokenizer) -> list[list[int]]:
    """Each topic's tokens cut into CHUNK-token documents (a shorter tail is dropped)."""
    docs = []
    for name in names:
        ids = tokenizer(topics[name])["input_ids"]
        docs += [ids[i : i + CHUNK] for i in range(0, len(ids) - CHUNK + 1, CHUNK)]
    return docs


def geometric_median(x: torch.Tensor, iterations: int = 30) -> torch.Tensor:
    """Weiszfeld's iteration: a centre for b_dec that the few huge-norm rows do not drag away."""
    median = x.mean(0)
    for _ in range(iterations):
        weights = 1 / (x - median).norm(dim=-1).clamp_min(1e-6)
        median = (weights[:, None] * x).sum(0) / weights.sum()
    return median


def train(store: splice.ActivationStore, steps: int, batch: int) -> SparseAutoencoder:
    cfg = SAEConfig("topk", d_in=D_MODEL, d_sae=EXPANSION * D_MODEL, k=K, hook_name=HOOK)
    sae = SparseAutoencoder(cfg)
    keep = store.positions > 0  # no attention-sink rows
    with torch.no_grad():
        directions = torch.randn(cfg.d_sae, cfg.d_in)
        sae.W_dec.copy_(directions / directions.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sample = store[keep.nonzero()[:, 0][torch.randperm(int(keep.sum()))[:4096]]]
        sae.b_dec.copy_(geometric_median(sample))
    optimiser = torch.optim.Adam(sae.parameters(), lr=1e-3)
    # constant rate, then a linear decay over the last fifth of the steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: min(1.0, 5 * (1 - s / steps)))
    step, epoch = 0, 0
    while step < steps:
        for x, rows in store.batches(batch, shuffle=True, seed=epoch, drop_last=True, with_rows=True):
            x = x[keep[rows]]
            loss = (sae(x) - x).pow(2).sum(-1).mean()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            with torch.no_grad():  # keep features' activations comparable: unit decoder rows
                sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
            step += 1
            if step % max(1, steps // 8) == 0 or step == steps:
                print(f"  step {step:4d}/{steps}  epoch {epoch}  mse/token {loss.item():9.1f}")
            if step == steps:
                break
        epoch += 1
    return sae.requires_grad_(False)


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="out")
    parser.add_argument("--quick", action="store_true", help="a few seconds of training (the test suite)")
    args = parser.parse_args()
    out, mode = Path(args.out), "quick" if args.quick else "full"
    settings = QUICK if args.quick else FULL
    started = time.perf_counter()
    torch.manual_seed(0)
    torch.set_grad_enabled(False)  # only the training loop needs gradients

    m = splice.load()
    timings = {"load": time.perf_counter() - started}  # seconds per phase
    print(f"model: {splice.loading.EMBEDDED_NAME}, SAE at {SITE}, {mode} mode")
    names = sorted(topics)
    held_out = names[::8]
    train_docs = documents([n for n in names if n not in held_out], m.tokenizer)[: settings["train_docs"]]
    eval_docs = documents(held_out, m.tokenizer)[: settings["eval_docs"]]
    print(f"corpus: {len(train_docs)} training and {len(eval_docs)} held-out documents of {CHUNK} tokens")

    cache = dict(max_tokens=CHUNK, batch_size=16, progress=True)
    store = splice.cache_activations(m, train_docs, SITE, out / "acts", **cache)[SITE]
    held = splice.cache_activations(m, eval_docs, SITE, out / "acts_eval", **cache)[SITE]
    print(store)
    timings["cache"] = time.perf_counter() - started - timings["load"]

    timer = time.perf_counter()
    with torch.enable_grad():
        sae = train(store, settings["steps"], settings["batch"])
    timings["train"] = time.perf_counter() - timer
    print(f"trained {sae} in {timings['train']:.0f} s")

    splice.sae.save(sae, out / "sae")
    reloaded = splice.sae.load(out / "sae")
    x = held[held.positions > 0]
    acts = sae.encode(x)
    assert torch.equal(reloaded.encode(x), acts), "the reloaded SAE must encode identically"

    # -- reconstruction and loss on held-out text ----------------------------------------------
    timer = time.perf_counter()
    ev = 1 - (sae.decode(acts) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    l0 = (acts > 0).sum(-1).float().mean().item()
    dead = int((acts.amax(0) == 0).sum())
    ids = torch.tensor(eval_docs[: settings["loss_docs"]])
    bare = m(ids)
    clean = next_token_loss(bare, ids)
    with m.attach(sae, site=SITE):  # with the error term the site's value is x again: nothing changes
        kept = m(ids)
    drift = (kept - bare).abs().max().item()  # 0.0: recon + (x - recon) is x again, bit for bit here
    assert torch.allclose(kept, bare, atol=1e-4), "attaching with error_term=True must not change logits"
    with m.attach(sae, site=SITE, error_term=False):  # the model runs on decode(encode(x))
        spliced = next_token_loss(m(ids), ids)
    with m.edit({SITE: splice.Zero()}):
        zero = next_token_loss(m(ids), ids)
    recovered = (zero - spliced) / (zero - clean)
    timings["evaluate"] = time.perf_counter() - timer
    report = pd.DataFrame(
        [
            ("held-out tokens (EV, L0, dead)", len(x)),
            ("explained variance", ev.item()),
            ("L0 (active features / token)", l0),
            (f"dead features (of {sae.d_sae})", dead),
            ("dead fraction", dead / sae.d_sae),
            ("loss tokens", ids[:, 1:].numel()),
            ("loss: clean", clean),
            ("loss: SAE reconstruction", spliced),
            ("loss: site zeroed", zero),
            ("fraction of loss recovered", recovered),
            ("max |logit change|, attached with error term", drift),
        ],
        columns=["metric", "value"],
    )
    print(f"\nheld-out evaluation ({mode}):\n{report.to_string(index=False, float_format='{:.4f}'.format)}")
    report.to_csv(out / "sae_eval.csv", index=False)

    # -- features on a prompt, and ablating each of the top ones ------------------------------
    acts_site = SITE + ".sae.acts"  # the SAE's latents, a sub-site while it is attached
    with m.attach(sae, site=SITE), m.record([acts_site]) as rec:
        m.run(PROMPT)
    prompt_acts = rec[acts_site]  # [1, pos, d_sae]
    shown = prompt_acts.clone()
    shown[:, 0] = 0  # the sink token (never trained on) would fill the table
    # " the" often carries a residual several times the usual norm at this layer, so it leads
    print(f"\nmost active features on {PROMPT!r} (position 0 left out):")
    print(
        splice.sae.top_features(shown, k=10, tokens=m.to_str_tokens(PROMPT)).round(2).to_string(index=False)
    )
    last = prompt_acts[0, -1]
    features = last.topk(settings["features"]).indices.tolist()

    # log P(" executed") is ~0.87 and saturates; its logit margin over the runner-up moves more
    sweep = splice.Sweep(
        sites=acts_site,
        interventions=splice.Zero(pos=-1),
        over="features",
        features=features,
        metrics=[metrics.logit_diff("answer", "other")],
        name="SAE feature ablation",
    )
    timer = time.perf_counter()
    with m.attach(sae, site=SITE):  # error term kept: only the zeroed latent changes the forward
        table = sweep.run(m, [{"prompt": PROMPT, "answer": ANSWER, "other": OTHER}])
    timings["sweep"] = time.perf_counter() - timer
    baseline = float(table[table.variant == -1].value.iloc[0])
    ablated = table[table.variant >= 0].copy()
    ablated["activation"] = [last[f].item() for f in ablated.feature]
    ablated = ablated.sort_values("effect", key=abs, ascending=False)
    print(
        f"\nlogit({ANSWER!r}) - logit({OTHER!r}) = {baseline:.3f}; zeroing each of the last token's "
        f"top {len(features)} features there:"
    )
    print(ablated[["feature", "activation", "value", "effect"]].round(4).to_string(index=False))
    table.to_csv(out / "feature_ablation.csv", index=False)

    effect_bars(table, out / "feature_ablation.png", title="one SAE feature zeroed at the last token")

    top = int(ablated.feature.iloc[0])  # the same ablation by hand, outside the sweep
    with m.attach(sae, site=SITE), m.edit({acts_site: splice.Zero(pos=-1, dims=[top])}):
        logits = m(PROMPT)[0, -1]
    one_off = (logits[m.to_single_token(ANSWER)] - logits[m.to_single_token(OTHER)]).item()
    timings["total"] = time.perf_counter() - started
    print(f"one-off ablation of feature {top}: {one_off:.4f} (the sweep: {float(ablated.value.iloc[0]):.4f})")
    print("\n" + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items()) + f"; written to {out}")

    # -- the claims ---------------------------------------------------------------------------------
    ev_floor, recovered_floor, effect_floor = FLOORS[mode]
    assert abs(l0 - K) < 1e-6, f"a TopK SAE keeps exactly k={K} features per token (held-out L0 {l0})"
    assert ev > ev_floor, f"explained variance {ev:.3f} is below {ev_floor}"
    assert recovered > recovered_floor, f"loss recovered {recovered:.3f} is below {recovered_floor}"
    assert clean < spliced < zero, "the reconstruction should cost some loss, zeroing much more"
    # a zero residual stays zero through this bias-free model: uniform logits, loss ln(vocab)
    assert abs(zero - math.log(m.hf.config.vocab_size)) < 1e-3, zero
    assert ablated.effect.abs().max() > effect_floor, f"no top feature moves the margin by {effect_floor}"
    value = float(ablated.value.iloc[0])
    assert abs(value - one_off) < 1e-4, f"sweep {value} and one-off ablation {one_off} disagree"


if __name__ == "__main__":
    main()
