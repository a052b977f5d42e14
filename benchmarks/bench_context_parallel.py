"""Context parallelism: per-device memory, collective bytes and step time against the context
size P, at a fixed total sequence length.

For P = 1, 2, 4, 8 the train step (forward, backward, AdamW; batch 1) of the enwik8-width model
on a (1, 1, 1, P) mesh is compiled from abstract inputs and XLA's memory analysis gives the
per-device temporaries, arguments and outputs. The collectives are read from the compiled HLO:
bytes of every all-gather, all-reduce, reduce-scatter, collective-permute and all-to-all
result, per layer, at the full length and at half of it (state exchange must not grow with
the length; the gradient all-reduce is the size of the parameters). Step time is the median
of timed steps after a warm-up.

The P devices are simulated on the host CPU (`--xla_force_host_platform_device_count`), so
they share its cores: their step times show the cost of splitting, not a speed-up.

Run from the repository root:
  python -m benchmarks.bench_context_parallel                      # the table in RESULTS.md
  python -m benchmarks.bench_context_parallel --quick --out /tmp/cp.json   # smoke run
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from typing import Any

NUM_DEVICES = 8
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    flag = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The device count above must be set before JAX starts.
import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import common  # noqa: E402
from megalodon_flax.training.config import TrainConfig, default_config  # noqa: E402
from megalodon_flax.training.setup import create_mesh, setup_training  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "bench_context_parallel.json")
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "collective-permute", "all-to-all")
_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4,
    "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}  # fmt: skip
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")


def collective_bytes(hlo_text: str) -> dict[str, int]:
    """Bytes of the results of each kind of collective in compiled HLO text (per device).

    An asynchronous `*-start` op's result is a tuple whose last element is the output.
    """
    totals = dict.fromkeys(COLLECTIVES, 0)
    for line in hlo_text.splitlines():
        match = _OP.search(line)
        if match is None:
            continue
        shapes = _SHAPE.findall(match.group(1))
        if match.group(3):
            shapes = shapes[-1:]
        for dtype, dims in shapes:
            count = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            totals[match.group(2)] += count * _DTYPE_BYTES.get(dtype, 4)
    return totals


def train_config(
    context: int, length: int, quick: bool, compute_dtype: str = "float32"
) -> TrainConfig:
    """The enwik8 training config at batch 1 × `length` on a (1, 1, 1, context) mesh."""
    config = default_config()
    config.seq_len = length
    config.batch_size = 1
    config.eval.batch_size = 1
    config.mesh.shape = (1, 1, 1, context)
    config.model.compute_dtype = compute_dtype
    if quick:
        config.model.update(
            model_dim=32, num_layers=2, num_heads=2, z_dim=16, value_dim=32,
            ffn_hidden_dim=64, cema_ndim=4, chunk_size=32, norm_num_groups=4,
        )  # fmt: skip
    return TrainConfig.from_mapping(config)


def _abstract_batch(setup: Any) -> dict[str, jax.ShapeDtypeStruct]:
    config = setup.config
    shape = (config.grad_accum_steps, config.batch_size, config.seq_len)
    kinds = {"inputs": np.int32, "targets": np.int32, "weights": np.float32}
    return {
        k: jax.ShapeDtypeStruct(shape, v, sharding=setup.train_batch_sharding)
        for k, v in kinds.items()
    }


def compile_step(config: TrainConfig) -> tuple[Any, Any]:
    """The setup and the compiled train step of `config`."""
    setup = setup_training(config, create_mesh(config))
    with setup.activate():
        compiled = setup.p_train_step.lower(setup.abstract_state, _abstract_batch(setup)).compile()
    return setup, compiled


def measure(
    context: int, length: int, steps: int, quick: bool, compute_dtype: str
) -> dict[str, Any]:
    """Memory, collective bytes (at `length` and `length // 2`) and step time at one P."""
    config = train_config(context, length, quick, compute_dtype)
    layers = config.model.num_layers
    record: dict[str, Any] = {
        "context": context,
        "length": length,
        "num_layers": layers,
        "compute_dtype": compute_dtype,
    }
    start = common.now()
    setup, compiled = compile_step(config)
    record["compile_s"] = round(common.now() - start, 2)
    record["memory"] = common.compiled_memory(compiled)
    full = collective_bytes(compiled.as_text())
    half = dict.fromkeys(COLLECTIVES, 0)
    if context > 1:  # one device has no collectives at any length
        _, half_compiled = compile_step(train_config(context, length // 2, quick, compute_dtype))
        half = collective_bytes(half_compiled.as_text())
    record["collective_bytes_per_layer"] = {k: v / layers for k, v in full.items()}
    record["collective_bytes_per_layer_at_half_length"] = {k: v / layers for k, v in half.items()}
    if steps:
        state = setup.init_state()
        rng = np.random.default_rng(0)
        tokens = rng.integers(0, 256, (1, length + 1), dtype=np.int32)
        local = {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "weights": np.ones((1, length), np.float32),
        }
        times = []
        for i in range(steps + 1):
            t0 = common.now()
            state, metrics = setup.train_step(state, local)
            common.block(metrics)
            if i:
                times.append((common.now() - t0) * 1e3)
        record.update(common.summarize_ms(times))
    return record


def _mib(value: float | None) -> str:
    return common.fmt(value, ".1f")


def print_table(records: Sequence[dict[str, Any]]) -> str:
    base = records[0]["memory"].get("temp_mib")
    rows = []
    for r in records:
        temp = r["memory"].get("temp_mib")
        per_layer = r["collective_bytes_per_layer"]
        half = r["collective_bytes_per_layer_at_half_length"]
        rows.append(
            [
                r["context"],
                _mib(temp),
                common.fmt(temp / base if temp is not None and base else None, ".3f"),
                _mib(r["memory"].get("argument_mib")),
                common.fmt(per_layer["all-gather"] / 1024, ".1f"),
                common.fmt(per_layer["all-reduce"] / 2**20, ".2f"),
                common.fmt(sum(per_layer.values()) / 2**20, ".2f"),
                common.fmt(sum(half.values()) / 2**20, ".2f"),
                common.fmt(r.get("median_ms"), ".0f"),
                f"{common.fmt(r.get('min_ms'), '.0f')}-{common.fmt(r.get('max_ms'), '.0f')}",
            ]
        )
    title = (
        f"Train step at batch 1 x {records[0]['length']:,} tokens, per device "
        f"({records[0]['num_layers']} layers, {records[0]['compute_dtype']} compute; simulated "
        "CPU devices share the host's cores, "
        "so times are not speed-ups)"
    )
    headers = [
        "P", "temp MiB", "vs P=1", "args MiB", "all-gather KiB/layer", "all-reduce MiB/layer",
        "collectives MiB/layer", "same at L/2", "step ms", "min-max",
    ]  # fmt: skip
    text = common.table(title, headers, rows)
    print(text)
    return text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, default=32768, help="total tokens per sequence")
    parser.add_argument("--contexts", default="1,2,4,8", help="context sizes P")
    parser.add_argument("--steps", type=int, default=2, help="timed steps (0: compile only)")
    parser.add_argument("--quick", action="store_true", help="a 2-layer 32-wide model")
    parser.add_argument("--compute_dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    contexts = [int(p) for p in args.contexts.split(",")]
    if max(contexts) > jax.device_count():
        parser.error(f"{max(contexts)} devices asked, {jax.device_count()} available")
    records = []
    for p in contexts:
        records.append(measure(p, args.length, args.steps, args.quick, args.compute_dtype))
        print(f"P={p}: done", flush=True)
    table = print_table(records)
    command = "python -m benchmarks.bench_context_parallel " + " ".join(argv or sys.argv[1:])
    common.write_json(
        args.out,
        {
            "benchmark": "context_parallel",
            "command": command.strip(),
            "machine": common.machine_info(),
            "simulated_devices": jax.device_count(),
            "note": "simulated CPU devices share the host's cores: times are not speed-ups",
            "records": records,
            "table": table,
        },
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
