"""Multi-process training: 2 processes x 2 CPU devices (gloo) against 1 process x 4 devices.

Oracle: the single-process 4-device run of the same config (float32 scalars within 1e-5).
"""

from __future__ import annotations

import re
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests import helpers

_CONFIG = """
from tests.factories import tiny_train_config_dict


def get_config():
    return tiny_train_config_dict(
        data={{"data_dir": {data_dir!r}, "manual_dir": {manual_dir!r}}},
        num_train_steps=4,
        log_every_steps=1,
        eval={{"every_steps": 2}},
        checkpoint={{"every_steps": 2}},
        sampling={{"every_steps": 4}},
        optimizer={{"learning_rate": 5e-3}},
    )
"""


def _logged_scalars(log: str, key: str) -> dict[int, float]:
    """Parses clu LoggingWriter lines `[step] a=1, b=2` for `key`."""
    out = {}
    for step, body in re.findall(r"\] \[(\d+)\] (.*)", log):
        for item in body.split(", "):
            name, _, value = item.partition("=")
            if name == key:
                out[int(step)] = float(value)
    return out


@pytest.mark.slow
def test_two_processes_match_one_process_with_four_devices(tmp_path: Path, enwik8_data) -> None:
    config_path = tmp_path / "tiny_config.py"
    config_path.write_text(textwrap.dedent(_CONFIG.format(**enwik8_data)))

    single = tmp_path / "single"
    proc = subprocess.run(
        helpers.main_command(config_path, single),
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(num_devices=4),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]

    multi = tmp_path / "multi"
    port = helpers.free_port()
    commands = [
        helpers.main_command(
            config_path,
            multi,
            f"--coordinator_address=127.0.0.1:{port}",
            "--num_processes=2",
            f"--process_id={i}",
        )
        for i in range(2)
    ]
    results = helpers.run_together(commands, env=helpers.subprocess_env(num_devices=2))
    for i, result in enumerate(results):
        assert result.returncode == 0, f"process {i}:\n{result.stderr[-6000:]}"
    logs = [result.stderr for result in results]
    for i, log in enumerate(logs):
        assert f"Process {i}/2" in log
        assert "4 global devices" in log

    # Process 0 writes TensorBoard; its float32 scalars match the 4-device run.
    for tag in ("train_loss", "grad_norm", "eval_loss"):
        want = helpers.read_scalars(single, tag)
        got = helpers.read_scalars(multi, tag)
        assert sorted(got) == sorted(want) and want, tag
        for step in want:
            np.testing.assert_allclose(got[step], want[step], rtol=1e-5, err_msg=f"{tag} {step}")
    # Both processes log the same losses (6 significant digits in the log).
    want = helpers.read_scalars(single, "train_loss")
    for i, log in enumerate(logs):
        got = _logged_scalars(log, "train_loss")
        assert sorted(got) == [1, 2, 3, 4], f"process {i}"
        for step, value in got.items():
            np.testing.assert_allclose(value, want[step], rtol=1e-5, err_msg=f"process {i}")
    # Every process took part in the checkpoints; both steps are complete.
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == [
        "2",
        "4",
    ]
