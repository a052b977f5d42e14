"""What packing documents into rows costs: the packed train step against the unpacked one, and
the CEMA reset paths that the packed step can take.

Sections (each a table and a JSON list; the cases of a section are timed alternately):
  step: the enwik8 model's train step (fwd + bwd + AdamW, fp32) on B × 512 tokens, unpacked
        and packed (segment ids of documents with geometric lengths, mean 256 tokens), for
        this package and for megalodon-jax 0.2.2 (when installed) in the same run.
  cema: one CEMA layer of the enwik8 width (D = 384, N = 16), value and gradient on
        B × 512: the unpacked FFT path against the reset paths (`cema_blocked_resets` at
        several block sizes, the associative scan with A = 0 at run starts, the sequential
        scan).

Run from the repository root:
  python -m benchmarks.bench_packing                          # the tables in RESULTS.md
  python -m benchmarks.bench_packing --quick --out /tmp/packing.json   # smoke run
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

import megalodon_flax as mf
from benchmarks import common
from benchmarks.bench_model import OursModel, PeerModel, TrainRunner, run_cases
from megalodon_flax.layers.segments import packed_target_weights, segments_from_ids
from megalodon_flax.megalodon import cema, cema_powers, cema_resets

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "bench_packing.json")


def packed_segment_ids(batch: int, length: int, mean_length: float, seed: int) -> np.ndarray:
    """(batch, length) int32 ids of documents with geometric lengths (the last one cut)."""
    rng = np.random.default_rng(seed)
    rows = np.zeros((batch, length), np.int32)
    for b in range(batch):
        t, doc = 0, 1
        while t < length:
            n = int(rng.geometric(1.0 / mean_length))
            rows[b, t : t + n] = doc
            t, doc = t + n, doc + 1
    return rows


def weighted_loss(
    forward: Callable[..., jax.Array], segment_ids: jax.Array | None
) -> Callable[[Any, jax.Array], jax.Array]:
    """Mean next-token loss of tokens (B, L + 1); packed rows drop cross-run and padding pairs."""

    def loss(params: Any, tokens: jax.Array) -> jax.Array:
        inputs, targets = tokens[:, :-1], tokens[:, 1:]
        if segment_ids is None:
            logits = forward(params, inputs)
            weights = jnp.ones(targets.shape, jnp.float32)
        else:
            logits = forward(params, inputs, segment_ids=segment_ids[:, :-1])
            weights = packed_target_weights(segment_ids)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
        return jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    return loss


def _ours_forward(model: OursModel, params: Any, tokens: jax.Array, **kwargs: Any) -> jax.Array:
    return model.module.apply({"params": params}, tokens, **kwargs)[0]


def _peer_forward(model: PeerModel, params: Any, tokens: jax.Array, **kwargs: Any) -> jax.Array:
    return model.eqx.combine(params, model.static)(tokens, return_cache=False, **kwargs)[0]


def step_section(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    cfg = mf.enwik8_config()
    length = args.length
    tokens = common.random_tokens(args.batch, length + 1, cfg.vocab_size, 1)
    ids = jnp.asarray(packed_segment_ids(args.batch, length + 1, args.mean_document, 2))
    models: list[tuple[str, Any, Callable[..., jax.Array]]] = []
    ours = OursModel(cfg)
    models.append((common.OURS, ours, functools.partial(_ours_forward, ours)))
    available, error = common.peer_available()
    if available:
        peer = PeerModel(cfg)
        models.append((common.PEER, peer, functools.partial(_peer_forward, peer)))
    else:
        log(f"megalodon-jax not available: {error}")

    builders = []
    for name, model, forward in models:
        for packed in (False, True):

            def build(model=model, forward=forward, packed=packed, name=name) -> common.Case:
                loss = weighted_loss(forward, ids if packed else None)
                runner = TrainRunner(loss, model.params, tokens, model.compiler_options)
                label = f"{name} {'packed' if packed else 'unpacked'}"
                return common.Case(label, runner.prepare, runner.run)

            builders.append((f"{name} {packed}", build))
    log(f"step: train {args.batch} x {length} ...")
    records = []
    for case in run_cases(builders, args.repeats, args.warmup):
        rec = common.case_record(case, kind="train", batch=args.batch, length=length)
        records.append(rec)
        log(f"  {case.name}: {rec.get('median_ms')} ms {rec.get('error', '')}")
    for name, *_ in models:
        by_case = {r["model"]: r for r in records if r["model"].startswith(name)}
        base = by_case.get(f"{name} unpacked", {}).get("median_ms")
        packed = by_case.get(f"{name} packed", {}).get("median_ms")
        if base and packed:
            by_case[f"{name} packed"]["packed_over_unpacked"] = round(packed / base, 3)
    return records


def _cema_case(
    name: str, y_fn: Callable[[cema.CemaCoefficients, jax.Array], jax.Array], x: jax.Array
) -> common.Case:
    dim, order = x.shape[1], 16
    rng = np.random.default_rng(3)
    raw = [
        jnp.asarray(rng.normal(0.0, 0.2, (dim, order, 1)), jnp.float32),
        jnp.asarray(rng.normal(0.0, 0.2, (dim, order, 1)), jnp.float32),
        jnp.asarray(rng.normal(0.0, 1.0, (dim, 1, 1)), jnp.float32),
        jnp.asarray(rng.normal(0.0, 1.0, (dim, order)), jnp.float32),
        jnp.asarray(rng.normal(0.0, 1.0, (dim, order)), jnp.float32),
    ]

    def objective(raw: list[jax.Array], x: jax.Array) -> jax.Array:
        return jnp.sum(jnp.sin(y_fn(cema_powers.cema_coefficients(*raw), x)))

    grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    holder: dict[str, Any] = {}

    def prepare() -> dict[str, Any]:
        start = time.perf_counter()
        holder["compiled"] = grad.lower(raw, x).compile()
        return {"lower_plus_compile_s": round(time.perf_counter() - start, 3)}

    def run() -> None:
        common.block(holder["compiled"](raw, x))

    return common.Case(name, prepare, run)


def cema_section(args: argparse.Namespace, log: Callable[[str], None]) -> list[dict[str, Any]]:
    length = args.length
    x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, 384, length), jnp.float32)
    seg = segments_from_ids(
        jnp.asarray(packed_segment_ids(args.batch, length, args.mean_document, 2))
    )
    variants: list[tuple[str, Callable[[cema.CemaCoefficients, jax.Array], jax.Array]]] = [
        ("fft, unpacked", lambda c, x: cema.cema_fft(c, x)[0]),
    ]
    for size in args.blocks:
        variants.append(
            (
                f"blocked resets, T={size}",
                functools.partial(
                    lambda c, x, size: cema_resets.cema_blocked_resets(c, x, seg.position, size),
                    size=size,
                ),
            )
        )
    variants += [
        (
            "associative scan, resets",
            lambda c, x: cema.cema_associative_scan(c, x, None, seg.starts)[0],
        ),
        ("sequential, resets", lambda c, x: cema.cema_sequential(c, x, None, seg.starts)[0]),
    ]
    builders = [(name, functools.partial(_cema_case, name, fn, x)) for name, fn in variants]
    log(f"cema: value and gradient, {args.batch} x 384 x {length} ...")
    records = []
    for case in run_cases(builders, args.repeats, args.warmup):
        rec = common.case_record(case, kind="cema", batch=args.batch, length=length)
        records.append(rec)
        log(f"  {case.name}: {rec.get('median_ms')} ms {rec.get('error', '')}")
    return records


def render(results: dict[str, Any]) -> str:
    out = []
    for section, title in (
        ("step", "Train step, unpacked vs packed (fp32)"),
        ("cema", "CEMA value and gradient: reset paths"),
    ):
        rows = [
            [
                r["model"],
                f"{r['batch']} x {r['length']}",
                common.fmt(r.get("lower_plus_compile_s"), ".1f"),
                f"{common.fmt(r.get('median_ms'))} ({common.fmt(r.get('min_ms'))}-"
                f"{common.fmt(r.get('max_ms'))})",
                common.fmt(r.get("packed_over_unpacked"), ".2f"),
                (r.get("error") or "")[:40],
            ]
            for r in results.get(section, [])
        ]
        if rows:
            headers = ["case", "B x L", "compile s", "ms (min-max)", "packed/unpacked", "error"]
            out.append(common.table(title, headers, rows))
    return "\n\n".join(out)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes, 1 repeat (smoke test)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=512)
    p.add_argument("--mean-document", type=float, default=256.0)
    p.add_argument("--blocks", type=common.int_list, default=[8, 16, 32, 64])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--sections", type=common.str_list, default=["cema", "step"])
    p.add_argument("--out", default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.warmup = 1, 0
        args.batch, args.length, args.mean_document = 1, 64, 16.0
        args.blocks = [16]
    unknown = sorted(set(args.sections) - {"cema", "step"})
    if unknown:
        p.error(f"unknown sections {unknown}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    results: dict[str, Any] = {"machine": common.machine_info(), "settings": vars(args)}
    for section, measure in (("cema", cema_section), ("step", step_section)):
        if section in args.sections:
            results[section] = measure(args, log)
            common.write_json(args.out, results)
    results["elapsed_s"] = round(time.perf_counter() - start, 1)
    common.write_json(args.out, results)
    print()
    print(render(results))
    print(f"\nwrote {os.path.abspath(args.out)} ({results['elapsed_s']} s)")
    return results


if __name__ == "__main__":
    main()
