"""How our model's execution options trade time for memory: remat policies, attention kernels,
scanned vs unrolled layers.

Sections (each a table and a JSON list; variants of one case are timed alternately; compute
dtype `--dtype`, float32 by default):
  remat:     train step (fwd + bwd + AdamW) at batch 1 × 512 and 1 × 8,192 tokens for
             every `remat_policy` with scanned layers (the training default's layout), and
             unrolled without remat as the reference: median/min/max ms and XLA's compiled
             memory (temporaries and the peak estimate temp + arguments + outputs − aliases).
  attention: `attention_impl` "xla" vs "dot_product": the train step at 4 × 512 and the
             forward at 1 × 32,768 tokens (values, gradients: tests/megalodon).
  layers:    `scan_layers` on and off: the train step at 4 × 512 (scanned with the
             training default's policy, with "save_dots_spectra_probs" and with no remat;
             unrolled with no remat) and the forward at 32,768.
  compiler:  the project's `compiler_options` for the platform against XLA's defaults: the
             train step at 4 × 512 (unrolled, and scanned with the default policy) and
             the unrolled forward at 32,768.
  generate:  `scan_layers` on and off for greedy generation (`sampling.generate`, prefill +
             decode loop) of `--new-tokens` after a 1 × 384 prompt, and of one token (the
             prefill alone): per-call ms, decode ms per token = (t(T) − t(1)) / (T − 1),
             and compile time (`sampling.lower_generate`).

Run from the repository root:
  python -m benchmarks.bench_variants                       # the tables in RESULTS.md
  python -m benchmarks.bench_variants --quick --out /tmp/variants.json   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax

import megalodon_flax as mf
from benchmarks import common
from benchmarks.bench_model import (
    ForwardRunner,
    OursModel,
    TrainRunner,
    compile_jitted,
    run_cases,
)
from megalodon_flax.layers.remat import REMAT_POLICIES
from megalodon_flax.megalodon import layer_stack
from megalodon_flax.sampling import generate, lower_generate
from megalodon_flax.training.config import TrainConfig

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "bench_variants.json")
SECTIONS = ("remat", "attention", "layers", "compiler", "generate")
# The training default's layout and remat policy (RESULTS.md, "Execution options").
_DEFAULT_MODEL = TrainConfig().model
SCANNED_TRAIN = {"scan_layers": True, "remat_policy": _DEFAULT_MODEL.remat_policy}
UNROLLED = {"scan_layers": False, "remat_policy": "none"}


# Variant key that is not a config field: "platform" compiles with the project's
# `compiler_options` for the platform (what every other variant does), "xla_defaults" without.
OPTIONS_KEY = "compiler_options"


class GenerateRunner:
    """Greedy `generate` of `new_tokens` after fixed prompt tokens (prefill + decode loop)."""

    def __init__(self, model: OursModel, prompt: jax.Array, new_tokens: int) -> None:
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.key = jax.random.PRNGKey(0)

    def lower(self) -> jax.stages.Lowered:
        return lower_generate(
            self.model.module, self.model.params, self.prompt, self.new_tokens, self.key, 0.0
        )

    def prepare(self) -> dict[str, Any]:
        # The compile facts of the program `generate` dispatches to; the warm-up call then
        # compiles it once more through generate's own jit cache.
        return compile_jitted(self)[1]

    def run(self) -> None:
        out = generate(
            self.model.module, self.model.params, self.prompt, self.new_tokens, self.key, 0.0
        )
        common.block(out)


def _variant_builder(
    kind: str,
    base: OursModel,
    overrides: dict[str, Any],
    batch: int,
    length: int,
    new_tokens: int = 0,
) -> Callable[[], common.Case]:
    fields = {k: v for k, v in overrides.items() if k != OPTIONS_KEY}
    cfg = base.cfg.replace(**fields)
    xla_defaults = overrides.get(OPTIONS_KEY, "platform") == "xla_defaults"
    name = ", ".join(f"{k}={v}" for k, v in overrides.items())

    def build() -> common.Case:
        model = OursModel(cfg, layer_stack.to_layout(base.params, cfg.scan_layers))
        options = None if xla_defaults else model.compiler_options
        tokens = common.random_tokens(batch, length, cfg.vocab_size, 1)
        if kind == "train":
            runner: Any = TrainRunner(model.loss, model.params, tokens, options)
        elif kind == "forward":
            runner = ForwardRunner(model.forward, model.params, tokens, options)
        else:
            runner = GenerateRunner(model, tokens, new_tokens)
        return common.Case(name, runner.prepare, runner.run)

    return build


def measure(
    section: str,
    kind: str,
    base: OursModel,
    variants: Sequence[dict[str, Any]],
    batch: int,
    length: int,
    args: argparse.Namespace,
    log: Callable[[str], None],
    new_tokens: int = 0,
) -> list[dict[str, Any]]:
    """Times `variants` of one case alternately; `new_tokens` only for kind "generate"
    (`length` is then the prompt's)."""
    log(f"{section}: {kind} {batch} x {length} {f'+ {new_tokens}' if new_tokens else ''}...")
    builders = [
        (str(v), _variant_builder(kind, base, v, batch, length, new_tokens)) for v in variants
    ]
    repeats = args.repeats if length < 8192 else args.long_repeats
    records = []
    for case, overrides in zip(run_cases(builders, repeats, args.warmup), variants, strict=True):
        rec = common.case_record(case, kind=kind, batch=batch, length=length, **overrides)
        if kind == "generate":
            rec["new_tokens"] = new_tokens
        if rec.get("median_ms"):
            done = batch * (new_tokens or length)
            rec["tokens_per_s"] = round(done / (rec["median_ms"] / 1e3), 1)
        records.append(rec)
    reference = next((r for r, v in zip(records, variants, strict=True) if v == UNROLLED), None)
    for rec in records:
        times, ref_times = rec.get("times_ms"), (reference or {}).get("times_ms")
        if times and ref_times and len(times) == len(ref_times):
            # Median of the per-repeat ratios (the variants alternate repeat by repeat).
            ratios = [a / b for a, b in zip(times, ref_times, strict=True)]
            rec["paired_vs_unrolled"] = round(statistics.median(ratios), 3)
        mem = rec.get("memory", {})
        log(
            f"  {rec['model']}: {rec.get('median_ms')} ms "
            f"(x{rec.get('paired_vs_unrolled')} unrolled), temp {mem.get('temp_mib')} MiB, "
            f"peak {mem.get('peak_estimate_mib')} MiB {rec.get('error', '')}"
        )
    return records


def decode_ms_per_token(
    records: list[dict[str, Any]], new_tokens: int, log: Callable[[str], None]
) -> None:
    """Adds (t(T) − t(1)) / (T − 1) of medians to each variant's T-token record."""
    one = {r["model"]: r for r in records if r.get("new_tokens") == 1}
    for rec in records:
        short = one.get(rec["model"], {})
        if rec.get("new_tokens") == new_tokens > 1 and rec.get("median_ms") and short:
            per = (rec["median_ms"] - short["median_ms"]) / (new_tokens - 1)
            rec["decode_ms_per_token"] = round(per, 3)
            log(f"  {rec['model']}: decode {rec['decode_ms_per_token']} ms per token")


def render(results: dict[str, Any]) -> str:
    out = []
    for section, title in (
        ("remat", "Remat policies: train step"),
        ("attention", "Attention kernels"),
        ("layers", "Scanned vs unrolled layers"),
        ("compiler", "Compiler options: the platform's against XLA's defaults"),
        ("generate", "Generation (greedy, prefill + decode)"),
    ):
        rows = []
        for r in results.get(section, []):
            mem = r.get("memory", {})
            rows.append(
                [
                    r["kind"],
                    f"{r['batch']} x {r['length']}"
                    + (f" + {r['new_tokens']}" if r.get("new_tokens") else ""),
                    r["model"],
                    common.fmt(r.get("lower_plus_compile_s"), ".1f"),
                    f"{common.fmt(r.get('median_ms'))} ({common.fmt(r.get('min_ms'))}-"
                    f"{common.fmt(r.get('max_ms'))})",
                    common.fmt(r.get("paired_vs_unrolled"), ".3f"),
                    common.fmt(mem.get("temp_mib"), ".0f"),
                    common.fmt(mem.get("peak_estimate_mib"), ".0f"),
                    (r.get("error") or "")[:40],
                ]
            )
        if rows:
            headers = ["kind", "B x L", "variant", "compile s", "ms (min-max)", "/ unrolled"]
            out.append(common.table(title, [*headers, "temp MiB", "peak MiB", "error"], rows))
    return "\n\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (smoke test)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--long-repeats", type=int, default=3, help="repeats at >= 8,192 tokens")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--remat-lengths", type=common.int_list, default=[512, 8192])
    p.add_argument("--train-batch", type=int, default=4, help="batch of the 512-token steps")
    p.add_argument("--forward-length", type=int, default=32768)
    p.add_argument("--prompt", type=int, default=384, help="prompt tokens of the generate section")
    p.add_argument("--new-tokens", type=int, default=256, help="tokens generated per call")
    p.add_argument("--sections", type=common.str_list, default=list(SECTIONS))
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="compute dtype (cuDNN's fused attention needs bfloat16)",
    )
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.long_repeats, args.warmup = 1, 1, 0
        args.remat_lengths = [128]
        args.train_batch = 1
        args.forward_length = 256
        args.prompt, args.new_tokens = 16, 8
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown sections {unknown}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    cfg = mf.enwik8_config(compute_dtype=args.dtype)
    base = OursModel(cfg)
    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "settings": vars(args),
        "config": cfg.to_dict(),
    }
    seq = 128 if args.quick else 512
    if "remat" in args.sections:
        policies = [{"scan_layers": True, "remat_policy": p} for p in REMAT_POLICIES]
        policies.append(UNROLLED)
        results["remat"] = []
        for length in args.remat_lengths:
            results["remat"] += measure("remat", "train", base, policies, 1, length, args, log)
            common.write_json(args.out, results)
    if "attention" in args.sections:
        kernels = [{"attention_impl": k} for k in ("xla", "dot_product")]
        results["attention"] = measure(
            "attention", "train", base, kernels, args.train_batch, seq, args, log
        ) + measure("attention", "forward", base, kernels, 1, args.forward_length, args, log)
        common.write_json(args.out, results)
    if "layers" in args.sections:
        train_layouts = [
            SCANNED_TRAIN,
            {"scan_layers": True, "remat_policy": "save_dots_spectra_probs"},
            {"scan_layers": True, "remat_policy": "none"},
            UNROLLED,
        ]
        forward_layouts = [{"scan_layers": s} for s in (True, False)]
        results["layers"] = measure(
            "layers", "train", base, train_layouts, args.train_batch, seq, args, log
        ) + measure("layers", "forward", base, forward_layouts, 1, args.forward_length, args, log)
        common.write_json(args.out, results)
    if "compiler" in args.sections:
        both = [{OPTIONS_KEY: "platform"}, {OPTIONS_KEY: "xla_defaults"}]
        train_variants = [
            {**layout, **options} for layout in (UNROLLED, SCANNED_TRAIN) for options in both
        ]
        forward_variants = [{"scan_layers": False, **options} for options in both]
        results["compiler"] = measure(
            "compiler", "train", base, train_variants, args.train_batch, seq, args, log
        ) + measure(
            "compiler", "forward", base, forward_variants, 1, args.forward_length, args, log
        )
        common.write_json(args.out, results)
    if "generate" in args.sections:
        layouts = [{"scan_layers": True}, UNROLLED]
        results["generate"] = []
        for new in (args.new_tokens, 1):
            results["generate"] += measure(
                "generate", "generate", base, layouts, 1, args.prompt, args, log, new
            )
        decode_ms_per_token(results["generate"], args.new_tokens, log)
        common.write_json(args.out, results)
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    common.write_json(args.out, results)
    print()
    print(render(results))
    print(f"\nwrote {os.path.abspath(args.out)} ({results['elapsed_s']} s)")
    return results


if __name__ == "__main__":
    main()
