"""SAE interop: splice.sae against SAELens 6.54's own API, side by side in one process.

    .venv/bin/python benchmarks/peers/sae_interop.py   # after `bash benchmarks/peers/setup.sh saelens`

It re-runs itself in the saelens venv (which holds splice too). For each case (standard with and
without apply_b_dec_to_input, JumpReLU, TopK with and without rescale_acts_by_decoder_norm) it
builds an SAE with SAELens' classes and random weights, then checks, on random inputs:

1. SAELens `save_model` -> `splice.sae.load`: encode and decode equal SAELens' own;
2. the SAELens object itself through `splice.sae.as_sae` (accepted as is) and `check_fits` on a tiny
   GPT-2 `splice.Model` (its width and hook name are read from SAELens' config);
3. `splice.sae.save` -> SAELens `SAE.load_from_disk`: same class, config and outputs.

Two more cases write a cfg.json in the layout SAELens 5.x saved (flat keys, `hook_name` at the
top, TopK as `activation_fn_str: "topk"`), and check that splice and SAELens' own loader for that
layout read it to the same outputs.

Then the SAELens objects themselves are attached to a model. For standard, JumpReLU and TopK, an
SAE built with SAELens' classes (random weights, decoder rows scaled to unit norm, as SAEs are
trained) is passed as it is to `m.attach(sae, site="blocks.1.resid_post")` on
`splice.Model(GPT2LMHeadModel)`, a random 3-layer GPT-2 with d_model 64, on 4 x 9 random tokens,
under `torch.no_grad`. With `x` the site recorded without the SAE, `a = sae.encode(x)` and `k` the
feature active on the most tokens:

a. error term kept: the logits equal the bare ones exactly, with nothing read, with `.sae.acts`
   recorded, and attached by its own `cfg.metadata.hook_name` (no `site=`);
b. `.sae.acts` recorded equals `sae.encode(x)` exactly;
c. `error_term=False`: the logits equal those of a hand-written torch forward hook on block 1
   that returns `sae.decode(sae.encode(x))` (tolerance 1e-6);
d. `Zero(dims=[k])` at `.sae.acts`: the site the model goes on with (read by a torch pre-hook on
   block 2) minus `x` equals `-a_k * W_dec[k]` (tolerance 1e-5).

The same four checks run on the splice copy of each SAE (`splice.sae.load` of its SAELens-saved
folder), and the copy's logits and latents are compared with the SAELens object's: identical in
a-c; in d the copy takes splice's fast path (only row k of W_dec, `linear_decoder`) and the
SAELens object the generic one (`decode(a') - decode(a)`), so they agree up to rounding (1e-5).

Prints two tables, writes `results/sae_interop.json` (the attach rows carry `"section":
"attach"`), exits 1 if any file difference exceeds 0 (the same torch ops run in the same order
on the same device) or any attach check exceeds its tolerance.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV_PYTHON = HERE / ".venvs" / "saelens" / "bin" / "python"
RESULTS = HERE / "results" / "sae_interop.json"
D_IN, D_SAE, K = 64, 256, 12
SHAPE = (4, 9, D_IN)  # [batch, pos, d_in]
TOL = 0.0
HOOK = "blocks.1.hook_resid_post"


def max_diff(a, b) -> float:
    if a.shape != b.shape:
        raise ValueError(f"shape {tuple(a.shape)} != {tuple(b.shape)}")
    return float((a.double() - b.double()).abs().max())


def build_saelens(kind: str, seed: int):
    """An SAELens inference SAE of one case, with random weights (threshold spread around the
    pre-activations' scale, some negative, so the JumpReLU mask and ReLU both matter)."""
    import torch
    from sae_lens import (
        JumpReLUSAE,
        JumpReLUSAEConfig,
        StandardSAE,
        StandardSAEConfig,
        TopKSAE,
        TopKSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=HOOK, model_name="tiny-gpt2")
    common = dict(d_in=D_IN, d_sae=D_SAE, dtype="float32", device="cpu", metadata=meta)
    if kind == "standard":
        sae = StandardSAE(StandardSAEConfig(**common))
    elif kind == "standard, no b_dec on input":
        sae = StandardSAE(StandardSAEConfig(**common, apply_b_dec_to_input=False))
    elif kind == "jumprelu":
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
    elif kind == "topk":
        sae = TopKSAE(TopKSAEConfig(**common, k=K))
    elif kind == "topk, rescale by decoder norm":
        sae = TopKSAE(TopKSAEConfig(**common, k=K, rescale_acts_by_decoder_norm=True))
    else:
        raise ValueError(kind)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.3 if name.startswith("b") else 1.0))
        if getattr(sae, "threshold", None) is not None:
            sae.threshold.copy_(torch.randn(D_SAE, generator=g) * 4.0)
    return sae.eval()


def outputs(sae, x):
    import torch

    with torch.no_grad():
        acts = sae.encode(x)
        return acts, sae.decode(acts)


def compare() -> list[dict]:
    import sae_lens
    import torch
    import transformers
    from sae_lens import SAE

    import splice
    from splice import sae as ssae

    torch.set_num_threads(2)
    config = transformers.GPT2Config(n_layer=2, n_embd=D_IN, n_head=4, vocab_size=32)
    model = splice.Model(transformers.GPT2LMHeadModel(config).eval())
    rows: list[dict] = []

    def row(case, path, theirs, mine, note=""):
        (a1, r1), (a2, r2) = theirs, mine
        rows.append(
            {
                "case": case,
                "path": path,
                "encode_max_abs_diff": max_diff(a1, a2),
                "decode_max_abs_diff": max_diff(r1, r2),
                "nonzero_features_per_row": round(float((a1 != 0).sum(-1).double().mean()), 2),
                "note": note,
            }
        )

    cases = ["standard", "standard, no b_dec on input", "jumprelu", "topk", "topk, rescale by decoder norm"]
    with tempfile.TemporaryDirectory() as tmp:
        for i, kind in enumerate(cases):
            theirs = build_saelens(kind, seed=i)
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)) * 2.0
            reference = outputs(theirs, x)

            # 1. SAELens save_model -> splice.sae.load
            folder = Path(tmp) / f"saelens-{i}"
            theirs.save_model(folder)
            mine = ssae.load(folder)
            assert mine.cfg.hook_name == HOOK, mine.cfg
            row(kind, "SAELens save_model -> splice.sae.load", reference, outputs(mine, x), repr(mine))

            # 2. the SAELens object itself
            same = ssae.as_sae(theirs)
            assert same is theirs
            site = ssae.check_fits(theirs, model)
            assert site == "blocks.1.resid_post", site
            row(kind, "SAELens SAE via as_sae (+ check_fits)", reference, outputs(same, x), f"site {site}")

            # 3. splice.sae.save -> SAELens load_from_disk
            back = Path(tmp) / f"splice-{i}"
            ssae.save(mine, back)
            reread = SAE.load_from_disk(back)
            assert type(reread) is type(theirs), (type(reread), type(theirs))
            assert reread.cfg.metadata.hook_name == HOOK
            assert getattr(reread.cfg, "k", None) == getattr(theirs.cfg, "k", None)
            row(
                kind,
                "splice.sae.save -> SAELens load_from_disk",
                reference,
                outputs(reread, x),
                type(reread).__name__,
            )

        # 4. the layout SAELens 5.x wrote (keys of its SAEConfig.to_dict), read by both loaders
        legacy = [
            ("legacy 5.x standard", {"architecture": "standard", "activation_fn_str": "relu"}, "standard"),
            (
                "legacy 5.x topk",
                {"architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}},
                "topk",
            ),
        ]
        for j, (case, fields, kind) in enumerate(legacy):
            source = build_saelens(kind, seed=50 + j)
            folder = Path(tmp) / f"legacy-{j}"
            source.save_model(folder)
            cfg = {
                "d_in": D_IN,
                "d_sae": D_SAE,
                "dtype": "float32",
                "device": "cpu",
                "model_name": "tiny-gpt2",
                "hook_name": HOOK,
                "hook_layer": 1,
                "hook_head_index": None,
                "activation_fn_kwargs": {},
                "apply_b_dec_to_input": True,
                "finetuning_scaling_factor": False,
                "sae_lens_training_version": "5.11.0",
                "prepend_bos": True,
                "dataset_path": "none",
                "dataset_trust_remote_code": True,
                "context_size": 128,
                "normalize_activations": "none",
                "neuronpedia_id": None,
                "model_from_pretrained_kwargs": {},
                "seqpos_slice": [None],
                **fields,
            }
            (folder / "cfg.json").write_text(json.dumps(cfg))
            x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(200 + j)) * 2.0
            theirs = SAE.load_from_disk(folder)
            mine = ssae.load(folder)
            assert mine.cfg.hook_name == HOOK and mine.cfg.architecture == kind, mine.cfg
            row(
                case,
                "5.x cfg.json: SAELens load_from_disk vs splice.sae.load",
                outputs(theirs, x),
                outputs(mine, x),
                repr(mine),
            )

    for r in rows:
        r.update(
            splice=splice.__version__,
            sae_lens=sae_lens.__version__,
            torch=torch.__version__,
            machine=platform.machine(),
        )
    return rows


ATTACH_SITE = "blocks.1.resid_post"
ATTACH_SHAPE = (4, 9)  # [batch, pos] token ids
ATTACH_TOL = {"exact": 0.0, "recon": 1e-6, "edit": 1e-5}


def attach_checks(tmp: Path) -> list[dict]:
    """Checks a-d of the module docstring, for each SAELens class and its splice copy."""
    import torch
    import transformers

    import splice
    from splice import sae as ssae

    torch.set_num_threads(2)
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=D_IN, n_head=4, vocab_size=32)
    hf = transformers.GPT2LMHeadModel(config).eval()
    model = splice.Model(hf)
    ids = torch.randint(0, config.vocab_size, ATTACH_SHAPE, generator=torch.Generator().manual_seed(7))
    rows: list[dict] = []

    def logits():
        return hf(input_ids=ids).logits

    def replace_output(fn):
        """A plain torch forward hook on block 1 replacing its hidden states by fn(them)."""

        def hook(module, args, output):
            if isinstance(output, tuple):
                return (fn(output[0]),) + tuple(output[1:])
            return fn(output)

        return hf.transformer.h[1].register_forward_hook(hook)

    def site_seen_by_block_2(run):
        """The blocks.1.resid_post tensor the model goes on with: block 2's input."""
        seen = {}

        def pre_hook(module, args, kwargs):
            seen["x"] = (args[0] if args else kwargs["hidden_states"]).clone()

        handle = hf.transformer.h[2].register_forward_pre_hook(pre_hook, with_kwargs=True)
        try:
            out = run()
        finally:
            handle.remove()
        return seen["x"], out

    def add(case, sae_name, check, diff, tol):
        rows.append(
            {
                "section": "attach",
                "case": case,
                "sae": sae_name,
                "check": check,
                "max_abs_diff": diff,
                "tol": tol,
                "ok": bool(diff <= tol),
            }
        )

    acts_site = f"{ATTACH_SITE}.sae.acts"
    with torch.no_grad():
        with model.record(ATTACH_SITE) as rec:
            bare = logits()
        x = rec[ATTACH_SITE]
        for i, kind in enumerate(["standard", "jumprelu", "topk"]):
            theirs = build_saelens(kind, seed=300 + i)
            theirs.W_dec /= theirs.W_dec.norm(dim=-1, keepdim=True)
            folder = tmp / f"attach-{kind}"
            theirs.save_model(folder)
            mine = ssae.load(folder)
            a = theirs.encode(x)
            k = int((a != 0).flatten(0, 1).sum(0).argmax())
            active = int((a[..., k] != 0).sum())
            case = f"{kind} (feature {k} on {active}/{a.shape[0] * a.shape[1]} tokens)"
            print(
                f"attach {kind}: L0 {float((a != 0).sum(-1).double().mean()):.1f}, max |a_k W_dec[k]| "
                f"{float((a[..., k : k + 1] * theirs.W_dec[k]).abs().max()):.3g}, max |x| {float(x.abs().max()):.3g}, "
                f"max |logits| {float(bare.abs().max()):.3g}"
            )
            outs = {}
            for name, sae in ((type(theirs).__name__, theirs), ("splice.sae.load copy", mine)):
                # a. transparency
                with model.attach(sae, site=ATTACH_SITE):
                    plain = logits()
                with model.attach(sae, site=ATTACH_SITE), model.record(acts_site) as got:
                    recorded = logits()
                with model.attach(sae):  # the site from cfg.metadata.hook_name (SAELens 6) / cfg.hook_name
                    assert model.attached(ATTACH_SITE) is sae
                    by_hook = logits()
                for label, out in (
                    ("a. error term, no edit: logits == bare", plain),
                    ("a. error term, .sae.acts recorded: logits == bare", recorded),
                    ("a. attached by its hook_name: logits == bare", by_hook),
                ):
                    add(case, name, label, float(not torch.equal(out, bare)), ATTACH_TOL["exact"])
                # b. latents
                acts = got[acts_site]
                add(
                    case,
                    name,
                    "b. .sae.acts == SAELens encode(x)",
                    float(not torch.equal(acts, a)),
                    ATTACH_TOL["exact"],
                )
                # c. reconstruction only
                with model.attach(sae, site=ATTACH_SITE, error_term=False):
                    recon = logits()
                handle = replace_output(lambda h: theirs.decode(theirs.encode(h)).to(h.dtype))
                try:
                    hand = logits()
                finally:
                    handle.remove()
                add(
                    case,
                    name,
                    "c. error_term=False vs hand hook decode(encode(x))",
                    max_diff(recon, hand),
                    ATTACH_TOL["recon"],
                )
                # d. one feature zeroed
                with model.attach(sae, site=ATTACH_SITE), model.edit({acts_site: splice.Zero(dims=[k])}):
                    site, edited = site_seen_by_block_2(logits)
                expected = -a[..., k : k + 1] * theirs.W_dec[k]
                add(
                    case,
                    name,
                    "d. Zero(dims=[k]): site - x vs -a_k W_dec[k]",
                    max_diff(site - x, expected),
                    ATTACH_TOL["edit"],
                )
                outs[name] = {"recorded": acts, "recon": recon, "edited": edited, "site": site}
                if model.hook_count:
                    raise RuntimeError("splice left hooks on the model")
            ours, mine_out = outs[type(theirs).__name__], outs["splice.sae.load copy"]
            for label, key, tol in (
                (".sae.acts", "recorded", ATTACH_TOL["exact"]),
                ("error_term=False logits", "recon", ATTACH_TOL["exact"]),
                ("Zero(dims=[k]) logits", "edited", ATTACH_TOL["edit"]),
                ("Zero(dims=[k]) site", "site", ATTACH_TOL["edit"]),
            ):
                add(case, "copy vs SAELens object", f"same {label}", max_diff(ours[key], mine_out[key]), tol)
    return rows


def main() -> int:
    if Path(sys.prefix).resolve() != VENV_PYTHON.parent.parent.resolve():
        if not VENV_PYTHON.exists():
            print("sae_interop: run `bash benchmarks/peers/setup.sh saelens` first", file=sys.stderr)
            return 2
        return subprocess.run(
            [str(VENV_PYTHON), __file__], env={**os.environ, "PYTHONWARNINGS": "ignore"}
        ).returncode
    rows = compare()
    with tempfile.TemporaryDirectory() as tmp:
        attach = attach_checks(Path(tmp))
    RESULTS.parent.mkdir(exist_ok=True)
    versions = {k: rows[0][k] for k in ("splice", "sae_lens", "torch", "machine")}
    RESULTS.write_text(json.dumps(rows + [{**r, **versions} for r in attach], indent=1) + "\n")
    width = max(len(r["case"]) for r in rows)
    pwidth = max(len(r["path"]) for r in rows)
    print(f"{'case':<{width}}  {'path':<{pwidth}}  {'encode diff':>11}  {'decode diff':>11}  {'L0':>6}")
    for r in rows:
        print(
            f"{r['case']:<{width}}  {r['path']:<{pwidth}}  {r['encode_max_abs_diff']:>11.3g}  "
            f"{r['decode_max_abs_diff']:>11.3g}  {r['nonzero_features_per_row']:>6}"
        )
    bad = [r for r in rows if max(r["encode_max_abs_diff"], r["decode_max_abs_diff"]) > TOL]
    if bad:
        print(f"\nMISMATCH above {TOL}: {[(r['case'], r['path']) for r in bad]}")

    print(f"\nattached to splice.Model(GPT2LMHeadModel, 3 layers, d_model {D_IN}) at {ATTACH_SITE}:")
    widths = {key: max(len(str(r[key])) for r in attach) for key in ("case", "sae", "check")}
    print(
        f"{'case':<{widths['case']}}  {'sae':<{widths['sae']}}  {'check':<{widths['check']}}  {'max diff':>9}  {'tol':>7}"
    )
    for r in attach:
        flag = "" if r["ok"] else "  FAIL"
        print(
            f"{r['case']:<{widths['case']}}  {r['sae']:<{widths['sae']}}  {r['check']:<{widths['check']}}  "
            f"{r['max_abs_diff']:>9.3g}  {r['tol']:>7.3g}{flag}"
        )
    attach_bad = [r for r in attach if not r["ok"]]
    if attach_bad:
        print(f"\nATTACH CHECKS FAILED: {[(r['case'], r['sae'], r['check']) for r in attach_bad]}")
    else:
        print(f"\nattach: all {len(attach)} checks within tolerance")
    print(f"\nwrote {RESULTS.relative_to(HERE.parent.parent)}")
    return 1 if bad or attach_bad else 0


if __name__ == "__main__":
    sys.exit(main())
