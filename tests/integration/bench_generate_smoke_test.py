"""Smoke test of `benchmarks/bench_generate.py --quick --skip-peer` run as a subprocess.

Checks the JSON layout, positive timings, the derived rates against their definitions
(B·T / t(T), B·(T−1) / (t(T) − t(1)), first call − steady call), the decode-state bytes against
a fresh `init_cache` (a separate code path), the token output bytes, the compiled argument size
against the float32 parameters, and that memory for 64 and 1,024 new tokens agrees within 5%.
About 70 s on 2 idle cores (marked slow).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import megalodon_flax as mf
from tests import helpers


def _nbytes(tree: object) -> int:
    return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def _check_timed(rec: dict) -> None:
    assert "error" not in rec, rec.get("error")
    assert rec["repeats"] == len(rec["times_ms"]) >= 1
    assert all(t > 0 for t in rec["times_ms"])
    assert rec["min_ms"] <= rec["median_ms"] <= rec["max_ms"]


@pytest.mark.slow
def test_quick_generate_benchmark_writes_complete_json(tmp_path: Path) -> None:
    out = tmp_path / "nested" / "bench_generate.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.bench_generate",
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
    for title in ("PREFILL", "GENERATE", "DECODE ONLY", "CONSTANT MEMORY", "TARGETS"):
        assert title in proc.stdout, title
    data = json.loads(out.read_text())

    for key in (
        "machine",
        "settings",
        "config",
        "param_counts",
        "prefill",
        "generate",
        "decode",
        "memory",
        "targets",
    ):
        assert key in data, key
    machine = data["machine"]
    for key in ("versions", "cpu_model", "cpu_count", "date_utc", "load_average_start"):
        assert key in machine, key
    assert len(machine["load_average_end"]) == 3
    settings = data["settings"]
    assert settings["quick"] is True and settings["skip_peer"] is True
    prompt_len, new_tokens = settings["prompt_len"], settings["new_tokens"]
    assert new_tokens > 1

    cfg = mf.enwik8_config()
    assert data["config"]["model_dim"] == cfg.model_dim == 384
    n_params = mf.parameter_count(cfg)["total"]
    assert data["param_counts"] == {"ours": n_params}

    (prefill,) = data["prefill"]
    _check_timed(prefill)
    assert (prefill["model"], prefill["batch"], prefill["prompt_len"]) == ("ours", 1, prompt_len)
    assert prefill["first_call_s"] > 0

    gen = {(r["batch"], r["new_tokens"]): r for r in data["generate"]}
    assert set(gen) == {(b, t) for b in settings["batches"] for t in (1, new_tokens)}
    for (batch, t), rec in gen.items():
        _check_timed(rec)
        assert rec["model"] == "ours" and rec["prompt_len"] == prompt_len
        assert rec["new_tokens_per_s"] == pytest.approx(
            batch * t / (rec["median_ms"] / 1e3), rel=1e-3
        )
        expected_compile = rec["first_call_s"] - rec["median_ms"] / 1e3
        assert rec["compile_s"] == pytest.approx(max(expected_compile, 0.0), abs=2e-3)
        assert rec["compile_s"] > 0  # the first call compiles the program

    for row in data["decode"]:
        batch = row["batch"]
        t_one, t_full = gen[(batch, 1)]["median_ms"], gen[(batch, new_tokens)]["median_ms"]
        assert (row["t1_median_ms"], row["tT_median_ms"]) == (t_one, t_full)
        assert t_full > t_one
        expected = batch * (new_tokens - 1) / ((t_full - t_one) / 1e3)
        assert row["decode_tokens_per_s"] == pytest.approx(expected, rel=1e-3)
    assert {r["batch"] for r in data["decode"]} == set(settings["batches"])

    memory = data["memory"]
    small, large = memory["records"]
    assert [small["new_tokens"], large["new_tokens"]] == settings["memory_tokens"]
    fresh_state = _nbytes(mf.init_cache(cfg, 1))
    for rec in (small, large):
        assert "error" not in rec, rec.get("error")
        assert rec["compile_s"] > 0 and rec["lower_s"] > 0
        assert rec["state_bytes"] == fresh_state
        assert rec["tokens_bytes"] == 4 * rec["new_tokens"]
        sizes = rec["bytes"]
        assert sizes["argument"] >= 4 * n_params
        assert sizes["output"] >= rec["state_bytes"] + rec["tokens_bytes"]
        assert sizes["peak_estimate"] == (
            sizes["temp"] + sizes["argument"] + sizes["output"] - sizes["alias"]
        )
        assert sizes["temp"] > 0
        assert len(rec["rss_growth_bytes"]) == settings["rss_repeats"]
        assert min(rec["rss_growth_bytes"]) > 0
    temp_ratio = large["bytes"]["temp"] / small["bytes"]["temp"]
    peak_ratio = large["bytes"]["peak_estimate"] / small["bytes"]["peak_estimate"]
    rss_ratio = statistics.median(large["rss_growth_bytes"]) / statistics.median(
        small["rss_growth_bytes"]
    )
    ratios = memory["ratios"]
    assert ratios["temp_ratio"] == pytest.approx(temp_ratio, abs=1e-6)
    assert ratios["rss_growth_ratio"] == pytest.approx(rss_ratio, abs=1e-4)
    # 16x more new tokens, the same memory: the constant-memory claim of the issue.
    assert large["new_tokens"] >= 16 * small["new_tokens"]
    for value in (temp_ratio, peak_ratio):
        assert 0.95 <= value <= 1.05, ratios
    # One noisy RSS sample per case: it must not grow with the tokens (less is noise).
    assert rss_ratio <= 1.05, ratios
    assert ratios["rss_no_growth"] is True
    assert ratios["within_5_percent"] is True
    assert data["targets"]["constant_memory"]["holds"] is True
