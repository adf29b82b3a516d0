"""pyxen benchmarks: run them with ``bench/run`` (see docs/bench.md)."""
