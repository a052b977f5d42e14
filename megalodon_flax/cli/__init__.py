"""Command-line entry points (absl): train, sample, evaluate, convert, compare."""
