"""Trains Megalodon on enwik8: `python main.py --config=configs/megalodon.py --workdir=runs/x`.

The flags are those of `megalodon_flax/cli/train.py`.
"""

from megalodon_flax.cli import train

if __name__ == "__main__":
    train.run()
