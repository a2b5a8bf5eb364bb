"""Shared helpers of the benchmarks: machine description, timing, result files and tables.

A benchmark's `run` returns a dict with at least a `"table"` entry, `{"columns": [...],
"rows": [{column: value}, ...]}`, and optionally `"notes"` (a list of lines); everything else
in the dict is written to the JSON file as it is.
"""

from __future__ import annotations

import datetime
import importlib
import inspect
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from amortjax.engine import memory_maps

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RATIO_TARGET = 0.95
"""The speed target of the ratio modules (issue 13): library / hand-written floor >= 0.95."""


def machine_info() -> dict[str, Any]:
    """Where and on what code the benchmark ran: processor, core count, Python and JAX
    versions, backend, date, and `code` (`experiments.runner.code_version`: the git commit,
    whether the checkout differed from it, the package versions)."""
    from experiments.runner import code_version

    devices = jax.devices()
    return {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "system": f"{platform.system()} {platform.release()}",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "jax_version": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d) for d in devices],
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "code": code_version(exclude=[str(RESULTS_DIR.relative_to(RESULTS_DIR.parents[1]))]),
    }


def process_info() -> dict[str, Any]:
    """This process after a benchmark (Linux; None elsewhere): `peak_rss_mib`, its peak
    resident memory (VmHWM), and `memory_maps`, the number of its memory mappings, which the
    kernel caps (`vm.max_map_count`, `max_map_count` here): compiled code takes mappings, and
    a process that runs out of them fails to compile with "Cannot allocate memory"."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    peak = None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            peak = int(line.split()[1]) / 1024
    maps = memory_maps()
    return {
        "peak_rss_mib": peak,
        "memory_maps": None if maps is None else maps[0],
        "max_map_count": None if maps is None else maps[1],
    }


def time_call(fn: Callable[[], Any]) -> float:
    """Seconds taken by `fn()`, waiting for every array it returns to be computed."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - start


def time_in_turns(
    jobs: dict[Any, Callable[[], Any]], repeats: int
) -> tuple[dict[Any, list[float]], dict[Any, float]]:
    """Times each thunk of `jobs` in `repeats` rounds after a warm-up round, the jobs taking
    turns within each round (so that each sees the same minutes of a shared machine), in
    reverse order every other round (so that no job always runs right after the same one).

    Returns:
        `(times, first_call)`: each job's seconds in the timed rounds, and its first call's
        (compilation included).
    """
    times: dict[Any, list[float]] = {job: [] for job in jobs}
    first_call: dict[Any, float] = {}
    for r in range(repeats + 1):  # round 0 compiles
        for job, thunk in turns(list(jobs.items()), r):
            seconds = time_call(thunk)
            if r == 0:
                first_call[job] = seconds
            else:
                times[job].append(seconds)
    return times, first_call


def turns(items: list, round_index: int) -> list:
    """`items` in the order round `round_index` times them: as given in even rounds, reversed
    in odd ones."""
    return items if round_index % 2 == 0 else items[::-1]


def hand_bernoulli_log_px(x: jax.Array, logits: jax.Array) -> jax.Array:
    """sum_j log Bernoulli(x_j; sigmoid(l_j)) = sum_j x_j l_j - softplus(l_j), written out for the
    hand-written floors (softplus in its stable form: 3% faster per step on CPU than
    jax.nn.softplus, a logaddexp): x broadcasting to logits `[..., x_dim]` -> `[...]`."""
    softplus = jnp.maximum(logits, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return jnp.sum(x * logits - softplus, axis=-1)


def median(values: list[float]) -> float:
    """The median of a non-empty list of floats."""
    return float(statistics.median(values))


def round_ratios(
    library: list[float], floor: list[float], library_work: float = 1.0, floor_work: float = 1.0
) -> dict[str, Any]:
    """Library / floor in throughput (work per second) within each timed round of
    `time_in_turns`, where the two ran seconds apart, beside the ratio of the medians that the
    modules report. The medians can come from different rounds, so a machine whose speed drifts
    between rounds moves that ratio although both variants saw every round; the per-round ratios
    show the drift, and `ratio_interval` turns them into a mean with a confidence interval.

    Args:
        library, floor: seconds per round, in the order the rounds ran, `[repeats]` each.
        library_work, floor_work: the work each timed call did (datapoint-steps, decoder
            evaluations).

    Returns:
        `{"per_round": [...], "median_per_round": m, "range": [min, max],
        "ratio_of_medians": r, **ratio_interval(per_round)}`.
    """
    rounds = [(library_work / a) / (floor_work / b) for a, b in zip(library, floor, strict=True)]
    return {
        "per_round": rounds,
        "median_per_round": median(rounds),
        "range": [min(rounds), max(rounds)],
        "ratio_of_medians": (library_work / median(library)) / (floor_work / median(floor)),
        **ratio_interval(rounds),
    }


def ratio_interval(ratios: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """The geometric mean of per-round ratios r_1..r_n and its Student-t confidence interval:
    with l_i = log r_i, mean m and standard error s / sqrt(n) (s the sample standard deviation),
    `exp(m -+ t_{(1+confidence)/2, n-1} s / sqrt(n))`. Logs, because a ratio's noise is
    multiplicative (a round slowed by a neighbour scales both times) and the interval then never
    crosses zero. The rounds must be independent for the interval to hold; the library and the
    floor timed seconds apart in each round share that round's machine speed, which is what
    pairing them removes.

    Returns:
        `{"geometric_mean": g, "interval": [low, high], "confidence": confidence}`, the interval
        `None` for fewer than two rounds.
    """
    logs = np.log(np.asarray(ratios, dtype=np.float64))
    mean = float(logs.mean())
    interval = None
    if len(logs) >= 2:
        half = float(scipy.stats.t.ppf((1 + confidence) / 2, len(logs) - 1))
        half *= float(logs.std(ddof=1)) / math.sqrt(len(logs))
        interval = [math.exp(mean - half), math.exp(mean + half)]
    return {"geometric_mean": math.exp(mean), "interval": interval, "confidence": confidence}


def verdict(interval: list[float] | None, target: float) -> str:
    """Reads "met" when a ratio's whole confidence interval (`ratio_interval`) is at or above
    `target`, "not met" when it is wholly below, "not resolved" when it straddles the target
    (more rounds, or a quieter machine, would decide it)."""
    if interval is None:
        return "not resolved"
    if interval[0] >= target:
        return "met"
    if interval[1] < target:
        return "not met"
    return "not resolved"


def describe_rounds(by_round: dict[str, Any], target: float) -> str:
    """One line for a module's notes: the per-round ratios, their median, geometric mean and
    interval, and the verdict against `target` (`round_ratios`' output)."""
    low, high = by_round["interval"] or (float("nan"), float("nan"))
    return (
        ", ".join(f"{v:.3f}" for v in by_round["per_round"])
        + f" (median {by_round['median_per_round']:.3f}; geometric mean"
        f" {by_round['geometric_mean']:.3f}, {100 * by_round['confidence']:.0f}% interval"
        f" {low:.3f}-{high:.3f}: >= {target} {verdict(by_round['interval'], target)})"
    )


def _format(value: Any) -> str:
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0 or abs(value) >= 100:
            return f"{value:.1f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


def markdown_table(columns: list[str], rows: list[dict[str, Any]]) -> str:
    """A Markdown table of `rows` (dicts keyed by column name; missing entries left blank)."""
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def to_markdown(name: str, result: dict[str, Any]) -> str:
    """The Markdown report of one benchmark result: a title, the machine, the table, notes."""
    machine = result.get("machine", {})
    parts = [
        f"# Benchmark `{name}`" + (" (quick mode)" if result.get("quick") else ""),
        "",
        f"{machine.get('processor', '?')}, {machine.get('cpu_count', '?')} cores, "
        f"jax {machine.get('jax_version', '?')} ({machine.get('jax_backend', '?')}), "
        f"{machine.get('date', '?')}",
        "",
        markdown_table(result["table"]["columns"], result["table"]["rows"]),
    ]
    notes = result.get("notes", [])
    if notes:
        parts += ["", *(f"- {line}" for line in notes)]
    return "\n".join(parts) + "\n"


def run_and_save(
    name: str,
    *,
    quick: bool = False,
    out_dir: str | Path = RESULTS_DIR,
    **sizes: Any,
) -> tuple[dict[str, Any], str]:
    """Runs benchmark module `bench.<name>` and writes `<name>.json` and `<name>.md`.

    Args:
        name: the benchmark's module name inside the `bench` package.
        quick: few repeats and small problems (for tests and smoke runs).
        out_dir: folder for the result files (created if missing).
        **sizes: passed on to the module's `run`; a `run` with an `out_dir` parameter gets
            `out_dir` too, to write files (figures) beside the JSON.

    Returns:
        The result dict (with `"name"`, `"quick"` and `"machine"` added) and its Markdown report.
    """
    module = importlib.import_module(f"bench.{name}")
    if "out_dir" in inspect.signature(module.run).parameters:
        sizes = {**sizes, "out_dir": Path(out_dir)}  # a module that writes files (figures)
    result = {"name": name, "quick": quick, "machine": machine_info()}
    result.update(module.run(quick=quick, **sizes))
    result["process"] = process_info()
    report = to_markdown(name, result)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2, allow_nan=False) + "\n")
    (out / f"{name}.md").write_text(report)
    return result, report


def load_binarized(split: str, n: int, x_dim: int, data: str, seed: int) -> tuple[np.ndarray, str]:
    """The first n binarized-MNIST images of a split, or random binary vectors.

    Args:
        split: "train" or "test".
        n: number of datapoints.
        x_dim: observation size (real data only when it is 784).
        data: "binarized_mnist" (random vectors if it cannot be loaded) or "random".
        seed: seed of the random data.

    Returns:
        `x [n, x_dim]` float32 in {0, 1} and a note saying which data it is.
    """
    what = {"train": "training", "test": "test"}[split]
    if data == "binarized_mnist" and x_dim == 784:
        try:
            from amortjax.data import load_data

            images = getattr(load_data("binarized_mnist"), split)
            if images.shape[0] >= n:
                note = f"data: first {n} binarized-MNIST {what} images"
                return np.ascontiguousarray(images[:n], np.float32), note
            reason = f"only {images.shape[0]} {what} images"
        except Exception as err:  # any failure to load falls back to random data
            reason = f"{type(err).__name__}: {err}"
        note = f"data: random Bernoulli(0.13) vectors (binarized MNIST unavailable: {reason})"
    elif data in ("binarized_mnist", "random"):
        note = "data: random Bernoulli(0.13) vectors"
    else:
        raise ValueError(f"unknown data {data!r}; choose 'binarized_mnist' or 'random'")
    rng = np.random.default_rng(seed)
    return (rng.random((n, x_dim)) < 0.13).astype(np.float32), note
