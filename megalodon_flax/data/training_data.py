"""The training run's data, chosen by `config.data`: a resumable training iterator and the
evaluation tokens.

* `source='enwik8'`, `documents='windows'`: random byte windows of the train split
  (`pipeline.TrainIterator`), the published protocol and the default.
* `source='enwik8'`, `documents='pages'`: the train split's `<page>` elements as documents,
  packed (`packing.PackedTrainIterator`). Evaluation is unchanged (windows of the
  validation or test split), so its numbers compare with the default's.
* `source='text_files'`: the documents of `text_paths` (`documents.TextFiles`), the last
  `eval_fraction` of them held out; training packs the rest, evaluation reads windows of
  the held-out documents one after another, each document from a fresh state (segment ids);
  stream evaluation reads each held-out document as one stream from a fresh state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from absl import logging

from megalodon_flax.data import documents, enwik8, packing, pipeline, tokenization

TrainIteratorFactory = Callable[[Mapping[str, Any] | None], Iterator[pipeline.Batch]]


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What a run reads.

    Attributes:
      new_train_iterator: state or None → the training iterator (`get_state()` resumes it).
      eval_tokens: int (N,) tokens evaluated by windows or streams.
      eval_bytes: bytes of text behind `eval_tokens` (bits per byte = nats / ln 2 / bytes).
      eval_segment_ids: int (N,) document of each evaluation token (> 0) where the tokens
        are several documents one after another (text_files), else None.
      tokenizer: encodes documents and prompts, decodes samples.
      description: one line for the log.
    """

    new_train_iterator: TrainIteratorFactory
    eval_tokens: np.ndarray
    eval_bytes: int
    tokenizer: tokenization.Tokenizer
    description: str
    eval_segment_ids: np.ndarray | None = None


def load(config: Any, process_index: int, process_count: int) -> TrainingData:
    """The data of a `TrainConfig` for this process's share of the rows.

    Raises:
      documents.CorpusError, tokenization.TokenizerError: an unusable corpus or tokenizer
        (including a tokenizer with more tokens than the model's vocabulary).
    """
    data = config.data
    tokenizer = tokenization.load_tokenizer(data.tokenizer, data.invalid_utf8)
    tokenization.check_vocab(tokenizer, config.model.vocab_size)
    common = dict(
        seq_len=config.seq_len,
        global_batch_size=config.effective_batch_size,
        seed=config.seed,
        process_index=process_index,
        process_count=process_count,
    )

    strict_text = data.invalid_utf8 == "error" and data.tokenizer is not None

    def packed(docs: Any) -> TrainIteratorFactory:
        if strict_text:  # refused here, naming the document, not later in the prefetch thread
            documents.check_utf8(docs)
        return lambda state: packing.PackedTrainIterator(
            docs, tokenize=tokenizer.encode, prefetch=data.prefetch, state=state, **common
        )

    if data.source == "enwik8":
        splits = enwik8.load_enwik8_splits(
            data_dir=data.data_dir,
            manual_dir=data.manual_dir,
            allow_sample_fallback=data.allow_sample_fallback,
        )
        split = splits[config.eval.split]
        if data.documents == "windows":
            return TrainingData(
                lambda state: pipeline.TrainIterator(
                    splits["train"], prefetch=data.prefetch, state=state, **common
                ),
                split,
                split.size,
                tokenizer,
                f"enwik8 windows ({splits.source})",
            )
        pages = documents.Enwik8Pages(splits["train"])
        return TrainingData(
            packed(pages),
            tokenizer.encode(split.tobytes()),
            split.size,
            tokenizer,
            f"enwik8 pages as packed documents ({len(pages)} documents, {splits.source}), "
            f"tokenizer {tokenizer.name}",
        )
    corpus = documents.TextFiles(data.text_paths, data.text_field)
    train_ids, eval_ids = documents.split_documents(corpus, data.eval_fraction)
    if strict_text:
        documents.check_utf8(documents.DocumentRange(corpus, eval_ids))
    held_out = [corpus[i] for i in eval_ids]
    pieces = [tokenizer.encode(d) for d in held_out]
    eval_tokens = np.concatenate(pieces)
    eval_segment_ids = np.repeat(
        np.arange(1, len(pieces) + 1, dtype=np.int32), [p.size for p in pieces]
    )
    if all(p.size < 2 for p in pieces):  # no token to predict from within its document
        raise documents.CorpusError(
            f"the {len(eval_ids)} held-out documents of {corpus} hold {eval_tokens.size} "
            "tokens, none two in one document: raise config.data.eval_fraction"
        )
    logging.info("%s: %d training, %d held-out documents", corpus, len(train_ids), len(eval_ids))
    return TrainingData(
        packed(documents.DocumentRange(corpus, train_ids)),
        eval_tokens,
        sum(len(d) for d in held_out),
        tokenizer,
        f"{corpus}, packed, tokenizer {tokenizer.name}",
        eval_segment_ids,
    )
