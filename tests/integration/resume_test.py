"""A training run killed with SIGKILL right after a checkpoint resumes when rerun.

Oracle: the uninterrupted run of the same config; from the checkpoint on, every logged scalar
and the final checkpoint of the resumed run equal it bitwise.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from megalodon_flax.training import loop
from megalodon_flax.training.errors import ResumeMismatchError
from megalodon_flax.training.setup import setup_training
from tests import helpers
from tests.factories import tiny_train_config

# ------------------------------------------------------------------------- kill and resume
_CHILD = """
import os, signal
from tests import helpers
from megalodon_flax.training import checkpointing, loop

config = helpers.config_from_json({config!r})
kill_at = {kill_at}
if kill_at:
    original = checkpointing.save

    def save_then_die(manager, step, *args, **kwargs):
        original(manager, step, *args, **kwargs)
        if step == kill_at:
            manager.wait_until_finished()
            os.kill(os.getpid(), signal.SIGKILL)

    checkpointing.save = save_then_die
loop.train_and_evaluate(config, {workdir!r})
"""


def _child(config, workdir: Path, kill_at: int = 0, expect_kill: bool = False) -> None:
    code = _CHILD.format(
        config=helpers.config_to_json(config), workdir=str(workdir), kill_at=kill_at
    )
    if not expect_kill:
        helpers.run_python(code)
        return
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=helpers.REPO_ROOT,
        env=helpers.subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]


def _killable_config(data: dict, num_train_steps: int):
    """A checkpoint at step 3 (where the child dies), evaluation only at the end."""
    return tiny_train_config(
        data=data,
        num_train_steps=num_train_steps,
        checkpoint={"every_steps": 3},
        eval={"every_steps": 100},
        sampling={"every_steps": 0},
        log_every_steps=1,
        optimizer={"learning_rate": 5e-3},
    )


@pytest.mark.slow
def test_sigkill_after_checkpoint_then_rerun_matches_uninterrupted_bitwise(
    tmp_path: Path, enwik8_data
) -> None:
    config = _killable_config(enwik8_data, num_train_steps=8)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _child(config, straight)
    _child(config, killed, kill_at=3, expect_kill=True)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
    runs_before = len(helpers.event_files(killed))
    _child(config, killed)  # the same command again: resumes from step 3
    rerun_files = helpers.event_files(killed)[runs_before:]
    assert len(rerun_files) == 1
    # The rerun trained only steps 4..8: it resumed rather than starting over.
    assert sorted(helpers.read_scalars(killed, "train_loss", rerun_files)) == [4, 5, 6, 7, 8]

    for tag in ("train_loss", "grad_norm", "learning_rate", "eval_loss"):
        want = helpers.read_scalars(straight, tag)
        got = helpers.read_scalars(killed, tag)
        steps = [s for s in sorted(want) if s > 3]
        assert steps, tag
        for s in steps:
            assert got[s] == want[s], (tag, s, got[s], want[s])  # bitwise
    setup = setup_training(config)
    _, a, data_a = helpers.restore_checkpoint(straight, setup)
    _, b, data_b = helpers.restore_checkpoint(killed, setup)
    assert data_a == data_b == {"step": 8, "train_iterator": {"step": 8}}
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _text_corpus(root: Path, n: int = 60) -> Path:
    """A folder of .txt files and a .jsonl dump of random-length documents."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "packed", "rows", "reset", "\u00fcber"]

    def text() -> str:
        return " ".join(rng.choice(words, rng.integers(1, 30)).tolist()) + "\n"

    root.mkdir()
    for i in range(n // 2):
        (root / f"doc{i:03d}.txt").write_text(text(), encoding="utf-8")
    lines = [json.dumps({"id": i, "text": text()}) for i in range(n - n // 2)]
    (root / "dump.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.mark.slow
def test_packed_text_files_run_killed_and_rerun_matches_uninterrupted_bitwise(
    tmp_path: Path,
) -> None:
    corpus = _text_corpus(tmp_path / "corpus")
    data = {"source": "text_files", "text_paths": str(corpus), "eval_fraction": 0.1}
    config = _killable_config(data, num_train_steps=6)
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _child(config, straight)
    _child(config, killed, kill_at=3, expect_kill=True)
    _child(config, killed)
    for tag in ("train_loss", "grad_norm", "eval_loss"):
        want, got = helpers.read_scalars(straight, tag), helpers.read_scalars(killed, tag)
        steps = [s for s in sorted(want) if s > 3]
        assert steps, tag
        assert [got[s] for s in steps] == [want[s] for s in steps], tag  # bitwise
    setup = setup_training(config)
    _, a, data_a = helpers.restore_checkpoint(straight, setup)
    _, b, data_b = helpers.restore_checkpoint(killed, setup)
    assert data_a == data_b and data_a["train_iterator"]["num_documents"] == 54
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # With a document more, the saved position no longer points into the same corpus: the
    # rerun refuses before anything in the workdir changes.
    (corpus / "extra.txt").write_text("one more document\n", encoding="utf-8")
    listing = sorted(p.name for p in (killed / "checkpoints").iterdir())
    longer = tiny_train_config(data=data, num_train_steps=9)
    with pytest.raises(
        ResumeMismatchError,
        match="corpus changed since the checkpoint: 54 training documents then, 55 now",
    ):
        loop.train_and_evaluate(longer, str(killed))
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == listing
