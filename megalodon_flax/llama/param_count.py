"""The Llama baseline's closed-form parameter count."""

from __future__ import annotations

from megalodon_flax.llama.config import LlamaConfig


def parameter_breakdown(config: LlamaConfig) -> dict[str, int]:
    """Closed-form parameter counts per component and 'total'.

    Per block: attention 4·D², SwiGLU 3·D·F, two RMSNorm scales 2·D; plus the (tied)
    embedding V·D and the final norm D.
    """
    d, f = config.model_dim, config.ffn_hidden_dim
    counts = {
        "embedding": config.vocab_size * d,
        "attention": config.num_layers * 4 * d * d,
        "ffn": config.num_layers * 3 * d * f,
        "norms": config.num_layers * 2 * d + d,
    }
    counts["total"] = sum(counts.values())
    return counts
