"""Does the packed Grain pipeline keep up with training? Tokens per second it delivers,
against the tokens per second the enwik8 train step consumes, in the same run.

Workloads:
  pipeline: `PackedTrainIterator` over the bundled enwik8 sample's `<page>` documents, rows of
            `--seq-len` + 1, `--batch` rows per batch, background-thread prefetch as in
            training; once with bytes, once with a byte-level BPE tokenizer (Hugging Face
            `tokenizers`, `--vocab` tokens) trained here on the sample's first 1 MB (not
            timed). Each repeat times `--batches` batches after 5 warm-up batches.
  train:    the enwik8 config's train step (fwd + bwd + AdamW, fp32) at the same batch.

  python -m benchmarks.bench_pipeline                       # the table in RESULTS.md
  python -m benchmarks.bench_pipeline --quick --out /tmp/p.json   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

import megalodon_flax as mf
from benchmarks import common
from megalodon_flax.data import documents, enwik8, packing, tokenization

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "results", "bench_pipeline.json")
WARMUP_BATCHES = 5


def train_bpe(text: bytes, vocab: int, directory: str) -> str:
    """A byte-level BPE tokenizer JSON trained on `text` (one document per line)."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    lines = text.decode("utf-8", errors="replace").splitlines()
    tok.train_from_iterator(lines, trainer)
    path = os.path.join(directory, "bpe.json")
    tok.save(path)
    return path


def pipeline_times(
    pages: Sequence[bytes],
    tokenize: Callable[[bytes], np.ndarray],
    args: argparse.Namespace,
) -> list[float]:
    """Seconds per `args.batches` batches, one fresh iterator per repeat."""
    times = []
    for repeat in range(args.repeats):
        it = packing.PackedTrainIterator(
            pages,
            seq_len=args.seq_len,
            global_batch_size=args.batch,
            seed=repeat,
            tokenize=tokenize,
        )
        for _ in range(WARMUP_BATCHES):
            next(it)
        start = time.perf_counter()
        for _ in range(args.batches):
            next(it)
        times.append(time.perf_counter() - start)
        it.close()
    return times


def train_step_ms(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.bench_model import OursModel, TrainRunner

    model = OursModel(mf.enwik8_config())
    runner = TrainRunner(
        model.loss,
        model.params,
        common.random_tokens(args.batch, args.seq_len, 256, 0),
        model.compiler_options,
    )
    info = runner.prepare()
    runner.run()  # warm-up
    times = []
    for _ in range(args.train_repeats):
        start = time.perf_counter()
        runner.run()
        times.append((time.perf_counter() - start) * 1e3)
    return {**common.summarize_ms(times), "compile_s": info["lower_plus_compile_s"]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batches", type=int, default=200)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--train-repeats", type=int, default=3)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--skip-train", action="store_true")
    p.add_argument("--quick", action="store_true", help="small sizes (smoke test)")
    p.add_argument("--out", default=DEFAULT_OUT)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.seq_len, args.batches, args.repeats = 2, 64, 10, 1
        args.train_repeats, args.vocab = 1, 300

    raw = enwik8.read_member(enwik8.SAMPLE_ZIP)
    pages = documents.Enwik8Pages(np.frombuffer(raw, np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        bpe = tokenization.load_tokenizer(train_bpe(raw[: 1 << 20], args.vocab, tmp))
    tokens_per_batch = args.batch * args.seq_len
    results: dict[str, Any] = {
        "machine": common.machine_info(),
        "settings": vars(args),
        "documents": len(pages),
        "sample_bytes": len(raw),
        "rows": {},
    }
    for name, tokenizer in (("bytes", tokenization.ByteTokenizer()), ("bpe", bpe)):
        times = pipeline_times(pages, tokenizer.encode, args)
        median = float(np.median(times))
        results["rows"][name] = {
            "tokens_per_s": tokens_per_batch * args.batches / median,
            "tokens_per_s_min": tokens_per_batch * args.batches / max(times),
            "tokens_per_s_max": tokens_per_batch * args.batches / min(times),
            "times_s": times,
        }
        if name == "bpe":
            sample = raw[: 1 << 20]
            results["rows"][name]["bytes_per_token"] = len(sample) / bpe.encode(sample).size
    if not args.skip_train:
        step = train_step_ms(args)
        step["tokens_per_s"] = tokens_per_batch / (step["median_ms"] / 1e3)
        results["train_step"] = step
    common.write_json(args.out, results)

    rows = []
    consumed = results.get("train_step", {}).get("tokens_per_s")
    for name, row in results["rows"].items():
        ratio = row["tokens_per_s"] / consumed if consumed else None
        rows.append(
            [
                f"pipeline, {name}",
                f"{row['tokens_per_s']:,.0f} ({row['tokens_per_s_min']:,.0f}-"
                f"{row['tokens_per_s_max']:,.0f})",
                common.fmt(ratio, ".0f"),
            ]
        )
    if consumed:
        step = results["train_step"]
        rows.append([f"train step ({step['median_ms']:.0f} ms)", f"{consumed:,.0f}", "1"])
    title = f"Packed pipeline vs train step, {args.batch} x {args.seq_len}"
    print(common.table(title, ["", "tokens/s (min-max)", "x train step"], rows))
    print(f"\nwrote {os.path.abspath(args.out)}")
    return results


if __name__ == "__main__":
    main()
