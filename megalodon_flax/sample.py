"""Generate text from a trained run.

  python -m megalodon_flax.sample --workdir=runs/megalodon --prompt="The " \
      --max_new_tokens=256 --temperature=0.8
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from absl import app, flags

from megalodon_flax import inference
from megalodon_flax.workdir import load_trained_run

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints/).")
flags.DEFINE_string("prompt", "The ", "Prompt text (encoded as UTF-8 bytes).")
flags.DEFINE_integer("max_new_tokens", 256, "Bytes to generate.")
flags.DEFINE_float("temperature", 0.8, "Sampling temperature (0 = greedy).")
flags.DEFINE_integer("top_k", 0, "Keep the k most likely bytes (0 = off).")
flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
flags.DEFINE_float("min_p", 0.0, "Keep bytes with p >= min_p * p_max (0 = off).")
flags.DEFINE_integer("num_samples", 1, "Independent samples of the same prompt.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.mark_flags_as_required(["workdir"])


def encode(text: str) -> np.ndarray:
    """UTF-8 bytes of `text` as int32 token ids (1, P)."""
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)[None]


def decode(tokens: np.ndarray) -> str:
    """Bytes → text, invalid UTF-8 replaced."""
    return bytes(np.asarray(tokens, np.uint8).tolist()).decode("utf-8", errors="replace")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    prompt = encode(FLAGS.prompt)
    if prompt.size == 0:
        raise app.UsageError("--prompt must not be empty")
    try:
        run = load_trained_run(FLAGS.workdir)
    except FileNotFoundError as err:
        sys.exit(f"error: {err}")
    prompts = np.repeat(prompt, FLAGS.num_samples, axis=0)
    tokens = inference.generate(
        run.model,
        run.params,
        prompts,
        FLAGS.max_new_tokens,
        jax.random.key(FLAGS.seed),
        temperature=FLAGS.temperature,
        top_k=FLAGS.top_k,
        top_p=FLAGS.top_p,
        min_p=FLAGS.min_p,
    )
    for row in np.asarray(tokens):
        print(FLAGS.prompt + decode(row))


if __name__ == "__main__":
    app.run(main)
