"""The enwik8 experiment: an 11,277,696-parameter Megalodon trained on bytes.

Run with `python main.py --config=configs/megalodon.py --workdir=runs/megalodon`; override any
field on the command line, e.g. `--config.seed=3` or `--config.model.num_layers=4`.
"""

import ml_collections
from ml_collections import config_dict

from megalodon_flax.sharding import DEFAULT_LOGICAL_AXIS_RULES


def get_model_config() -> ml_collections.ConfigDict:
    """Fields of `megalodon_flax.config.MegalodonConfig` (same names, see its docstring)."""
    model = ml_collections.ConfigDict()
    # Byte-level vocabulary.
    model.vocab_size = 256
    # Model width D.
    model.model_dim = 384
    # Number of Megalodon blocks.
    model.num_layers = 6
    # Attention heads (share the Q/K width z_dim and the value width value_dim).
    model.num_heads = 3
    # Shared Q/K width Z.
    model.z_dim = 192
    # Value / gate width E.
    model.value_dim = 384
    # FFN hidden width F.
    model.ffn_hidden_dim = 1024
    # CEMA order N (complex EMA dimensions per channel).
    model.cema_ndim = 8
    # Attention chunk length C: 256 gives two chunks per 512-byte sequence.
    model.chunk_size = 256
    # Groups of TimestepNorm.
    model.norm_num_groups = 32
    # Dropout on the embedding and block outputs.
    model.dropout = 0.0
    # Dropout on the attention probabilities.
    model.attention_dropout = 0.0
    # Dropout inside the blocks (CEMA output, gated attention, FFN hidden).
    model.hidden_dropout = 0.0
    # SwiGLU FFN (adds fc3).
    model.swiglu = True
    # Rescale the FFN output per layer.
    model.rescale_nffn = False
    # Multiply embeddings by sqrt(D).
    model.scale_emb = False
    # Tie the LM head to the embedding (with tie_policy 'explicit').
    model.share_emb = False
    # Learnable scales and offsets in the norms.
    model.norm_affine = True
    # Epsilon of all norms.
    model.norm_eps = 1e-5
    # Weight initialization: he, bert, gaussian or xavier.
    model.init_mode = "he"
    # RoPE base (None: 10000).
    model.rope_base = config_dict.placeholder(float)
    # LM-head width (-1: vocab_size).
    model.output_size = -1
    # Padding token id.
    model.pad_token_id = 0
    # Beginning-of-sequence token id.
    model.bos_token_id = 1
    # End-of-sequence token id.
    model.eos_token_id = 2
    # Biases on all 8 internal linears ('hf') or only on wz, wv, wr, wh1 ('upstream').
    model.bias_topology = "hf"
    # Tie the head iff its width equals the vocabulary ('hf') or iff share_emb ('explicit').
    model.tie_policy = "hf"
    # TimestepNorm statistics: 'upstream' (block Welford) or 'hf'.
    model.timestep_norm_variant = "upstream"
    # RoPE pairs: 'adjacent' (2j, 2j+1) or 'half_split' (j, j + Dh/2).
    model.rope_layout = "adjacent"
    # CEMA algorithm for training: 'fft', 'scan' or 'sequential'.
    model.cema_path = "fft"
    # Cached calls shorter than this use the sequential CEMA recurrence.
    model.sequential_cema_below = 32
    # Lags per block when building CEMA powers.
    model.cema_block_size = 4096
    # Storage dtype of ordinary parameters: float32 or bfloat16 (float16 is rejected).
    model.param_dtype = "float32"
    # Dtype of matmul inputs and activations: float32 or bfloat16 (float16 is rejected).
    model.compute_dtype = "bfloat16"
    # Rematerialize each block in the backward pass (saves memory, costs compute).
    model.remat = False
    # Zero padded inputs before CEMA (False: megalodon-hf behaviour).
    model.mask_cema_inputs = True
    # Dropout on the embeddings too (False: megalodon-hf behaviour).
    model.embedding_dropout = True
    return model


def get_config() -> ml_collections.ConfigDict:
    """Returns the enwik8 training configuration."""
    config = ml_collections.ConfigDict()
    # Model family: 'megalodon' or the 'llama' baseline (configs/llama.py).
    config.model_family = "megalodon"
    # Model hyper-parameters, mapped 1:1 onto MegalodonConfig.
    config.model = get_model_config()

    # Seed of the parameter init, the dropout RNG and the training-window offsets.
    config.seed = 7
    # Bytes per training sequence (windows hold seq_len + 1 bytes).
    config.seq_len = 512
    # Global micro-batch: sequences per forward/backward pass, over all devices.
    config.batch_size = 16
    # Micro-batches per update; the effective batch is batch_size * grad_accum_steps = 16.
    config.grad_accum_steps = 1
    # Number of optimizer updates.
    config.num_train_steps = 1200

    # Peak learning rate of AdamW.
    config.learning_rate = 4e-4
    # Learning-rate shape after warmup: 'cosine', 'linear', 'rsqrt' or 'constant'.
    config.lr_schedule = "cosine"
    # Linear warmup from 0 over this many steps (0: none).
    config.warmup_steps = 100
    # Final learning rate of the cosine / linear decay as a fraction of the peak.
    config.min_lr_ratio = 0.1
    # AdamW beta1.
    config.adam_b1 = 0.9
    # AdamW beta2.
    config.adam_b2 = 0.98
    # AdamW epsilon.
    config.adam_eps = 1e-8
    # Decoupled weight decay of AdamW.
    config.weight_decay = 2e-4
    # Parameters that decay: 'all' or 'matrices' (ndim >= 2; skips norms, biases, CEMA vectors).
    config.weight_decay_mask = "all"
    # Clip gradients to this global norm (0: no clipping).
    config.grad_clip_norm = 1.0

    # Write training scalars every this many steps.
    config.log_every_steps = 10
    # Evaluate on the validation split every this many steps (and after the last step).
    config.eval_every_steps = 100
    # Validation batches per evaluation (-1: the whole split).
    config.num_eval_batches = 100
    # Global batch of evaluation.
    config.eval_batch_size = 16
    # Save a checkpoint every this many steps (and after the last step).
    config.checkpoint_every_steps = 500
    # Checkpoints kept on disk.
    config.max_checkpoints_to_keep = 3
    # Write checkpoints in the background.
    config.async_checkpointing = True
    # Seconds between ReportProgress lines (steps/s, ETA).
    config.report_every_secs = 60.0

    # Generate a text sample every this many steps (0: never).
    config.sample_every_steps = 200
    # Prompt of the text sample (UTF-8 bytes).
    config.sample_prompt = "<page>\n    <title>"
    # Bytes generated per sample.
    config.sample_length = 256
    # Sampling temperature (0: greedy).
    config.sample_temperature = 1.0
    # Top-k filter of sampling (0: off).
    config.sample_top_k = 0
    # Nucleus (top-p) filter of sampling (1.0: off).
    config.sample_top_p = 0.95

    # Capture a profile trace (TensorBoard profile plugin) of this many steps (0: never).
    config.profile_num_steps = 5
    # Step at which the profile trace starts.
    config.profile_first_step = 10

    # Mesh sizes along (data, fsdp, tensor); one -1 absorbs the remaining devices.
    config.mesh_shape = (-1, 1, 1)
    # Logical axis name -> mesh axes; see megalodon_flax/sharding.py.
    config.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

    # tfds data directory (None: $TFDS_DATA_DIR or ~/tensorflow_datasets).
    config.data_dir = config_dict.placeholder(str)
    # Directory holding the full enwik8.zip (None: <data_dir>/downloads/manual).
    config.manual_dir = config_dict.placeholder(str)
    # Use the bundled 4 MB sample (with a loud warning) when the full file is unavailable.
    config.allow_sample_fallback = True
    # Split used for evaluation: 'validation' or 'test'.
    config.eval_split = "validation"
    # Evaluation kind: 'window' (fresh state per seq_len window), 'stream' (state carried
    # over the split, constant memory) or 'both'.
    config.eval_mode = "window"
    # Stream evaluation: bytes of the split to read (-1: all of it).
    config.eval_stream_max_bytes = 262_144
    # Stream evaluation: contiguous streams scored in parallel as one batch.
    config.eval_stream_num_streams = 1
    return config
