"""Converts between training workdirs and PyTorch Megalodon state dicts (spec §8).

    python -m megalodon_flax.cli.convert --workdir=runs/megalodon --to=hf --out=megalodon-hf
    python -m megalodon_flax.cli.convert --workdir=runs/megalodon --to=upstream \
        --out=upstream.safetensors
    python -m megalodon_flax.cli.convert --from=hf --in=megalodon-hf \
        --config=configs/megalodon.py --workdir=runs/imported

`--to=hf` writes a directory (`model.safetensors` + megalodon-hf's `config.json`) that
`MegalodonForCausalLM.from_pretrained` loads; `--to=upstream` writes one `.safetensors` file.
`--from` reads a `.safetensors`/`.pt`/`.bin`/`.pth` file or such a directory. Every argument
is checked when the flags are parsed, before anything is loaded; a bad one ends the program
with one line naming the flag.
"""

from __future__ import annotations

from absl import app, flags

from megalodon_flax.cli import arguments, common
from megalodon_flax.config_base import ConfigError
from megalodon_flax.megalodon.convert import ConversionError
from megalodon_flax.training import checkpointing, conversion

FLAGS = flags.FLAGS
define_flags = arguments.define_convert_flags


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {argv[1:]}")
    source, in_path = FLAGS["from"].value, FLAGS["in"].value
    try:
        if FLAGS.to:
            dtype = FLAGS.dtype or "float32"
            state_dict = conversion.export_run(FLAGS.workdir, FLAGS.to, FLAGS.out, dtype)
            what = "directory" if FLAGS.to == "hf" else "file"
            print(f"wrote {len(state_dict)} tensors ({FLAGS.to} layout) to the {what} {FLAGS.out}")
        else:
            config = common.train_config(FLAGS.config)
            count = conversion.import_run(in_path, source, config, FLAGS.workdir)
            print(f"imported {count:,} parameters into {FLAGS.workdir} (checkpoint step 0)")
    except (
        ConversionError,
        ConfigError,
        checkpointing.CheckpointError,
        OSError,
        ImportError,
    ) as err:
        common.fail(str(err))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=common.parse_checked_flags)
