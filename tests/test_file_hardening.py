"""Files splice reads and writes, under hostile or damaged input: custom-metric identities in
checkpoints, YAML aliases, damaged checkpoints/configs/edits/data, read-only and header-only
checkpoints, and what the CLI prints for each."""

import json
import os
import re
import sys

import pandas as pd
import pytest
import yaml
from conftest import CharTokenizer, build

import splice
from splice import metrics
from splice.cli import main
from splice.config import load_config
from splice.sweeps.checkpoint import Checkpoint

DATA = [{"prompt": p, "correct": "a", "wrong": "c"} for p in ["abcde", "bcdefg", "cdefgh", "ghijk"]]
TOKEN = 5  # read as a module global by the metrics below


@pytest.fixture(scope="module")
def tiny():
    return splice.Model(build("gpt2"), CharTokenizer())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random GPT-2 with a one-token-per-character tokenizer, saved as a local folder."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny_gpt2")
    vocab = {"<pad>": 0, **{chr(c): c - 31 for c in range(32, 127)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<pad>").save_pretrained(
        folder
    )
    build("gpt2").save_pretrained(folder)
    return folder


def run(model, metric, checkpoint=None):
    sweep = splice.Sweep(sites="blocks.0.attn.z", interventions=splice.Zero(), over="heads", metrics=[metric])
    return sweep.run(model, DATA, batch_size=2, checkpoint=checkpoint, progress=False)


def same(a, b):
    """Equal tables up to float rounding (a resumed sweep batches its remaining variants differently)."""
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-4, atol=1e-6)
    return True


def interrupt(path, keep=3):
    """What a kill leaves behind: the header and the first `keep` results."""
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[: 1 + keep]))


# -- A. a custom metric's identity covers what determines its result ------------------------------
def _global_token(logits, clean, batch):
    return logits[:, -1, TOKEN]


def _nested_global(logits, clean, batch):
    def pick(x):
        return x[:, -1, TOKEN]

    return pick(logits)


def _reading(kind, t, monkeypatch):
    """A custom metric reading token t through a closure cell, a default argument or a global."""
    if kind == "closure":
        return metrics.custom(lambda logits, clean, batch: logits[:, -1, t], name="at_t")
    if kind == "default":
        return metrics.custom(lambda logits, clean, batch, t=t: logits[:, -1, t], name="at_t")
    monkeypatch.setattr(sys.modules[__name__], "TOKEN", t)
    return metrics.custom(_global_token if kind == "global" else _nested_global, name="at_t")


@pytest.mark.parametrize("kind", ["closure", "default", "global", "nested global"])
def test_resuming_with_another_captured_value_is_refused(tiny, tmp_path, monkeypatch, kind):
    path = tmp_path / "sweep.jsonl"
    run(tiny, _reading(kind, 5, monkeypatch), path)
    interrupt(path)
    with pytest.raises(splice.SpliceError, match="different sweep"):
        run(tiny, _reading(kind, 7, monkeypatch), path)
    resumed = run(tiny, _reading(kind, 5, monkeypatch), path)  # the same value resumes
    assert same(resumed, run(tiny, _reading(kind, 5, monkeypatch)))


# Two metrics with the same source text (one line) but different constants.
AT_5, AT_7 = (lambda logits, clean, batch: logits[:, -1, 5]), (lambda logits, clean, batch: logits[:, -1, 7])


def test_identity_is_the_code_not_the_source_text(tiny, tmp_path):
    path = tmp_path / "sweep.jsonl"
    run(tiny, metrics.custom(AT_5, name="at"), path)
    with pytest.raises(splice.SpliceError, match="different sweep"):
        run(tiny, metrics.custom(AT_7, name="at"), path)


def _compiled(t):
    """A function without source text (as from exec or a notebook cell that is gone)."""
    namespace = {}
    exec(f"def at(logits, clean, batch):\n    return logits[:, -1, {t}]\n", namespace)
    return metrics.custom(namespace["at"])


def test_functions_without_source_text_are_known_by_their_code(tiny, tmp_path):
    path = tmp_path / "sweep.jsonl"
    first = run(tiny, _compiled(5), path)
    interrupt(path)
    assert same(run(tiny, _compiled(5), path), first)  # an equal function, another object: resumes
    with pytest.raises(splice.SpliceError, match="different sweep"):
        run(tiny, _compiled(7), path)


class Probe:
    """An arbitrary object: it has no stable value to fingerprint."""

    index = 5


def test_a_metric_reading_an_arbitrary_object_needs_an_explicit_identity(tiny, tmp_path):
    probe = Probe()
    path = tmp_path / "sweep.jsonl"
    fn = lambda logits, clean, batch: logits[:, -1, probe.index]  # noqa: E731
    with pytest.raises(splice.SpliceError, match=r"closure variable 'probe'.*Probe.*identity="):
        run(tiny, metrics.custom(fn, name="probe"), path)
    assert not path.exists()
    run(tiny, metrics.custom(fn, name="probe"))  # without a checkpoint nothing needs an identity
    first = run(tiny, metrics.custom(fn, name="probe", identity="probe index 5"), path)
    interrupt(path)
    assert same(run(tiny, metrics.custom(fn, name="probe", identity="probe index 5"), path), first)
    with pytest.raises(splice.SpliceError, match="different sweep"):
        run(tiny, metrics.custom(fn, name="probe", identity="probe index 7"), path)


# -- B. hostile and damaged files ---------------------------------------------------------------
def billion_laughs(levels=8):
    """~400 bytes that expand to 8**levels floats through nested aliases."""
    lines = ["a0: &a0 [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 8)}]" for i in range(1, levels)]
    return "\n".join(lines) + f"\nblocks.0.resid_post: {{type: Add, vector: {{tensor: *a{levels - 1}}}}}\n"


def test_yaml_aliases_are_refused_in_edits_files(tmp_path):
    path = tmp_path / "laughs.yaml"
    path.write_text(billion_laughs())
    assert len(path.read_bytes()) < 600
    with pytest.raises(splice.SpliceError, match=rf"{re.escape(str(path))} line 1: .*anchors and aliases"):
        splice.Edits.load(path)


def test_yaml_aliases_are_refused_in_configs(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "model: smollm2\ndata: [hi]\nsweep:\n  sites: blocks.0.attn.z\n"
        "  interventions: &zero [{type: Zero}]\nmetrics: [kl_from_baseline]\n"
    )
    with pytest.raises(splice.SpliceError, match=rf"{re.escape(str(path))} line 5: .*anchors and aliases"):
        load_config(path)


class SharingEdits(splice.Edits):
    """An Edits whose to_dict shares one record between two sites (safe_dump made that an alias)."""

    def to_dict(self):
        shared = [{"type": "Scale", "factor": 0.5, "pos": [1, 2]}]
        return {"blocks.0.mlp.out": shared, "blocks.1.mlp.out": shared}


def test_edits_yaml_is_written_without_aliases(tmp_path):
    path = tmp_path / "edits.yaml"
    SharingEdits().save(path)
    events = list(yaml.parse(path.read_text()))
    assert not any(isinstance(e, yaml.AliasEvent) or getattr(e, "anchor", None) for e in events)
    assert splice.Edits.load(path)["blocks.1.mlp.out"] == splice.Scale(0.5, pos=[1, 2])


def test_an_absurd_tensor_record_is_refused_before_it_is_allocated():
    nested = [0.0] * 8
    for _ in range(7):  # 8**8 = 16.7M numbers described by 8 shared lists
        nested = [nested] * 8
    with pytest.raises(
        splice.SpliceError, match=r"\[8, 8, 8, 8, 8, 8, 8, 8\] \(16,777,216 numbers\) is over the limit"
    ):
        splice.Edits.from_dict({"blocks.0.resid_post": {"type": "Add", "vector": {"tensor": nested}}})


def test_a_finished_read_only_checkpoint_is_read_without_writing(tiny, tmp_path):
    path = tmp_path / "sweep.jsonl"
    table = run(tiny, metrics.kl_from_baseline(), path)
    os.utime(
        path, ns=(10**9, 10**9)
    )  # any write would move the mtime (also as root, which chmod does not stop)
    path.chmod(0o444)
    content, listing = path.read_bytes(), sorted(tmp_path.iterdir())
    assert run(tiny, metrics.kl_from_baseline(), path).equals(table)
    assert (
        path.stat().st_mtime_ns == 10**9
        and path.read_bytes() == content
        and sorted(tmp_path.iterdir()) == listing
    )


def test_a_torn_last_line_is_cut_off_when_the_sweep_appends(tiny, tmp_path):
    path = tmp_path / "sweep.jsonl"
    table = run(tiny, metrics.kl_from_baseline(), path)
    interrupt(path, keep=4)
    with open(path, "a") as handle:
        handle.write('{"variant": 3, "batch": 1, "val')
    assert same(run(tiny, metrics.kl_from_baseline(), path), table)
    records = [json.loads(line) for line in path.read_text().splitlines()[1:]]
    assert len({(r["variant"], r["batch"]) for r in records}) == len(records) == (4 + 1) * 2


HEADER = '{"splice_sweep": 1, "spec_hash": "abc"}\n'
RESULT = '{"variant": 0, "batch": 0, "values": {"m": [1.0]}}\n'


@pytest.mark.parametrize(
    "content, line, problem",
    [
        (HEADER + '{"variant": 0, "batch": 0}\n', 2, "missing values"),
        (HEADER + RESULT + "[1, 2]\n", 3, "got a JSON list"),
        (HEADER + '{"variant": "0", "batch": 0, "values": {}}\n', 2, "wrong type"),
        (HEADER + '{"variant": 0, "ba\n' + RESULT, 2, "invalid JSON"),
        ('{"splice_sweep": 1, "spec_ha', 1, "cut short"),
        ('{"name": "not a checkpoint"}\n' + RESULT, 1, 'got \'{"name"'),
        ("prompt,correct\nabc,a\n", 1, "invalid JSON"),
    ],
)
def test_a_damaged_checkpoint_is_named_by_file_and_line(tmp_path, content, line, problem):
    path = tmp_path / "sweep.jsonl"
    path.write_text(content)
    with pytest.raises(
        splice.SpliceError, match=rf"{re.escape(str(path))} line {line}: .*{re.escape(problem)}.*expected"
    ):
        Checkpoint(path, "abc")
    assert path.read_text() == content


def test_a_header_without_results_is_taken_over(tiny, tmp_path):
    path = tmp_path / "sweep.jsonl"
    path.write_text('{"splice_sweep": 1, "spec_hash": "left by a run that failed before its first result"}\n')
    table = run(tiny, metrics.kl_from_baseline(), path)
    assert same(table, run(tiny, metrics.kl_from_baseline()))
    assert (
        json.loads(path.read_text().splitlines()[0])["spec_hash"]
        != "left by a run that failed before its first result"
    )


EDITS_ERRORS = [
    ("e.yaml", "a:\n  type: Zero\n  pos: {slice: [0, 4, 0]}\n", 3, "slice step cannot be 0"),
    ("e.yaml", "a: {type: Zero, pos: {slice: [0, 4]}}\n", 1, "three integers or nulls"),
    ("e.yaml", "a: {type: Zero, pos: {slice: [0, 4, 1, 2]}}\n", 1, "three integers or nulls"),
    ("e.yaml", "a: {type: Zero, dims: {slice: [a, 4, null]}}\n", 1, "three integers or nulls"),
    ("e.yaml", "a: {type: Zero, dims: {slice: [true, 4, null]}}\n", 1, "three integers or nulls"),
    ("e.yaml", "a: {type: Add, vector: {tensor: [1.0], dtype: floaty}}\n", 1, "floaty"),
    ("e.yaml", "a: {type: Add, vector: {tensor: [1.0, x]}}\n", 1, "rectangular nested list of numbers"),
    (
        "e.yaml",
        "a: {type: Add, vector: {tensor: [[1.0], [1.0, 2.0]]}}\n",
        1,
        "rectangular nested list of numbers",
    ),
    ("e.yaml", "a: Zero\n", 1, "expected an intervention record"),
    ("e.yaml", "- a\n- b\n", None, "expected a mapping of site"),
    ("e.yaml", "a: {type: Zero, pos: [1, 2}\n", 1, "expected ',' or ']'"),
    (
        "e.json",
        '{\n "a": [\n  {"type": "Zero", "pos": {"slice": [0, 4, 0]}}\n ]\n}\n',
        3,
        "slice step cannot be 0",
    ),
    ("e.json", '{"a": [}\n', 1, "invalid JSON"),
]


@pytest.mark.parametrize("name, content, line, problem", EDITS_ERRORS)
def test_a_bad_edits_file_is_named_by_file_and_line(tmp_path, name, content, line, problem):
    path = tmp_path / name
    path.write_text(content)
    at = f" line {line}" if line else ""
    with pytest.raises(splice.SpliceError, match=rf"{re.escape(str(path))}{at}\b.*{re.escape(problem)}"):
        splice.Edits.load(path)


def test_a_missing_edits_file_is_named(tmp_path):
    with pytest.raises(
        splice.SpliceError,
        match=rf"cannot read {re.escape(str(tmp_path))}/nope.yaml: No such file.*expected an edits file",
    ):
        splice.Edits.load(tmp_path / "nope.yaml")


def write_config(
    tmp_path, model_dir=None, data="data.jsonl", metric="kl_from_baseline", rows=None, **replace
):
    """A working sweep config (and its data file) in tmp_path, with parts replaced."""
    rows = rows if rows is not None else [{"prompt": p["prompt"]} for p in DATA]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    parts = {
        "model": f"model: {model_dir}\n",
        "data": f"data: {data}\n",
        "sweep": "sweep:\n  sites: blocks.0.attn.z\n  interventions: [{type: Zero}]\n  over: heads\n",
        "metrics": f"metrics:\n  - {metric}\n",
        "run": f"run: {{batch_size: 2, checkpoint: {tmp_path / 'ckpt.jsonl'}, progress: false}}\n",
        "output": f"output: {{table: {tmp_path / 'out' / 'table.csv'}, heatmap: false}}\n",
    }
    parts.update(replace)
    path = tmp_path / "sweep.yaml"
    path.write_text("".join(parts.values()))
    return path


CONFIG_ERRORS = [
    (dict(sweep="sweep:\n  sites: [blocks.0.attn.z\n"), "sweep.yaml", 5, "expected ',' or ']'"),
    (dict(data="missing.jsonl"), "missing.jsonl", None, "No such file"),
    (dict(metric="nope"), "sweep.yaml", 8, "unknown metric 'nope'"),
    (
        dict(
            sweep="sweep:\n  sites: blocks.0.attn.z\n  interventions: [{type: Zero, pos: {slice: [0, 2, 0]}}]\n"
        ),
        "sweep.yaml",
        5,
        "slice step cannot be 0",
    ),
    (dict(run="run: {batchsize: 2}\n"), "sweep.yaml", 9, "unknown keys ['batchsize']"),
    (dict(data="[hi, 3]"), "sweep.yaml", 2, "expected a prompt string"),
]


@pytest.mark.parametrize("replace, name, line, problem", CONFIG_ERRORS)
def test_a_bad_config_is_named_by_file_and_line(tmp_path, replace, name, line, problem):
    path = write_config(tmp_path, **replace)
    at = f" line {line}" if line else ""
    with pytest.raises(splice.SpliceError, match=rf"{re.escape(name)}{at}\b.*{re.escape(problem)}"):
        load_config(path)


def test_a_bad_data_line_is_named_by_file_and_line(tmp_path):
    path = write_config(tmp_path)
    with open(tmp_path / "data.jsonl", "a") as handle:
        handle.write('{"prompt": "abc"\n')
    with pytest.raises(splice.SpliceError, match=r"data.jsonl line 5: invalid JSON"):
        load_config(path)


def test_a_missing_config_is_named(tmp_path):
    with pytest.raises(splice.SpliceError, match=r"nope.yaml: No such file.*expected a sweep config"):
        load_config(tmp_path / "nope.yaml")


# -- CLI ----------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def quiet_loading():
    """No weight-loading progress bar on stderr, where the CLI's one-line errors are checked."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    yield
    hf_logging.enable_progress_bar()


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_a_failed_cli_run_does_not_block_the_corrected_one(tmp_path, model_dir, capsys):
    broken = write_config(tmp_path, model_dir, metric="answer_logprob")  # the data has no 'answer' field
    code, _, err = cli(capsys, "sweep", broken)
    assert code == 2 and "data field 'answer'" in err
    left_behind = (tmp_path / "ckpt.jsonl").exists()
    fixed = write_config(
        tmp_path,
        model_dir,
        metric="answer_logprob",
        rows=[{"prompt": p["prompt"], "answer": "a"} for p in DATA],
    )
    code, out, err = cli(capsys, "sweep", fixed)
    assert code == 0, err
    assert "answer_logprob: baseline" in out and (tmp_path / "out" / "table.csv").exists()
    assert not left_behind  # the failed run wrote no checkpoint at all


@pytest.mark.parametrize(
    "case",
    [
        "yaml syntax",
        "missing config",
        "missing data",
        "alias",
        "bad slice",
        "checkpoint missing keys",
        "checkpoint torn header",
    ],
)
def test_cli_reports_file_errors_in_one_line(tmp_path, model_dir, capsys, case):
    config = write_config(tmp_path, model_dir)
    checkpoint = tmp_path / "ckpt.jsonl"
    named = {
        "yaml syntax": "sweep.yaml",
        "missing config": "nope.yaml",
        "missing data": "missing.jsonl",
        "alias": "sweep.yaml",
        "bad slice": "sweep.yaml",
        "checkpoint missing keys": "ckpt.jsonl",
        "checkpoint torn header": "ckpt.jsonl",
    }[case]
    if case == "yaml syntax":
        config = write_config(tmp_path, model_dir, metrics="metrics: [kl_from_baseline\n")
    elif case == "missing config":
        config = tmp_path / "nope.yaml"
    elif case == "missing data":
        config = write_config(tmp_path, model_dir, data="missing.jsonl")
    elif case == "alias":
        config = write_config(tmp_path, model_dir, metrics="metrics: &m [kl_from_baseline]\n")
    elif case == "bad slice":
        config = write_config(
            tmp_path,
            model_dir,
            sweep="sweep:\n  sites: blocks.0.attn.z\n  interventions: [{type: Zero, pos: {slice: [1]}}]\n",
        )
    else:
        assert cli(capsys, "sweep", config)[0] == 0
        lines = checkpoint.read_text().splitlines()
        checkpoint.write_text(
            '{"splice_sweep": 1, "spec'
            if case == "checkpoint torn header"
            else "\n".join(lines[:2] + ['{"variant": 1}']) + "\n"
        )
    code, _, err = cli(capsys, "sweep", config)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("splice: ") and named in err, err


def test_sites_filter_takes_globs_and_text(model_dir, capsys):
    def listed(pattern):
        code, out, err = cli(capsys, "sites", model_dir, "--filter", pattern)
        assert code == 0, err
        return {m.group(1) for m in re.finditer(r"^(\S+) +\[", out, re.M)}

    assert listed("blocks.*.attn.q") == {f"blocks.{layer}.attn.q" for layer in range(3)}
    assert listed("blocks.1.") == {n for n in splice.load(model_dir).sites if n.startswith("blocks.1.")}
    code, _, err = cli(capsys, "sites", model_dir, "--filter", "blocks.*.nope")
    assert code == 2 and len(err.splitlines()) == 1 and "matches --filter 'blocks.*.nope'" in err
