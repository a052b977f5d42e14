"""Converts between training workdirs and PyTorch Megalodon state dicts (spec §8).

    python -m megalodon_flax.cli.convert --workdir=runs/megalodon --to=hf --out=model.safetensors
    python -m megalodon_flax.cli.convert --from=hf --in=model.safetensors \
        --config=configs/megalodon.py --workdir=runs/imported
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from megalodon_flax.cli import common
from megalodon_flax.megalodon.convert import ConversionError
from megalodon_flax.megalodon.state_dict_layout import FORMATS
from megalodon_flax.training import conversion

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Training workdir (read with --to, created with --from).")
flags.DEFINE_enum("to", None, FORMATS, "Export the workdir's newest weights to this layout.")
flags.DEFINE_string("out", None, "Output .safetensors file (with --to).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Export dtype (with --to).")
flags.DEFINE_enum("from", None, FORMATS, "Import a state dict of this layout.")
flags.DEFINE_string("in", None, ".safetensors/.pt/.bin file to import (with --from).")
config_flags.DEFINE_config_file("config", None, "Config file of the run to create (--from).")
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    source, in_path = FLAGS["from"].value, FLAGS["in"].value
    if (FLAGS.to is None) == (source is None):
        raise app.UsageError("give exactly one of --to (export) or --from (import)")
    if FLAGS.to and not FLAGS.out:
        raise app.UsageError("--to needs --out")
    if source and (not in_path or FLAGS.config is None):
        raise app.UsageError("--from needs --in and --config")
    try:
        if FLAGS.to:
            state_dict = conversion.export_run(FLAGS.workdir, FLAGS.to, FLAGS.out, FLAGS.dtype)
            print(f"wrote {len(state_dict)} tensors ({FLAGS.to} layout) to {FLAGS.out}")
        else:
            config = common.train_config(FLAGS.config)
            count = conversion.import_run(in_path, source, config, FLAGS.workdir)
            print(f"imported {count:,} parameters into {FLAGS.workdir} (checkpoint step 0)")
    except (ConversionError, FileNotFoundError, FileExistsError) as err:
        common.fail(str(err))


if __name__ == "__main__":
    app.run(main, flags_parser=common.parse_flags)
