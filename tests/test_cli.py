"""`splice sites` on the embedded model, run as a user would."""

import re
import subprocess
import sys

import pytest


@pytest.mark.real
def test_sites_lists_names_and_shapes():
    out = subprocess.run(
        [sys.executable, "-m", "splice.cli", "sites", "--filter", "blocks.29."],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert re.search(r"^blocks\.29\.attn\.k +\[batch, pos, 3, 64\]$", out.stdout, re.M)
    assert re.search(r"^blocks\.29\.attn\.pattern +\[batch, 9, pos, k_pos\]$", out.stdout, re.M)
    assert "blocks.28." not in out.stdout


def test_errors_are_reported_not_raised():
    out = subprocess.run(
        [sys.executable, "-m", "splice.cli", "sites", "/nonexistent/model/dir"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "splice: cannot load the model '/nonexistent/model/dir'"
    ), out.stderr


def test_version_is_printed():
    import splice

    out = subprocess.run(
        [sys.executable, "-m", "splice.cli", "--version"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip() == f"splice {splice.__version__}"


@pytest.mark.real
def test_sweep_command_writes_table_and_heatmap(tmp_path):
    import shutil
    from pathlib import Path

    import pandas as pd

    config = tmp_path / "ioi.yaml"
    shutil.copy(Path(__file__).parent.parent / "examples" / "ioi_sweep.yaml", config)
    out = subprocess.run(
        [sys.executable, "-m", "splice.cli", "sweep", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "logit_diff: baseline" in out.stdout and "kl_from_baseline: baseline" in out.stdout
    table = pd.read_csv(tmp_path / "out" / "ioi_last_layers.csv")
    assert len(table) == 2 * (4 * 9 + 1)
    assert (tmp_path / "out" / "ioi_last_layers.jsonl").exists() and (
        tmp_path / "out" / "ioi_last_layers.png"
    ).stat().st_size > 1000
    # Re-running resumes from the checkpoint: same table, nothing recomputed.
    again = subprocess.run(
        [sys.executable, "-m", "splice.cli", "sweep", str(config)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert again.returncode == 0 and pd.read_csv(tmp_path / "out" / "ioi_last_layers.csv").equals(table)


def test_sweep_config_errors_are_clear(tmp_path):
    from splice import SpliceError
    from splice.config import load_config

    bad = tmp_path / "bad.yaml"
    bad.write_text("model: smollm2\ndata: [hi]\nsweep: {sites: blocks.0.attn.z}\nmetrics: [logit_diff]\n")
    with pytest.raises(SpliceError, match="interventions is required"):
        load_config(bad)
    bad.write_text(
        "model: smollm2\ndata: [hi]\nsweep: {sites: blocks.0.attn.z, interventions: [{type: Zero}]}\nmetrics: [nope]\n"
    )
    with pytest.raises(SpliceError, match="unknown metric 'nope'"):
        load_config(bad)
    bad.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(Exception, match="constructor"):
        load_config(bad)


def test_a_folder_that_holds_no_model_is_a_splice_error(tmp_path):
    # transformers raises ValueError ("Unrecognized model") for an existing folder without a
    # config: it must reach the user as one `splice:` line like every other unloadable model.
    out = subprocess.run(
        [sys.executable, "-m", "splice.cli", "sites", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith(
        f"splice: cannot load the model '{tmp_path}'"
    ), out.stderr


@pytest.mark.real
def test_a_feature_sweep_config_reads_its_sae_folder_and_draws_bars(tmp_path, smol, monkeypatch, capsys):
    import pandas as pd
    import torch

    import splice
    from splice import SpliceError, cli
    from splice.config import load_config
    from splice.sae import SAEConfig, SparseAutoencoder

    g = torch.Generator().manual_seed(0)
    sae = SparseAutoencoder(
        SAEConfig("topk", 576, 1152, k=16, hook_name="blocks.20.hook_resid_post"),
        {
            "W_enc": torch.randn(576, 1152, generator=g) * 0.05,
            "b_enc": torch.zeros(1152),
            "W_dec": torch.randn(1152, 576, generator=g) * 0.05,
            "b_dec": torch.zeros(576),
        },
    )
    splice.sae.save(sae, tmp_path / "sae")
    config = tmp_path / "features.yaml"
    config.write_text(
        "data: [{prompt: 'The keys of a dictionary are', answer: ' unique'}]\n"
        "sweep: {sites: blocks.20.resid_post.sae.acts, interventions: [{type: Zero}], over: features,\n"
        "        features: 'top:3', sae: sae}\n"
        "metrics: [{answer_logprob: {answer: answer}}]\n"
        "run: {progress: false}\n"
        f"output: {{table: {tmp_path / 'out' / 'features.csv'}}}\n"
    )
    loaded = load_config(config)
    assert loaded.sweep.features == 3 and torch.equal(loaded.sweep.sae.sae.W_dec, sae.W_dec)
    monkeypatch.setattr(splice.spec, "load", lambda *a, **k: smol)  # the session's model, not a reload
    assert cli.main(["sweep", str(config)]) == 0
    printed = capsys.readouterr().out
    assert "bars: " in printed and " feature " in printed
    table = pd.read_csv(tmp_path / "out" / "features.csv")
    assert len(table.feature.dropna()) == 3 and (tmp_path / "out" / "features.png").stat().st_size > 1000
    config.write_text(config.read_text().replace("sae: sae}", "sae: nowhere}"))
    with pytest.raises(
        SpliceError, match=r"features.yaml line 3 at \['sweep'\]\['sae'\]: .*nowhere: no such SAE folder"
    ):
        load_config(config)
