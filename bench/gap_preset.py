"""Wall time of the whole `amortization_gap` experiment in a preset (quick by default).

Runs `run_experiment("amortization_gap", preset=...)` into a temporary results folder, exactly
as `make experiment NAME=amortization_gap` does, and reports the wall time of the command and
how it splits into training and gap evaluation per model (from the experiment's own metrics).
This is the number the quick preset's "about 15 minutes on 2 CPU cores" is checked against.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from experiments.runner import run_experiment


def run(quick: bool = False, *, preset: str = "quick", overrides: tuple[str, ...] = ()) -> dict:
    """Runs the preset once and returns its timings.

    Args:
        quick: unused beyond the record (the preset decides the size); kept for the registry.
        preset: the experiment's preset.
        overrides: `key=value` overrides of the experiment's config.

    Returns:
        A dict with the wall time, per-model training and evaluation seconds, and a `table`.
    """
    with tempfile.TemporaryDirectory() as root:
        start = time.perf_counter()
        _, metrics = run_experiment(
            "amortization_gap", preset=preset, overrides=list(overrides), results_root=root
        )
        wall = time.perf_counter() - start
    rows: list[dict[str, Any]] = [
        {
            "part": name,
            "train (s)": r["train_seconds"],
            "gap evaluation (s)": r["eval_seconds"],
        }
        for name, r in metrics["models"].items()
    ]
    rows.append({"part": "whole command (incl. data, figures, variants)", "wall (s)": wall})
    return {
        "preset": preset,
        "overrides": list(overrides),
        "wall_seconds": wall,
        "models": {
            n: {"train_seconds": r["train_seconds"], "eval_seconds": r["eval_seconds"]}
            for n, r in metrics["models"].items()
        },
        "table": {"columns": ["part", "train (s)", "gap evaluation (s)", "wall (s)"], "rows": rows},
        "notes": [f"`make experiment NAME=amortization_gap PRESET={preset}`, {wall / 60:.1f} min"],
    }
