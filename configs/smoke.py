"""A tiny variant of the enwik8 experiment that trains in seconds on a CPU."""

import ml_collections

from configs import megalodon


def get_config() -> ml_collections.ConfigDict:
    """Returns the enwik8 config shrunk to a 2-layer, 32-wide float32 model."""
    config = megalodon.get_config()
    config.model.model_dim = 32
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.z_dim = 16
    config.model.value_dim = 32
    config.model.ffn_hidden_dim = 64
    config.model.cema_ndim = 4
    config.model.chunk_size = 32
    config.model.norm_num_groups = 4
    config.model.compute_dtype = "float32"

    config.seq_len = 64
    config.batch_size = 8
    config.num_train_steps = 60
    config.learning_rate = 3e-3
    config.warmup_steps = 10
    config.log_every_steps = 10
    config.eval_every_steps = 30
    config.num_eval_batches = 4
    config.eval_batch_size = 8
    config.checkpoint_every_steps = 30
    config.sample_every_steps = 30
    config.sample_length = 32
    config.profile_num_steps = 0
    config.report_every_secs = 10.0
    return config
