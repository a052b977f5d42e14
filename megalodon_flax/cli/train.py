"""Trains a model (Megalodon on enwik8 by default); `main.py` runs this.

    python main.py --config=configs/megalodon.py --workdir=runs/megalodon

Any config field can be overridden, e.g. `--config.seed=3 --config.model.num_layers=4
--config.optimizer.learning_rate=1e-3`. Multi-process runs join with
`--coordinator_address=host:port --num_processes=N --process_id=i` (or the
JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID environment variables, or
`--distributed` for cluster auto-detection).
"""

from __future__ import annotations

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from megalodon_flax import sharding
from megalodon_flax.cli import common
from megalodon_flax.config_base import ConfigError
from megalodon_flax.data.documents import CorpusError
from megalodon_flax.data.enwik8 import Enwik8UnavailableError
from megalodon_flax.data.source_file import Enwik8FileError
from megalodon_flax.data.tokenization import TokenizerError
from megalodon_flax.training import loop
from megalodon_flax.training.errors import TrainingError

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Where checkpoints, TensorBoard files and config go.")
config_flags.DEFINE_config_file(
    "config", None, "Path to a config file, e.g. configs/megalodon.py.", lock_config=True
)
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
flags.DEFINE_integer("process_id", None, "Index of this process (multi-process).")
flags.DEFINE_bool("distributed", False, "Join a multi-process run detected from the cluster.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = common.train_config(FLAGS.config)
    sharding.initialize_distributed(
        FLAGS.coordinator_address,
        FLAGS.num_processes,
        FLAGS.process_id,
        auto_detect=FLAGS.distributed,
    )
    logging.info(
        "Process %d/%d, devices: %s", jax.process_index(), jax.process_count(), jax.devices()
    )
    try:
        loop.train_and_evaluate(config, FLAGS.workdir)
    except ConfigError as err:  # a mesh or batch that does not fit the devices
        common.fail(str(err))
    except (
        TrainingError,
        Enwik8FileError,
        Enwik8UnavailableError,
        CorpusError,
        TokenizerError,
    ) as err:
        # a checkpoint, workdir lock, non-finite training or data-file error
        logging.flush()
        common.fail(str(err))


def run() -> None:
    """Parses the flags (JAX's included) and trains."""
    jax.config.config_with_absl()
    app.run(main, flags_parser=common.parse_flags)


if __name__ == "__main__":
    run()
