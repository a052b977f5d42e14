"""Start-up cost: compile time and peak process memory, each case in a fresh process.

Every measurement runs in its own Python process (nothing cached, no persistent compilation
cache), so compile time and the peak resident set size (ru_maxrss, which includes the
compiler's own memory) belong to that case alone. A worker imports JAX and the model, builds
the enwik8 model, initializes its parameters, lowers and compiles one jitted function, runs
it a few times and reports: lower and compile seconds, the median of the timed runs, XLA's
estimate of the executable's buffers (temp + arguments + outputs − aliases) and the peak RSS.

Implementations ("variants") run alternately repeat by repeat, like `bench_model`:
  scanned    ours with `scan_layers=True`
  unrolled   ours with `scan_layers=False`
  peer       megalodon-jax 0.2.2 in the equivalent topology (when installed)
Ours compile with the project's `compiler_options` for the platform, as its train and eval
steps do; `scanned+xla` and `unrolled+xla` compile the same with XLA's defaults (megalodon-jax
always does).

Cases: `train-BxL` (forward + backward + AdamW, fp32, params and optimizer state donated) and
`forward-L` (batch 1, fp32). `--depths` repeats the train case with other layer counts.

Run from the repository root:
  python -m benchmarks.bench_startup                       # the table in RESULTS.md
  python -m benchmarks.bench_startup --quick --out /tmp/startup.json   # smoke run
  python -m benchmarks.bench_startup --remat-policy save_dots_no_batch  # our blocks rematted
  python -m benchmarks.bench_startup --variants scanned,scanned+xla   # the options' effect
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common
from megalodon_flax.layers.remat import REMAT_POLICIES

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "bench_startup.json")
VARIANTS = ("scanned", "unrolled", "peer")
PEER_VARIANT = "peer"
XLA_DEFAULTS_SUFFIX = "+xla"
KNOWN_VARIANTS = (*VARIANTS, *(v + XLA_DEFAULTS_SUFFIX for v in VARIANTS if v != PEER_VARIANT))


# ---------------------------------------------------------------------------- the worker
def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Measures one case in this (fresh) process; returns the JSON record."""
    import resource

    t0 = time.perf_counter()
    import jax

    import megalodon_flax as mf
    from benchmarks.bench_model import OursModel, PeerModel, TrainRunner, compile_jitted

    import_s = time.perf_counter() - t0
    overrides = {"num_layers": spec["layers"]}
    cfg = mf.enwik8_config(**overrides)
    if spec["variant"] == PEER_VARIANT:
        model = PeerModel(cfg)
    else:
        scanned = spec["variant"].removesuffix(XLA_DEFAULTS_SUFFIX) == "scanned"
        model = OursModel(cfg.replace(scan_layers=scanned, remat_policy=spec["remat_policy"]))
        if spec["variant"].endswith(XLA_DEFAULTS_SUFFIX):
            model.compiler_options = None
    common.block(model.params)
    init_s = time.perf_counter() - t0 - import_s
    tokens = common.random_tokens(spec["batch"], spec["length"], cfg.vocab_size, 1)
    if spec["kind"] == "train":
        runner = TrainRunner(model.loss, model.params, tokens, model.compiler_options)
        del model.params  # the runner holds its own copy, donated every step
        info = runner.prepare()
        run = runner.run
    else:
        forward = jax.jit(model.forward, compiler_options=model.compiler_options)
        compiled, info = compile_jitted(forward, model.params, tokens)

        def run() -> None:
            common.block(compiled(model.params, tokens))

    first_s = common.timed_call(run) / 1e3
    times = [common.timed_call(run) for _ in range(spec["runs"])]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return {
        **spec,
        "import_s": round(import_s, 3),
        "init_s": round(init_s, 3),
        "lower_s": info["lower_s"],
        "compile_s": info["compile_s"],
        "lower_plus_compile_s": info["lower_plus_compile_s"],
        "first_run_s": round(first_s, 3),
        "run_ms": round(statistics.median(times), 2) if times else None,
        "xla_estimate_mib": info["memory"].get("peak_estimate_mib"),
        "peak_rss_mib": round(rss, 1),
        "pid": os.getpid(),
        "jax_backend": jax.default_backend(),
    }


def run_worker(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    """Runs `worker(spec)` in a fresh interpreter; a failure becomes an error record."""
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    cmd = [sys.executable, "-m", "benchmarks.bench_startup", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired:
        return {**spec, "error": f"timed out after {timeout_s:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {**spec, "error": f"exit {proc.returncode}: {' | '.join(tail)}"[:2000]}
    return json.loads(lines[-1])


# ---------------------------------------------------------------------------- the driver
def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The (kind, batch, length, layers) cases of this run, without variants."""
    out = []
    for batch in args.train_batches:
        out.append({"kind": "train", "batch": batch, "length": args.train_seq, "layers": 6})
    for length in args.lengths:
        out.append({"kind": "forward", "batch": 1, "length": length, "layers": 6})
    for layers in args.depths:
        if layers != 6:
            batch = max(args.train_batches)
            out.append(
                {"kind": "train", "batch": batch, "length": args.train_seq, "layers": layers}
            )
    return out


def case_name(case: dict[str, Any]) -> str:
    if case["kind"] == "train":
        name = f"train {case['batch']} x {case['length']}"
    else:
        name = f"forward {case['length']:,}"
    return name + ("" if case["layers"] == 6 else f", {case['layers']} layers")


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (min, max) of each measured field over the repeats of one case and variant."""
    fields = ("compile_s", "lower_plus_compile_s", "run_ms", "peak_rss_mib", "xla_estimate_mib")
    ok = [r for r in records if "error" not in r]
    out: dict[str, Any] = {"repeats": len(ok)}
    if len(ok) < len(records):
        out["errors"] = [r["error"] for r in records if "error" in r]
    for name in fields:
        values = [r[name] for r in ok if r.get(name) is not None]
        if values:
            out[name] = {
                "median": round(statistics.median(values), 3),
                "min": min(values),
                "max": max(values),
            }
    return out


def _median(summary: dict[str, Any], field: str) -> float | None:
    return summary.get(field, {}).get("median")


def render(results: dict[str, Any]) -> str:
    rows = []
    for entry in results["cases"]:
        per = entry["variants"]
        peer = per.get(PEER_VARIANT, {})
        for variant, summary in per.items():

            def cell(field: str, spec: str, summary: dict[str, Any] = summary) -> str:
                stats = summary.get(field)
                if not stats:
                    return "-"
                return (
                    f"{common.fmt(stats['median'], spec)} "
                    f"({common.fmt(stats['min'], spec)}-{common.fmt(stats['max'], spec)})"
                )

            def ratio(
                field: str,
                summary: dict[str, Any] = summary,
                peer: dict[str, Any] = peer,
                variant: str = variant,
            ) -> str:
                ours, theirs = _median(summary, field), _median(peer, field)
                if variant == PEER_VARIANT or not ours or not theirs:
                    return ""
                return f"{ours / theirs:.2f}"

            rows.append(
                [
                    entry["name"],
                    variant,
                    cell("lower_plus_compile_s", ".2f"),
                    ratio("lower_plus_compile_s"),
                    cell("peak_rss_mib", ".0f"),
                    ratio("peak_rss_mib"),
                    cell("xla_estimate_mib", ".0f"),
                    cell("run_ms", ".1f"),
                ]
            )
    headers = [
        "case",
        "variant",
        "lower+compile s",
        "/ peer",
        "peak RSS MiB",
        "/ peer",
        "XLA estimate MiB",
        "run ms",
    ]
    note = (
        "Each value: median (min-max) over fresh processes, variants alternating. Peak RSS "
        "includes JAX's import (~160 MiB) and the compiler."
    )
    title = (
        "Start-up: compile time and peak memory "
        f"(fp32, our remat_policy={results['settings']['remat_policy']})"
    )
    return common.table(title, headers, rows) + ("\n" + note)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (smoke test)")
    p.add_argument("--repeats", type=int, default=None, help="fresh processes per case (3)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per process after the first")
    p.add_argument("--train-seq", type=int, default=512)
    p.add_argument("--train-batches", type=common.int_list, default=None, help="default 1,4")
    p.add_argument("--lengths", type=common.int_list, default=None, help="default 512,32768")
    p.add_argument("--depths", type=common.int_list, default=None, help="default 6,12,24")
    p.add_argument(
        "--variants", type=common.str_list, default=list(VARIANTS), help="scanned,unrolled,peer"
    )
    p.add_argument(
        "--remat-policy",
        default="none",
        choices=tuple(REMAT_POLICIES),
        help="remat_policy of our variants",
    )
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per worker")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "repeats": 1 if quick else 3,
        "train_batches": [1] if quick else [1, 4],
        "lengths": [256] if quick else [512, 32768],
        "depths": [6, 12] if quick else [6, 12, 24],
    }
    if quick:
        args.train_seq = min(args.train_seq, 128)
        args.runs = min(args.runs, 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = sorted(set(args.variants) - set(KNOWN_VARIANTS))
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {KNOWN_VARIANTS}")
    if args.repeats < 1 or args.runs < 0:
        p.error("--repeats must be >= 1 and --runs >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))), flush=True)
        return {}
    start = time.perf_counter()
    variants = list(args.variants)
    if PEER_VARIANT in variants:
        ok, why = common.peer_available()
        if not ok:
            print(f"megalodon-jax unavailable ({why}): measuring ours only", flush=True)
            variants.remove(PEER_VARIANT)
    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "settings": vars(args),
        "peer_version": common.package_version("megalodon-jax"),
        "cases": [],
    }
    for case in cases(args):
        raw: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for repeat in range(args.repeats):
            for variant in variants:
                spec = {
                    **case,
                    "variant": variant,
                    "runs": args.runs,
                    "remat_policy": args.remat_policy,
                }
                record = run_worker(spec, args.timeout)
                raw[variant].append(record)
                shown = record.get("error") or (
                    f"compile {record['lower_plus_compile_s']:.2f} s, "
                    f"RSS {record['peak_rss_mib']:.0f} MiB, run {record['run_ms']} ms"
                )
                print(
                    f"[{time.perf_counter() - start:7.1f}s] {case_name(case)} {variant} "
                    f"#{repeat + 1}: {shown}",
                    flush=True,
                )
        results["cases"].append(
            {
                "name": case_name(case),
                **case,
                "variants": {v: summarize(r) for v, r in raw.items()},
                "raw": raw,
            }
        )
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        common.write_json(args.out, results)
    print()
    print(render(results))
    print(f"\nwrote {os.path.abspath(args.out)} ({results['elapsed_s']} s)")
    return results


if __name__ == "__main__":
    main()
