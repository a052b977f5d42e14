"""The Llama baseline of the enwik8 experiment: 12,489,600 parameters, same training settings.

Run with `python main.py --config=configs/llama.py --workdir=runs/llama`. Every training
field comes from `configs/megalodon.py`; only `model_family` and `model` differ.
"""

import ml_collections

from configs import megalodon


def get_model_config() -> ml_collections.ConfigDict:
    """Fields of `megalodon_flax.llama.LlamaConfig` (same names, see its docstring)."""
    model = ml_collections.ConfigDict()
    # Byte-level vocabulary (also the width of the tied LM head).
    model.vocab_size = 256
    # Model width D.
    model.model_dim = 384
    # Transformer blocks.
    model.num_layers = 6
    # Attention heads of width model_dim / num_heads = 64.
    model.num_heads = 6
    # SwiGLU hidden width F (sets the total to 12,489,600 parameters).
    model.ffn_hidden_dim = 1280
    # RoPE base.
    model.rope_base = 10000.0
    # Epsilon of the RMSNorms.
    model.norm_eps = 1e-5
    # Dropout on the embeddings and sub-block outputs.
    model.dropout = 0.0
    # Dropout on the attention probabilities.
    model.attention_dropout = 0.0
    # Standard deviation of the normal weight initialization.
    model.init_std = 0.02
    # Storage dtype of the parameters: float32 or bfloat16 (float16 is rejected).
    model.param_dtype = "float32"
    # Dtype of matmul inputs and activations, as in configs/megalodon.py.
    model.compute_dtype = "bfloat16"
    # Rematerialize each block in the backward pass.
    model.remat = False
    return model


def get_config() -> ml_collections.ConfigDict:
    """Returns the Megalodon training config with the Llama model swapped in."""
    config = megalodon.get_config()
    config.model_family = "llama"
    config.model = get_model_config()
    return config
