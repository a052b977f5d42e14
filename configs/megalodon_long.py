"""Long-context enwik8: the enwik8 model trained on 65,536-byte sequences, each split along
time over the mesh's `context` axis (every device holds 65,536 / P bytes of a sequence).

Run with `python main.py --config=configs/megalodon_long.py --workdir=runs/long`. Every
device of the machine joins the context axis (`mesh.shape = (1, 1, 1, -1)`); the sequence
length must be divisible by the context size × the chunk size (256), so any power of two up
to 256 devices works. On more devices than you want on the context axis, give the rest to
data parallelism, e.g. `--config.mesh.shape='(2,1,1,-1)'` with `--config.batch_size=2`.
The memory a device needs at each context size is measured by
`benchmarks/bench_context_parallel.py` (see README, "Context parallelism").
"""

import ml_collections

from megalodon_flax.training.config import default_config


def get_config() -> ml_collections.ConfigDict:
    """Returns the enwik8 configuration at 65,536 bytes per sequence over a context axis."""
    config = default_config()
    config.seq_len = 65536
    config.batch_size = 1
    # The 1,200-step enwik8 schedule sees 16 × 512 bytes per step; one 64K sequence is 8×
    # that, so 150 steps train on the same number of bytes.
    config.num_train_steps = 150
    config.schedule.warmup_steps = 20
    config.log_every_steps = 5
    config.mesh.shape = (1, 1, 1, -1)
    config.eval.update(batch_size=1, num_batches=4, every_steps=50)
    config.checkpoint.every_steps = 50
    config.sampling.every_steps = 50
    return config
