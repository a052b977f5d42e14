"""Where the time goes, per op category, in the enwik8 training step and a long forward.

Workloads (enwik8 configuration, float32 compute):
  train:        forward + backward + AdamW update, batch 4 × 512 (built like `bench_model.py`).
  long_forward: `model.apply({"params": params}, tokens)` at batch 1 × 32,768 tokens.

Method (the one that works on jax 0.10.2 with the XLA CPU thunk runtime):
  1. Module scopes. `jax.config.update("flax_profile", True)` is refused by jax ("Unrecognized
     config option"): `flax_profile` is a Flax option (`flax.config`, default True in flax
     0.12.8), read once when `flax.linen` is imported. The profile forces it on with
     `flax.linen.override_named_call(True)` around lowering (the previous setting is
     restored). Flax then runs every Module method under `jax.named_scope(<module name>)`
     (instance names: `model/layers_0/attn/cema`, not class names), and each HLO
     instruction's `metadata={op_name=...}` carries the module path, e.g.
     `jit(_step)/transpose(jvp(MegalodonLM))/model/layers_0/attn/cema/jit(fft)/fft`.
  2. Python stacks. The compiled HLO text (`compiled.as_text()`) also carries the tables
     FileNames / FunctionNames / FileLocations / StackFrames, and every instruction's metadata
     has a `stack_frame_id`. Following the parents gives each instruction's Python call stack
     with qualified names (`CEMA.__call__`, `cema_kernel`, `causal_convolution`,
     `masked_attention`, `apply_rope`, `TimestepNorm.__call__`, `next_token_loss`, ...). The
     printed `parent_frame_id` is one more than the parent's listed id (1 = no parent); this
     convention was read off the dump and is checked by the chains it produces. The stacks
     separate what the module path cannot: kernel construction from the FFT inside CEMA, and
     the attention functions inside the gated attention module. Backward instructions keep the
     stacks of their forward equations.
  3. Trace. `jax.profiler.trace(logdir, create_perfetto_trace=True)` over a few executions
     after warm-up writes `plugins/profile/<run>/<host>.trace.json.gz` (Chrome trace JSON; the
     perfetto file holds the same events). On the CPU thunk executor every executed thunk is
     one complete event ("ph": "X") on an executor thread with
     `args = {hlo_module, hlo_op, run_id}`; `hlo_op` is the name of the HLO instruction (a
     fusion, a dot, an fft, a copy ...) in the compiled module, so it joins the HLO text
     directly. Each execution has its own run_id. Per-thread exclusive times are used (events
     nested in another event on the same thread are subtracted from it).
  An XLA dump (`XLA_FLAGS=--xla_dump_to=...`) of the optimized HLO holds the same metadata
  and is not needed.

Categories come from the ordered rule table RULES (first match wins) over: the effective
opcode of the instruction (a fusion counts as `dot` / `fft` when it contains one), the
functions on its Python stack, its module path and whether it lies inside the model scope.
An instruction without metadata (a few dots and reduce-windows made by XLA rewrites, the
copies of donated parameters) borrows it from its nearest operand, else user.

Times. Two per op and category: `thunk ms` is the sum of its exclusive thunk durations;
`ms` is concurrency-shared (each instant of the executor's wall time split equally among
the thunks running then). The executor runs independent thunks concurrently on several
threads; when the process gets fewer cores than busy threads (here: 2 cores shared with a
background job), overlapping thunks are time-sliced and their raw durations over-count, so
the shared times (which add up to the executor's busy wall time) are the better shares.

Busy cores. The trace shows thunks only: a thunk parallelized inside (Eigen / XNNPACK
thread pools) still appears as one event on one thread. Reported: `thunk_busy_cores`
(Σ thunk time / executor span: concurrency between thunks), `process_cpu_cores` (process
CPU time / wall time of the traced calls, intra-op threads included) and how the CPU time
spread over the process's threads (/proc/self/task). A probe runs the workload's real FFT
and a matmul alone and reports their CPU/wall ratios and thread spread, which tells whether
the FFTs use more than one core.

Run from the repository root:
  python -m benchmarks.profile_ops [--workloads=train,long_forward] [--long_len=32768]
      [--repeats=3] [--long_repeats=2] [--top=15] [--logdir=DIR]
      [--out=benchmarks/results/profile_ops.json]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import hashlib
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp

import megalodon_flax as mf
from benchmarks import bench_model, common
from benchmarks.common import str_list
from megalodon_flax.model.cema import fft_length

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "profile_ops.json")
WORKLOADS = ("train", "long_forward")
MODEL_SCOPE = "MegalodonLM"  # Flax's scope name of the unnamed top module (its class name)

# ---------------------------------------------------------------------------- categories
CEMA_KERNEL = "CEMA kernel construction"
FFT = "FFT"
CEMA_OTHER = "CEMA other"
TIMESTEP_NORM = "TimestepNorm"
ATTENTION = "attention"
MATMUL = "matmuls"
OTHER_NORMS = "other norms"
OPTIMIZER = "optimizer"
LOSS_EMBEDDING = "loss/embedding"
ELEMENTWISE = "other elementwise"
UNATTRIBUTED = "unattributed"
CATEGORIES = (
    CEMA_KERNEL,
    FFT,
    CEMA_OTHER,
    TIMESTEP_NORM,
    ATTENTION,
    MATMUL,
    OTHER_NORMS,
    OPTIMIZER,
    LOSS_EMBEDDING,
    ELEMENTWISE,
    UNATTRIBUTED,
)


@dataclass(frozen=True)
class Rule:
    """One row of the category table; every given condition must hold.

    opcodes: the instruction's effective opcode is one of these.
    functions: a function on its Python stack starts with one of these prefixes (qualified
      names such as `CEMA.__call__` or `cema_kernel.<locals>.kernel_block`; prefixes keep
      the rules valid when helpers are added or renamed), or one of `scopes` is a segment of
      its module path (op_name); `scopes` is the fallback for metadata without stack frames.
    op_name_has: one of these substrings occurs in its op_name.
    outside_model: True = the op_name lies outside the model scope, False = inside.
    """

    category: str
    opcodes: tuple[str, ...] = ()
    functions: tuple[str, ...] = ()
    scopes: tuple[str, ...] = ()
    op_name_has: tuple[str, ...] = ()
    outside_model: bool | None = None

    def matches(self, op: OpInfo) -> bool:
        if self.opcodes and op.kind not in self.opcodes:
            return False
        if (self.functions or self.scopes) and not (
            any(fn.startswith(self.functions) for fn in op.functions)
            or any(s in op.scopes for s in self.scopes)
        ):
            return False
        if self.op_name_has and not any(s in op.op_name for s in self.op_name_has):
            return False
        return self.outside_model is None or self.outside_model == (MODEL_SCOPE not in op.scopes)

    def describe(self) -> str:
        parts = []
        if self.opcodes:
            parts.append("opcode in " + "/".join(self.opcodes))
        if self.functions or self.scopes:
            names = [f"{f}*" for f in self.functions] + [f"scope {s}" for s in self.scopes]
            parts.append("stack has " + " | ".join(names))
        if self.op_name_has:
            parts.append("op_name has " + " | ".join(self.op_name_has))
        if self.outside_model is not None:
            parts.append(("outside" if self.outside_model else "inside") + " the model scope")
        return "; ".join(parts) or "anything"


# Ordered: the first matching rule names the category.
RULES: tuple[Rule, ...] = (
    Rule(UNATTRIBUTED, op_name_has=("<none>",)),
    Rule(FFT, opcodes=("fft",)),
    Rule(FFT, functions=("causal_convolution",)),  # padding, spectra product, slicing
    Rule(
        CEMA_KERNEL,  # coefficients, powers q^j (polar form), kernel / bias assembly
        functions=(
            "cema_coefficients",
            "cema_kernel",
            "initial_state_bias",
            "_power",
            "_expand_lags",
        ),
    ),
    Rule(CEMA_OTHER, functions=("CEMA.__call__", "cema"), scopes=("cema",)),
    Rule(
        TIMESTEP_NORM,
        functions=(
            "TimestepNorm.",
            "timestep_norm_statistics",
            "_anchored_statistics",
            "_chan_merge",
        ),
        scopes=("timenorm",),
    ),
    Rule(OTHER_NORMS, functions=("RMSNorm.", "LayerNorm.")),
    Rule(
        ATTENTION,
        functions=(
            "chunked_attention",
            "masked_attention",
            "streaming_attention",
            "_decode_attention",
            "apply_rope",
            "rope_frequencies",
            "rms_normalize",  # the per-head Q/K normalization (RMSNorm is matched above)
        ),
    ),
    Rule(MATMUL, opcodes=("dot", "convolution")),
    Rule(
        LOSS_EMBEDDING,
        functions=("next_token_loss", "softmax_cross_entropy", "Embed."),
        scopes=("embed",),
    ),
    Rule(OPTIMIZER, outside_model=True),
    Rule(ELEMENTWISE),
)


def categorize(op: OpInfo) -> str:
    """The category of the first rule of RULES that matches op (the last rule matches
    every op)."""
    return next(rule.category for rule in RULES if rule.matches(op))


# ---------------------------------------------------------------------------- HLO text
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+) = (.+?) ([a-z][a-z0-9\-]*)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([^\s(]+)\s*\(.*\{\s*$")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME_ID = re.compile(r"stack_frame_id=(\d+)")
_CALLS = re.compile(r"calls=(\{[^}]*\}|%[^\s,)]+)")
_KV = re.compile(r"(\w+)=(\d+)")
_OPERAND = re.compile(r"%([^\s,()]+)")
# Effective opcode of a fusion: the first of these found inside it, else "elementwise".
_KIND_ORDER = ("fft", "convolution", "dot", "scatter", "gather", "sort", "reduce")
_DROPPED = re.compile(r"^(jit|pjit)\(.*\)$|^(checkpoint|remat|rematted_computation)$")
_WRAPPED = re.compile(r"^(?:jvp|transpose|vmap|remat|checkpoint)\((.*)\)$")


@dataclass
class Instruction:
    """One HLO instruction of the compiled text.

    op_name / frame_id: its metadata ("" / 0 when it has none); calls: the computations it
    calls (fusion bodies ...); operands: names of its operand instructions.
    """

    name: str
    opcode: str
    op_name: str = ""
    frame_id: int = 0
    calls: tuple[str, ...] = ()
    operands: tuple[str, ...] = ()
    is_root: bool = False


@dataclass
class OpInfo:
    """What the categorizer knows about one executed HLO instruction (thunk)."""

    name: str
    kind: str
    op_name: str
    functions: frozenset[str]
    scopes: frozenset[str]
    stack: tuple[str, ...] = ()
    metadata_from: str = ""  # the neighbour whose metadata was borrowed ("" = its own)
    fused_dots: tuple[str, ...] = ()  # module paths of the dots inside a fusion


@dataclass
class HloIndex:
    """Instructions of a compiled module with their metadata and Python stacks."""

    module: str
    instructions: dict[str, Instruction] = field(default_factory=dict)
    computations: dict[str, list[Instruction]] = field(default_factory=dict)
    functions: dict[int, str] = field(default_factory=dict)
    files: dict[int, str] = field(default_factory=dict)
    locations: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # file, fn, line
    frames: dict[int, tuple[int, int]] = field(default_factory=dict)  # location, parent
    users: dict[str, list[str]] = field(default_factory=dict)

    def stack(self, frame_id: int) -> list[tuple[str, str, int]]:
        """(function, file, line) from the innermost frame outwards."""
        out: list[tuple[str, str, int]] = []
        seen: set[int] = set()
        while frame_id > 0 and frame_id in self.frames and frame_id not in seen:
            seen.add(frame_id)
            loc, printed_parent = self.frames[frame_id]
            file_id, fn_id, line = self.locations.get(loc, (0, 0, 0))
            out.append((self.functions.get(fn_id, "?"), self.files.get(file_id, "?"), line))
            frame_id = printed_parent - 1
        return out

    def kind(self, instr: Instruction) -> str:
        """Effective opcode: a fusion's most expensive kind of content, else the opcode."""
        if instr.opcode != "fusion":
            return instr.opcode
        found = {i.opcode for i in self._fused(instr)}
        for kind in _KIND_ORDER:
            if kind in found:
                return kind
        return "elementwise"

    def _fused(self, instr: Instruction) -> list[Instruction]:
        out: list[Instruction] = []
        todo = list(instr.calls)
        seen: set[str] = set()
        while todo:
            comp = todo.pop()
            if comp in seen:
                continue
            seen.add(comp)
            for inner in self.computations.get(comp, []):
                out.append(inner)
                todo.extend(inner.calls)
        return out

    def primary(self, instr: Instruction) -> Instruction:
        """The instruction whose metadata describes a thunk: for fusions holding an fft /
        dot / convolution that instruction, else the fusion itself (XLA gives it the root's
        metadata), else the fused root."""
        if instr.opcode != "fusion":
            return instr
        fused = self._fused(instr)
        for kind in ("fft", "convolution", "dot"):
            for inner in fused:
                if inner.opcode == kind and inner.op_name:
                    return inner
        if instr.op_name:
            return instr
        for inner in fused:
            if inner.is_root and inner.op_name:
                return inner
        return next((i for i in fused if i.op_name), instr)

    def borrowed(self, instr: Instruction, depth: int = 3) -> tuple[str, Instruction] | None:
        """For an instruction without metadata (XLA rewrites drop it, e.g. some dots): the
        nearest operand, else user, with metadata (breadth first, up to `depth` hops);
        parameters and constants do not lend theirs."""
        for links in (lambda i: i.operands, lambda i: self.users.get(i.name, ())):
            frontier, seen = [instr.name], {instr.name}
            for _ in range(depth):
                nxt = []
                for name in frontier:
                    for other in links(self.instructions[name]):
                        if other in seen or other not in self.instructions:
                            continue
                        seen.add(other)
                        cand = self.instructions[other]
                        if cand.opcode in ("parameter", "constant"):
                            continue
                        source = self.primary(cand)
                        if source.op_name:
                            return other, source
                        nxt.append(other)
                frontier = nxt
        return None

    def info(self, name: str) -> OpInfo:
        """The categorizer's view of the instruction `name` (<none> when nothing is known)."""
        instr = self.instructions.get(name)
        if instr is None:
            return OpInfo(
                name=name, kind="?", op_name="<none>", functions=frozenset(), scopes=frozenset()
            )
        source = self.primary(instr)
        lender = ""
        if not source.op_name:
            donor = self.borrowed(instr)
            if donor is not None:
                lender, source = donor
        op_name = source.op_name or "<none>"
        stack = self.stack(source.frame_id)
        return OpInfo(
            name=name,
            kind=self.kind(instr),
            op_name=op_name,
            functions=frozenset(fn for fn, _, _ in stack),
            scopes=frozenset(scope_segments(op_name)),
            stack=tuple(f"{fn}:{line}" for fn, _, line in stack[:6]),
            metadata_from=lender,
            fused_dots=tuple(
                short_scope(i.op_name)
                for i in self._fused(instr)
                if i.opcode in ("dot", "convolution")
            ),
        )


def scope_segments(op_name: str) -> list[str]:
    """Module-path segments of an op_name: `jit(f)` segments (jitted functions, not modules)
    and remat markers dropped, `jvp(...)` / `transpose(...)` / `vmap(...)` wrappers unwrapped.

    `jit(_step)/transpose(jvp(MegalodonLM))/model/layers_0/attn/cema/jit(fft)/fft` →
    [MegalodonLM, model, layers_0, attn, cema, fft]; the last segment is the primitive.
    """
    out = []
    for seg in op_name.split("/"):
        if _DROPPED.match(seg):
            continue
        while True:  # transpose(jvp(X)) → X
            m = _WRAPPED.match(seg)
            if not m:
                break
            seg = m.group(1)
        if seg:
            out.append(seg)
    return out


def short_scope(op_name: str) -> str:
    """The innermost module path of an op_name, e.g. `layers_5/attn/wh1` ("?" if none)."""
    segs = [s for s in scope_segments(op_name)[:-1] if s not in (MODEL_SCOPE, "model")]
    return "/".join(segs[-3:]) or "?"


def _table(text: str, header: str) -> list[str]:
    """Lines of a numbered table (FileNames, ...) of the HLO text, [] when absent."""
    match = re.search(rf"^{header}\n(.*?)(?:\n\n|\n[A-Z][A-Za-z]+\n)", text, re.S | re.M)
    return match.group(1).splitlines() if match else []


def parse_hlo(text: str) -> HloIndex:
    """Parses `compiled.as_text()`: instructions, metadata, called computations, stacks."""
    first = text.split("\n", 1)[0]
    module = first.split()[1].rstrip(",") if first.startswith("HloModule") else "?"
    index = HloIndex(module=module)
    for line in _table(text, "FileNames"):
        num, _, rest = line.strip().partition(" ")
        index.files[int(num)] = rest.strip('"')
    for line in _table(text, "FunctionNames"):
        num, _, rest = line.strip().partition(" ")
        index.functions[int(num)] = rest.strip('"')
    for line in _table(text, "FileLocations"):
        num, _, rest = line.strip().partition(" ")
        kv = {k: int(v) for k, v in _KV.findall(rest)}
        index.locations[int(num)] = (
            kv.get("file_name_id", 0),
            kv.get("function_name_id", 0),
            kv.get("line", 0),
        )
    for line in _table(text, "StackFrames"):
        num, _, rest = line.strip().partition(" ")
        kv = {k: int(v) for k, v in _KV.findall(rest)}
        index.frames[int(num)] = (kv.get("file_location_id", 0), kv.get("parent_frame_id", 0))
    computation = ""
    for line in text.splitlines():
        comp = _COMP.match(line)
        if comp:
            computation = comp.group(1)
            index.computations.setdefault(computation, [])
            continue
        m = _INSTR.match(line)
        if not m or not computation:
            continue
        name, _, opcode, rest = m.groups()
        op_name = _OP_NAME.search(rest)
        frame = _FRAME_ID.search(rest)
        calls = _CALLS.search(rest)
        called: tuple[str, ...] = ()
        if calls:
            called = tuple(c.strip().lstrip("%") for c in calls.group(1).strip("{}").split(","))
        depth, end = 0, len(rest)
        for pos, ch in enumerate(rest):  # operands: up to the parenthesis closing "opcode("
            if ch == "(":
                depth += 1
            elif ch == ")":
                if depth == 0:
                    end = pos
                    break
                depth -= 1
        operands = tuple(_OPERAND.findall(rest[:end]))
        for operand in operands:
            index.users.setdefault(operand, []).append(name)
        instr = Instruction(
            name=name,
            opcode=opcode,
            op_name=op_name.group(1).replace("\\'", "'") if op_name else "",
            frame_id=int(frame.group(1)) if frame else 0,
            calls=tuple(c for c in called if c),
            operands=operands,
            is_root=line.lstrip().startswith("ROOT "),
        )
        index.instructions[name] = instr
        index.computations[computation].append(instr)
    return index


# ---------------------------------------------------------------------------- trace
@dataclass
class OpEvent:
    name: str
    tid: int
    run: str
    ts: float  # microseconds
    dur: float
    exclusive: float = 0.0
    shared: float = 0.0


def trace_files(logdir: str) -> list[str]:
    """Chrome-trace files under logdir, newest first (`*.trace.json.gz`, then perfetto)."""
    found = []
    for pattern in ("*.trace.json.gz", "perfetto_trace.json.gz"):
        hits = glob.glob(os.path.join(logdir, "**", pattern), recursive=True)
        found += sorted(hits, key=os.path.getmtime, reverse=True)
    return found


def load_op_events(logdir: str, module: str) -> tuple[list[OpEvent], str]:
    """Thunk events of HLO module `module` from the newest trace file that has any."""
    for path in trace_files(logdir):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            data = json.load(fh)
        raw = data.get("traceEvents", []) if isinstance(data, dict) else data
        events = []
        for e in raw:
            args = e.get("args") or {}
            if e.get("ph") != "X" or "hlo_op" not in args:
                continue
            if args.get("hlo_module") not in (None, module):
                continue
            events.append(
                OpEvent(
                    name=str(args["hlo_op"]),
                    tid=int(e.get("tid", 0)),
                    run=str(args.get("run_id", "0")),
                    ts=float(e["ts"]),
                    dur=float(e.get("dur", 0.0)),
                )
            )
        if events:
            set_exclusive_times(events)
            return events, path
    raise RuntimeError(f"no thunk events of module {module!r} in a trace under {logdir}")


def set_exclusive_times(events: Sequence[OpEvent]) -> None:
    """Exclusive duration: an event's duration minus events nested in it on its thread."""
    by_thread: dict[int, list[OpEvent]] = collections.defaultdict(list)
    for e in events:
        e.exclusive = e.dur
        by_thread[e.tid].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e.ts, -e.dur))
        open_events: list[OpEvent] = []
        for e in evs:
            while open_events and open_events[-1].ts + open_events[-1].dur <= e.ts + 1e-3:
                open_events.pop()
            if open_events:
                parent = open_events[-1]
                parent.exclusive = max(0.0, parent.exclusive - e.dur)
            open_events.append(e)


# ---------------------------------------------------------------------------- summary
def set_shared_times(events: Sequence[OpEvent]) -> None:
    """Concurrency-shared time: each instant of wall time is split equally among the ops
    running at that instant (the innermost open event of each thread).

    When the process gets fewer cores than it has busy executor threads (here: 2 cores and a
    background job), concurrent thunks are time-sliced and their durations overlap; shared
    times then add up to the busy wall time instead of over-counting the overlap.
    """
    points: list[tuple[float, int, int]] = []  # (time, 0 = end / 1 = start, event index)
    for i, e in enumerate(events):
        e.shared = 0.0
        points.append((e.ts, 1, i))
        points.append((e.ts + e.dur, 0, i))
    points.sort()
    open_by_thread: dict[int, list[int]] = collections.defaultdict(list)
    running: set[int] = set()  # the innermost open event of each thread
    last = points[0][0] if points else 0.0
    for t, is_start, i in points:
        if running and t > last:
            share = (t - last) / len(running)
            for j in running:
                events[j].shared += share
        last = t
        stack = open_by_thread[events[i].tid]
        if stack:
            running.discard(stack[-1])
        if is_start:
            stack.append(i)
        elif i in stack:
            stack.remove(i)
        if stack:
            running.add(stack[-1])


def _rounded(us: float, n_runs: int) -> float:
    return round(us / n_runs / 1e3, 3)


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def summarize(events: Sequence[OpEvent], index: HloIndex, top: int = 15) -> dict[str, Any]:
    """Per-category and per-op times (ms per execution), the `top` ops by shared time and
    the thunk concurrency.

    Two times per op: `thunk_ms` (its exclusive thunk durations; concurrent thunks each count
    in full) and `ms` (concurrency-shared, see set_shared_times; adds up to the busy wall).
    """
    set_shared_times(events)
    runs: dict[str, list[OpEvent]] = collections.defaultdict(list)
    for e in events:
        runs[e.run].append(e)
    n_runs = len(runs)
    spans = [max(e.ts + e.dur for e in es) - min(e.ts for e in es) for es in runs.values()]
    thunk: dict[str, float] = collections.defaultdict(float)
    shared: dict[str, float] = collections.defaultdict(float)
    calls: dict[str, int] = collections.defaultdict(int)
    for e in events:
        thunk[e.name] += e.exclusive
        shared[e.name] += e.shared
        calls[e.name] += 1
    infos = {name: index.info(name) for name in thunk}
    cats = {name: categorize(info) for name, info in infos.items()}
    thunk_total, shared_total = sum(thunk.values()), sum(shared.values())
    category_rows = []
    for cat in CATEGORIES:
        names = [n for n in thunk if cats[n] == cat]
        t_us, s_us = sum(thunk[n] for n in names), sum(shared[n] for n in names)
        kinds: dict[str, float] = collections.defaultdict(float)
        for n in names:
            kinds[infos[n].kind] += shared[n]
        category_rows.append(
            {
                "category": cat,
                "ms_per_step": _rounded(s_us, n_runs),
                "share_pct": _pct(s_us, shared_total),
                "thunk_ms_per_step": _rounded(t_us, n_runs),
                "thunk_share_pct": _pct(t_us, thunk_total),
                "ops": len(names),
                "thunk_calls_per_step": round(sum(calls[n] for n in names) / n_runs, 1),
                "ms_per_step_by_kind": {
                    k: _rounded(v, n_runs) for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])
                },
            }
        )
    ranked = sorted(shared, key=shared.__getitem__, reverse=True)
    top_rows = []
    for name in ranked[:top]:
        info = infos[name]
        top_rows.append(
            {
                "op": name,
                "category": cats[name],
                "kind": info.kind,
                "ms_per_step": _rounded(shared[name], n_runs),
                "share_pct": _pct(shared[name], shared_total),
                "thunk_ms_per_step": _rounded(thunk[name], n_runs),
                "calls_per_step": round(calls[name] / n_runs, 2),
                "op_name": info.op_name,
                "metadata_from": info.metadata_from,
                "fused_dots": list(info.fused_dots),
                "stack": list(info.stack),
            }
        )
    wall_us = sum(spans)
    by_kind: dict[str, float] = collections.defaultdict(float)
    for name, us in shared.items():
        by_kind[infos[name].kind] += us
    summary = {
        "hlo_module": index.module,
        "executions_traced": n_runs,
        "op_time_ms_per_step": _rounded(shared_total, n_runs),
        "thunk_time_ms_per_step": _rounded(thunk_total, n_runs),
        "executor_wall_ms_per_step": _rounded(wall_us, n_runs),
        "executor_idle_pct": _pct(wall_us - shared_total, wall_us),
        "thunk_busy_cores": round(thunk_total / wall_us, 3) if wall_us else None,
        "threads_used": len({e.tid for e in events}),
        "distinct_ops": len(thunk),
        "thunks_per_step": round(len(events) / n_runs, 1),
        "categories": category_rows,
        "top_ops": top_rows,
        "by_kind_ms_per_step": {
            k: _rounded(v, n_runs) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])
        },
    }
    return summary


def thread_cpu_seconds() -> dict[int, float]:
    """CPU seconds (user + system) of each thread of this process, from /proc (Linux)."""
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    out: dict[int, float] = {}
    for path in glob.glob("/proc/self/task/*/stat"):
        try:
            with open(path, encoding="utf-8") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After "pid (comm)": state is field 3, utime field 14, stime field 15.
        out[int(path.split("/")[-2])] = (int(fields[11]) + int(fields[12])) / tick
    return out


def thread_cpu_split(
    before: dict[int, float], after: dict[int, float], min_share: float = 0.1
) -> dict[str, Any]:
    """How the process CPU time between two snapshots spread over its threads."""
    deltas = sorted(
        (after[t] - before.get(t, 0.0) for t in after if after[t] > before.get(t, 0.0)),
        reverse=True,
    )
    total = sum(deltas)
    return {
        "cpu_s": round(total, 3),
        "min_share": min_share,
        "threads_over_min_share": sum(d >= min_share * total for d in deltas) if total else 0,
        "top_thread_shares_pct": [round(100.0 * d / total, 1) for d in deltas[:4]] if total else [],
    }


# ---------------------------------------------------------------------------- profiling
def profile_executable(
    name: str,
    runner: Any,
    repeats: int,
    warmup: int,
    logdir: str | None = None,
    top: int = 15,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Compiles (with Flax module scopes on), warms up, traces `repeats` runs, summarizes.

    `runner` is a bench_model runner: `prepare()` compiles into `runner.compiled` and returns
    its compile facts (`lower_plus_compile_s`, `memory`, see bench_model.compile_jitted), and
    `run()` executes it once (blocking). The trace goes to `<logdir>/<name>` (kept), or to a
    temporary folder that is removed when logdir is None. The summary keeps the `top` ops.
    """
    run = runner.run
    own_dir = logdir is None
    if logdir is None:
        trace_dir = tempfile.mkdtemp(prefix=f"profile_ops_{name}_")
    else:
        trace_dir = os.path.join(logdir, name)
    try:
        with nn.override_named_call(True):
            info = runner.prepare()
        compile_s = info["lower_plus_compile_s"]
        log(f"{name}: compiled in {compile_s:.1f} s")
        index = parse_hlo(runner.compiled.as_text())
        first_ms = common.timed_call(run)
        for _ in range(warmup):
            run()
        log(f"{name}: first call {first_ms / 1e3:.1f} s; tracing {repeats} executions ...")
        wall_ms, cpu_s = [], []
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            threads_before = thread_cpu_seconds()
            for _ in range(repeats):
                c0, w0 = time.process_time(), time.perf_counter()
                run()
                cpu_s.append(time.process_time() - c0)
                wall_ms.append((time.perf_counter() - w0) * 1e3)
            threads = thread_cpu_split(threads_before, thread_cpu_seconds())
        events, path = load_op_events(trace_dir, index.module)
        summary = summarize(events, index, top)
        wall = common.summarize_ms(wall_ms)
        summary.update(
            compile_s=round(compile_s, 2),
            first_call_ms=round(first_ms, 1),
            call_wall_ms=[round(w, 1) for w in wall["times_ms"]],
            call_wall_ms_median=round(wall["median_ms"], 1),
            process_cpu_cores=round(sum(cpu_s) / (sum(wall_ms) / 1e3), 3),
            thread_cpu=threads,
            trace_file=os.path.basename(path),
            memory=info["memory"],
        )
        return summary
    finally:
        if own_dir:
            shutil.rmtree(trace_dir, ignore_errors=True)


def thread_probe(
    label: str, fn: Callable[..., Any], args: Sequence[Any], min_s: float = 1.0
) -> dict[str, Any]:
    """Wall and process-CPU time of a jitted fn run alone, and its threads per call.

    cpu/wall is the number of cores it kept busy (capped by what the machine gave us).
    Successive calls may run on different executor threads, so the spread over threads is
    taken per call: `threads_per_call` = median number of threads holding ≥ 20 % of one
    call's CPU time (1 = single-threaded op). /proc counts CPU time in clock ticks (10 ms),
    so it is reported only when a call takes ≥ 50 ms of CPU.
    """
    compiled = jax.jit(fn).lower(*args).compile()
    common.block(compiled(*args))
    calls, wall, cpu = 0, 0.0, 0.0
    threads: list[int] = []
    top_share: list[float] = []
    while wall < min_s or calls < 2:
        before = thread_cpu_seconds()
        c0, w0 = time.process_time(), time.perf_counter()
        common.block(compiled(*args))
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        split = thread_cpu_split(before, thread_cpu_seconds(), min_share=0.2)
        calls += 1
        if split["cpu_s"] >= 0.05:
            threads.append(split["threads_over_min_share"])
            top_share.append(split["top_thread_shares_pct"][0])
    return {
        "probe": label,
        "calls": calls,
        "ms_per_call": round(wall / calls * 1e3, 3),
        "cpu_cores": round(cpu / wall, 3),
        "threads_per_call": statistics.median(threads) if threads else None,
        "top_thread_share_pct_per_call": round(statistics.median(top_share), 1)
        if top_share
        else None,
    }


def threading_probes(batch: int, dim: int, length: int) -> list[dict[str, Any]]:
    """Ops of the workload's sizes run alone: the CEMA input rfft as the model does it (zero
    padding to the FFT size, then the FFT), the bare FFT, an elementwise fusion and a matmul."""
    n = fft_length(length)
    x = jax.random.normal(jax.random.PRNGKey(5), (batch, dim, length), jnp.float32)
    xn = jax.random.normal(jax.random.PRNGKey(6), (batch, dim, n), jnp.float32)
    a = jax.random.normal(jax.random.PRNGKey(7), (batch * length, dim), jnp.float32)
    w = jax.random.normal(jax.random.PRNGKey(8), (dim, 1024), jnp.float32)
    return [
        thread_probe(f"pad + rfft {tuple(x.shape)} n={n}", lambda v: jnp.fft.rfft(v, n=n), [x]),
        thread_probe(f"rfft alone {tuple(xn.shape)}", jnp.fft.rfft, [xn]),
        thread_probe(
            f"elementwise exp·cos {tuple(xn.shape)}", lambda v: jnp.exp(-v) * jnp.cos(v), [xn]
        ),
        thread_probe(f"matmul {tuple(a.shape)}x{tuple(w.shape)}", jnp.dot, [a, w]),
    ]


# Summary key of the sequence length, per workload.
LENGTH_KEYS = {"train": "seq", "long_forward": "length"}
TITLES = {"train": "train step (fwd+bwd+AdamW)", "long_forward": "long forward"}


def profile_model(
    cfg: mf.MegalodonConfig,
    kind: str,
    batch: int,
    length: int,
    repeats: int,
    warmup: int = 0,
    logdir: str | None = None,
    top: int = 15,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Profiles one workload of the model on random tokens of shape (batch, length).

    kind: "train" = forward + backward + AdamW step (bench_model's TrainRunner: jit, donated
    state); "long_forward" = inference forward `model.apply({"params": params}, tokens)` →
    logits (bench_model's ForwardRunner, cache None). `warmup` untimed runs follow the first
    call, then `repeats` runs are traced (see profile_executable for logdir and top).
    The summary records `batch`, the length under LENGTH_KEYS[kind] (`seq` / `length`) and
    `tokens_per_s` = batch · length / median wall time per call.
    """
    if kind not in LENGTH_KEYS:
        raise ValueError(f"unknown workload {kind!r} (choose from {', '.join(WORKLOADS)})")
    model = bench_model.OursModel(cfg)
    if kind == "train":
        tokens = common.random_tokens(batch, length, cfg.vocab_size, 1)
        runner: Any = bench_model.TrainRunner(model.loss, model.params, tokens)
    else:
        tokens = common.random_tokens(batch, length, cfg.vocab_size, 2)
        runner = bench_model.ForwardRunner(model.forward, model.params, tokens)
    summary = profile_executable(kind, runner, repeats, warmup, logdir, top, log)
    summary.update(
        {
            "batch": batch,
            LENGTH_KEYS[kind]: length,
            "tokens_per_s": round(batch * length / (summary["call_wall_ms_median"] / 1e3), 1),
        }
    )
    return summary


# ---------------------------------------------------------------------------- printing
def markdown(title: str, summary: dict[str, Any], top: int = 15) -> str:
    """Category table, top ops, busy-core lines and threading probes of one workload."""
    lines = [f"### {title}", ""]
    if summary.get("error"):
        return "\n".join([*lines, f"FAILED: {summary['error']}"])
    threads = summary.get("thread_cpu", {})
    lines += [
        f"- wall per call {summary['call_wall_ms_median']:.1f} ms (median of "
        f"{len(summary['call_wall_ms'])}); executor span {summary['executor_wall_ms_per_step']:.1f}"
        f" ms, of it idle {summary['executor_idle_pct']:.1f} %",
        f"- op time {summary['op_time_ms_per_step']:.1f} ms (concurrency-shared), thunk time "
        f"{summary['thunk_time_ms_per_step']:.1f} ms; {summary['thunks_per_step']:.0f} thunks, "
        f"{summary['distinct_ops']} distinct ops, {summary['threads_used']} executor threads",
        f"- busy cores: thunk concurrency {summary['thunk_busy_cores']:.2f} (Σ thunk time / "
        f"span); process CPU / wall {summary['process_cpu_cores']:.2f}; threads with > 10 % of "
        f"the CPU time: {threads.get('threads_over_min_share')} "
        f"(top shares {threads.get('top_thread_shares_pct')} %)",
        "",
        "| category | ms/step | share % | thunk ms/step | thunk share % | ops |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary["categories"]:
        if row["ops"]:
            lines.append(
                f"| {row['category']} | {row['ms_per_step']:.1f} | {row['share_pct']:.1f} "
                f"| {row['thunk_ms_per_step']:.1f} | {row['thunk_share_pct']:.1f} "
                f"| {row['ops']} |"
            )
    lines += [
        "",
        "| # | op | category | kind | ms/step | share % | thunk ms | op_name |",
        "|---|---|---|---|---:|---:|---:|---|",
    ]
    for i, row in enumerate(summary["top_ops"][:top], 1):
        cell = "`" + re.sub(r"^jit\([^)]*\)/", "", row["op_name"]) + "`"
        if row.get("metadata_from"):
            cell += f" (metadata of {row['metadata_from']})"
        if len(row.get("fused_dots", [])) > 1:
            cell += " (fused dots: " + ", ".join(row["fused_dots"]) + ")"
        lines.append(
            f"| {i} | {row['op']} | {row['category']} | {row['kind']} | {row['ms_per_step']:.1f}"
            f" | {row['share_pct']:.1f} | {row['thunk_ms_per_step']:.1f} | {cell} |"
        )
    probes = summary.get("threading_probes") or []
    if probes:
        lines += [
            "",
            "| probe (alone) | ms/call | CPU / wall | threads per call | top thread % |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {p['probe']} | {p['ms_per_call']:.2f} | {p['cpu_cores']:.2f} "
            f"| {p['threads_per_call']} | {p['top_thread_share_pct_per_call']} |"
            for p in probes
        ]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", type=str_list, default=list(WORKLOADS))
    p.add_argument("--long_len", type=int, default=32768, help="tokens of the long forward")
    p.add_argument("--repeats", type=int, default=3, help="traced executions of the train step")
    p.add_argument("--long_repeats", type=int, default=2, help="traced long forwards")
    p.add_argument("--warmup", type=int, default=1, help="untimed train steps after the first")
    p.add_argument("--train_batch", type=int, default=4)
    p.add_argument("--train_seq", type=int, default=512)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--skip_probes", action="store_true", help="no FFT/matmul threading probes")
    p.add_argument(
        "--logdir",
        default=None,
        help="keep the traces here, in one subfolder per workload (default: temp, removed)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)} (choose from {', '.join(WORKLOADS)})")
    if min(args.repeats, args.long_repeats) < 1 or args.warmup < 0:
        p.error("--repeats/--long_repeats must be >= 1 and --warmup >= 0")
    return args


def code_state() -> dict[str, Any]:
    """The profiled code: git HEAD (read only) and short hashes of the model sources."""
    repo = os.path.dirname(HERE)
    state: dict[str, Any] = {"git_head": None, "model_sources_sha256": {}}
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10
        )
        state["git_head"] = head.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    for path in sorted(glob.glob(os.path.join(repo, "megalodon_flax", "model", "*.py"))):
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()[:12]
        state["model_sources_sha256"][os.path.basename(path)] = digest
    return state


def rules_table() -> list[dict[str, str]]:
    return [{"category": r.category, "when": r.describe()} for r in RULES]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    cfg = mf.enwik8_config(compute_dtype="float32")
    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "settings": vars(args),
        "config": cfg.to_dict(),
        "code": code_state(),
        "method": (__doc__ or "").split("Method", 1)[-1].split("Categories", 1)[0].strip(),
        "rules": rules_table(),
        "workloads": {},
    }

    def save() -> None:
        results["machine"]["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        common.write_json(args.out, results)

    log(f"backend={jax.default_backend()} workloads={args.workloads} out={args.out}")
    # (batch, length, repeats, warmup) of each workload.
    settings = {
        "train": (args.train_batch, args.train_seq, args.repeats, args.warmup),
        "long_forward": (1, args.long_len, args.long_repeats, 0),
    }
    for name in args.workloads:
        batch, length, repeats, warmup = settings[name]
        try:
            summary = profile_model(
                cfg, name, batch, length, repeats, warmup, args.logdir, args.top, log
            )
        except Exception as exc:
            summary = common.error_record(exc)
            log(f"{name}: FAILED {summary['error'][:300]}")
        if not args.skip_probes and "error" not in summary:
            try:
                summary["threading_probes"] = threading_probes(batch, cfg.model_dim, length)
            except Exception as exc:
                summary["threading_probes_error"] = common.error_record(exc)["error"]
        results["workloads"][name] = summary
        save()
        log(f"{name}: done")
    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    print()
    for name, summary in results["workloads"].items():
        batch, length = settings[name][:2]
        print(markdown(f"{TITLES[name]}, batch {batch} × {length}, fp32", summary, args.top))
        print()
    print(f"wrote {os.path.abspath(args.out)} ({results['elapsed_s']} s)")
    return results


if __name__ == "__main__":
    main()
