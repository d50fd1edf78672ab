"""sessionpool benchmark suite: `python -m bench.run [--quick]`."""
