"""Tokenizer files: our wrappers against the libraries that made them (the oracle), the UTF-8
policy, the vocabulary check, and a packed training run with a tokenizer (window and stream
evaluation of its held-out documents)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import numpy as np
import pytest

from megalodon_flax import families
from megalodon_flax.data import tokenization
from megalodon_flax.data.tokenization import TokenizerError
from megalodon_flax.training import loop
from megalodon_flax.training.metrics import token_cross_entropy
from megalodon_flax.training.setup import setup_training
from tests import helpers
from tests.factories import tiny_train_config

WORDS = [
    "state",
    "space",
    "model",
    "chunk",
    "norm",
    "gate",
    "reset",
    "long",
    "context",
    "\u00fcber",
]


def _lines(n: int = 200, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, rng.integers(3, 12)).tolist()) for _ in range(n)]


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory) -> str:
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_lines(), trainer)
    path = str(tmp_path_factory.mktemp("hf") / "tokenizer.json")
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    import sentencepiece

    prefix = tmp_path_factory.mktemp("spm") / "sp"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines()),
        model_prefix=str(prefix),
        vocab_size=30,
        model_type="unigram",
        minloglevel=2,
    )
    return f"{prefix}.model"


def test_hugging_face_json_encodes_and_decodes_as_the_library(hf_json: str) -> None:
    import tokenizers

    ours = tokenization.load_tokenizer(hf_json)
    lib = tokenizers.Tokenizer.from_file(hf_json)
    assert isinstance(ours, tokenization.HuggingFaceTokenizer)
    assert ours.vocab_size == lib.get_vocab_size(with_added_tokens=True) > 256
    for text in [*_lines(5, seed=1), "unseen w\u00f6rds \U0001f600"]:
        ids = ours.encode(text.encode("utf-8"))
        assert ids.dtype == np.int32
        assert ids.tolist() == lib.encode(text, add_special_tokens=False).ids
        assert ours.decode(ids) == text  # byte-level BPE round-trips any text


def test_sentencepiece_model_encodes_and_decodes_as_the_library(spm_model: str) -> None:
    import sentencepiece

    ours = tokenization.load_tokenizer(spm_model)
    lib = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    assert isinstance(ours, tokenization.SentencePieceTokenizer)
    assert ours.vocab_size == lib.get_piece_size() == 30
    for text in _lines(5, seed=2):
        ids = ours.encode(text.encode("utf-8"))
        assert ids.tolist() == lib.encode(text)
        assert ours.decode(ids) == lib.decode(lib.encode(text)) == text


def test_invalid_utf8_is_replaced_or_refused(spm_model: str) -> None:
    bad = b"model " + b"\xff\xfe" + b" gate"
    replacing = tokenization.load_tokenizer(spm_model)
    want = replacing.encode("model \ufffd\ufffd gate".encode())
    np.testing.assert_array_equal(replacing.encode(bad), want)
    strict = tokenization.load_tokenizer(spm_model, invalid_utf8="error")
    with pytest.raises(TokenizerError, match=r"not valid UTF-8 at byte 6.*invalid_utf8='replace'"):
        strict.encode(bad)
    # Bytes take anything as it is.
    assert tokenization.ByteTokenizer().encode(bad).tolist() == list(bad)


def test_unusable_tokenizer_files_and_vocabularies_fail_clearly(tmp_path: Path, hf_json) -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        tokenization.load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a Hugging Face tokenizers JSON"):
        tokenization.load_tokenizer(str(tmp_path / "bad.json"))
    (tmp_path / "bad.model").write_bytes(b"\x00\x01garbage")
    with pytest.raises(TokenizerError, match="not a sentencepiece model"):
        tokenization.load_tokenizer(str(tmp_path / "bad.model"))
    tok = tokenization.load_tokenizer(hf_json)
    with pytest.raises(
        TokenizerError, match=r"has \d+ tokens but the model's vocabulary holds 256"
    ):
        tokenization.check_vocab(tok, 256)
    tokenization.check_vocab(tok, tok.vocab_size)


def _corpus(root: Path) -> Path:
    root.mkdir()
    lines = [json.dumps({"text": t}) for t in _lines(60, seed=3)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def test_packed_run_with_a_tokenizer_reports_bits_per_byte_and_decodes_samples(
    tmp_path: Path, spm_model: str
) -> None:
    """Window and stream evaluation of the held-out documents in bits per token and per byte;
    oracle for the streams: each document's sentencepiece ids alone in one uncached forward."""
    import sentencepiece

    corpus = _corpus(tmp_path / "corpus")
    data = {"source": "text_files", "text_paths": str(corpus), "tokenizer": spm_model}
    config = tiny_train_config(
        data={**data, "eval_fraction": 0.05},
        model={"vocab_size": 64},
        num_train_steps=2,
        eval={"every_steps": 2, "num_batches": -1, "mode": "both", "stream_num_streams": 2},
        checkpoint={"every_steps": 2},
        sampling={"every_steps": 0, "prompt": "state space", "length": 6},
    )
    workdir = tmp_path / "run"
    state = loop.train_and_evaluate(config, str(workdir))
    lib = sentencepiece.SentencePieceProcessor(model_file=spm_model)
    held_out = _lines(60, seed=3)[-3:]  # eval_fraction 0.05 of 60 documents: the last 3
    ids = [np.asarray(lib.encode(t), np.int32)[None] for t in held_out]
    tokens = sum(d.size for d in ids)
    nbytes = sum(len(t.encode()) for t in held_out)
    per_token = helpers.read_scalars(workdir, "eval_bits_per_token")[2]
    per_byte = helpers.read_scalars(workdir, "eval_bits_per_byte")[2]
    assert per_byte == pytest.approx(per_token * tokens / nbytes, rel=1e-6)
    assert math.isfinite(helpers.read_scalars(workdir, "train_bits_per_token")[2])
    assert not helpers.read_scalars(workdir, "train_bits_per_byte")

    model = families.build_model(config.model)
    params = nn.unbox(state.params)
    forward = jax.jit(lambda x: model.apply({"params": params}, x)[0])
    nll = sum(float(token_cross_entropy(forward(d[:, :-1]), d[:, 1:]).sum()) for d in ids)
    stream_per_token = helpers.read_scalars(workdir, "eval_stream_bits_per_token")[2]
    assert stream_per_token == pytest.approx(nll / (tokens - len(ids)) / math.log(2), rel=1e-5)
    stream_per_byte = helpers.read_scalars(workdir, "eval_stream_bits_per_byte")[2]
    assert stream_per_byte == pytest.approx(stream_per_token * tokens / nbytes, rel=1e-6)

    tok = tokenization.load_tokenizer(spm_model)
    text = loop.generate_sample(setup_training(config), state.params, 2, tok)
    assert text.startswith("state space")
    # A model narrower than the tokenizer's vocabulary stops before any work.
    narrow = tiny_train_config(data=data, model={"vocab_size": 16})
    with pytest.raises(TokenizerError, match=r"has 30 tokens but the model's vocabulary holds 16"):
        loop.train_and_evaluate(narrow, str(tmp_path / "narrow"))


def test_ids_outside_the_vocabulary_decode_to_replacement_characters(spm_model: str) -> None:
    tok = tokenization.load_tokenizer(spm_model)
    a, b = tok.encode(b"state space"), tok.encode(b"gate")
    got = tok.decode(np.concatenate([a, [tok.vocab_size, 40], b]))
    assert got == tok.decode(a) + "\ufffd\ufffd" + tok.decode(b)


def test_evaluate_cli_refuses_a_run_that_reads_tokens(spm_model: str) -> None:
    """`evaluate` scores enwik8 bytes: a tokenizer run's ids would be read as bytes."""
    import types

    from megalodon_flax.cli import evaluate

    config = tiny_train_config(
        data={"source": "text_files", "text_paths": "x", "tokenizer": spm_model}
    )
    with pytest.raises(SystemExit, match=r"evaluate scores enwik8 bytes.*sp\.model"):
        evaluate._split_bytes(types.SimpleNamespace(config=config))


def test_evaluate_cli_refuses_a_byte_run_on_text_files() -> None:
    """A byte-level text_files run would be scored on enwik8, not on its held-out documents."""
    import types

    from megalodon_flax.cli import evaluate

    config = tiny_train_config(data={"source": "text_files", "text_paths": "corpus/*.txt"})
    with pytest.raises(SystemExit, match=r"data.source='text_files' \(corpus/\*\.txt\)"):
        evaluate._split_bytes(types.SimpleNamespace(config=config))
