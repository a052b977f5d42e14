"""Stream evaluation runs at constant memory: peak RSS against the length of the split read.

Each fraction of the split (default 1/4, 1/2 and all of enwik8's test split) is read in a fresh
process by the context-curve reader (`megalodon_flax.context_curve.carried_position_losses`,
exact statistics, state carried through the whole split) with the enwik8 model (fp32,
initialized with a fixed seed: memory does not depend on the weights). Each process reports
its peak resident memory; the table shows them against the shortest read, and the target is
a spread within 5%.

Run from the repository root:
  python -m benchmarks.bench_eval_memory                 # the table in RESULTS.md
  python -m benchmarks.bench_eval_memory --quick --max_bytes 20000 --out /tmp/mem.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "bench_eval_memory.json")
SPREAD_TARGET = 1.05


def _child(args: argparse.Namespace) -> dict[str, Any]:
    """Reads `args.fraction` of the split in this process; returns its measurements."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from megalodon_flax import context_curve
    from megalodon_flax.data import enwik8
    from megalodon_flax.megalodon.config import enwik8_config
    from megalodon_flax.megalodon.model import MegalodonLM

    splits = enwik8.load_enwik8_splits(args.data_dir, args.manual_dir, allow_sample_fallback=True)
    split = splits[args.split][: args.max_bytes or None]
    data = split[: int(len(split) * args.fraction)]
    overrides: dict[str, Any] = {"compute_dtype": "float32"}
    if args.quick:
        overrides.update(
            model_dim=32, num_layers=2, num_heads=2, z_dim=16, value_dim=32,
            ffn_hidden_dim=64, cema_ndim=4, chunk_size=32, norm_num_groups=4,
        )  # fmt: skip
    model = MegalodonLM(enwik8_config(**overrides))
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))["params"]
    losses = context_curve.carried_position_losses(
        model, params, data, num_streams=args.num_streams
    )
    return {
        "fraction": args.fraction,
        "bytes": int(data.shape[0]),
        "split_source": splits.source,
        "seconds": round(losses.seconds, 2),
        "bits_per_byte": losses.total_bits_per_byte,
        "peak_rss_mib": round(common.max_rss_mib(), 1),
    }


def _run_child(args: argparse.Namespace, fraction: float) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.bench_eval_memory", "--child", str(fraction)]
    for name in ("split", "num_streams", "max_bytes", "data_dir", "manual_dir"):
        value = getattr(args, name)
        if value is not None:
            command.append(f"--{name}={value}")
    if args.quick:
        command.append("--quick")
    root = os.path.dirname(HERE)
    proc = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child for {fraction} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.split("RESULT", 1)[1])


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fractions", default="0.25,0.5,1", help="parts of the split read")
    parser.add_argument("--split", default="test", choices=("train", "validation", "test"))
    parser.add_argument("--num_streams", type=int, default=1)
    parser.add_argument("--max_bytes", type=int, default=0, help="cap the split (0: all)")
    parser.add_argument("--data_dir", default=None, help="tfds data directory")
    parser.add_argument("--manual_dir", default=None, help="folder holding enwik8.zip")
    parser.add_argument("--quick", action="store_true", help="a 2-layer 32-wide model")
    parser.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    parser.add_argument("--child", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is not None:
        args.fraction = args.child
        print("RESULT" + json.dumps(_child(args)))
        return None
    records = [_run_child(args, float(f)) for f in args.fractions.split(",")]
    base = records[0]["peak_rss_mib"]
    rows = [
        [
            f"{r['fraction']:g}",
            f"{r['bytes']:,}",
            common.fmt(r["peak_rss_mib"]),
            common.fmt(r["peak_rss_mib"] / base, ".3f"),
            common.fmt(r["seconds"]),
            common.fmt(r["bits_per_byte"], ".4f"),
        ]
        for r in records
    ]
    peaks = [r["peak_rss_mib"] for r in records]
    spread = max(peaks) / min(peaks)
    table = common.table(
        f"Stream evaluation of the {args.split} split, one process per length "
        f"(peak RSS spread {spread:.3f}, target <= {SPREAD_TARGET})",
        ["fraction", "bytes", "peak RSS MiB", "vs first", "seconds", "bits/byte"],
        rows,
    )
    print(table)
    command = "python -m benchmarks.bench_eval_memory " + " ".join(argv or sys.argv[1:])
    payload = {
        "benchmark": "eval_memory",
        "command": command.strip(),
        "machine": common.machine_info(),
        "records": records,
        "peak_rss_spread": spread,
        "target_met": spread <= SPREAD_TARGET,
        "table": table,
    }
    common.write_json(args.out, payload)
    print(f"wrote {args.out}")
    return payload


if __name__ == "__main__":
    main()
