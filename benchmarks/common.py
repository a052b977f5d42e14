"""Timing, memory and machine-description helpers shared by the benchmarks."""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp

from megalodon_flax import memory

MIB = 1024.0 * 1024.0


def block(tree: Any) -> Any:
    """Waits until every array in `tree` is computed and returns `tree`."""
    return jax.block_until_ready(tree)


def now() -> float:
    return time.perf_counter()


def summarize_ms(times_ms: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the raw list of per-repeat times in milliseconds."""
    times = [float(t) for t in times_ms]
    if not times:
        return {"repeats": 0, "times_ms": [], "median_ms": None, "min_ms": None, "max_ms": None}
    return {
        "repeats": len(times),
        "times_ms": [round(t, 3) for t in times],
        "median_ms": round(statistics.median(times), 3),
        "min_ms": round(min(times), 3),
        "max_ms": round(max(times), 3),
    }


max_rss_mib = memory.max_rss_mib


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def compiled_memory(compiled: Any) -> dict[str, Any]:
    """Sizes from an executable's memory analysis in MiB.

    `peak_estimate_mib` = temp + argument + output − alias (buffers live during the call).
    """
    try:
        stats = compiled.memory_analysis()
    except Exception as exc:
        return {"error": f"memory_analysis unavailable: {exc!r}"}
    if stats is None:
        return {"error": "memory_analysis returned None"}
    names = ("temp", "argument", "output", "alias", "generated_code")
    sizes = {n: int(getattr(stats, f"{n}_size_in_bytes", 0) or 0) for n in names}
    peak = sizes["temp"] + sizes["argument"] + sizes["output"] - sizes["alias"]
    out: dict[str, Any] = {f"{n}_mib": round(v / MIB, 2) for n, v in sizes.items()}
    out["peak_estimate_mib"] = round(peak / MIB, 2)
    return out


def device_peak_mib() -> float | None:
    """`peak_bytes_in_use` of the first device (GPU/TPU; None on CPU, which reports no stats)."""
    peak = memory.device_peak_mib(jax.devices()[:1])
    return None if peak is None else round(peak, 2)


def on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def error_record(exc: BaseException) -> dict[str, str]:
    """A JSON-friendly description of a failure (type, message, last traceback lines)."""
    tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
    return {"error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": "".join(tb[-3:])[-2000:]}


def package_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def machine_info() -> dict[str, Any]:
    """Versions, devices, CPU, cores, memory, load and the UTC date of this run."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    total_mem = None
    try:
        with open("/proc/meminfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    total_mem = round(int(line.split()[1]) / 1024.0 / 1024.0, 2)
    except OSError:
        pass
    packages = ("jax", "jaxlib", "flax", "optax", "numpy", "equinox", "megalodon-jax")
    return {
        "date_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": {p: package_version(p) for p in packages},
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kinds": sorted({d.device_kind for d in jax.devices()}),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": usable_cores,
        "memory_total_gib": total_mem,
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
        "xla_flags": os.environ.get("XLA_FLAGS"),
    }


@dataclass
class Case:
    """One benchmarked computation: `prepare` compiles and builds state, `run` executes once.

    `prepare()` returns a dict of compile facts (lower_s, compile_s, memory ...); `run()` performs
    one blocking execution. Times of `run()` are collected by `measure_interleaved`.
    """

    name: str
    prepare: Callable[[], dict[str, Any]]
    run: Callable[[], None]
    info: dict[str, Any] = field(default_factory=dict)
    times_ms: list[float] = field(default_factory=list)
    failed: dict[str, str] | None = None


def timed_call(fn: Callable[[], Any]) -> float:
    """Milliseconds taken by one blocking call of fn."""
    start = now()
    fn()
    return (now() - start) * 1e3


def measure_interleaved(cases: Sequence[Case], repeats: int, warmup: int) -> None:
    """Prepares every case, warms each up, then times them alternately repeat by repeat.

    Alternating the cases in each repeat exposes them to the same machine load, so their
    ratio stays meaningful on a shared machine. A case that raises is marked failed and skipped.
    """
    for case in cases:
        try:
            rss_before = max_rss_mib()
            case.info.update(case.prepare())
            case.info["first_call_s"] = round(timed_call(case.run) / 1e3, 4)
            case.info["max_rss_growth_mib"] = round(max_rss_mib() - rss_before, 1)
            peak = device_peak_mib()
            if peak is not None:
                case.info["device_peak_bytes_in_use_mib"] = peak
        except Exception as exc:
            case.failed = error_record(exc)
    for _ in range(warmup):
        for case in cases:
            if case.failed is None:
                try:
                    case.run()
                except Exception as exc:
                    case.failed = error_record(exc)
    for _ in range(repeats):
        for case in cases:
            if case.failed is None:
                try:
                    case.times_ms.append(timed_call(case.run))
                except Exception as exc:
                    case.failed = error_record(exc)


def case_record(case: Case, **extra: Any) -> dict[str, Any]:
    """The JSON record of a measured case."""
    record: dict[str, Any] = {"model": case.name, **extra, **case.info}
    if case.failed is not None:
        record.update(case.failed)
    record.update(summarize_ms(case.times_ms))
    return record


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Writes payload atomically (temp file + rename); creates the parent directory."""
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2, sort_keys=False, default=str)
        fh.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------- shared by the CLIs
OURS = "ours"
PEER = "megalodon_jax"


def random_tokens(batch: int, length: int, vocab: int, seed: int = 0) -> jax.Array:
    """Uniform random token ids (batch, length) int32."""
    return jax.random.randint(jax.random.PRNGKey(seed), (batch, length), 0, vocab, jnp.int32)


def peer_available() -> tuple[bool, str | None]:
    """Whether megalodon-jax (and equinox) import, and the error if not."""
    try:
        import equinox  # noqa: F401
        import megalodon_jax  # noqa: F401
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


def fmt(value: Any, spec: str = ".1f") -> str:
    """A table cell: numbers with `spec`, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, float | int) and not isinstance(value, bool):
        return format(value, spec)
    return str(value)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A right-aligned plain-text table under `title`."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = [title, "  ".join(h.rjust(w) for h, w in zip(cells[0], widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells[1:]]
    return "\n".join(lines)


def int_list(text: str) -> list[int]:
    """'1,4' → [1, 4] (argparse type)."""
    return [int(v) for v in text.split(",") if v.strip()]


def str_list(text: str) -> list[str]:
    """'a,b' → ['a', 'b'] (argparse type)."""
    return [v.strip() for v in text.split(",") if v.strip()]
