"""One accelerator check: train step, long forwards, forward scaling and generation, against
megalodon-jax in the same run. `benchmarks/gpu_check.sh` runs it.

Sections (ours and megalodon-jax alternating repeat by repeat, medians with min-max):
  train:    the enwik8 experiment's train step (fwd + bwd + AdamW) at 16 × 512 in bf16
            compute, with the training default's layers (scanned, rematted) and unrolled
            without remat: ms/step, tokens/s, MFU (the model's FLOPs per step / time / the
            chip's peak dense bf16 FLOP/s; the model's FLOPs are XLA's count of the
            unrolled step without remat, since XLA counts a loop's body once), and
            `--steps` consecutive steps timed as one run (the target: 1,200 steps in under
            20 s plus compile).
  forward:  batch-1 forwards at 32K and 128K tokens.
  scaling:  our batch-1 forward at longer lengths up to 1M tokens: ms per 1K tokens (flat
            across the forward and scaling rows means linear in length).
  generate: greedy generation of `--new-tokens` tokens after a 512-token prompt.

On a CPU (no accelerator, or `--small`) every size shrinks so that the same code runs in a
couple of minutes: the smoke test of this script.

  python -m benchmarks.gpu_check                 # sizes by backend
  python -m benchmarks.gpu_check --small --out /tmp/gpu_check.json
  python -m benchmarks.gpu_check --sections train --trace /tmp/trace   # + a profiler trace
  python -m benchmarks.gpu_check --sections forward --append           # add to the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

import megalodon_flax as mf
from benchmarks import common
from benchmarks.bench_generate import OursGen, PeerGen
from benchmarks.bench_model import ForwardRunner, OursModel, PeerModel, TrainRunner, run_cases
from megalodon_flax.megalodon import layer_stack
from megalodon_flax.training.config import TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "gpu_check.json")

# Peak dense bf16 FLOP/s by device kind (vendor data sheets, SXM parts).
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L4": 121e12}

FULL = {
    "train_batch": 16,
    "train_seq": 512,
    "steps": 200,
    "lengths": [32768, 131072],
    "scaling": [262144, 524288, 1048576],
    "prompt": 512,
    "new_tokens": 256,
    "repeats": 5,
}
SMALL = {
    "train_batch": 2,
    "train_seq": 128,
    "steps": 5,
    "lengths": [512, 1024],
    "scaling": [256, 512, 1024],
    "prompt": 16,
    "new_tokens": 8,
    "repeats": 2,
}


def peak_flops() -> tuple[str, float | None]:
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_BF16_FLOPS.items():
        if name in kind:
            return kind, flops
    return kind, None


def step_flops(compiled: Any) -> float | None:
    """XLA's FLOP count of one call of a compiled function (None where unavailable)."""
    try:
        cost = compiled.cost_analysis()
    except Exception:
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    flops = (cost or {}).get("flops")
    return float(flops) if flops else None


SECTIONS = ("train", "forward", "scaling", "generate")
# The train section's second row of ours: unrolled layers, no remat.
UNROLLED = f"{common.OURS} unrolled"


def trace_steps(runner: TrainRunner, steps: int, trace_dir: str) -> None:
    """Records `steps` train steps with the JAX profiler (a Perfetto trace under trace_dir)."""
    import jax.profiler

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(steps):
            runner.run()


def train_section(
    models: dict[str, Any], sizes: dict[str, Any], log: Callable, trace_dir: str | None = None
) -> list[dict]:
    """The train step of every model in `models`, alternating; `UNROLLED`'s FLOP count is
    the model FLOPs of every row's MFU."""
    batch, seq = sizes["train_batch"], sizes["train_seq"]
    tokens = common.random_tokens(batch, seq, 256, 1)
    runners: dict[str, TrainRunner] = {}
    builders = []
    for name, model in models.items():

        def build(name: str = name, model: Any = model) -> common.Case:
            runners[name] = TrainRunner(model.loss, model.params, tokens, model.compiler_options)
            return common.Case(name, runners[name].prepare, runners[name].run)

        builders.append((name, build))
    log(f"train bf16 {batch} x {seq} ...")
    _, peak = peak_flops()
    records = []
    cases = run_cases(builders, sizes["repeats"], 1)
    unrolled = runners.get(UNROLLED)
    model_flops = step_flops(unrolled.compiled) if unrolled is not None else None
    for case in cases:
        rec = common.case_record(case, batch=batch, seq=seq, dtype="bfloat16")
        runner = runners.get(case.name)
        if rec.get("median_ms") and runner is not None:
            rec["tokens_per_s"] = round(batch * seq / (rec["median_ms"] / 1e3), 1)
            rec["xla_flops_per_step"] = step_flops(runner.compiled)
            rec["model_flops_per_step"] = model_flops
            if model_flops and peak:
                rec["mfu"] = round(model_flops / (rec["median_ms"] / 1e3) / peak, 4)
            start = time.perf_counter()
            for _ in range(sizes["steps"]):
                runner.run()
            elapsed = time.perf_counter() - start
            rec["consecutive_steps"] = sizes["steps"]
            rec["consecutive_s"] = round(elapsed, 3)
            rec["projected_1200_steps_s"] = round(elapsed * 1200 / sizes["steps"], 2)
            if trace_dir and case.name == common.OURS:
                try:
                    trace_steps(runner, 3, trace_dir)
                    rec["trace_dir"] = trace_dir
                except Exception as exc:  # a profiler failure must not lose the timings
                    rec["trace_error"] = common.error_record(exc)
        records.append(rec)
        log(f"  {case.name}: {rec.get('median_ms')} ms/step, MFU {rec.get('mfu')}")
    return records


def forward_section(
    models: dict[str, Any], lengths: Sequence[int], repeats: int, log: Callable
) -> list[dict]:
    records = []
    for length in lengths:
        tokens = common.random_tokens(1, length, 256, 2)
        builders = []
        for name, model in models.items():

            def build(model: Any = model, tokens: jax.Array = tokens) -> common.Case:
                runner = ForwardRunner(model.forward, model.params, tokens, model.compiler_options)
                return common.Case(model.name, runner.prepare, runner.run)

            builders.append((name, build))
        log(f"forward bf16 1 x {length} ...")
        for case in run_cases(builders, repeats, 1):
            rec = common.case_record(case, length=length, dtype="bfloat16")
            if rec.get("median_ms"):
                rec["ms_per_1k_tokens"] = round(rec["median_ms"] * 1000 / length, 3)
            records.append(rec)
            log(f"  {case.name}: {rec.get('median_ms')} ms {rec.get('error', '')}")
    return records


def generate_section(
    cfg: mf.MegalodonConfig, with_peer: bool, sizes: dict[str, Any], log: Callable
) -> list[dict]:
    prompt = common.random_tokens(1, sizes["prompt"], cfg.vocab_size, 3)
    key = jax.random.PRNGKey(0)
    new = sizes["new_tokens"]
    gens: list[Any] = [OursGen(cfg)] + ([PeerGen(cfg)] if with_peer else [])
    cases = []
    first_call_s = {}
    log(f"generate {new} tokens after {sizes['prompt']} ...")
    for gen in gens:

        def run(gen: Any = gen) -> None:
            common.block(gen.generate(prompt, new, key))

        start = time.perf_counter()  # the first call compiles: logged apart, so a timeout
        run()  # shows which model it stopped in
        first_call_s[gen.name] = round(time.perf_counter() - start, 2)
        log(f"  {gen.name}: first call (compiles) {first_call_s[gen.name]} s")
        cases.append(common.Case(gen.name, dict, run))
    common.measure_interleaved(cases, sizes["repeats"], 0)
    records = []
    for case in cases:
        rec = common.case_record(case, prompt=sizes["prompt"], new_tokens=new)
        rec["first_call_s"] = first_call_s[case.name]
        if rec.get("median_ms"):
            rec["tokens_per_s"] = round(new / (rec["median_ms"] / 1e3), 1)
        records.append(rec)
        log(f"  {case.name}: {rec.get('median_ms')} ms")
    return records


def _cell(r: dict[str, Any], key: str, spec: str = ".1f") -> str:
    return common.fmt(r.get(key), spec)


def render(results: dict[str, Any]) -> str:
    out = [f"device: {results['device']} (backend {results['backend']})"]
    rows = [
        [
            r["model"],
            f"{_cell(r, 'median_ms', '.2f')} ({_cell(r, 'min_ms', '.2f')}-"
            f"{_cell(r, 'max_ms', '.2f')})",
            _cell(r, "tokens_per_s", ".0f"),
            _cell(r, "mfu", ".3f"),
            _cell(r, "projected_1200_steps_s", ".1f"),
            _cell(r, "lower_plus_compile_s"),
        ]
        for r in results.get("train", [])
    ]
    headers = ["model", "ms/step (min-max)", "tokens/s", "MFU", "1,200 steps s", "compile s"]
    out.append(common.table("Train step, enwik8 config, bf16", headers, rows))
    for section, title in (("forward", "Forward, batch 1, bf16"), ("scaling", "Our forward")):
        rows = [
            [
                r["model"],
                f"{r['length']:,}",
                f"{_cell(r, 'median_ms')} ({_cell(r, 'min_ms')}-{_cell(r, 'max_ms')})",
                _cell(r, "ms_per_1k_tokens", ".3f"),
                (r.get("error") or "")[:40],
            ]
            for r in results.get(section, [])
        ]
        headers = ["model", "tokens", "ms (min-max)", "ms / 1K tokens", "error"]
        out.append(common.table(title, headers, rows))
    rows = [
        [r["model"], _cell(r, "median_ms"), _cell(r, "tokens_per_s", ".0f")]
        for r in results.get("generate", [])
    ]
    out.append(common.table("Greedy generation", ["model", "ms", "new tokens/s"], rows))
    return "\n\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="CPU sizes (default on a CPU backend)")
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    p.add_argument(
        "--sections",
        type=common.str_list,
        default=list(SECTIONS),
        help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)",
    )
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the other sections of an existing --out file (one process per section)",
    )
    p.add_argument("--trace", default=None, help="profile 3 of our train steps into this folder")
    args = p.parse_args(argv)
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}; choose from {','.join(SECTIONS)}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    small = args.small or common.on_cpu()
    sizes = SMALL if small else FULL
    kind, peak = peak_flops()
    results: dict[str, Any] = {}
    if args.append and os.path.exists(args.out):
        with open(args.out, encoding="utf-8") as fh:
            results = json.load(fh)
    results |= {
        "machine": common.machine_info(),
        "device": kind,
        "backend": jax.default_backend(),
        "peak_bf16_flops": peak,
        "sizes": sizes,
    }
    cfg = TrainConfig().model  # the enwik8 experiment: bf16, scanned layers with remat
    ours = OursModel(cfg)
    models: dict[str, Any] = {common.OURS: ours}
    with_peer = not args.skip_peer and common.peer_available()[0]
    if with_peer:
        models[common.PEER] = PeerModel(cfg)
    unrolled_cfg = cfg.replace(scan_layers=False, remat_policy="none")
    train_models = {
        **models,
        UNROLLED: OursModel(unrolled_cfg, layer_stack.to_layout(ours.params, False)),
    }
    results["peer"] = common.package_version("megalodon-jax") if with_peer else None
    log(f"device {kind}, backend {results['backend']}, peer {results['peer']}")
    sections: list[tuple[str, Callable[[], list[dict]]]] = [
        ("train", lambda: train_section(train_models, sizes, log, args.trace)),
        ("forward", lambda: forward_section(models, sizes["lengths"], sizes["repeats"], log)),
        (
            "scaling",
            lambda: forward_section(
                {common.OURS: models[common.OURS]}, sizes["scaling"], sizes["repeats"], log
            ),
        ),
        ("generate", lambda: generate_section(cfg, with_peer, sizes, log)),
    ]
    for name, run in sections:
        if name not in args.sections:
            continue
        section_start = time.perf_counter()
        try:
            results[name] = run()
        except Exception as exc:  # one failing section must not lose the others
            results[name] = [{"model": "-", **common.error_record(exc)}]
            log(f"{name} failed: {exc}")
        seconds = round(time.perf_counter() - section_start, 1)
        results.setdefault("section_s", {})[name] = seconds
        common.write_json(args.out, results)
    results["elapsed_s"] = round(sum(results.get("section_s", {}).values()), 1)
    common.write_json(args.out, results)
    print()
    print(render(results))
    print(f"\nwrote {os.path.abspath(args.out)} ({results['elapsed_s']} s)")
    return results


if __name__ == "__main__":
    main()
