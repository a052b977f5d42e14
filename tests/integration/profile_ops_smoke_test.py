"""Smoke test of `benchmarks/profile_ops.py`: the train step and the forward of a tiny model
(D=32, 1 layer, 64 tokens) profiled in-process.

The trace must yield thunk events that join the compiled HLO, the categories must add up to
the total op time, CEMA / attention / matmul ops must be recognized, and the busy-core
estimates must be positive (about 25 s on 2 busy cores).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import flax.linen as nn
import pytest

from benchmarks import hlo_profile as hp
from benchmarks import profile_ops as po
from benchmarks import trace_profile as tp
from tests.factories import tiny_megalodon_config

# One layer, one head, chunks of 32: the smallest model with every op category.
TINY = tiny_megalodon_config(vocab_size=256, num_layers=1, num_heads=1, chunk_size=32)


def _quiet(_: str) -> None:
    pass


def _check_summary(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert "error" not in summary, summary.get("error")
    cats = {row["category"]: row for row in summary["categories"]}
    assert set(cats) == set(hp.CATEGORIES)
    for key, total_key in (("", "op_time_ms_per_step"), ("thunk_", "thunk_time_ms_per_step")):
        total = summary[total_key]
        assert total > 0
        parts = sum(r[f"{key}ms_per_step"] for r in cats.values())
        assert parts == pytest.approx(total, rel=0.03)
        assert sum(r[f"{key}share_pct"] for r in cats.values()) == pytest.approx(100.0, abs=1.0)
    # Shared time is the busy part of the executor span; thunk time counts overlaps in full.
    assert summary["op_time_ms_per_step"] <= summary["executor_wall_ms_per_step"] * 1.001
    assert summary["op_time_ms_per_step"] <= summary["thunk_time_ms_per_step"] * 1.001
    for name in (hp.CEMA_KERNEL, hp.FFT, hp.ATTENTION, hp.MATMUL, hp.TIMESTEP_NORM):
        assert cats[name]["ops"] > 0, name
    assert summary["thunk_busy_cores"] > 0
    assert summary["process_cpu_cores"] > 0
    assert summary["executions_traced"] == 2
    assert summary["executor_wall_ms_per_step"] > 0
    top = summary["top_ops"]
    assert top and all(r["category"] in hp.CATEGORIES for r in top)
    assert [r["ms_per_step"] for r in top] == sorted((r["ms_per_step"] for r in top), reverse=True)
    # Almost every executed op joins an instruction with metadata (own or a neighbour's).
    assert cats[hp.UNATTRIBUTED]["share_pct"] < 5.0
    return cats


def test_profile_train_and_forward_tiny(tmp_path: Path) -> None:
    cfg = TINY
    named_call_before = nn.module._use_named_call
    # Scopes off around the profile: it must force them on while lowering (the category
    # checks and the module paths below need them) and restore the setting afterwards.
    with nn.override_named_call(False):
        train = po.profile_model(
            cfg, "train", batch=2, length=64, repeats=2, warmup=0, logdir=str(tmp_path), top=20
        )
        assert nn.module._use_named_call is False
        fwd = po.profile_model(
            cfg, "long_forward", batch=1, length=64, repeats=2, logdir=str(tmp_path), log=_quiet
        )
        assert nn.module._use_named_call is False
    assert nn.module._use_named_call == named_call_before

    cats = _check_summary(train)
    assert cats[hp.OPTIMIZER]["ops"] > 0 and cats[hp.LOSS_EMBEDDING]["ops"] > 0
    assert train["batch"] == 2 and train["seq"] == 64 and train["tokens_per_s"] > 0
    # `top` above the former cap of 15 is honoured.
    assert train["distinct_ops"] > 20 and len(train["top_ops"]) == 20

    cats = _check_summary(fwd)
    assert cats[hp.OPTIMIZER]["ops"] == 0  # no optimizer in a forward
    assert fwd["batch"] == 1 and fwd["length"] == 64 and fwd["tokens_per_s"] > 0
    assert len(fwd["top_ops"]) == min(15, fwd["distinct_ops"])
    text = po.markdown("tiny forward", fwd)
    assert "| CEMA kernel construction |" in text and "| matmuls |" in text

    for summary, kind in ((train, "train"), (fwd, "long_forward")):
        # Model ops carry Flax module paths: scopes were on during lowering.
        assert any(hp.MODEL_SCOPE in hp.scope_segments(r["op_name"]) for r in summary["top_ops"])
        # Compile facts come from runner.prepare().
        assert summary["compile_s"] > 0
        assert summary["memory"].get("peak_estimate_mib", 0) > 0, summary["memory"]
        # A true median: with 2 repeats the mean of the two, not the larger one.
        assert len(summary["call_wall_ms"]) == 2
        assert summary["call_wall_ms_median"] == pytest.approx(
            sum(summary["call_wall_ms"]) / 2, abs=0.11
        )
        # Traces kept under logdir, one subfolder per workload.
        kept = tp.trace_files(str(tmp_path / kind))
        assert kept and summary["trace_file"] == Path(kept[0]).name
