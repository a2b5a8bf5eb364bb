"""Speed benchmarks of amortjax, run with `python -m bench` from the repository root.

Each benchmark is a module of this package exposing `run(quick: bool, **sizes) -> dict`; the
registry in `bench.__main__` runs them and `bench.common` writes their results (JSON with a
description of the machine, and a Markdown table) to `bench/results/`.
"""
