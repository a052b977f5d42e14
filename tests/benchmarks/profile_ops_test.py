"""Tests of the parsing modules of `benchmarks/profile_ops.py`: `benchmarks/hlo_profile.py`
(compiled HLO text → instructions, stacks, categories) and `benchmarks/trace_profile.py`
(profiler trace → per-op / per-category times), and of profile_ops' arguments.

Oracles: small hand-written HLO text and trace events whose categories and times are worked
out by hand in the comments. (The profile of a real model:
`tests/integration/profile_ops_smoke_test.py`.)
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from benchmarks import hlo_profile as hp
from benchmarks import profile_ops as po
from benchmarks import trace_profile as tp
from tests.factories import tiny_megalodon_config

# The profiled model of `tests/integration/profile_ops_smoke_test.py`.
TINY = tiny_megalodon_config(vocab_size=256, num_layers=1, num_heads=1, chunk_size=32)


def test_profile_model_rejects_unknown_workload() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        po.profile_model(TINY, "backward", 1, 64, repeats=1)


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
    index = hp.parse_hlo(HLO)
    assert index.module == "jit_f"
    assert [fn for fn, _, _ in index.stack(2)] == ["causal_convolution", "CEMA.__call__"]
    fusion = index.info("fusion.1")
    assert fusion.kind == "fft" and fusion.op_name.endswith("cema/fft")
    assert hp.categorize(fusion) == hp.FFT
    add = index.info("add.2")
    assert add.scopes >= {"M", "cema", "add"}
    assert hp.categorize(add) == hp.CEMA_OTHER
    copy = index.info("copy.1")  # no metadata: borrowed from its user, the fft fusion
    assert copy.metadata_from == "fusion.1" and hp.categorize(copy) == hp.FFT
    assert hp.categorize(index.info("missing")) == hp.UNATTRIBUTED
    assert hp.scope_segments("jit(_step)/transpose(jvp(MegalodonLM))/model/norm/mul") == [
        "MegalodonLM",
        "model",
        "norm",
        "mul",
    ]


def test_exclusive_and_shared_times() -> None:
    outer = tp.OpEvent("while.1", tid=1, run="r", ts=0.0, dur=10.0)
    inner = tp.OpEvent("dot.2", tid=1, run="r", ts=2.0, dur=3.0)
    other = tp.OpEvent("add.3", tid=2, run="r", ts=1.0, dur=4.0)
    events = [outer, inner, other]
    tp.set_exclusive_times(events)
    assert (outer.exclusive, inner.exclusive, other.exclusive) == (7.0, 3.0, 4.0)
    # Shared: [0,1) outer alone, [1,2) outer+add, [2,5) dot+add, [5,10) outer alone.
    tp.set_shared_times(events)
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
    rules = hp.rules_table()
    assert rules[-1] == {"category": hp.ELEMENTWISE, "when": "anything"}
    assert {r["category"] for r in rules} == set(hp.CATEGORIES)


def _op(kind: str, functions: tuple[str, ...] = (), scopes: tuple[str, ...] = ()) -> hp.OpInfo:
    """An OpInfo inside the model scope unless `scopes` says otherwise."""
    scopes = scopes or (hp.MODEL_SCOPE, "model", kind)
    return hp.OpInfo("x", kind, "/".join(scopes), frozenset(functions), frozenset(scopes))


# (op, category), the category read off the rule table by hand: first matching rule wins.
CATEGORY_CASES = [
    # "<none>" metadata beats everything, even an fft opcode.
    (hp.OpInfo("x", "fft", "<none>", frozenset(), frozenset()), hp.UNATTRIBUTED),
    # An fft opcode is FFT even outside the model (before the optimizer rule).
    (_op("fft", scopes=("adam", "fft")), hp.FFT),
    # causal_convolution's padding / slicing counts as FFT, though it runs inside CEMA.
    (_op("elementwise", ("causal_convolution", "CEMA.__call__")), hp.FFT),
    (_op("elementwise", ("cema_kernel.<locals>.kernel_block", "CEMA.__call__")), hp.CEMA_KERNEL),
    (_op("multiply", ("_power", "cema_coefficients")), hp.CEMA_KERNEL),
    # A dot inside CEMA is CEMA work (the CEMA rule precedes the matmul rule).
    (_op("dot", ("CEMA.__call__",)), hp.CEMA_OTHER),
    # No stack frames: the module path segment `cema` decides.
    (
        _op("add", scopes=(hp.MODEL_SCOPE, "model", "layers_0", "attn", "cema", "add")),
        hp.CEMA_OTHER,
    ),
    (
        _op("reduce", ("TimestepNorm.__call__", "MovingAverageGatedAttention.__call__")),
        hp.TIMESTEP_NORM,
    ),
    (_op("add", scopes=(hp.MODEL_SCOPE, "model", "attn", "timenorm", "add")), hp.TIMESTEP_NORM),
    # "TimestepNorm." is a class prefix: another name starting with the same letters is not it.
    (_op("reduce", ("TimestepNormalizer",)), hp.ELEMENTWISE),
    # Norm modules precede the attention functions they are called from.
    (_op("reduce", ("RMSNorm.__call__", "chunked_attention")), hp.OTHER_NORMS),
    (_op("reduce", ("LayerNorm.__call__",)), hp.OTHER_NORMS),
    (_op("dot", ("masked_attention", "chunked_attention")), hp.ATTENTION),
    (_op("multiply", ("rms_normalize",)), hp.ATTENTION),
    (_op("dot", ("Dense.__call__",)), hp.MATMUL),
    (_op("convolution"), hp.MATMUL),
    # A dot outside the model is still a matmul (opcode rule before the optimizer rule).
    (_op("dot", scopes=("dot_general",)), hp.MATMUL),
    (_op("gather", ("Embed.__call__",)), hp.LOSS_EMBEDDING),
    (_op("scatter", scopes=(hp.MODEL_SCOPE, "model", "embed", "scatter-add")), hp.LOSS_EMBEDDING),
    # The loss lies outside the model scope but precedes the optimizer rule.
    (_op("reduce", ("next_token_loss",), scopes=("reduce_sum",)), hp.LOSS_EMBEDDING),
    (_op("add", scopes=("adam", "add")), hp.OPTIMIZER),
    (_op("add"), hp.ELEMENTWISE),
]


@pytest.mark.parametrize(("op", "expected"), CATEGORY_CASES)
def test_categorize_rule_order(op: hp.OpInfo, expected: str) -> None:
    assert hp.categorize(op) == expected


def test_rule_descriptions() -> None:
    by_category = {r.category: r for r in hp.RULES}
    assert by_category[hp.OPTIMIZER].describe() == "outside the model scope"
    assert by_category[hp.CEMA_OTHER].describe() == "stack has CEMA.__call__* | cema* | scope cema"
    assert hp.RULES[0].describe() == "op_name has <none>"
    assert hp.RULES[1].describe() == "opcode in fft"


# Tables without blank lines between them (each ends at the next header); a nested fusion
# whose dot carries a 3-frame stack; an elementwise fusion and a reduce fusion; instructions
# without metadata that borrow it (1 and 2 hops) or find none (a broadcast of a constant).
# A backslash ends a source line inside an HLO line (the string joins the two).
HLO_NESTED = """HloModule jit_g, entry_computation_layout={(f32[8,4]{1,0})->f32[8]{0}}

FileNames
1 "/r/megalodon_flax/megalodon/mega.py"
2 "/r/megalodon_flax/megalodon/chunked_attention.py"
FunctionNames
1 "MovingAverageGatedAttention.__call__"
2 "chunked_attention"
3 "masked_attention"
FileLocations
1 {file_name_id=1 function_name_id=1 line=100 end_line=100 column=1 end_column=2}
2 {file_name_id=2 function_name_id=2 line=50 end_line=50 column=1 end_column=2}
3 {file_name_id=2 function_name_id=3 line=20 end_line=20 column=1 end_column=2}
StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=2}
3 {file_location_id=3 parent_frame_id=3}

%inner_dot (a: f32[8,4], b: f32[4,8]) -> f32[8,8] {
  %a = f32[8,4]{1,0} parameter(0)
  %b = f32[4,8]{1,0} parameter(1)
  ROOT %dot.5 = f32[8,8]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}, \
metadata={op_name="jit(g)/MegalodonLM/model/layers_0/attn/dot_general" stack_frame_id=3}
}

%outer_fusion (x: f32[8,4]) -> f32[8,8] {
  %x = f32[8,4]{1,0} parameter(0)
  %t = f32[4,8]{0,1} transpose(%x), dimensions={1,0}
  ROOT %nested = f32[8,8]{1,0} fusion(%x, %t), kind=kOutput, calls=%inner_dot
}

%fused_add (p0: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  ROOT %add.9 = f32[8,8]{1,0} add(%p0, %p0), metadata={op_name="jit(g)/adam/add"}
}

%region_sum (l: f32[], r: f32[]) -> f32[] {
  %l = f32[] parameter(0)
  %r = f32[] parameter(1)
  ROOT %add.4 = f32[] add(%l, %r)
}

%fused_reduce (q0: f32[8,8]) -> f32[8] {
  %q0 = f32[8,8]{1,0} parameter(0)
  %zero = f32[] constant(0)
  ROOT %reduce.3 = f32[8]{0} reduce(%q0, %zero), dimensions={1}, to_apply=%region_sum
}

ENTRY %main (p: f32[8,4]) -> f32[8] {
  %p = f32[8,4]{1,0} parameter(0)
  %constant.2 = f32[] constant(1)
  %broadcast.8 = f32[8,8]{1,0} broadcast(%constant.2), dimensions={}
  %fusion.1 = f32[8,8]{1,0} fusion(%p), kind=kLoop, calls=%outer_fusion
  %copy.7 = f32[8,8]{1,0} copy(%fusion.1)
  %bitcast.11 = f32[8,8]{1,0} bitcast(%copy.7)
  %fusion.2 = f32[8,8]{1,0} fusion(%bitcast.11), kind=kLoop, calls=%fused_add
  ROOT %fusion.3 = f32[8]{0} fusion(%fusion.2), kind=kInput, calls=%fused_reduce, \
metadata={op_name="jit(g)/MegalodonLM/model/norm/reduce_sum"}
}
"""


def test_parse_hlo_nested_fusions_and_borrowed_metadata() -> None:
    index = hp.parse_hlo(HLO_NESTED)
    assert index.module == "jit_g"
    assert index.files == {
        1: "/r/megalodon_flax/megalodon/mega.py",
        2: "/r/megalodon_flax/megalodon/chunked_attention.py",
    }
    assert index.locations[3] == (2, 3, 20)
    assert index.frames[3] == (3, 3)
    assert set(index.computations) == {
        "inner_dot",
        "outer_fusion",
        "fused_add",
        "region_sum",
        "fused_reduce",
        "main",
    }
    fusion1 = index.instructions["fusion.1"]
    assert (fusion1.opcode, fusion1.calls, fusion1.operands) == (
        "fusion",
        ("outer_fusion",),
        ("p",),
    )
    assert index.instructions["fusion.3"].is_root and not fusion1.is_root
    assert index.users["fusion.1"] == ["copy.7"]
    # Frame 3 → printed parent 3 = frame 2 → printed parent 2 = frame 1 → printed 1 = none.
    assert index.stack(3) == [
        ("masked_attention", "/r/megalodon_flax/megalodon/chunked_attention.py", 20),
        ("chunked_attention", "/r/megalodon_flax/megalodon/chunked_attention.py", 50),
        ("MovingAverageGatedAttention.__call__", "/r/megalodon_flax/megalodon/mega.py", 100),
    ]

    # The dot two computations down makes fusion.1 a dot with the dot's metadata and stack.
    dot = index.info("fusion.1")
    assert dot.kind == "dot" and dot.metadata_from == ""
    assert dot.op_name == "jit(g)/MegalodonLM/model/layers_0/attn/dot_general"
    assert dot.stack == (
        "masked_attention:20",
        "chunked_attention:50",
        "MovingAverageGatedAttention.__call__:100",
    )
    assert dot.fused_dots == ("layers_0/attn",)
    assert hp.categorize(dot) == hp.ATTENTION  # masked_attention on the stack, before matmuls
    # No metadata: one hop to its operand fusion.1, then two hops through copy.7.
    for name, kind in (("copy.7", "copy"), ("bitcast.11", "bitcast")):
        info = index.info(name)
        assert (info.kind, info.metadata_from, info.op_name) == (kind, "fusion.1", dot.op_name)
        assert hp.categorize(info) == hp.ATTENTION
    # Fusion without metadata of its own, only elementwise inside: the fused root's op_name,
    # outside the model scope → optimizer.
    add = index.info("fusion.2")
    assert (add.kind, add.op_name, add.fused_dots) == ("elementwise", "jit(g)/adam/add", ())
    assert hp.categorize(add) == hp.OPTIMIZER
    # Reduce fusion with its own metadata, inside the model, no stack → other elementwise.
    red = index.info("fusion.3")
    assert (red.kind, red.op_name, red.functions) == (
        "reduce",
        "jit(g)/MegalodonLM/model/norm/reduce_sum",
        frozenset(),
    )
    assert red.scopes == {"MegalodonLM", "model", "norm", "reduce_sum"}
    assert hp.categorize(red) == hp.ELEMENTWISE
    # Only a constant operand and no users: nothing to borrow.
    bcast = index.info("broadcast.8")
    assert (bcast.kind, bcast.op_name) == ("broadcast", "<none>")
    assert hp.categorize(bcast) == hp.UNATTRIBUTED


def test_scope_helpers() -> None:
    name = "jit(_step)/transpose(jvp(MegalodonLM))/model/layers_3/attn/remat/wh1/jit(f)/dot_general"
    assert hp.scope_segments(name) == [
        "MegalodonLM",
        "model",
        "layers_3",
        "attn",
        "wh1",
        "dot_general",
    ]
    assert hp.short_scope(name) == "layers_3/attn/wh1"
    assert hp.short_scope("jit(_step)/MegalodonLM/model/add") == "?"
    assert hp.scope_segments("vmap(jvp(adam))/mul") == ["adam", "mul"]


def _x(op: str, tid: int, ts: float, dur: float, run: str, module: str = "jit_f") -> dict:
    """A complete thunk event as the CPU executor writes it."""
    args = {"hlo_module": module, "hlo_op": op, "run_id": run}
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": op, "args": args}


# Two executions of HLO (above): fusion.1 (fft → FFT), add.2 (CEMA other), copy.1 (borrows
# fusion.1's metadata → FFT). Times in µs:
#   run 1: tid 1 fusion.1 [0, 4000), copy.1 [6000, 8000); tid 2 add.2 [2000, 6000)
#   run 2: tid 1 fusion.1 [100000, 102000), add.2 [102000, 103000)
# Shared: fusion.1 2000 + 2000/2 + 2000 = 5000; add.2 2000/2 + 2000 + 1000 = 4000;
# copy.1 2000; total 11000 = busy wall (8000 + 3000). Exclusive = durations (no nesting):
# fusion.1 6000, add.2 5000, copy.1 2000; total 13000.
TRACE = {
    "displayTimeUnit": "ns",
    "traceEvents": [
        {"ph": "M", "pid": 1, "tid": 1, "name": "thread_name", "args": {"name": "exec"}},
        _x("fusion.1", 1, 0.0, 4000.0, "1"),
        _x("add.2", 2, 2000.0, 4000.0, "1"),
        _x("copy.1", 1, 6000.0, 2000.0, "1"),
        {"ph": "X", "tid": 1, "ts": 0.0, "dur": 9000.0, "name": "Execute", "args": {}},
        _x("fusion.1", 3, 50000.0, 7000.0, "9", module="jit_other"),
        {"ph": "B", "tid": 1, "ts": 100000.0, "name": "x", "args": {"hlo_op": "fusion.1"}},
        _x("fusion.1", 1, 100000.0, 2000.0, "2"),
        _x("add.2", 1, 102000.0, 1000.0, "2"),
    ],
}


def test_thunk_events_filter_and_fields() -> None:
    events = tp.thunk_events(TRACE, "jit_f")
    assert [(e.name, e.tid, e.run, e.ts, e.dur) for e in events] == [
        ("fusion.1", 1, "1", 0.0, 4000.0),
        ("add.2", 2, "1", 2000.0, 4000.0),
        ("copy.1", 1, "1", 6000.0, 2000.0),
        ("fusion.1", 1, "2", 100000.0, 2000.0),
        ("add.2", 1, "2", 102000.0, 1000.0),
    ]
    assert [e.name for e in tp.thunk_events(TRACE["traceEvents"], "jit_other")] == ["fusion.1"]
    # No hlo_module: counts as any module's; missing tid / run_id / dur read as 0 / "0" / 0.
    bare = tp.thunk_events([{"ph": "X", "ts": 5, "args": {"hlo_op": "dot.1"}}], "jit_f")
    assert [(e.name, e.tid, e.run, e.ts, e.dur) for e in bare] == [("dot.1", 0, "0", 5.0, 0.0)]


def test_load_op_events_newest_file_with_events(tmp_path: Path) -> None:
    def write(run: str, trace: dict, mtime: float) -> str:
        path = tmp_path / "plugins" / "profile" / run / "host.trace.json.gz"
        path.parent.mkdir(parents=True)
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            json.dump(trace, fh)
        os.utime(path, (mtime, mtime))
        return str(path)

    older = write("run_a", TRACE, 1_000_000.0)
    write("run_b", {"traceEvents": [_x("fusion.1", 1, 0.0, 1.0, "1", "jit_other")]}, 2_000_000.0)
    assert tp.trace_files(str(tmp_path))[1] == older  # newest first
    events, path = tp.load_op_events(str(tmp_path), "jit_f")
    assert path == older and len(events) == 5
    assert [e.exclusive for e in events] == [4000.0, 4000.0, 2000.0, 2000.0, 1000.0]
    with pytest.raises(RuntimeError, match="no thunk events"):
        tp.load_op_events(str(tmp_path), "jit_missing")


def test_summarize_joins_trace_with_hlo() -> None:
    events = tp.thunk_events(TRACE, "jit_f")
    tp.set_exclusive_times(events)
    summary = tp.summarize(events, hp.parse_hlo(HLO), top=2)
    assert summary["hlo_module"] == "jit_f"
    assert summary["executions_traced"] == 2
    assert summary["op_time_ms_per_step"] == 5.5  # 11000 µs / 2 runs
    assert summary["thunk_time_ms_per_step"] == 6.5  # 13000 µs / 2
    assert summary["executor_wall_ms_per_step"] == 5.5  # (8000 + 3000) / 2
    assert summary["executor_idle_pct"] == 0.0
    assert summary["thunk_busy_cores"] == 1.182  # 13000 / 11000
    assert (summary["threads_used"], summary["distinct_ops"], summary["thunks_per_step"]) == (
        2,
        3,
        2.5,
    )
    cats = {row["category"]: row for row in summary["categories"]}
    assert list(cats) == list(hp.CATEGORIES)
    # FFT = fusion.1 + copy.1: shared 7000, thunk 8000, 3 thunks in 2 runs.
    assert cats[hp.FFT] == {
        "category": hp.FFT,
        "ms_per_step": 3.5,
        "share_pct": 63.64,  # 7000 / 11000
        "thunk_ms_per_step": 4.0,
        "thunk_share_pct": 61.54,  # 8000 / 13000
        "ops": 2,
        "thunk_calls_per_step": 1.5,
        "ms_per_step_by_kind": {"fft": 2.5, "copy": 1.0},
    }
    assert cats[hp.CEMA_OTHER] == {
        "category": hp.CEMA_OTHER,
        "ms_per_step": 2.0,
        "share_pct": 36.36,
        "thunk_ms_per_step": 2.5,
        "thunk_share_pct": 38.46,
        "ops": 1,
        "thunk_calls_per_step": 1.0,
        "ms_per_step_by_kind": {"add": 2.0},
    }
    assert all(
        row["ops"] == 0 and row["ms_per_step"] == 0.0
        for cat, row in cats.items()
        if cat not in (hp.FFT, hp.CEMA_OTHER)
    )
    assert [r["op"] for r in summary["top_ops"]] == ["fusion.1", "add.2"]
    assert summary["top_ops"][0] == {
        "op": "fusion.1",
        "category": hp.FFT,
        "kind": "fft",
        "ms_per_step": 2.5,
        "share_pct": 45.45,  # 5000 / 11000
        "thunk_ms_per_step": 3.0,
        "calls_per_step": 1.0,
        "op_name": "f/M/cema/fft",
        "metadata_from": "",
        "fused_dots": [],
        "stack": ["causal_convolution:20", "CEMA.__call__:10"],
    }
    assert summary["by_kind_ms_per_step"] == {"fft": 2.5, "add": 2.0, "copy": 1.0}
