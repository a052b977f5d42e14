"""The test helpers that run child processes together.

Oracle: what the children report they did (the bytes written, the marker seen).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tests import helpers

_LOUD = "import sys; sys.stderr.write('x' * 1_000_000); open(sys.argv[1], 'w').close()"
_WAITS = """
import os, sys, time
deadline = time.monotonic() + 60
while not os.path.exists(sys.argv[1]):
    assert time.monotonic() < deadline, "the other process never got past its output"
    time.sleep(0.05)
print("saw marker")
"""


def test_run_together_never_blocks_a_process_on_its_output(tmp_path: Path) -> None:
    """A process that writes more than a pipe holds finishes while the first one waits for
    it (a pipe read only after the first process ends would block it forever)."""
    marker = str(tmp_path / "marker")
    waits = [sys.executable, "-c", _WAITS, marker]
    loud = [sys.executable, "-c", _LOUD, marker]
    first, second = helpers.run_together([waits, loud], env=helpers.subprocess_env(), timeout=120)
    assert (first.returncode, first.stdout.strip()) == (0, "saw marker")
    assert (second.returncode, len(second.stderr)) == (0, 1_000_000)


def test_run_together_kills_what_outlives_the_timeout() -> None:
    start = time.monotonic()
    quick = [sys.executable, "-c", "print('done')"]
    stuck = [sys.executable, "-c", "import time; time.sleep(120)"]
    done, killed = helpers.run_together([quick, stuck], env=helpers.subprocess_env(), timeout=3)
    assert time.monotonic() - start < 60
    assert (done.returncode, done.stdout.strip()) == (0, "done")
    assert killed.returncode < 0  # ended by a signal
