"""Smoke test of `benchmarks/bench_model.py --quick --skip-peer` run as a subprocess.

Checks the JSON layout, positive timings, tokens/s against tokens / median time, the parameter
count against the closed-form count of the config, and the compiled argument size against the
bytes of the float32 parameters. About 70 s on 2 idle cores (marked slow).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import megalodon_flax as mf
from tests import helpers

MIB = 1024.0 * 1024.0


@pytest.mark.slow
def test_quick_benchmark_writes_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "bench.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_model",
            "--quick",
            "--skip-peer",
            "--out",
            str(out),
        ],
        cwd=helpers.REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TRAIN STEP" in proc.stdout and "FORWARD" in proc.stdout and "CEMA" in proc.stdout
    data = json.loads(out.read_text())

    for key in ("machine", "settings", "config", "param_counts", "train", "forward", "cema"):
        assert key in data, key
    machine = data["machine"]
    for key in ("versions", "devices", "cpu_model", "cpu_count", "date_utc"):
        assert key in machine, key
    assert machine["versions"]["jax"]
    assert data["settings"]["quick"] is True and data["settings"]["skip_peer"] is True

    cfg = mf.enwik8_config()
    assert data["config"]["model_dim"] == cfg.model_dim == 384
    n_params = mf.parameter_count(cfg)["total"]
    assert data["param_counts"] == {"ours": n_params}

    records = data["train"] + data["forward"] + data["cema"]
    assert records
    for rec in records:
        assert "error" not in rec, rec.get("error")
        assert rec["repeats"] == len(rec["times_ms"]) >= 1
        assert all(t > 0 for t in rec["times_ms"])
        assert rec["min_ms"] <= rec["median_ms"] <= rec["max_ms"]
        assert rec["compile_s"] > 0 and rec["first_call_s"] > 0

    (train,) = data["train"]
    assert (train["model"], train["dtype"], train["batch"], train["seq"]) == (
        "ours",
        "float32",
        1,
        512,
    )
    expected_rate = train["batch"] * train["seq"] / (train["median_ms"] / 1e3)
    assert train["tokens_per_s"] == pytest.approx(expected_rate, rel=1e-3)

    (fwd,) = data["forward"]
    assert fwd["length"] == 512 and fwd["dtype"] == "float32"
    assert fwd["ms_per_1k_tokens"] == pytest.approx(fwd["median_ms"] * 1000 / 512, rel=1e-3)
    memory = fwd["memory"]
    # Arguments hold at least the float32 parameters; the peak covers the arguments.
    assert memory["argument_mib"] >= n_params * 4 / MIB - 0.01
    assert memory["peak_estimate_mib"] >= memory["argument_mib"] + memory["output_mib"] - 0.02
    # Logits (1, 512, 256) float32 are the output.
    assert memory["output_mib"] >= 512 * 256 * 4 / MIB - 0.01

    cema_keys = {(r["path"], r["mode"], r["length"]) for r in data["cema"]}
    assert cema_keys == {
        (path, mode, 512)
        for path in ("fft", "scan", "sequential")
        for mode in ("forward", "forward_backward")
    }
