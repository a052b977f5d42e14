"""Smoke tests of the start-up, variants and accelerator-check benchmarks at tiny sizes.

Each checks the JSON it writes against values recomputed from the records themselves
(tokens/s from tokens and median time, ms per 1K tokens, MFU absent without a known peak)
and that every variant it names was measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers


def _run_benchmark(name: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m benchmarks.<name> args` in a child process; fails the test if it fails.

    The start-up benchmark measures compilation: it runs its own children without the
    suite's persistent XLA cache."""
    proc = subprocess.run(
        [sys.executable, "-m", f"benchmarks.{name}", *args],
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_startup_benchmark_measures_each_variant_in_a_fresh_process(tmp_path: Path) -> None:
    out = tmp_path / "startup.json"
    args = ["--quick", "--lengths", "128", "--depths", "6", "--variants", "scanned,unrolled+xla"]
    proc = _run_benchmark("bench_startup", *args, "--out", str(out))
    data = json.loads(out.read_text())
    names = [c["name"] for c in data["cases"]]
    assert names == ["train 1 x 128", "forward 128"]
    pids = set()
    for case in data["cases"]:
        assert set(case["variants"]) == {"scanned", "unrolled+xla"}
        for variant, records in case["raw"].items():
            (record,) = records
            assert "error" not in record, record
            assert record["variant"] == variant
            assert record["lower_plus_compile_s"] >= record["compile_s"] > 0
            assert record["peak_rss_mib"] > 100  # includes JAX itself
            assert record["run_ms"] > 0
            pids.add(record.get("pid"))
    assert len(pids) == 4  # one process per measurement
    assert "Start-up: compile time and peak memory" in proc.stdout


@pytest.mark.slow
def test_variants_benchmark_compares_attention_kernels_and_generation_layouts(
    tmp_path: Path,
) -> None:
    from benchmarks import bench_variants

    out = tmp_path / "variants.json"
    args = ["--quick", "--sections", "attention,generate", "--out", str(out)]
    data = bench_variants.main(args)
    written = json.loads(out.read_text())
    for section in ("attention", "generate"):
        assert written[section] == json.loads(json.dumps(data[section], default=str))
    kernels = [(r["kind"], r["attention_impl"]) for r in data["attention"]]
    assert kernels == [
        ("train", "xla"),
        ("train", "dot_product"),
        ("forward", "xla"),
        ("forward", "dot_product"),
    ]
    for r in data["attention"]:
        assert "error" not in r, r
        tokens = r["batch"] * r["length"]
        assert r["tokens_per_s"] == pytest.approx(tokens / (r["median_ms"] / 1e3), abs=0.06)
        assert r["memory"]["peak_estimate_mib"] > 0
    # Generation: both layouts at T = 8 new tokens and at T = 1 (the prefill alone).
    generate = data["generate"]
    assert [(r["scan_layers"], r["new_tokens"]) for r in generate] == [
        (True, 8),
        (False, 8),
        (True, 1),
        (False, 1),
    ]
    one = {r["scan_layers"]: r["median_ms"] for r in generate if r["new_tokens"] == 1}
    for r in generate:
        assert "error" not in r, r
        assert r["length"] == 16 and r["lower_plus_compile_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(
            r["new_tokens"] / (r["median_ms"] / 1e3), abs=0.06
        )
        if r["new_tokens"] == 8:
            per_token = (r["median_ms"] - one[r["scan_layers"]]) / 7
            assert r["decode_ms_per_token"] == pytest.approx(per_token, abs=1e-3)


@pytest.mark.slow
def test_gpu_check_runs_on_cpu_at_small_sizes(tmp_path: Path, monkeypatch) -> None:
    from benchmarks import gpu_check

    tiny = dict(gpu_check.SMALL, train_seq=64, lengths=[128], scaling=[64, 128], steps=2)
    monkeypatch.setattr(gpu_check, "SMALL", dict(tiny, new_tokens=4, prompt=8, repeats=1))
    out = tmp_path / "gpu.json"
    first = gpu_check.main(["--skip-peer", "--out", str(out), "--sections", "generate"])
    assert set(first["section_s"]) == {"generate"} and "train" not in first
    # One process per section (what a run with a time limit per section does): --append
    # keeps the sections already in the file.
    data = gpu_check.main(
        ["--skip-peer", "--out", str(out), "--append", "--sections", "train,forward,scaling"]
    )
    assert json.loads(out.read_text()) == json.loads(json.dumps(data, default=str))
    assert set(data["section_s"]) == set(gpu_check.SECTIONS)
    assert data["generate"] == first["generate"]
    train, unrolled = data["train"]
    assert (train["model"], unrolled["model"]) == ("ours", gpu_check.UNROLLED)
    for row in (train, unrolled):
        assert "error" not in row, row
        tokens = row["batch"] * row["seq"]
        assert row["tokens_per_s"] == pytest.approx(tokens / (row["median_ms"] / 1e3), abs=0.06)
        assert row["model_flops_per_step"] > 6 * 11e6 * tokens  # at least 6·params·tokens
        assert "mfu" not in row  # a CPU has no peak in the table
        # consecutive_s is rounded to 1 ms (×600: 0.3 s), the projection to 0.01 s.
        assert row["projected_1200_steps_s"] == pytest.approx(row["consecutive_s"] * 600, abs=0.31)
    # The model's FLOPs are the unrolled step's count; XLA counts the scanned loop body once.
    assert unrolled["xla_flops_per_step"] == unrolled["model_flops_per_step"]
    assert train["xla_flops_per_step"] < train["model_flops_per_step"] / 3
    assert [r["length"] for r in data["scaling"]] == [64, 128]
    for r in data["forward"] + data["scaling"]:
        assert r["ms_per_1k_tokens"] == pytest.approx(r["median_ms"] * 1000 / r["length"], abs=6e-4)
    (gen,) = data["generate"]
    # Rates are rounded to 0.1 token/s, times to 1 µs.
    assert gen["tokens_per_s"] == pytest.approx(4 / (gen["median_ms"] / 1e3), abs=0.06)
    assert gen["first_call_s"] > 0


def test_gpu_check_refuses_unknown_sections(capsys) -> None:
    from benchmarks import gpu_check

    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--sections", "train,decode"])
    assert "unknown sections ['decode']" in capsys.readouterr().err


@pytest.mark.slow
def test_context_parallel_benchmark_reads_memory_and_collectives(tmp_path: Path) -> None:
    """Oracles: the collective bytes parsed from the HLO at L equal those at L/2 (state
    exchange does not grow with L), temporaries fall with P, and the table repeats the JSON."""
    out = tmp_path / "cp.json"
    args = ["--quick", "--length", "512", "--contexts", "1,4", "--steps", "1"]
    proc = _run_benchmark("bench_context_parallel", *args, "--out", str(out))
    data = json.loads(out.read_text())
    assert data["simulated_devices"] == 8 and "not speed-ups" in data["note"]
    one, four = data["records"]
    assert (one["context"], four["context"]) == (1, 4)
    assert sum(one["collective_bytes_per_layer"].values()) == 0  # one device: none
    per_layer = four["collective_bytes_per_layer"]
    assert per_layer["all-gather"] > 0 and per_layer["all-reduce"] > 0
    assert per_layer == four["collective_bytes_per_layer_at_half_length"]
    assert four["memory"]["temp_mib"] < one["memory"]["temp_mib"]
    assert one["median_ms"] > 0 and four["repeats"] == 1
    assert data["table"] in proc.stdout


@pytest.mark.slow
def test_eval_memory_benchmark_reads_each_length_in_its_own_process(tmp_path: Path) -> None:
    """Oracle: the whole read's bits per byte is `evaluation.stream_eval` of the same bytes with
    the same seeded model in this process; every process reports its own peak memory."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from megalodon_flax import evaluation
    from megalodon_flax.data import enwik8
    from megalodon_flax.megalodon.config import enwik8_config
    from megalodon_flax.megalodon.model import MegalodonLM

    data_dir, manual_dir = helpers.make_enwik8_dirs(tmp_path / "data", num_bytes=120_000)
    out = tmp_path / "mem.json"
    args = ["--quick", "--fractions", "0.5,1", "--max_bytes", "3000", "--out", str(out)]
    args += [f"--data_dir={data_dir}", f"--manual_dir={manual_dir}"]
    proc = _run_benchmark("bench_eval_memory", *args)
    data = json.loads(out.read_text())
    half, whole = data["records"]
    assert (half["bytes"], whole["bytes"]) == (1500, 3000)
    assert half["peak_rss_mib"] > 100 and whole["peak_rss_mib"] > 100
    peaks = [half["peak_rss_mib"], whole["peak_rss_mib"]]
    assert data["peak_rss_spread"] == pytest.approx(max(peaks) / min(peaks))
    split = enwik8.load_enwik8_splits(data_dir, manual_dir)["test"][:3000]
    model = MegalodonLM(
        enwik8_config(
            compute_dtype="float32", model_dim=32, num_layers=2, num_heads=2, z_dim=16,
            value_dim=32, ffn_hidden_dim=64, cema_ndim=4, chunk_size=32, norm_num_groups=4,
        )
    )  # fmt: skip
    params = nn.unbox(model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    want = evaluation.stream_eval(model, params, split).bits_per_byte
    assert whole["bits_per_byte"] == pytest.approx(want, rel=1e-5)
    assert data["table"] in proc.stdout
