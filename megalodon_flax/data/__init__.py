"""Datasets of megalodon_flax; `megalodon_flax.data.enwik8` registers the `enwik8` tfds builder."""
