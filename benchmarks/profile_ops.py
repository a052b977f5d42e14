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

This file is the entry point (workloads, timing, tables, JSON). The HLO reading and the rule
table RULES are in `benchmarks/hlo_profile.py`; the trace reading and the per-op and
per-category summary in `benchmarks/trace_profile.py`.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp

import megalodon_flax as mf
from benchmarks import bench_model, common
from benchmarks.common import str_list
from benchmarks.hlo_profile import parse_hlo, rules_table
from benchmarks.trace_profile import load_op_events, summarize
from megalodon_flax.megalodon.cema import fft_length

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "profile_ops.json")
WORKLOADS = ("train", "long_forward")


# ---------------------------------------------------------------------------- CPU threads
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
        runner: Any = bench_model.TrainRunner(
            model.loss, model.params, tokens, model.compiler_options
        )
    else:
        tokens = common.random_tokens(batch, length, cfg.vocab_size, 2)
        runner = bench_model.ForwardRunner(
            model.forward, model.params, tokens, model.compiler_options
        )
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
    sources = [os.path.join(repo, "megalodon_flax", d, "*.py") for d in ("megalodon", "layers")]
    for path in sorted(p for pattern in sources for p in glob.glob(pattern)):
        with open(path, "rb") as fh:
            digest = hashlib.sha256(fh.read()).hexdigest()[:12]
        state["model_sources_sha256"][os.path.basename(path)] = digest
    return state


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
