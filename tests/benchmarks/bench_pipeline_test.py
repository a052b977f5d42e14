"""Smoke run of benchmarks/bench_pipeline.py: its figures agree with its own raw times."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_bench_pipeline_quick_run_reports_consistent_rates(tmp_path: Path) -> None:
    from benchmarks import bench_pipeline

    out = tmp_path / "p.json"
    data = bench_pipeline.main(["--quick", "--skip-train", "--out", str(out)])
    assert json.loads(out.read_text())["rows"].keys() == {"bytes", "bpe"}
    tokens = 2 * 64 * 10  # quick: batch 2, seq_len 64, 10 batches per repeat
    for row in data["rows"].values():
        (seconds,) = row["times_s"]
        assert row["tokens_per_s"] == pytest.approx(tokens / seconds)
    assert data["rows"]["bpe"]["bytes_per_token"] > 1.0  # merges make tokens longer
    assert data["documents"] > 100  # the sample's <page> elements
    assert "train_step" not in data
