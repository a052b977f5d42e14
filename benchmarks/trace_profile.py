"""The profiler's per-thunk trace events, joined with the compiled HLO: per-op and
per-category times of one traced executable.

Input: the Chrome trace JSON that `jax.profiler.trace(logdir, create_perfetto_trace=True)`
writes as `<logdir>/plugins/profile/<run>/<host>.trace.json.gz` (or `perfetto_trace.json.gz`):
`{"traceEvents": [event, ...], ...}` or a bare list of events. On the XLA CPU thunk executor
every executed thunk is one complete event

  {"ph": "X", "tid": 7, "ts": 1234.5, "dur": 12.0, "name": "...",
   "args": {"hlo_module": "jit__step", "hlo_op": "fusion.12", "run_id": "42"}}

with `ts` / `dur` in microseconds; `hlo_op` names an instruction of the compiled HLO text (see
hlo_profile) and `run_id` tells the executions apart. Other events (ph != "X", or no
`hlo_op`) and thunks of other modules are ignored.

Times per event: `exclusive` = its duration minus the events nested in it on the same thread;
`shared` = concurrency-shared (each instant of wall time split equally among the thunks
running then). `summarize` adds them up per op and per category (hlo_profile.categorize) in
milliseconds per execution.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.hlo_profile import CATEGORIES, HloIndex, categorize


@dataclass
class OpEvent:
    """One executed thunk: hlo_op name, thread, run_id; times in microseconds."""

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


def thunk_events(trace: dict[str, Any] | list[dict[str, Any]], module: str) -> list[OpEvent]:
    """The thunk events of HLO module `module` in decoded trace JSON (format in the module
    docstring), in trace order. An event without `hlo_module` counts as the module's; missing
    `tid` / `run_id` / `dur` read as 0 / "0" / 0. Times are not set (see set_exclusive_times)."""
    raw = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
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
    return events


def load_op_events(logdir: str, module: str) -> tuple[list[OpEvent], str]:
    """Thunk events of HLO module `module`, with exclusive times, from the newest trace file
    under logdir that has any, and that file's path. RuntimeError when none has any."""
    for path in trace_files(logdir):
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            events = thunk_events(json.load(fh), module)
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
    """Microseconds in all runs → milliseconds per run, 3 decimals."""
    return round(us / n_runs / 1e3, 3)


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 2) if whole else 0.0


def summarize(events: Sequence[OpEvent], index: HloIndex, top: int = 15) -> dict[str, Any]:
    """Per-category and per-op times (ms per execution), the `top` ops by shared time and
    the thunk concurrency.

    events: thunk events of `index.module` with exclusive times (load_op_events); their
    shared times are set here. Two times per op: `thunk_ms` (its exclusive thunk durations;
    concurrent thunks each count in full) and `ms` (concurrency-shared, see
    set_shared_times; adds up to the busy wall). Returns the JSON summary: totals, one row
    per category of CATEGORIES (`categories`), the `top_ops` rows and `by_kind_ms_per_step`.
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
