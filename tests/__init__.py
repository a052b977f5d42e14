"""The test suite: a package so that tests, their child processes and the benchmarks import
`tests.factories`, `tests.helpers` and `tests.reference` by name from the repository root."""
