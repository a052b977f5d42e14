"""Sampling and evaluation from a trained workdir: the CLIs, the loader and stream evaluation
during training, checked against independent computations on the restored weights.

Oracles: one uncached forward of the restored model over the split (stream) or each window,
`sampling.generate` on the restored weights for the sample CLI, and the HF export imported
back (weights within 1e-7, identical samples) for the convert CLI.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax import sampling
from megalodon_flax.data import enwik8
from megalodon_flax.training.checkpointing import load_run_config, restore_run
from megalodon_flax.training.loop import train_and_evaluate
from tests import helpers
from tests.factories import tiny_train_config


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    """A tiny run trained for 8 steps with window and stream evaluation every 4 steps."""
    root = tmp_path_factory.mktemp("run")
    data_dir, manual_dir = helpers.make_enwik8_dirs(root)
    config = tiny_train_config(
        data={"data_dir": data_dir, "manual_dir": manual_dir},
        sampling={"every_steps": 0},
        eval={"mode": "both", "stream_max_bytes": 600},
    )
    workdir = root / "workdir"
    train_and_evaluate(config, str(workdir))
    return workdir, config


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _load_split(config, split: str) -> np.ndarray:
    data = config.data
    splits = enwik8.load_enwik8_splits(data.data_dir, data.manual_dir, data.allow_sample_fallback)
    return splits[split]


def _one_shot_nll(run, data: np.ndarray) -> float:
    logits, _ = run.model.apply({"params": run.params}, jnp.asarray(data[None, :-1], jnp.int32))
    logp = np.asarray(jax.nn.log_softmax(logits[0]), np.float64)
    return float(-logp[np.arange(data.size - 1), data[1:]].sum())


@pytest.mark.slow
def test_stream_evaluation_during_training_is_logged(trained_workdir):
    workdir, config = trained_workdir
    stream = helpers.read_scalars(workdir, "eval_stream_bits_per_byte")
    window = helpers.read_scalars(workdir, "eval_bits_per_byte")
    assert sorted(stream) == sorted(window) == [4, 8]
    run = restore_run(workdir)
    split = _load_split(config, config.eval.split)[:600]
    expected = _one_shot_nll(run, split) / 599 / np.log(2)
    np.testing.assert_allclose(stream[8], expected, rtol=1e-4)


@pytest.mark.slow
def test_loader_restores_the_newest_checkpoint(trained_workdir):
    workdir, config = trained_workdir
    run = restore_run(workdir)
    assert run.step == 8
    assert run.config == config
    assert run.model_config == config.model
    assert load_run_config(workdir).seq_len == config.seq_len


@pytest.mark.slow
def test_sample_cli_greedy_matches_generate(trained_workdir):
    workdir, _ = trained_workdir
    proc = _cli(
        "megalodon_flax.cli.sample",
        f"--workdir={workdir}",
        "--prompt=<page>",
        "--max_new_tokens=24",
        "--temperature=0",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = restore_run(workdir)
    prompt = np.frombuffer(b"<page>", np.uint8).astype(np.int32)[None]
    tokens = sampling.generate(run.model, run.params, prompt, 24, jax.random.key(0), 0.0)
    text = "<page>" + bytes(np.asarray(tokens[0], np.uint8).tolist()).decode(
        "utf-8", errors="replace"
    )
    assert proc.stdout.rstrip("\n") == text


@pytest.mark.slow
def test_evaluate_cli_stream_and_window(trained_workdir):
    workdir, config = trained_workdir
    run = restore_run(workdir)
    split = _load_split(config, "test")[:500]
    expected = _one_shot_nll(run, split)
    results = {}
    for mode in ("stream", "window"):
        proc = _cli(
            "megalodon_flax.cli.evaluate",
            f"--workdir={workdir}",
            "--split=test",
            f"--mode={mode}",
            "--max_bytes=500",
            "--call_length=24",
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert results[mode]["num_tokens"] == 499
        assert results[mode]["step"] == 8
    np.testing.assert_allclose(
        results["stream"]["bits_per_byte"], expected / 499 / np.log(2), rtol=1e-4
    )
    # Windows of seq_len + 1 bytes restart the state; each is an independent one-shot.
    window_nll = sum(
        _one_shot_nll(run, split[s : s + config.seq_len + 1])
        for s in range(0, split.size - 1, config.seq_len)
    )
    np.testing.assert_allclose(results["window"]["loss"], window_nll / 499, rtol=1e-4)


@pytest.mark.slow
def test_evaluate_cli_context_curve(trained_workdir, tmp_path):
    """Context mode writes the curve of both protocols as JSON, Markdown and PNG; the exact
    protocol's total is the one-shot loss, its buckets the bytes of each position range."""
    workdir, config = trained_workdir
    run = restore_run(workdir)
    split = _load_split(config, "test")[:1500]
    out_dir = tmp_path / "curve"
    proc = _cli(
        "megalodon_flax.cli.evaluate",
        f"--workdir={workdir}",
        "--mode=context",
        "--max_bytes=1500",
        f"--out_dir={out_dir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ETA" in proc.stderr
    data = json.loads((out_dir / "context_curve.json").read_text())
    exact, upstream = data["curves"]["workdir (exact)"], data["curves"]["workdir (upstream)"]
    assert [(b["start"], b["stop"], b["tokens"]) for b in exact["buckets"]] == [
        (0, 512, 512),
        (512, 1024, 512),
        (1024, 1499, 475),
    ]
    np.testing.assert_allclose(
        exact["bits_per_byte"], _one_shot_nll(run, split) / 1499 / np.log(2), rtol=1e-4
    )
    assert upstream["tokens"] == 1499 and upstream["bits_per_byte"] != exact["bits_per_byte"]
    table = (out_dir / "context_curve.md").read_text()
    assert data["table"] in table and "workdir (upstream) bits/byte" in table
    assert f"{exact['buckets'][1]['bits_per_byte']:.4f}" in table
    assert (out_dir / "context_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one-line `error: ...` a CLI ends with (exit status 1, no traceback)."""
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), proc.stderr[-3000:]
    return last


@pytest.mark.parametrize("module", ["megalodon_flax.cli.sample", "megalodon_flax.cli.evaluate"])
def test_clis_fail_clearly_without_a_run(tmp_path, module):
    proc = _cli(module, f"--workdir={tmp_path / 'absent'}")
    assert "does not exist" in _error_line(proc)
    (tmp_path / "empty").mkdir()
    proc = _cli(module, f"--workdir={tmp_path / 'empty'}")
    assert "config.json not found" in _error_line(proc)


@pytest.mark.slow
def test_convert_cli_round_trip_through_hf(trained_workdir, tmp_path):
    """Export a trained run to megalodon-hf safetensors and import it into a new workdir: the
    weights come back (the ±1 LayerNorm shift may move the last bit) and sample identically."""
    from megalodon_flax.megalodon.convert import load_state_dict
    from megalodon_flax.megalodon.state_dict_layout import expected_shapes

    workdir, _ = trained_workdir
    out = tmp_path / "hf"
    proc = _cli("megalodon_flax.cli.convert", f"--workdir={workdir}", "--to=hf", f"--out={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = restore_run(workdir)
    exported = load_state_dict(str(out))
    assert {k: v.shape for k, v in exported.items()} == expected_shapes(run.model_config, "hf")

    config_file = tmp_path / "config.py"
    config_file.write_text(
        "from megalodon_flax.training.checkpointing import load_run_config\n\n\n"
        "def get_config():\n"
        f"    return load_run_config({str(workdir)!r}).to_config_dict()\n"
    )
    imported = tmp_path / "imported"
    args = [f"--workdir={imported}", "--from=hf", f"--in={out}", f"--config={config_file}"]
    proc = _cli("megalodon_flax.cli.convert", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = restore_run(imported)
    assert again.step == 0
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7),
        again.params,
        run.params,
    )
    samples = [
        _cli(
            "megalodon_flax.cli.sample", f"--workdir={w}", "--temperature=0", "--max_new_tokens=16"
        )
        for w in (workdir, imported)
    ]
    assert samples[0].returncode == samples[1].returncode == 0
    assert samples[0].stdout == samples[1].stdout
    proc = _cli("megalodon_flax.cli.convert", *args)
    assert "already holds checkpoints" in _error_line(proc)
