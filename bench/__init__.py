"""sessionpool benchmark suite: `python bench/run.py [--quick]`."""
