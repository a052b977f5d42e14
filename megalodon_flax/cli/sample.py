"""Generates text from a trained run.

    python -m megalodon_flax.cli.sample --workdir=runs/megalodon --prompt="The " \
        --max_new_tokens=256 --temperature=0.8

Every argument is checked when the flags are parsed, before the run is loaded; a bad one
ends the program with one line naming the flag.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from absl import app, flags

from megalodon_flax import sampling
from megalodon_flax.cli import common
from megalodon_flax.data import codec

FLAGS = flags.FLAGS


def _finite(value: float) -> str | None:
    return None if math.isfinite(value) else "must be a finite number"


def _prompt_problem(prompt: str) -> str | None:
    try:
        return None if codec.encode(prompt).size else "must not be empty"
    except UnicodeEncodeError as err:
        return f"is not valid text ({err.reason} at character {err.start})"


def define_flags(fv: flags.FlagValues = FLAGS) -> None:
    """Defines this program's flags and their checks on `fv` (tests pass their own)."""
    flags.DEFINE_string(
        "workdir", None, "Training workdir (config.json + checkpoints/).", flag_values=fv
    )
    flags.DEFINE_string(
        "prompt", "The ", "Prompt text (UTF-8 bytes, at least one).", flag_values=fv
    )
    flags.DEFINE_integer("max_new_tokens", 256, "Bytes to generate.", lower_bound=1, flag_values=fv)
    flags.DEFINE_float(
        "temperature", 0.8, "Sampling temperature (0 = greedy).", lower_bound=0.0, flag_values=fv
    )
    flags.DEFINE_integer(
        "top_k", 0, "Keep the k most likely bytes (0 = off).", lower_bound=0, flag_values=fv
    )
    flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1 = off).", flag_values=fv)
    flags.DEFINE_float(
        "min_p", 0.0, "Keep bytes with p >= min_p * p_max, in [0, 1) (0 = off).", flag_values=fv
    )
    flags.DEFINE_integer(
        "num_samples", 1, "Independent samples of the same prompt.", lower_bound=1, flag_values=fv
    )
    flags.DEFINE_integer("seed", 0, "PRNG seed.", lower_bound=0, flag_values=fv)
    flags.mark_flags_as_required(["workdir"], flag_values=fv)
    common.check_flag("workdir", common.existing_dir_problem, fv)
    common.check_flag("prompt", _prompt_problem, fv)
    common.check_flag("temperature", _finite, fv)
    common.check_flag(
        "top_p", lambda p: None if 0.0 < p <= 1.0 else "must be in (0, 1] (1 = off)", fv
    )
    common.check_flag(
        "min_p", lambda p: None if 0.0 <= p < 1.0 else "must be in [0, 1) (0 = off)", fv
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {argv[1:]}")
    prompt = codec.encode(FLAGS.prompt)  # bytes: token ids of every run (vocab >= 256)
    run = common.restore_run(FLAGS.workdir)
    tokens = sampling.generate(
        run.model,
        run.params,
        np.repeat(prompt[None], FLAGS.num_samples, axis=0),
        FLAGS.max_new_tokens,
        jax.random.key(FLAGS.seed),
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        min_p=FLAGS.min_p,
    )
    for row in np.asarray(tokens):
        print(FLAGS.prompt + codec.decode(row))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_checked_flags)
