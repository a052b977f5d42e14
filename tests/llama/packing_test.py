"""The Llama baseline over packed rows: attention stays inside each run and positions restart
at its start, so each document's logits are those of the document in a row of its own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megalodon_flax.llama.model import LlamaLM
from tests.factories import tiny_llama_config
from tests.packed_rows import DOCS, IDS, documents_alone, packed_tokens

pytestmark = pytest.mark.usefixtures("highest_precision")


def test_packed_logits_equal_each_document_alone():
    model = LlamaLM(tiny_llama_config())
    tokens = packed_tokens()
    variables = model.init(jax.random.key(0), jnp.asarray(tokens))
    packed, _ = jax.jit(model.apply)(variables, jnp.asarray(tokens), segment_ids=jnp.asarray(IDS))
    packed = np.asarray(packed)
    assert np.isfinite(packed).all()
    rows, mask = documents_alone(tokens)
    alone = np.asarray(jax.jit(model.apply)(variables, jnp.asarray(rows), attention_mask=mask)[0])
    for i, (b, start, end) in enumerate(DOCS):
        np.testing.assert_allclose(packed[b, start:end], alone[i, : end - start], atol=1e-5)


def test_packed_rows_refuse_a_mask_or_a_cache():
    model = LlamaLM(tiny_llama_config())
    tokens = jnp.asarray(packed_tokens())
    variables = model.init(jax.random.key(0), tokens)
    ids = jnp.asarray(IDS)
    with pytest.raises(ValueError, match="attention_mask"):
        model.apply(variables, tokens, segment_ids=ids, attention_mask=ids > 0)
    with pytest.raises(ValueError, match=">= 0"):
        model.apply(variables, tokens, segment_ids=ids.at[1, 0].set(-2))
