"""Generates text from a trained run.

    python -m megalodon_flax.cli.sample --workdir=runs/megalodon --prompt="The " \
        --max_new_tokens=256 --temperature=0.8
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from megalodon_flax import sampling
from megalodon_flax.cli import common
from megalodon_flax.data import codec

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_string("prompt", "The ", "Prompt text (encoded as UTF-8 bytes).")
flags.DEFINE_integer("max_new_tokens", 256, "Bytes to generate.", lower_bound=1)
flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).", lower_bound=0.0)
flags.DEFINE_integer("top_k", 0, "Keep the k most likely bytes (0 = off).", lower_bound=0)
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_float("min_p", 0.0, "Keep bytes with p >= min_p * p_max (0 = off).")
flags.DEFINE_integer("num_samples", 1, "Independent samples of the same prompt.", lower_bound=1)
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    prompt = codec.encode(FLAGS.prompt)
    if prompt.size == 0:
        raise app.UsageError("--prompt must not be empty")
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
    app.run(main)
