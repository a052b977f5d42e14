"""The Llama baseline of the enwik8 experiment: 12,489,600 parameters, same training settings.

Run with `python main.py --config=configs/llama.py --workdir=runs/llama`. Only the model
differs from `configs/megalodon.py`: `LlamaConfig`'s defaults (dim 384, 6 layers, 6 heads of
64, SwiGLU 1,280) with the same bf16 compute.
"""

import ml_collections

from megalodon_flax.llama import LlamaConfig
from megalodon_flax.training.config import default_config, model_config_dict


def get_config() -> ml_collections.ConfigDict:
    """Returns the Megalodon training config with the Llama model swapped in."""
    config = default_config()
    config.model_family = "llama"
    config.model = model_config_dict(LlamaConfig(compute_dtype="bfloat16"))
    return config
