"""Benchmarks against the peers (transformers+PEFT, the book's code), side by side in one run.

`python -m bench.run` (what `make bench` runs) runs them all and rewrites bench/README.md; see there.
"""
