"""probe's benchmark suite: `python bench/run.py [--smoke]` (or `make bench`)."""
