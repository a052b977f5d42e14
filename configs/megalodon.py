"""The enwik8 experiment: an 11,277,696-parameter Megalodon trained on bytes.

Run with `python main.py --config=configs/megalodon.py --workdir=runs/megalodon`. The
experiment is the default `TrainConfig` (`megalodon_flax/training/config.py` documents every
field); override any field on the command line, e.g. `--config.seed=3`,
`--config.model.num_layers=4` or `--config.optimizer.learning_rate=1e-3`.
"""

import ml_collections

from megalodon_flax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the enwik8 training configuration."""
    return default_config()
