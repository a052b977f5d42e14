"""`main.py` stops on a bad config with one `error: ...` line and status 1, before any work.

Oracle: the expected message for each bad flag, and no workdir created.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests import helpers


@pytest.mark.parametrize(
    ("arg", "expect"),
    [
        ("--config.not_a_field=1", "config.not_a_field"),
        ("--config.seq_len=1", "config.seq_len must be >= 2"),
        ("--config.optimizer.learning_rate=0", "config.optimizer.learning_rate must be > 0"),
        ("--config.model.compute_dtype=float16", "compute_dtype=float16 is not supported"),
        ("--config.mesh.shape=(64,1,1,1)", "config.mesh.shape (64, 1, 1, 1) (axes"),
        ("--config=configs/no_such_config.py", "No such file or directory"),
    ],
)
def test_main_exits_with_a_message_naming_the_problem(tmp_path: Path, arg, expect) -> None:
    """A bad config ends main.py with status 1 and one line `error: ...`, no traceback."""
    workdir = tmp_path / "w"
    proc = subprocess.run(
        [
            sys.executable,
            str(helpers.REPO_ROOT / "main.py"),
            f"--config={helpers.REPO_ROOT / 'configs' / 'smoke.py'}",
            f"--workdir={workdir}",
            arg,
        ],
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and expect in errors[0], proc.stderr[-3000:]
    assert proc.stderr.rstrip().endswith(errors[0])
    assert not workdir.exists()
