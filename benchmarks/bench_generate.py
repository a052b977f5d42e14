"""Benchmarks of generation with the enwik8 Megalodon configuration.

Sections (each recorded in the JSON output, failures recorded and skipped):
  prefill:  the cached forward of a P-token prompt at batch 1 (logits + streaming cache), ms.
  generate: end-to-end greedy `generate` calls (prompt P + T new tokens) at each batch, plus the
            same call with T = 1 (prefill + one sampled token); new tokens/s = B·T / t(T) and
            decode-only tokens/s = B·(T−1) / (t(T) − t(1)); compile time = first call − steady
            call (the same method for both implementations).
  memory:   our compiled generate program for two numbers of new tokens (256 and 4,096 by
            default): temp/argument/output bytes from the executable's memory analysis, the
            decode-state (cache) bytes, and the process RSS growth during steady calls
            (sampled every 0.5 ms, freed heap returned to the OS before each call; the median
            over the calls); ratios large / small.
  peer:     when `megalodon_jax` is importable, its `generate` and prefill are timed in the same
            run, alternately with ours repeat by repeat; ours/theirs ratios and the issue targets
            (≥ 2× their new tokens/s at batch 1, ≤ 0.4× their prefill time) are reported.

Run from the repository root:
  python -m benchmarks.bench_generate                   # full run
  python -m benchmarks.bench_generate --quick --skip-peer --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import megalodon_flax as mf
from benchmarks import common
from benchmarks.common import OURS, PEER, fmt, int_list, peer_available, random_tokens, table
from megalodon_flax.sampling import generate, lower_generate
from tests.reference import megalodon_jax_bridge

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "bench_generate.json")
TARGET_TOKENS_PER_S_RATIO = 2.0  # ours / theirs, at least
# The new-tokens/s target is for one prompt (384 + 256 tokens), like the prefill target;
# larger batches are measured and reported next to it.
TARGET_BATCH = 1
TARGET_PREFILL_RATIO = 0.4  # ours / theirs, at most
CONSTANT_MEMORY_TOLERANCE = 0.05


# ---------------------------------------------------------------------------- inputs
def tree_bytes(tree: Any) -> int:
    """Total bytes of the array (or ShapeDtypeStruct) leaves of `tree`."""
    return int(
        sum(
            np.prod(x.shape, dtype=np.int64) * np.dtype(x.dtype).itemsize
            for x in jax.tree.leaves(tree)
        )
    )


def load_now() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------- the two models
class OursGen:
    """megalodon_flax: `generate` and the cached prefill forward."""

    name = OURS

    def __init__(self, cfg: mf.MegalodonConfig) -> None:
        self.cfg = cfg
        self.module = mf.MegalodonLM(cfg)
        variables = jax.jit(self.module.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        self.params = nn.unbox(variables)["params"]
        self.variables = {"params": self.params}
        self._prefill = jax.jit(self.module.apply, static_argnames="return_cache")

    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(self.params)))

    def prefill(self, prompt: jax.Array) -> Any:
        return self._prefill(self.variables, prompt, return_cache=True)

    def generate(self, prompt: jax.Array, new_tokens: int, key: jax.Array) -> jax.Array:
        """(B, T) greedy new tokens."""
        return generate(self.module, self.params, prompt, new_tokens, key, temperature=0.0)


class PeerGen:
    """megalodon-jax 0.2.2: its `generate` and its cached prefill forward (cache=None start)."""

    name = PEER

    def __init__(self, cfg: mf.MegalodonConfig) -> None:
        import equinox as eqx
        import megalodon_jax

        self.mj = megalodon_jax
        self.cfg = cfg
        self.peer_cfg = megalodon_jax_bridge.megalodon_jax_config(cfg, strict=False)
        self.model = megalodon_jax.MegalodonForCausalLM(self.peer_cfg, key=jax.random.PRNGKey(0))
        # init_cache(cfg) is the all-None cache, the same start as cache=None.
        self._prefill = eqx.filter_jit(lambda m, t: m(t, cache=None, return_cache=True))

    def num_params(self) -> int:
        import equinox as eqx

        return int(sum(x.size for x in jax.tree.leaves(eqx.filter(self.model, eqx.is_array))))

    def prefill(self, prompt: jax.Array) -> Any:
        return self._prefill(self.model, prompt)

    def generate(self, prompt: jax.Array, new_tokens: int, key: jax.Array) -> jax.Array:
        """(B, T) greedy new tokens (their output is prompt + new tokens)."""
        ids, _, _ = self.mj.generate(
            self.model, prompt, max_new_tokens=new_tokens, temperature=0.0, key=key
        )
        return ids[:, prompt.shape[1] :]


# ---------------------------------------------------------------------------- cases
def call_case(name: str, fn: Callable[[], Any], check: Callable[[Any], None]) -> common.Case:
    """A case whose run() is one blocking call of fn (first call compiles through jit)."""

    def run() -> None:
        out = common.block(fn())
        check(out)

    return common.Case(name, prepare=dict, run=run)


def build_cases(
    builders: Sequence[tuple[str, Callable[[], common.Case]]],
) -> list[common.Case]:
    """Builds each case; a failing build becomes a failed case."""
    cases = []
    for name, build in builders:
        try:
            cases.append(build())
        except Exception as exc:
            failed = common.Case(name, prepare=dict, run=lambda: None)
            failed.failed = common.error_record(exc)
            cases.append(failed)
    return cases


def token_check(batch: int, new_tokens: int, vocab: int) -> Callable[[Any], None]:
    def check(tokens: Any) -> None:
        host = np.asarray(tokens)
        if host.shape != (batch, new_tokens):
            raise ValueError(f"generated shape {host.shape} != {(batch, new_tokens)}")
        if host.min() < 0 or host.max() >= vocab:
            raise ValueError(f"generated ids outside [0, {vocab})")

    return check


def logits_check(shape: tuple[int, ...]) -> Callable[[Any], None]:
    def check(out: Any) -> None:
        logits = out[0]
        if tuple(logits.shape) != shape:
            raise ValueError(f"prefill logits {logits.shape} != {shape}")
        if not bool(jnp.isfinite(logits[:, -1]).all()):
            raise FloatingPointError("non-finite prefill logits")

    return check


def with_compile_estimate(rec: dict[str, Any]) -> dict[str, Any]:
    """Adds compile_s = first call − median steady call (seconds)."""
    if rec.get("first_call_s") is not None and rec.get("median_ms"):
        rec["compile_s"] = round(max(rec["first_call_s"] - rec["median_ms"] / 1e3, 0.0), 3)
    return rec


# ---------------------------------------------------------------------------- sections
def prefill_section(
    models: dict[str, Any], args: argparse.Namespace, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    vocab = models[OURS].cfg.vocab_size
    prompt = random_tokens(1, args.prompt_len, vocab, 1)
    shape = (1, args.prompt_len, models[OURS].cfg.output_width)
    builders = [
        (n, lambda m=m: call_case(m.name, lambda: m.prefill(prompt), logits_check(shape)))
        for n, m in models.items()
    ]
    log(f"prefill batch=1 prompt={args.prompt_len} repeats={args.repeats} load={load_now()}")
    cases = build_cases(builders)
    common.measure_interleaved([c for c in cases if c.failed is None], args.repeats, args.warmup)
    records = []
    for case in cases:
        rec = with_compile_estimate(common.case_record(case, batch=1, prompt_len=args.prompt_len))
        if rec.get("median_ms"):
            rec["prompt_tokens_per_s"] = round(args.prompt_len / (rec["median_ms"] / 1e3), 1)
        records.append(rec)
        log("  " + short_line(rec))
    return records


def generate_section(
    models: dict[str, Any], args: argparse.Namespace, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    vocab = models[OURS].cfg.vocab_size
    key = jax.random.PRNGKey(7)
    records = []
    for batch in args.batches:
        prompt = random_tokens(batch, args.prompt_len, vocab, 2 + batch)
        builders = []
        for new_tokens in sorted({1, args.new_tokens}):
            for name, model in models.items():

                def build(
                    model: Any = model, new_tokens: int = new_tokens, prompt: jax.Array = prompt
                ) -> common.Case:
                    case = call_case(
                        model.name,
                        lambda: model.generate(prompt, new_tokens, key),
                        token_check(prompt.shape[0], new_tokens, vocab),
                    )
                    case.info["new_tokens"] = new_tokens
                    return case

                builders.append((name, build))
        log(
            f"generate batch={batch} prompt={args.prompt_len} new={args.new_tokens} "
            f"(and 1) repeats={args.repeats} load={load_now()}"
        )
        cases = build_cases(builders)
        common.measure_interleaved(
            [c for c in cases if c.failed is None], args.repeats, args.warmup
        )
        for case in cases:
            new_tokens = case.info.pop("new_tokens", None)
            rec = common.case_record(
                case, batch=batch, prompt_len=args.prompt_len, new_tokens=new_tokens
            )
            rec = with_compile_estimate(rec)
            if rec.get("median_ms") and new_tokens:
                rec["new_tokens_per_s"] = round(batch * new_tokens / (rec["median_ms"] / 1e3), 4)
                rec["ms_per_step"] = round(rec["median_ms"] / new_tokens, 3)
            records.append(rec)
            log("  " + short_line(rec))
    return records


def decode_rows(records: list[dict[str, Any]], new_tokens: int) -> list[dict[str, Any]]:
    """Decode-only rate B·(T−1) / (t(T) − t(1)) from the T and T = 1 medians of each model/batch."""
    rows = []
    index = {(r["model"], r["batch"], r.get("new_tokens")): r for r in records}
    for (model, batch, t), rec in index.items():
        if t != new_tokens or new_tokens <= 1:
            continue
        one = index.get((model, batch, 1))
        if not one or not rec.get("median_ms") or not one.get("median_ms"):
            continue
        delta_ms = rec["median_ms"] - one["median_ms"]
        row = {
            "model": model,
            "batch": batch,
            "new_tokens": new_tokens,
            "t1_median_ms": one["median_ms"],
            "tT_median_ms": rec["median_ms"],
            "decode_ms": round(delta_ms, 3),
        }
        if delta_ms > 0:
            row["decode_tokens_per_s"] = round(batch * (new_tokens - 1) / (delta_ms / 1e3), 4)
            row["decode_ms_per_step"] = round(delta_ms / (new_tokens - 1), 3)
        rows.append(row)
    return rows


class RssSampler:
    """Peak resident set size of this process while a block runs (polled from /proc)."""

    def __init__(self, interval_s: float = 5e-4) -> None:
        self.interval_s = interval_s
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def rss(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as fh:
            return int(fh.read().split()[1]) * self.page

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.start = self.rss()
        self.peak = self.start
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def _malloc_trim() -> Callable[[], None] | None:
    """glibc's malloc_trim(0) (returns freed heap to the OS), or None where unavailable."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return lambda: trim(0)


def memory_one(
    ours: OursGen, prompt: jax.Array, new_tokens: int, rss_repeats: int, key: jax.Array
) -> dict[str, Any]:
    """Compiled memory, decode-state bytes and RSS growth of one generate program."""
    rec: dict[str, Any] = {"model": OURS, "batch": int(prompt.shape[0]), "new_tokens": new_tokens}
    start = time.perf_counter()
    lowered = lower_generate(ours.module, ours.params, prompt, new_tokens, key, temperature=0.0)
    mid = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    rec.update(
        lower_s=round(mid - start, 3),
        compile_s=round(end - mid, 3),
        lower_plus_compile_s=round(end - start, 3),
        memory=common.compiled_memory(compiled),
    )
    stats = compiled.memory_analysis()
    sizes = {
        n: int(getattr(stats, f"{n}_size_in_bytes", 0) or 0)
        for n in ("temp", "argument", "output", "alias")
    }
    rec["bytes"] = {
        **sizes,
        "peak_estimate": sizes["temp"] + sizes["argument"] + sizes["output"] - sizes["alias"],
    }
    tokens_info, cache_info = lowered.out_info
    rec["tokens_bytes"] = tree_bytes(tokens_info)
    rec["state_bytes"] = tree_bytes(cache_info)
    if rss_repeats > 0 and common.on_cpu():
        trim = _malloc_trim()
        rec["rss_method"] = "peak /proc/self/statm RSS during the call minus RSS before it" + (
            ", after malloc_trim(0)" if trim else " (malloc_trim unavailable)"
        )
        check = token_check(prompt.shape[0], new_tokens, ours.cfg.vocab_size)
        first = time.perf_counter()
        check(common.block(ours.generate(prompt, new_tokens, key)))  # warm (already compiled)
        rec["first_call_s"] = round(time.perf_counter() - first, 3)
        growth, times = [], []
        for _ in range(rss_repeats):
            if trim:
                trim()
            with RssSampler() as sampler:
                t0 = time.perf_counter()
                out = common.block(ours.generate(prompt, new_tokens, key))
                times.append((time.perf_counter() - t0) * 1e3)
            check(out)
            del out
            growth.append(sampler.peak - sampler.start)
        rec["rss_growth_bytes"] = growth
        rec["rss_growth_median_bytes"] = int(statistics.median(growth))
        rec["rss_growth_mib"] = round(statistics.median(growth) / common.MIB, 2)
        rec["rss_growth_max_mib"] = round(max(growth) / common.MIB, 2)
        rec["process_max_rss_mib"] = round(common.max_rss_mib(), 1)
        rec.update(common.summarize_ms(times))
    return rec


def memory_section(
    ours: OursGen, args: argparse.Namespace, log: Callable[[str], None]
) -> dict[str, Any]:
    """Our generate program at two numbers of new tokens (batch 1); ratios large / small."""
    small, large = args.memory_tokens
    prompt = random_tokens(1, args.prompt_len, ours.cfg.vocab_size, 3)
    key = jax.random.PRNGKey(11)
    # Fresh compiles, so that the compile times are not cache hits of the timing sections.
    jax.clear_caches()
    out: dict[str, Any] = {"prompt_len": args.prompt_len, "batch": 1, "records": []}
    for new_tokens in (small, large):
        log(f"memory new_tokens={new_tokens} rss_repeats={args.rss_repeats} load={load_now()}")
        try:
            rec = memory_one(ours, prompt, new_tokens, args.rss_repeats, key)
        except Exception as exc:
            rec = {"model": OURS, "batch": 1, "new_tokens": new_tokens, **common.error_record(exc)}
        out["records"].append(rec)
        log("  " + memory_line(rec))
    recs = out["records"]
    if all("bytes" in r for r in recs):
        a, b = recs
        ratios = {
            "new_tokens_ratio": round(large / small, 3),
            "temp_ratio": round(b["bytes"]["temp"] / a["bytes"]["temp"], 6),
            "peak_estimate_ratio": round(
                b["bytes"]["peak_estimate"] / a["bytes"]["peak_estimate"], 6
            ),
            "state_ratio": round(b["state_bytes"] / a["state_bytes"], 6),
        }
        if a.get("rss_growth_bytes") and b.get("rss_growth_bytes"):
            ga, gb = a["rss_growth_median_bytes"], b["rss_growth_median_bytes"]
            if ga > 0:
                ratios["rss_growth_ratio"] = round(gb / ga, 4)
        checked = [ratios["temp_ratio"], ratios["peak_estimate_ratio"], ratios["state_ratio"]]
        ratios["within_5_percent"] = all(abs(r - 1.0) <= CONSTANT_MEMORY_TOLERANCE for r in checked)
        if "rss_growth_ratio" in ratios:
            # Sampled RSS growth is noisy; constant memory means it does not grow (a smaller
            # growth for the longer run is allocator noise, not a violation).
            ratios["rss_no_growth"] = ratios["rss_growth_ratio"] <= 1.0 + CONSTANT_MEMORY_TOLERANCE
        out["ratios"] = ratios
    return out


# ---------------------------------------------------------------------------- ratios
def paired(ours: dict[str, Any], theirs: dict[str, Any]) -> float | None:
    pairs = [a / b for a, b in zip(ours["times_ms"], theirs["times_ms"], strict=False) if b > 0]
    return round(float(statistics.median(pairs)), 3) if pairs else None


def ratios_and_targets(results: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    ratios: dict[str, Any] = {}
    targets: dict[str, Any] = {}
    pre = {r["model"]: r for r in results["prefill"]}
    if pre.get(OURS, {}).get("median_ms") and pre.get(PEER, {}).get("median_ms"):
        o, t = pre[OURS], pre[PEER]
        ratio = round(o["median_ms"] / t["median_ms"], 3)
        ratios["prefill"] = {
            "ours_median_ms": o["median_ms"],
            "theirs_median_ms": t["median_ms"],
            "ratio_of_medians": ratio,
            "paired_ratio_median": paired(o, t),
        }
        targets["prefill"] = {
            "ratio": ratio,
            "target_max": TARGET_PREFILL_RATIO,
            "holds": ratio <= TARGET_PREFILL_RATIO,
        }
    gen = {(r["model"], r["batch"], r.get("new_tokens")): r for r in results["generate"]}
    dec = {(r["model"], r["batch"]): r for r in results["decode"]}
    rows, target_rows = [], []
    for (model, batch, new_tokens), o in gen.items():
        t = gen.get((PEER, batch, new_tokens))
        if model != OURS or not t or not o.get("median_ms") or not t.get("median_ms"):
            continue
        speed = round(o["new_tokens_per_s"] / t["new_tokens_per_s"], 3)
        row = {
            "batch": batch,
            "new_tokens": new_tokens,
            "ours_new_tokens_per_s": o["new_tokens_per_s"],
            "theirs_new_tokens_per_s": t["new_tokens_per_s"],
            "speedup_new_tokens_per_s": speed,
            "time_ratio_paired_median": paired(o, t),
        }
        if o.get("compile_s") and t.get("compile_s"):
            row["compile_ratio"] = round(o["compile_s"] / t["compile_s"], 3)
        do, dt = dec.get((OURS, batch)), dec.get((PEER, batch))
        if new_tokens != 1 and do and dt and do.get("decode_tokens_per_s"):
            their_rate = dt.get("decode_tokens_per_s")
            row["speedup_decode_tokens_per_s"] = (
                round(do["decode_tokens_per_s"] / their_rate, 3) if their_rate else None
            )
        rows.append(row)
        if batch == TARGET_BATCH and new_tokens == results["settings"]["new_tokens"] > 1:
            target_rows.append(
                {
                    "batch": batch,
                    "new_tokens": new_tokens,
                    "speedup": speed,
                    "target_min": TARGET_TOKENS_PER_S_RATIO,
                    "holds": speed >= TARGET_TOKENS_PER_S_RATIO,
                }
            )
    if rows:
        ratios["generate"] = rows
    if target_rows:
        targets["new_tokens_per_s"] = target_rows
    mem = results.get("memory", {}).get("ratios")
    if mem:
        targets["constant_memory"] = {
            "temp_ratio": mem["temp_ratio"],
            "rss_growth_ratio": mem.get("rss_growth_ratio"),
            "tolerance": CONSTANT_MEMORY_TOLERANCE,
            "holds": bool(mem["within_5_percent"] and mem.get("rss_no_growth", True)),
        }
    return ratios, targets


# ---------------------------------------------------------------------------- printing
def short_line(rec: dict[str, Any]) -> str:
    if rec.get("error"):
        return f"{rec['model']}: FAILED {rec['error'][:160]}"
    extra = f" T={rec['new_tokens']}" if rec.get("new_tokens") else ""
    return (
        f"{rec['model']}{extra}: first {rec.get('first_call_s', float('nan')):.2f}s "
        f"median {rec['median_ms']:.1f} ms (min {rec['min_ms']:.1f}, max {rec['max_ms']:.1f})"
    )


def memory_line(rec: dict[str, Any]) -> str:
    if rec.get("error"):
        return f"T={rec['new_tokens']}: FAILED {rec['error'][:160]}"
    return (
        f"T={rec['new_tokens']}: compile {rec['lower_plus_compile_s']:.1f}s "
        f"temp {rec['bytes']['temp'] / common.MIB:.2f} MiB state {rec['state_bytes']} B "
        f"rss growth {fmt(rec.get('rss_growth_mib'), '.2f')} MiB"
    )


def render(results: dict[str, Any]) -> str:
    out = []
    timing_headers = ["compile_s", "first_s", "median_ms", "min_ms", "max_ms"]

    def timing(r: dict[str, Any]) -> list[str]:
        return [
            fmt(r.get("compile_s"), ".2f"),
            fmt(r.get("first_call_s"), ".2f"),
            fmt(r.get("median_ms")),
            fmt(r.get("min_ms")),
            fmt(r.get("max_ms")),
        ]

    if results.get("prefill"):
        rows = [
            [
                r["model"],
                r["batch"],
                r["prompt_len"],
                *timing(r),
                fmt(r.get("prompt_tokens_per_s"), ".0f"),
                (r.get("error") or "")[:40],
            ]
            for r in results["prefill"]
        ]
        out.append(
            table(
                "PREFILL (cached forward: logits + streaming cache)",
                ["model", "B", "P", *timing_headers, "prompt_tok/s", "error"],
                rows,
            )
        )
    if results.get("generate"):
        rows = [
            [
                r["model"],
                r["batch"],
                r["prompt_len"],
                r.get("new_tokens"),
                *timing(r),
                fmt(r.get("new_tokens_per_s")),
                fmt(r.get("ms_per_step"), ".2f"),
                (r.get("error") or "")[:40],
            ]
            for r in results["generate"]
        ]
        out.append(
            table(
                "GENERATE (greedy, end to end; compile_s = first call - median)",
                ["model", "B", "P", "T", *timing_headers, "new_tok/s", "ms/step", "error"],
                rows,
            )
        )
    if results.get("decode"):
        rows = [
            [
                r["model"],
                r["batch"],
                r["new_tokens"],
                fmt(r["t1_median_ms"]),
                fmt(r["tT_median_ms"]),
                fmt(r.get("decode_ms_per_step"), ".2f"),
                fmt(r.get("decode_tokens_per_s")),
            ]
            for r in results["decode"]
        ]
        out.append(
            table(
                "DECODE ONLY: B*(T-1) / (t(T) - t(1))",
                ["model", "B", "T", "t(1)_ms", "t(T)_ms", "ms/step", "decode_tok/s"],
                rows,
            )
        )
    mem = results.get("memory") or {}
    if mem.get("records"):
        rows = []
        for r in mem["records"]:
            b = r.get("bytes", {})
            rows.append(
                [
                    r["new_tokens"],
                    fmt(r.get("lower_plus_compile_s"), ".2f"),
                    fmt(b.get("temp"), "d"),
                    fmt(b.get("argument"), "d"),
                    fmt(b.get("output"), "d"),
                    fmt(b.get("peak_estimate"), "d"),
                    fmt(r.get("state_bytes"), "d"),
                    fmt(r.get("rss_growth_mib"), ".2f"),
                    fmt(r.get("median_ms")),
                    (r.get("error") or "")[:40],
                ]
            )
        out.append(
            table(
                f"CONSTANT MEMORY (ours, B=1, P={mem['prompt_len']}; bytes)",
                [
                    "T",
                    "compile_s",
                    "temp",
                    "argument",
                    "output",
                    "peak_est",
                    "state",
                    "rss_grow_MiB",
                    "median_ms",
                    "error",
                ],
                rows,
            )
        )
        if mem.get("ratios"):
            r = mem["ratios"]
            out.append(
                f"ratios T={mem['records'][1]['new_tokens']} / T={mem['records'][0]['new_tokens']}"
                f": temp {r['temp_ratio']:.6f}, peak_est {r['peak_estimate_ratio']:.6f}, "
                f"state {r['state_ratio']:.6f}, rss growth {fmt(r.get('rss_growth_ratio'), '.4f')}"
                f" -> within 5%: {r['within_5_percent']}"
                f" (rss growth <= 5%: {r.get('rss_no_growth', '-')})"
            )
    ratios = results.get("ratios", {})
    lines = []
    if ratios.get("prefill"):
        p = ratios["prefill"]
        lines.append(
            f"prefill ms ours/theirs: {p['ratio_of_medians']:.3f} "
            f"(paired {fmt(p['paired_ratio_median'], '.3f')}; "
            f"{p['ours_median_ms']:.1f} vs {p['theirs_median_ms']:.1f} ms)"
        )
    for row in ratios.get("generate", []):
        lines.append(
            f"generate B={row['batch']} T={row['new_tokens']}: new tok/s ours/theirs "
            f"{row['speedup_new_tokens_per_s']:.3f} ({row['ours_new_tokens_per_s']:.1f} vs "
            f"{row['theirs_new_tokens_per_s']:.1f}); decode-only "
            f"{fmt(row.get('speedup_decode_tokens_per_s'), '.3f')}; compile ours/theirs "
            f"{fmt(row.get('compile_ratio'), '.3f')}"
        )
    if lines:
        out.append("OURS vs MEGALODON-JAX\n" + "\n".join(lines))
    targets = results.get("targets", {})
    lines = []
    if "prefill" in targets:
        t = targets["prefill"]
        lines.append(f"prefill ours/theirs {t['ratio']:.3f} <= {t['target_max']}: {t['holds']}")
    for t in targets.get("new_tokens_per_s", []):
        lines.append(
            f"new tok/s ours/theirs B={t['batch']} T={t['new_tokens']} {t['speedup']:.3f} >= "
            f"{t['target_min']}: {t['holds']}"
        )
    if "constant_memory" in targets:
        t = targets["constant_memory"]
        lines.append(
            f"constant memory (temp {t['temp_ratio']:.6f}, rss "
            f"{fmt(t['rss_growth_ratio'], '.4f')}) within 5%: {t['holds']}"
        )
    if lines:
        out.append("TARGETS\n" + "\n".join(lines))
    return "\n\n".join(out)


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 3 repeats, batch 1, 64 new tokens, memory at 64 vs 1024 tokens",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first call")
    p.add_argument("--prompt-len", type=int, default=384)
    p.add_argument("--new-tokens", type=int, default=None, help="default 256 (quick: 64)")
    p.add_argument("--batches", type=int_list, default=None, help="default 1,8 (quick: 1)")
    p.add_argument(
        "--memory-tokens",
        type=int_list,
        default=None,
        help="the two new-token counts of the memory section (default 256,4096; quick: 64,1024)",
    )
    p.add_argument(
        "--rss-repeats",
        type=int,
        default=None,
        help="sampled calls per memory case, median reported (default 3, quick 1; 0 = compiled "
        "memory only)",
    )
    p.add_argument(
        "--bias-topology",
        choices=("hf", "upstream"),
        default="hf",
        help="our bias set (megalodon-jax always uses the upstream set)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="compute dtype of both models (parameters stay float32; the enwik8 training "
        "config uses bfloat16)",
    )
    p.add_argument("--skip-peer", action="store_true", help="do not benchmark megalodon-jax")
    p.add_argument("--skip-memory", action="store_true")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "repeats": 3 if quick else 5,
        "new_tokens": 64 if quick else 256,
        "batches": [1] if quick else [1, 8],
        "memory_tokens": [64, 1024] if quick else [256, 4096],
        "rss_repeats": 1 if quick else 3,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.repeats < 1 or args.warmup < 0 or args.rss_repeats < 0:
        p.error("--repeats must be >= 1, --warmup and --rss-repeats >= 0")
    if args.prompt_len < 1 or args.new_tokens < 1 or not args.batches or min(args.batches) < 1:
        p.error("--prompt-len, --new-tokens and --batches must be >= 1")
    if len(args.memory_tokens) != 2 or not 1 <= args.memory_tokens[0] < args.memory_tokens[1]:
        p.error("--memory-tokens takes two increasing counts, e.g. 256,4096")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    cfg = mf.enwik8_config(bias_topology=args.bias_topology, compute_dtype=args.dtype)
    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "settings": dict(vars(args)),
        "config": cfg.to_dict(),
        "peer": {"requested": not args.skip_peer},
        "prefill": [],
        "generate": [],
        "decode": [],
        "memory": {},
        "ratios": {},
        "targets": {},
    }

    def save() -> None:
        results["machine"]["load_average_now"] = load_now()
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        common.write_json(args.out, results)

    log(f"backend={jax.default_backend()} devices={jax.devices()} out={args.out}")
    models: dict[str, Any] = {OURS: OursGen(cfg)}
    results["param_counts"] = {OURS: models[OURS].num_params()}
    if not args.skip_peer:
        ok, why = peer_available()
        results["peer"]["available"] = ok
        if ok:
            try:
                log("building the megalodon-jax model (eager init) ...")
                peer = PeerGen(cfg)
                models[PEER] = peer
                results["param_counts"][PEER] = peer.num_params()
                results["peer"]["version"] = common.package_version("megalodon-jax")
                results["peer"]["config"] = {k: str(v) for k, v in vars(peer.peer_cfg).items()}
            except Exception as exc:
                results["peer"].update(common.error_record(exc))
        else:
            results["peer"]["error"] = why
    log(f"parameters: {results['param_counts']}")
    save()

    results["prefill"] = prefill_section(models, args, log)
    save()
    results["generate"] = generate_section(models, args, log)
    results["decode"] = decode_rows(results["generate"], args.new_tokens)
    save()
    if not args.skip_memory:
        results["memory"] = memory_section(models[OURS], args, log)
        save()
    results["ratios"], results["targets"] = ratios_and_targets(results)
    results["machine"]["load_average_end"] = load_now()
    save()
    print()
    print(render(results))
    print(f"\nwrote {os.path.abspath(args.out)} ({results['elapsed_s']} s)")
    return results


if __name__ == "__main__":
    main()
