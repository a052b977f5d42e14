"""Smoke test of `benchmarks/profile_ops.py` on a tiny model (D=32, 1 layer, 64 tokens).

Profiles the train step and the forward in-process: the trace must yield thunk events that
join the compiled HLO, the categories must add up to the total op time, CEMA / attention /
matmul ops must be recognized, and the busy-core estimates must be positive. Also checks the
HLO helpers on hand-written text. About 25 s on 2 busy cores.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import flax.linen as nn
import pytest

import megalodon_flax as mf

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `benchmarks` is a top-level package of the repository
    sys.path.insert(0, str(REPO))

from benchmarks import profile_ops as po  # noqa: E402

TINY = dict(
    vocab_size=256,
    model_dim=32,
    num_layers=1,
    num_heads=1,
    z_dim=16,
    value_dim=32,
    ffn_hidden_dim=64,
    cema_ndim=4,
    chunk_size=32,
    norm_num_groups=4,
)


def _quiet(_: str) -> None:
    pass


def _check_summary(summary: dict[str, Any]) -> dict[str, dict[str, Any]]:
    assert "error" not in summary, summary.get("error")
    cats = {row["category"]: row for row in summary["categories"]}
    assert set(cats) == set(po.CATEGORIES)
    for key, total_key in (("", "op_time_ms_per_step"), ("thunk_", "thunk_time_ms_per_step")):
        total = summary[total_key]
        assert total > 0
        parts = sum(r[f"{key}ms_per_step"] for r in cats.values())
        assert parts == pytest.approx(total, rel=0.03)
        assert sum(r[f"{key}share_pct"] for r in cats.values()) == pytest.approx(100.0, abs=1.0)
    # Shared time is the busy part of the executor span; thunk time counts overlaps in full.
    assert summary["op_time_ms_per_step"] <= summary["executor_wall_ms_per_step"] * 1.001
    assert summary["op_time_ms_per_step"] <= summary["thunk_time_ms_per_step"] * 1.001
    for name in (po.CEMA_KERNEL, po.FFT, po.ATTENTION, po.MATMUL, po.TIMESTEP_NORM):
        assert cats[name]["ops"] > 0, name
    assert summary["thunk_busy_cores"] > 0
    assert summary["process_cpu_cores"] > 0
    assert summary["executions_traced"] == 2
    assert summary["executor_wall_ms_per_step"] > 0
    top = summary["top_ops"]
    assert top and all(r["category"] in po.CATEGORIES for r in top)
    assert [r["ms_per_step"] for r in top] == sorted((r["ms_per_step"] for r in top), reverse=True)
    # Almost every executed op joins an instruction with metadata (own or a neighbour's).
    assert cats[po.UNATTRIBUTED]["share_pct"] < 5.0
    return cats


def test_profile_train_and_forward_tiny(tmp_path: Path) -> None:
    cfg = mf.MegalodonConfig(**TINY)
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
    assert cats[po.OPTIMIZER]["ops"] > 0 and cats[po.LOSS_EMBEDDING]["ops"] > 0
    assert train["batch"] == 2 and train["seq"] == 64 and train["tokens_per_s"] > 0
    # `top` above the former cap of 15 is honoured.
    assert train["distinct_ops"] > 20 and len(train["top_ops"]) == 20

    cats = _check_summary(fwd)
    assert cats[po.OPTIMIZER]["ops"] == 0  # no optimizer in a forward
    assert fwd["batch"] == 1 and fwd["length"] == 64 and fwd["tokens_per_s"] > 0
    assert len(fwd["top_ops"]) == min(15, fwd["distinct_ops"])
    text = po.markdown("tiny forward", fwd)
    assert "| CEMA kernel construction |" in text and "| matmuls |" in text

    for summary, kind in ((train, "train"), (fwd, "long_forward")):
        # Model ops carry Flax module paths: scopes were on during lowering.
        assert any(po.MODEL_SCOPE in po.scope_segments(r["op_name"]) for r in summary["top_ops"])
        # Compile facts come from runner.prepare().
        assert summary["compile_s"] > 0
        assert summary["memory"].get("peak_estimate_mib", 0) > 0, summary["memory"]
        # A true median: with 2 repeats the mean of the two, not the larger one.
        assert len(summary["call_wall_ms"]) == 2
        assert summary["call_wall_ms_median"] == pytest.approx(
            sum(summary["call_wall_ms"]) / 2, abs=0.11
        )
        # Traces kept under logdir, one subfolder per workload.
        kept = po.trace_files(str(tmp_path / kind))
        assert kept and summary["trace_file"] == Path(kept[0]).name


def test_profile_model_rejects_unknown_workload() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        po.profile_model(mf.MegalodonConfig(**TINY), "backward", 1, 64, repeats=1)


HLO = """HloModule jit_f, is_scheduled=true

FileNames
1 "/x/cema.py"

FunctionNames
1 "CEMA.__call__"
2 "causal_convolution"

FileLocations
1 {file_name_id=1 function_name_id=1 line=10 end_line=10 column=1 end_column=2}
2 {file_name_id=1 function_name_id=2 line=20 end_line=20 column=1 end_column=2}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}

%fused_computation (param_0: f32[4,8]) -> c64[4,5] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %fft.1 = c64[4,5]{1,0} fft(%param_0), metadata={op_name="f/M/cema/fft" stack_frame_id=2}
}

ENTRY %main (p: f32[4,8]) -> (c64[4,5], f32[4,8]) {
  %p = f32[4,8]{1,0} parameter(0), metadata={op_name="p"}
  %copy.1 = f32[4,8]{1,0} copy(%p)
  %fusion.1 = c64[4,5]{1,0} fusion(%copy.1), kind=kLoop, calls=%fused_computation
  %add.2 = f32[4,8] add(%p, %p), metadata={op_name="transpose(jvp(M))/cema/add" stack_frame_id=1}
  ROOT %tuple.3 = (c64[4,5]{1,0}, f32[4,8]{1,0}) tuple(%fusion.1, %add.2)
}
"""


def test_parse_hlo_stacks_fusions_and_rules() -> None:
    index = po.parse_hlo(HLO)
    assert index.module == "jit_f"
    assert [fn for fn, _, _ in index.stack(2)] == ["causal_convolution", "CEMA.__call__"]
    fusion = index.info("fusion.1")
    assert fusion.kind == "fft" and fusion.op_name.endswith("cema/fft")
    assert po.categorize(fusion) == po.FFT
    add = index.info("add.2")
    assert add.scopes >= {"M", "cema", "add"}
    assert po.categorize(add) == po.CEMA_OTHER
    copy = index.info("copy.1")  # no metadata: borrowed from its user, the fft fusion
    assert copy.metadata_from == "fusion.1" and po.categorize(copy) == po.FFT
    assert po.categorize(index.info("missing")) == po.UNATTRIBUTED
    assert po.scope_segments("jit(_step)/transpose(jvp(MegalodonLM))/model/norm/mul") == [
        "MegalodonLM",
        "model",
        "norm",
        "mul",
    ]


def test_exclusive_and_shared_times() -> None:
    outer = po.OpEvent("while.1", tid=1, run="r", ts=0.0, dur=10.0)
    inner = po.OpEvent("dot.2", tid=1, run="r", ts=2.0, dur=3.0)
    other = po.OpEvent("add.3", tid=2, run="r", ts=1.0, dur=4.0)
    events = [outer, inner, other]
    po.set_exclusive_times(events)
    assert (outer.exclusive, inner.exclusive, other.exclusive) == (7.0, 3.0, 4.0)
    # Shared: [0,1) outer alone, [1,2) outer+add, [2,5) dot+add, [5,10) outer alone.
    po.set_shared_times(events)
    assert outer.shared == pytest.approx(1.0 + 0.5 + 5.0)
    assert inner.shared == pytest.approx(1.5)
    assert other.shared == pytest.approx(0.5 + 1.5)
    assert sum(e.shared for e in events) == pytest.approx(10.0)  # the busy wall time


def test_cli_arguments() -> None:
    args = po.parse_args(["--workloads=long_forward", "--long_len=4096", "--repeats=2"])
    assert args.workloads == ["long_forward"] and args.long_len == 4096 and args.repeats == 2
    assert args.long_repeats == 2 and args.out.endswith("profile_ops.json")
    assert po.parse_args([]).workloads == ["train", "long_forward"]
    with pytest.raises(SystemExit):
        po.parse_args(["--workloads=train,backward"])
    rules = po.rules_table()
    assert rules[-1] == {"category": po.ELEMENTWISE, "when": "anything"}
    assert {r["category"] for r in rules} == set(po.CATEGORIES)
