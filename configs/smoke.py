"""A tiny variant of the enwik8 experiment that trains in seconds on a CPU."""

import ml_collections

from megalodon_flax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the enwik8 config shrunk to a 2-layer, 32-wide float32 model."""
    config = default_config()
    config.model.update(
        model_dim=32,
        num_layers=2,
        num_heads=2,
        z_dim=16,
        value_dim=32,
        ffn_hidden_dim=64,
        cema_ndim=4,
        chunk_size=32,
        norm_num_groups=4,
        compute_dtype="float32",
    )
    config.seq_len = 64
    config.batch_size = 8
    config.num_train_steps = 60
    config.log_every_steps = 10
    config.report_every_secs = 10.0
    config.optimizer.learning_rate = 3e-3
    config.schedule.warmup_steps = 10
    config.eval.update(every_steps=30, num_batches=4, batch_size=8)
    config.checkpoint.every_steps = 30
    config.sampling.update(every_steps=30, length=32)
    config.profile.num_steps = 0
    return config
