"""Every CLI checks its arguments when the flags are parsed, before it loads anything, and a
bad one ends the program with one line naming the flag.

Each case parses the CLI's own flag definitions (`define_flags`) on a fresh `FlagValues` and
expects the rule it breaks (the documented range, the file that must exist) in the error;
the boundary values of every range parse. The slow tests run the programs themselves.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from absl import flags
from safetensors.numpy import save_file

from megalodon_flax.cli import common, compare, convert, evaluate, sample
from tests import helpers

SMOKE = str(helpers.REPO_ROOT / "configs" / "smoke.py")


@pytest.fixture
def paths(tmp_path: Path) -> dict[str, str]:
    """A workdir-like folder, a file, an empty folder, a weights file and an HF directory."""
    (tmp_path / "run").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "hf").mkdir()
    weights = {"w": np.zeros(2, np.float32)}
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"))
    save_file(weights, str(tmp_path / "w.safetensors"))
    (tmp_path / "used" / "checkpoints" / "0").mkdir(parents=True)
    named = {name: str(tmp_path / name) for name in ("run", "empty", "hf", "used", "absent")}
    return named | {
        "file": str(tmp_path / "file.txt"),
        "weights": str(tmp_path / "w.safetensors"),
        "tmp": str(tmp_path),
    }


def _parse(module, args: list[str]) -> flags.FlagValues:
    fv = flags.FlagValues()
    module.define_flags(fv)
    argv, sys.argv = sys.argv, ["prog", *args]  # config_flags finds --config.* overrides here
    try:
        fv(["prog", *args])
    finally:
        sys.argv = argv
    return fv


def _error(module, args: list[str]) -> str:
    with pytest.raises(flags.Error) as info:
        _parse(module, args)
    return str(info.value)


SAMPLE_BAD = [
    ([], "--workdir must have a value"),
    (["--workdir={absent}"], "{absent} does not exist"),
    (["--workdir={file}"], "{file} is not a directory"),
    (["--workdir={run}", "--top_p=0"], "flag --top_p=0.0: must be in (0, 1]"),
    (["--workdir={run}", "--top_p=1.5"], "flag --top_p=1.5: must be in (0, 1]"),
    (["--workdir={run}", "--top_p=nan"], "flag --top_p=nan: must be in (0, 1]"),
    (["--workdir={run}", "--min_p=1"], "flag --min_p=1.0: must be in [0, 1)"),
    (["--workdir={run}", "--min_p=-0.1"], "flag --min_p=-0.1: must be in [0, 1)"),
    (["--workdir={run}", "--temperature=-1"], "flag --temperature=-1"),
    (["--workdir={run}", "--temperature=inf"], "flag --temperature=inf: must be a finite"),
    (["--workdir={run}", "--max_new_tokens=0"], "flag --max_new_tokens=0"),
    (["--workdir={run}", "--num_samples=0"], "flag --num_samples=0"),
    (["--workdir={run}", "--top_k=-1"], "flag --top_k=-1"),
    (["--workdir={run}", "--seed=-1"], "flag --seed=-1"),
    (["--workdir={run}", "--prompt="], "flag --prompt=: must not be empty"),
]
EVALUATE_BAD = [
    (["--workdir={absent}"], "{absent} does not exist"),
    (["--workdir={run}", "--call_length=-3"], "flag --call_length=-3"),
    (["--workdir={run}", "--num_streams=0"], "flag --num_streams=0"),
    (["--workdir={run}", "--max_bytes=-1"], "flag --max_bytes=-1"),
    (["--workdir={run}", "--max_bytes=1"], "must be 0 (all) or at least 2"),
    (["--workdir={run}", "--split=dev"], "flag --split=dev"),
    (["--workdir={run}", "--max_bytes=10", "--num_streams=6"], "fewer than 2 bytes to each"),
]
CONVERT_BAD = [
    (["--workdir={run}"], "give exactly one of --to (export) or --from (import)"),
    (["--workdir={run}", "--to=hf", "--from=hf"], "give exactly one of --to"),
    (["--workdir={run}", "--to=hf"], "--to needs --out"),
    (["--workdir={run}", "--to=hf", "--out={tmp}/m.safetensors"], "--to=hf writes a directory"),
    (["--workdir={run}", "--to=hf", "--out={absent}/hf"], "the folder {absent} does not exist"),
    (["--workdir={run}", "--to=hf", "--out={file}"], "{file} exists and is not a dir"),
    (["--workdir={run}", "--to=upstream", "--out={tmp}/u.pt"], "writes a .safetensors file"),
    (["--workdir={run}", "--to=upstream", "--out={absent}/u.safetensors"], "does not exist"),
    (["--workdir={absent}", "--to=hf", "--out={tmp}/hf2"], "{absent} does not exist"),
    (["--workdir={run}", "--to=hf", "--out={tmp}/x", "--in={hf}"], "--in only apply to an imp"),
    (["--workdir={absent}", "--from=hf", "--in={hf}"], "--from needs --in and --config"),
    (["--workdir={absent}", "--from=hf", "--config=" + SMOKE], "--from needs --in and --config"),
    (
        ["--workdir={absent}", "--from=hf", "--in={hf}", "--config=" + SMOKE, "--dtype=bfloat16"],
        "--dtype only apply to an export",
    ),
    (
        ["--workdir={absent}", "--from=hf", "--in={absent}.safetensors", "--config=" + SMOKE],
        "{absent}.safetensors does not exist",
    ),
    (
        ["--workdir={absent}", "--from=hf", "--in={file}", "--config=" + SMOKE],
        "is not a .safetensors/.pt/.bin/.pth file",
    ),
    (
        ["--workdir={absent}", "--from=hf", "--in={empty}", "--config=" + SMOKE],
        "{empty} is a directory without any of",
    ),
    (
        ["--workdir={absent}", "--from=hf", "--in={hf}", "--config={absent}.py"],
        "--config cannot be loaded",
    ),
    (
        ["--workdir={absent}", "--from=hf", "--in={hf}", "--config=" + SMOKE, "--config.seq_len=0"],
        "--config: config.seq_len must be >= 2, got 0",
    ),
    (
        ["--workdir={used}", "--from=hf", "--in={hf}", "--config=" + SMOKE],
        "{used} already holds checkpoints",
    ),
    (
        ["--workdir={file}", "--from=hf", "--in={hf}", "--config=" + SMOKE],
        "is not a directory",
    ),
]
COMPARE_BAD = [
    (["--out={tmp}/r.md"], "--workdirs must have a value"),
    (["--workdirs={run},{absent}", "--out={tmp}/r.md"], "{absent} does not exist"),
    (["--workdirs={run}", "--out={empty}"], "{empty} exists and is a directory"),
    (["--workdirs={run}", "--out={file}/r.md"], "{file} is a file, not a folder"),
    (["--workdirs={run}", "--out={tmp}/r.md", "--names=a,b"], "2 --names for 1 --workdirs"),
    (["--workdirs={run},{empty}", "--out={tmp}/r.md", "--names=a,a"], "--names must differ"),
    (["--workdirs={run}", "--out={tmp}/r.md", "--intro={absent}.md"], "does not exist"),
    (["--workdirs={run}", "--out={tmp}/r.md", "--appendix={absent}.md"], "does not exist"),
    (["--workdirs={run}", "--out={tmp}/r.md", "--plots_dir={file}"], "is not a directory"),
]
BAD = (
    [(sample, *case) for case in SAMPLE_BAD]
    + [(evaluate, *case) for case in EVALUATE_BAD]
    + [(convert, *case) for case in CONVERT_BAD]
    + [(compare, *case) for case in COMPARE_BAD]
)


@pytest.mark.parametrize(
    ("module", "args", "expected"), BAD, ids=[f"{m.__name__.split('.')[-1]}" for m, *_ in BAD]
)
def test_a_bad_argument_fails_the_parse(paths, module, args, expected):
    message = _error(module, [a.format(**paths) for a in args])
    assert expected.format(**paths) in message


GOOD = [
    (sample, ["--workdir={run}", "--top_p=1", "--min_p=0", "--temperature=0", "--top_k=0"]),
    (sample, ["--workdir={run}", "--top_p=1e-6", "--min_p=0.999", "--prompt=é"]),
    (evaluate, ["--workdir={run}", "--mode=window", "--max_bytes=2"]),
    (evaluate, ["--workdir={run}", "--mode=window", "--max_bytes=4", "--num_streams=3"]),
    (evaluate, ["--workdir={run}", "--call_length=1", "--num_streams=2", "--max_bytes=4"]),
    (convert, ["--workdir={run}", "--to=hf", "--out={tmp}/new_dir", "--dtype=bfloat16"]),
    (convert, ["--workdir={run}", "--to=upstream", "--out={tmp}/u.safetensors"]),
    (convert, ["--workdir={absent}/new", "--from=hf", "--in={hf}", "--config=" + SMOKE]),
    (
        convert,
        ["--workdir={empty}", "--from=upstream", "--in={weights}", "--config=" + SMOKE],
    ),
    (compare, ["--workdirs={run},{empty}", "--out={tmp}/new/sub/r.md", "--names=a,b"]),
]


@pytest.mark.parametrize(
    ("module", "args"), GOOD, ids=[f"{m.__name__.split('.')[-1]}" for m, _ in GOOD]
)
def test_boundary_values_parse(paths, module, args):
    _parse(module, [a.format(**paths) for a in args])


def test_the_error_is_one_line_without_the_config_dump(paths, monkeypatch, capsys):
    """absl lists every flag value of a failed multi-flag check, a whole --config included;
    `parse_checked_flags` prints the message alone, on one line."""
    fv = flags.FlagValues()
    convert.define_flags(fv)
    monkeypatch.setattr(common.flags, "FLAGS", fv)
    argv = ["prog", f"--workdir={paths['absent']}", "--from=hf", f"--in={paths['file']}"]
    with pytest.raises(SystemExit) as info:
        common.parse_checked_flags([*argv, f"--config={SMOKE}", "--seed=-1"])
    assert info.value.code == "error: Unknown command line flag 'seed'"
    fv = flags.FlagValues()
    convert.define_flags(fv)
    monkeypatch.setattr(common.flags, "FLAGS", fv)
    with pytest.raises(SystemExit) as info:
        common.parse_checked_flags([*argv, f"--config={SMOKE}"])
    assert info.value.code == (
        f"error: --in={paths['file']} is not a .safetensors/.pt/.bin/.pth file or a model directory"
    )


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", f"megalodon_flax.cli.{module}", *args],
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    ("module", "args", "expected"),
    [
        (
            "evaluate",
            ["--call_length=-3"],
            "error: flag --call_length=-3: -3 is not a non-negative",
        ),
        ("sample", ["--top_p=2"], "error: flag --top_p=2.0: must be in (0, 1] (1 = off)"),
        ("convert", ["--to=hf", "--out=m.safetensors"], "error: --to=hf writes a directory"),
        ("compare", ["--names=a,b"], "error: 2 --names for 1 --workdirs"),
    ],
)
def test_the_programs_stop_before_loading_with_one_line(tmp_path, module, args, expected):
    # The workdir's config.json is garbage: reading it would fail with another message.
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{not json")
    place = "--workdirs" if module == "compare" else "--workdir"
    extra = [f"--out={tmp_path / 'r.md'}"] if module == "compare" else []
    proc = _run(module, f"{place}={tmp_path / 'run'}", *extra, *args)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]  # one line, no traceback
    assert proc.stderr.strip().startswith(expected), proc.stderr
