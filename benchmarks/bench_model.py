"""Benchmarks of the enwik8 Megalodon configuration: training step, long forward, CEMA paths.

Sections (each recorded in the JSON output, failures recorded and skipped):
  train:   forward + backward + AdamW update (jit, params/optimizer state donated), next-token
           cross-entropy on random bytes; compile time, median/min/max ms per step, tokens/s.
  forward: jitted inference forward at several lengths (batch 1); time, ms per 1k tokens,
           peak memory (compiled memory analysis; device peak on GPU; process max-RSS growth).
  cema:    each CEMA algorithm (fft, scan, sequential) alone, forward and forward+backward.
  peer:    when `megalodon_jax` is importable, the same train/forward cases on megalodon-jax,
           timed alternately with ours repeat by repeat; ours/theirs ratios are reported.

Run from the repository root:
  python -m benchmarks.bench_model                   # full run
  python -m benchmarks.bench_model --quick --skip-peer --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import megalodon_flax as mf
from benchmarks import common
from benchmarks.common import (
    OURS,
    PEER,
    fmt,
    int_list,
    peer_available,
    random_tokens,
    str_list,
    table,
)
from megalodon_flax.compiler_options import compiler_options
from megalodon_flax.megalodon.cema import cema
from megalodon_flax.megalodon.cema_powers import cema_coefficients
from tests.reference import megalodon_jax_bridge

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "bench_model.json")
CEMA_PATHS = ("fft", "scan", "sequential")

warnings.filterwarnings("ignore", message=".*donated buffers were not usable.*")


# ---------------------------------------------------------------------------- shared pieces
def next_token_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Mean cross-entropy of predicting tokens[:, t+1] from logits[:, t], in float32."""
    return optax.softmax_cross_entropy_with_integer_labels(
        logits[:, :-1].astype(jnp.float32), tokens[:, 1:]
    ).mean()


def make_optimizer() -> optax.GradientTransformation:
    return optax.adamw(learning_rate=1e-3, b1=0.9, b2=0.98, weight_decay=0.1)


def compile_jitted(fn: Any, *args: Any) -> tuple[Any, dict[str, Any]]:
    """Lowers and compiles a jitted function for `args`; returns the executable and timings."""
    start = time.perf_counter()
    lowered = fn.lower(*args)
    mid = time.perf_counter()
    compiled = lowered.compile()
    end = time.perf_counter()
    info = {
        "lower_s": round(mid - start, 3),
        "compile_s": round(end - mid, 3),
        "lower_plus_compile_s": round(end - start, 3),
        "memory": common.compiled_memory(compiled),
    }
    return compiled, info


def check_fits(info: dict[str, Any]) -> None:
    """Raises MemoryError when the compiled peak estimate exceeds 90% of available host RAM."""
    if not common.on_cpu():
        return
    peak = info.get("memory", {}).get("peak_estimate_mib")
    avail = common.available_memory_bytes()
    if peak is not None and avail is not None and peak * common.MIB > 0.9 * avail:
        raise MemoryError(
            f"estimated peak {peak:.0f} MiB exceeds 90% of available memory "
            f"{avail / common.MIB:.0f} MiB; not executed"
        )


class TrainRunner:
    """Holds a donated (params, opt_state) pair and advances it one compiled step per run."""

    def __init__(
        self,
        loss_fn: Callable[[Any, jax.Array], jax.Array],
        params: Any,
        tokens: jax.Array,
        compiler_options: dict[str, Any] | None = None,
    ) -> None:
        self.tx = make_optimizer()
        self.compiler_options = compiler_options
        self.loss_fn = loss_fn
        self.params = jax.tree.map(jnp.copy, params)
        self.opt_state = self.tx.init(self.params)
        self.tokens = tokens
        self.compiled: Any = None
        self.loss: jax.Array | None = None

    def _step(self, params: Any, opt_state: Any, tokens: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, grads = jax.value_and_grad(self.loss_fn)(params, tokens)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def prepare(self) -> dict[str, Any]:
        step = jax.jit(self._step, donate_argnums=(0, 1), compiler_options=self.compiler_options)
        self.compiled, info = compile_jitted(step, self.params, self.opt_state, self.tokens)
        check_fits(info)
        return info

    def run(self) -> None:
        self.params, self.opt_state, self.loss = self.compiled(
            self.params, self.opt_state, self.tokens
        )
        common.block((self.params, self.loss))
        if not np.isfinite(np.asarray(self.loss)):
            raise FloatingPointError(f"non-finite training loss {self.loss}")


class ForwardRunner:
    """A compiled inference forward of fixed input tokens."""

    def __init__(
        self,
        forward_fn: Callable[[Any, jax.Array], jax.Array],
        params: Any,
        tokens: jax.Array,
        compiler_options: dict[str, Any] | None = None,
    ) -> None:
        self.forward_fn = forward_fn
        self.compiler_options = compiler_options
        self.params = params
        self.tokens = tokens
        self.compiled: Any = None

    def prepare(self) -> dict[str, Any]:
        forward = jax.jit(self.forward_fn, compiler_options=self.compiler_options)
        self.compiled, info = compile_jitted(forward, self.params, self.tokens)
        check_fits(info)
        return info

    def run(self) -> None:
        out = self.compiled(self.params, self.tokens)
        common.block(out)
        del out


# ---------------------------------------------------------------------------- the two models
class OursModel:
    """megalodon_flax: parameters and pure forward/loss functions for one compute dtype.

    `compiler_options` are the ones the project's own train and eval steps compile with.
    """

    name = OURS

    def __init__(self, cfg: mf.MegalodonConfig, params: Any | None = None) -> None:
        self.cfg = cfg
        self.module = mf.MegalodonLM(cfg)
        self.compiler_options = compiler_options()
        if params is None:
            init_tokens = jnp.zeros((1, 8), jnp.int32)
            variables = jax.jit(self.module.init)(jax.random.PRNGKey(0), init_tokens)
            params = nn.unbox(variables)["params"]
        self.params = params

    def with_dtype(self, dtype: str) -> OursModel:
        return OursModel(self.cfg.replace(compute_dtype=dtype), self.params)

    def forward(self, params: Any, tokens: jax.Array) -> jax.Array:
        return self.module.apply({"params": params}, tokens)[0]

    def loss(self, params: Any, tokens: jax.Array) -> jax.Array:
        return next_token_loss(self.forward(params, tokens), tokens)

    def num_params(self) -> int:
        return int(mf.count_params(self.params))


class PeerModel:
    """megalodon-jax (Equinox) in the equivalent topology, split into arrays + static parts."""

    name = PEER
    compiler_options = None  # XLA's defaults, as megalodon-jax's users get them

    def __init__(self, cfg: mf.MegalodonConfig) -> None:
        import equinox as eqx
        import megalodon_jax

        self.eqx = eqx
        self.cfg = cfg
        self.peer_cfg = megalodon_jax_bridge.megalodon_jax_config(cfg, strict=False)
        model = megalodon_jax.MegalodonForCausalLM(self.peer_cfg, key=jax.random.PRNGKey(0))
        self.params, self.static = eqx.partition(model, eqx.is_inexact_array)

    def with_dtype(self, dtype: str) -> PeerModel:
        return PeerModel(self.cfg.replace(compute_dtype=dtype))

    def forward(self, params: Any, tokens: jax.Array) -> jax.Array:
        model = self.eqx.combine(params, self.static)
        return model(tokens, return_cache=False)[0]

    def loss(self, params: Any, tokens: jax.Array) -> jax.Array:
        return next_token_loss(self.forward(params, tokens), tokens)

    def num_params(self) -> int:
        return int(sum(x.size for x in jax.tree.leaves(self.params)))


# ---------------------------------------------------------------------------- sections
def run_cases(
    builders: Sequence[tuple[str, Callable[[], common.Case]]], repeats: int, warmup: int
) -> list[common.Case]:
    """Builds each case (a failing build becomes a failed case) and measures them interleaved."""
    cases = []
    for name, build in builders:
        try:
            cases.append(build())
        except Exception as exc:
            failed = common.Case(name, prepare=dict, run=lambda: None)
            failed.failed = common.error_record(exc)
            cases.append(failed)
    common.measure_interleaved([c for c in cases if c.failed is None], repeats, warmup)
    return cases


def train_section(
    models: dict[str, dict[str, Any]], args: argparse.Namespace, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    records = []
    for dtype in args.dtypes:
        for batch in args.train_batches:
            tokens = random_tokens(batch, args.train_seq, models[OURS][dtype].cfg.vocab_size, 1)
            builders = []
            for name in models:
                model = models[name][dtype]

                def build(model: Any = model, tokens: jax.Array = tokens) -> common.Case:
                    runner = TrainRunner(model.loss, model.params, tokens, model.compiler_options)
                    return common.Case(model.name, runner.prepare, runner.run)

                builders.append((name, build))
            log(f"train dtype={dtype} batch={batch} seq={args.train_seq} ...")
            for case in run_cases(builders, args.repeats, args.warmup):
                rec = common.case_record(case, dtype=dtype, batch=batch, seq=args.train_seq)
                if rec.get("median_ms"):
                    rate = batch * args.train_seq / (rec["median_ms"] / 1e3)
                    rec["tokens_per_s"] = round(rate, 1)
                records.append(rec)
                log("  " + short_line(rec))
    return records


def forward_section(
    models: dict[str, dict[str, Any]], args: argparse.Namespace, log: Callable[[str], None]
) -> list[dict[str, Any]]:
    records = []
    for length in args.lengths:
        for dtype in args.forward_dtypes:
            if dtype != "float32" and length > args.forward_bf16_max_length:
                continue
            tokens = random_tokens(1, length, models[OURS][dtype].cfg.vocab_size, 2)
            builders = []
            for name in models:
                model = models[name][dtype]

                def build(model: Any = model, tokens: jax.Array = tokens) -> common.Case:
                    runner = ForwardRunner(
                        model.forward, model.params, tokens, model.compiler_options
                    )
                    return common.Case(model.name, runner.prepare, runner.run)

                builders.append((name, build))
            long = length >= args.long_threshold
            repeats = args.long_repeats if long else args.repeats
            warmup = args.long_warmup if long else args.warmup
            log(f"forward dtype={dtype} length={length} repeats={repeats} ...")
            for case in run_cases(builders, repeats, warmup):
                rec = common.case_record(case, dtype=dtype, batch=1, length=length)
                if rec.get("median_ms"):
                    rec["ms_per_1k_tokens"] = round(rec["median_ms"] * 1000.0 / length, 3)
                    rec["tokens_per_s"] = round(length / (rec["median_ms"] / 1e3), 1)
                peak = rec.get("memory", {}).get("peak_estimate_mib")
                if peak is not None:
                    rec["peak_estimate_mib_per_1k_tokens"] = round(peak * 1000.0 / length, 3)
                records.append(rec)
                log("  " + short_line(rec))
    return records


def cema_inputs(dim: int, ndim: int, length: int) -> tuple[tuple[jax.Array, ...], jax.Array]:
    """Random CEMA parameters (alpha, delta, theta, gamma_re, gamma_im, omega) and x (1, D, L)."""
    keys = jax.random.split(jax.random.PRNGKey(3), 7)
    params = (
        0.2 * jax.random.normal(keys[0], (dim, ndim, 1)),
        0.2 * jax.random.normal(keys[1], (dim, ndim, 1)),
        jax.random.normal(keys[2], (dim, 1, 1)),
        jax.random.normal(keys[3], (dim, ndim)),
        0.1 * jax.random.normal(keys[4], (dim, ndim)),
        0.25 * jax.random.normal(keys[5], (dim,)),
    )
    x = jax.random.normal(keys[6], (1, dim, length))
    return params, x


def cema_section(
    args: argparse.Namespace, log: Callable[[str], None], dim: int, ndim: int
) -> list[dict[str, Any]]:
    records = []
    for length in args.cema_lengths:
        params, x = cema_inputs(dim, ndim, length)
        for mode in ("forward", "forward_backward"):
            for path in CEMA_PATHS:

                def fwd(p: tuple[jax.Array, ...], xs: jax.Array, path: str = path) -> jax.Array:
                    coeffs = cema_coefficients(*p[:5])
                    return cema(coeffs, p[5], xs, path=path)[0]

                if mode == "forward":
                    fn = fwd
                else:
                    weights = jnp.cos(jnp.arange(length, dtype=jnp.float32) * 0.01)

                    def fn(p: Any, xs: jax.Array, fwd: Any = fwd, w: Any = weights) -> Any:
                        return jax.value_and_grad(
                            lambda p_, x_: jnp.sum(fwd(p_, x_) * w), argnums=(0, 1)
                        )(p, xs)

                def build(
                    fn: Any = fn, path: str = path, params: Any = params, x: jax.Array = x
                ) -> common.Case:
                    runner = ForwardRunner(fn, params, x, compiler_options())
                    return common.Case(f"cema_{path}", runner.prepare, runner.run)

                log(f"cema path={path} length={length} mode={mode} ...")
                (case,) = run_cases([(path, build)], args.repeats, args.warmup)
                rec = common.case_record(
                    case, path=path, length=length, mode=mode, shape=[1, dim, ndim]
                )
                if rec.get("median_ms"):
                    rec["us_per_token"] = round(rec["median_ms"] * 1000.0 / length, 3)
                records.append(rec)
                log("  " + short_line(rec))
    return records


def ratio_rows(records: list[dict[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """ours/theirs median ratios for records sharing the same `keys` values."""
    by_key: dict[tuple, dict[str, dict[str, Any]]] = {}
    for rec in records:
        by_key.setdefault(tuple(rec.get(k) for k in keys), {})[rec["model"]] = rec
    rows = []
    for key, pair in by_key.items():
        ours, theirs = pair.get(OURS), pair.get(PEER)
        if not ours or not theirs or not ours.get("median_ms") or not theirs.get("median_ms"):
            continue
        paired = [a / b for a, b in zip(ours["times_ms"], theirs["times_ms"], strict=False)]
        row = dict(zip(keys, key, strict=True))
        row.update(
            ours_median_ms=ours["median_ms"],
            theirs_median_ms=theirs["median_ms"],
            ratio_of_medians=round(ours["median_ms"] / theirs["median_ms"], 3),
            paired_ratio_median=round(float(np.median(paired)), 3) if paired else None,
        )
        for field in ("lower_plus_compile_s",):
            if ours.get(field) and theirs.get(field):
                row[f"{field}_ratio"] = round(ours[field] / theirs[field], 3)
        peak_o = ours.get("memory", {}).get("peak_estimate_mib")
        peak_t = theirs.get("memory", {}).get("peak_estimate_mib")
        if peak_o and peak_t:
            row["peak_estimate_ratio"] = round(peak_o / peak_t, 3)
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------- printing
def short_line(rec: dict[str, Any]) -> str:
    if rec.get("error"):
        return f"{rec['model']}: FAILED {rec['error'][:160]}"
    return (
        f"{rec['model']}: compile {rec.get('lower_plus_compile_s', float('nan')):.1f}s "
        f"median {rec['median_ms']:.1f} ms (min {rec['min_ms']:.1f}, max {rec['max_ms']:.1f})"
    )


def render(results: dict[str, Any]) -> str:
    out = []
    if results.get("train"):
        rows = [
            [
                r["model"],
                r["dtype"],
                r["batch"],
                r["seq"],
                fmt(r.get("lower_plus_compile_s")),
                fmt(r.get("first_call_s"), ".2f"),
                fmt(r.get("median_ms")),
                fmt(r.get("min_ms")),
                fmt(r.get("max_ms")),
                fmt(r.get("tokens_per_s"), ".0f"),
                fmt(r.get("memory", {}).get("peak_estimate_mib"), ".0f"),
                (r.get("error") or "")[:40],
            ]
            for r in results["train"]
        ]
        out.append(
            table(
                "TRAIN STEP (fwd+bwd+AdamW, donated state)",
                [
                    "model",
                    "dtype",
                    "B",
                    "L",
                    "compile_s",
                    "first_s",
                    "median_ms",
                    "min_ms",
                    "max_ms",
                    "tok/s",
                    "peak_MiB",
                    "error",
                ],
                rows,
            )
        )
    if results.get("forward"):
        rows = [
            [
                r["model"],
                r["dtype"],
                r["length"],
                fmt(r.get("lower_plus_compile_s")),
                fmt(r.get("median_ms")),
                fmt(r.get("min_ms")),
                fmt(r.get("max_ms")),
                fmt(r.get("ms_per_1k_tokens"), ".2f"),
                fmt(r.get("tokens_per_s"), ".0f"),
                fmt(r.get("memory", {}).get("peak_estimate_mib"), ".0f"),
                fmt(r.get("peak_estimate_mib_per_1k_tokens"), ".2f"),
                fmt(r.get("device_peak_bytes_in_use_mib"), ".0f"),
                fmt(r.get("max_rss_growth_mib"), ".0f"),
                (r.get("error") or "")[:40],
            ]
            for r in results["forward"]
        ]
        out.append(
            table(
                "FORWARD (inference, batch 1)",
                [
                    "model",
                    "dtype",
                    "L",
                    "compile_s",
                    "median_ms",
                    "min_ms",
                    "max_ms",
                    "ms/1k",
                    "tok/s",
                    "peak_MiB",
                    "MiB/1k",
                    "dev_peak",
                    "rss_grow",
                    "error",
                ],
                rows,
            )
        )
    if results.get("cema"):
        rows = [
            [
                r["path"],
                r["length"],
                r["mode"],
                fmt(r.get("lower_plus_compile_s")),
                fmt(r.get("median_ms"), ".2f"),
                fmt(r.get("min_ms"), ".2f"),
                fmt(r.get("max_ms"), ".2f"),
                fmt(r.get("us_per_token"), ".2f"),
                fmt(r.get("memory", {}).get("peak_estimate_mib"), ".0f"),
                (r.get("error") or "")[:40],
            ]
            for r in results["cema"]
        ]
        out.append(
            table(
                "CEMA PATHS (B=1, D=384, N=8)",
                [
                    "path",
                    "L",
                    "mode",
                    "compile_s",
                    "median_ms",
                    "min_ms",
                    "max_ms",
                    "us/token",
                    "peak_MiB",
                    "error",
                ],
                rows,
            )
        )
    for section, keys in (("train", ("dtype", "batch", "seq")), ("forward", ("dtype", "length"))):
        ratios = results.get("ratios", {}).get(section)
        if ratios:
            rows = [
                [
                    *(r[k] for k in keys),
                    fmt(r["ours_median_ms"]),
                    fmt(r["theirs_median_ms"]),
                    fmt(r["ratio_of_medians"], ".3f"),
                    fmt(r["paired_ratio_median"], ".3f"),
                    fmt(r.get("lower_plus_compile_s_ratio"), ".2f"),
                    fmt(r.get("peak_estimate_ratio"), ".2f"),
                ]
                for r in ratios
            ]
            out.append(
                table(
                    f"OURS / MEGALODON-JAX ({section}; < 1 means ours is faster / smaller)",
                    [*keys, "ours_ms", "theirs_ms", "ratio", "paired", "compile", "peak_mem"],
                    rows,
                )
            )
    return "\n\n".join(out)


# ---------------------------------------------------------------------------- CLI
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 2 repeats, shortest lengths, float32, batch 1",
    )
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    p.add_argument(
        "--long-repeats",
        type=int,
        default=None,
        help="timed repeats for forward lengths >= --long-threshold (default 3)",
    )
    p.add_argument("--long-threshold", type=int, default=8192)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls after the first call")
    p.add_argument(
        "--long-warmup",
        type=int,
        default=0,
        help="extra untimed calls for forward lengths >= --long-threshold (the first "
        "call after compiling already warms up)",
    )
    p.add_argument(
        "--lengths",
        type=int_list,
        default=None,
        help="forward lengths (default 512,2048,8192,32768)",
    )
    p.add_argument("--train-seq", type=int, default=512)
    p.add_argument("--train-batches", type=int_list, default=None, help="default 1,4")
    p.add_argument(
        "--dtypes",
        type=str_list,
        default=None,
        help="compute dtypes of the train step (default float32,bfloat16)",
    )
    p.add_argument(
        "--forward-dtypes",
        type=str_list,
        default=None,
        help="compute dtypes of the forward (default float32,bfloat16)",
    )
    p.add_argument(
        "--forward-bf16-max-length",
        type=int,
        default=2048,
        help="forward in non-float32 dtypes only up to this length",
    )
    p.add_argument("--cema-lengths", type=int_list, default=None, help="default 512,4096")
    p.add_argument(
        "--bias-topology",
        choices=("hf", "upstream"),
        default="hf",
        help="our bias set (megalodon-jax always uses the upstream set)",
    )
    p.add_argument("--skip-peer", action="store_true", help="do not benchmark megalodon-jax")
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--skip-forward", action="store_true")
    p.add_argument("--skip-cema", action="store_true")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {
        "repeats": 2 if quick else 5,
        "long_repeats": 2 if quick else 3,
        "lengths": [512] if quick else [512, 2048, 8192, 32768],
        "train_batches": [1] if quick else [1, 4],
        "dtypes": ["float32"] if quick else ["float32", "bfloat16"],
        "forward_dtypes": ["float32"] if quick else ["float32", "bfloat16"],
        "cema_lengths": [512] if quick else [512, 4096],
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for dtype in set(args.dtypes) | set(args.forward_dtypes):
        if dtype not in ("float32", "bfloat16"):
            p.error(f"unsupported dtype {dtype!r} (float32 or bfloat16)")
    if args.repeats < 1 or args.long_repeats < 1 or min(args.warmup, args.long_warmup) < 0:
        p.error("--repeats/--long-repeats must be >= 1 and --warmup/--long-warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    cfg = mf.enwik8_config(bias_topology=args.bias_topology)
    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "settings": {k: v for k, v in vars(args).items()},
        "config": cfg.to_dict(),
        "peer": {"requested": not args.skip_peer},
        "train": [],
        "forward": [],
        "cema": [],
        "ratios": {},
    }

    def save() -> None:
        results["machine"]["load_average_now"] = [round(x, 2) for x in os.getloadavg()]
        results["elapsed_s"] = round(time.perf_counter() - start, 1)
        common.write_json(args.out, results)

    log(f"backend={jax.default_backend()} devices={jax.devices()} out={args.out}")
    dtypes = sorted(set(args.dtypes) | set(args.forward_dtypes))
    models: dict[str, dict[str, Any]] = {OURS: {}}
    base = OursModel(cfg)
    for dtype in dtypes:
        models[OURS][dtype] = base.with_dtype(dtype)
    results["param_counts"] = {OURS: base.num_params()}
    if not args.skip_peer:
        ok, why = peer_available()
        results["peer"]["available"] = ok
        if ok:
            try:
                import megalodon_jax

                peer_base = PeerModel(cfg)
                models[PEER] = {d: peer_base.with_dtype(d) for d in dtypes}
                results["param_counts"][PEER] = peer_base.num_params()
                results["peer"]["version"] = common.package_version("megalodon-jax")
                results["peer"]["config"] = {k: str(v) for k, v in vars(peer_base.peer_cfg).items()}
                results["peer"]["module"] = megalodon_jax.__name__
            except Exception as exc:
                results["peer"].update(common.error_record(exc))
        else:
            results["peer"]["error"] = why
    log(f"parameters: {results['param_counts']}")
    save()

    if not args.skip_train:
        train_models = {n: {d: m[d] for d in args.dtypes} for n, m in models.items()}
        results["train"] = train_section(train_models, args, log)
        results["ratios"]["train"] = ratio_rows(results["train"], ("dtype", "batch", "seq"))
        save()
    if not args.skip_forward:
        fwd_models = {n: {d: m[d] for d in args.forward_dtypes} for n, m in models.items()}
        results["forward"] = forward_section(fwd_models, args, log)
        results["ratios"]["forward"] = ratio_rows(results["forward"], ("dtype", "length"))
        save()
    if not args.skip_cema:
        results["cema"] = cema_section(args, log, cfg.model_dim, cfg.cema_ndim)
        save()

    results["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    print()
    print(render(results))
    print(f"\nwrote {os.path.abspath(args.out)} ({results['elapsed_s']} s)")
    return results


if __name__ == "__main__":
    main()
