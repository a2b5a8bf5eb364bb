"""The committed benchmark results are one whole `make bench`, and the README quotes them.

`bench/results/<name>.json` holds every module's result of the last whole run that was
committed. The README's benchmark table states each target's latest value; these tests read the
values from the JSON files and check that the README's row of each benchmark states them as
they are, so that a rerun that changes a number and leaves the README alone fails here, and so
does a result left over from another run (another commit, a checkout that differed from it, a
quick run, or a date hours away from the others).
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _load(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _readme_row(name: str) -> str:
    rows = [
        line
        for line in (ROOT / "README.md").read_text().splitlines()
        if line.startswith(f"| `{name}` |")
    ]
    assert len(rows) == 1, f"the README's benchmark table needs one row for `{name}`"
    return rows[0]


def _local(result: dict, variant: str, datapoints: int, samples: int) -> dict:
    (row,) = [
        r
        for r in result["results"]
        if (r["variant"], r["datapoints"], r["num_samples"]) == (variant, datapoints, samples)
    ]
    return row


def _table_row(result: dict, column: str, value: str) -> dict:
    (row,) = [r for r in result["table"]["rows"] if r[column] == value]
    return row


def _interval(by_round: dict) -> list[str]:
    """A ratio's geometric mean over its rounds and 95% interval as a README row writes them,
    computed from the per-round ratios (runs saved before the modules recorded the interval)."""
    from bench.common import ratio_interval

    r = ratio_interval(by_round["per_round"])
    low, high = r["interval"]
    return [f"{r['geometric_mean']:.3f} [{low:.3f}, {high:.3f}]"]


def _quoted(name: str) -> list[str]:
    """The numbers of benchmark `name`'s result that its README row states, as it writes them."""
    r = _load(name)
    if name == "train_step":
        return [f"{r['ratios']['library_over_hand_scan']:.3f}"]
    if name == "local_optimizer":
        return [
            f"{_local(r, 'library', 100, 1)['over_floor']:.3f}",
            f"{_local(r, 'library', 100, 10)['over_floor']:.3f}",
            f"{_local(r, 'library', 100, 1)['over_floor_signal']:.3f}",
            f"{_local(r, 'library', 100, 10)['over_floor_signal']:.3f}",
            f"{_local(r, 'floor_monitor', 100, 1)['over_floor']:.3f}",
            *_interval(_local(r, "library", 100, 1)["over_floor_by_round"]),
            *_interval(_local(r, "library", 100, 10)["over_floor_by_round"]),
        ]
    if name == "newton_step":
        return [f"{r['library_over_floor']:.3f}", *_interval(r["library_over_floor_by_round"])]
    if name == "sa_step":
        return [f"{max(m['time_over_xla_flop_ratio'] for m in r['results']):.2f}"]
    if name == "evaluators":
        return [
            *(f"{_table_row(r, 'estimator', e)['library / floor']:.3f}" for e in ("IWAE", "AIS")),
            *_interval(r["results"]["IWAE"]["over_floor_by_round"]),
            *_interval(r["results"]["AIS"]["over_floor_by_round"]),
        ]
    if name == "memory":
        s = r["summary"]
        return [
            f"{s['iwae']['peak_mib_large_n']:,.0f}",
            f"{s['local']['peak_mib_small_n']:,.0f}",
            f"{s['local']['peak_mib_large_n']:,.0f}",
            f"{s['local']['peak_mib_large_chunk']:,.0f}",
        ]
    if name == "scaling":
        return [f"{r['slopes'][k]:.2f}" for k in ("iwae/N", "local/N", "iwae/S", "local/S")]
    if name == "gap_fullset":
        return [
            f"{r['wall_seconds'] / 60:.1f} min",
            *(f"{r['stages'][s]:.0f} s" for s in ("qstar", "bounds", "ais")),
            f"{100 * r['qstar_stopped_fraction']:.1f}%",
            f"+{r['doubling']['diagonal']['change']:.3f}",
            f"+{r['doubling']['flow']['change']:.3f}",
        ]
    if name == "gap_preset":
        return [f"{r['wall_seconds'] / 60:.1f} min"]
    if name == "paper_presets":
        return [f"{r['experiments'][e]['projected_hours']:.1f} h" for e in r["experiments"]]
    raise AssertionError(f"no README check for benchmark {name!r}: add one above")


def test_the_committed_results_are_one_whole_run_on_one_commit():
    results = {name: _load(name) for name in BENCHMARKS}
    dates = [datetime.datetime.fromisoformat(r["machine"]["date"]) for r in results.values()]
    assert max(dates) - min(dates) < datetime.timedelta(hours=3), "results of several runs"
    commits = {r["machine"]["code"]["commit"] for r in results.values()}
    assert len(commits) == 1 and None not in commits, commits
    for name, r in results.items():
        assert r["quick"] is False, f"{name}.json is a --quick run"
        assert r["machine"]["code"]["dirty"] is False, f"{name}.json: uncommitted code ran"
        assert (RESULTS / f"{name}.md").exists()


@pytest.mark.parametrize("name", list(BENCHMARKS))
def test_the_readme_states_each_benchmarks_committed_values(name):
    row = _readme_row(name)
    missing = [value for value in _quoted(name) if value not in row]
    assert not missing, f"README's `{name}` row lacks {missing} (bench/results/{name}.json)"


def test_the_paired_ratio_tool_reads_the_ratios_the_bench_reported():
    """`tools/bench_paired_ratios.py` pairs each round's library and floor times; its ratio of
    the medians must be the ratio each module reported (else it pairs the wrong times)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "bench_paired_ratios", ROOT / "tools" / "bench_paired_ratios.py"
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ratios = tool.main(RESULTS)
    reported = {
        "evaluators IWAE": _table_row(_load("evaluators"), "estimator", "IWAE")["library / floor"],
        "evaluators AIS": _table_row(_load("evaluators"), "estimator", "AIS")["library / floor"],
        "local_optimizer B=100 S=1": _local(_load("local_optimizer"), "library", 100, 1)[
            "over_floor"
        ],
        "local_optimizer B=100 S=10": _local(_load("local_optimizer"), "library", 100, 10)[
            "over_floor"
        ],
        "newton_step": _load("newton_step")["library_over_floor"],
    }
    assert set(ratios) == set(reported)
    for name, value in reported.items():
        assert ratios[name]["ratio_of_medians"] == pytest.approx(value, rel=1e-9), name
        low, high = ratios[name]["range"]
        assert low <= ratios[name]["median_per_round"] <= high


def test_round_ratios_pair_each_rounds_times():
    """Library / floor in throughput within each round, beside the ratio of the medians (which
    pairs the library's median round with the floor's: here two different rounds)."""
    from bench.common import round_ratios

    r = round_ratios([2.0, 1.0, 1.1], [1.9, 1.05, 0.9])
    assert r["per_round"] == pytest.approx([0.95, 1.05, 0.9 / 1.1])
    assert r["median_per_round"] == pytest.approx(0.95)
    assert r["range"] == pytest.approx([0.9 / 1.1, 1.05])
    assert r["ratio_of_medians"] == pytest.approx(1.05 / 1.1)
    # per unit of work: twice the floor's work in twice its time is the same speed
    assert round_ratios([2.0], [1.0], 2.0, 1.0)["per_round"] == pytest.approx([1.0])


def test_ratio_interval_is_the_t_interval_of_the_log_ratios():
    """Hand values: ratios e^-0.1, e^0, e^0.1 have log mean 0 and standard deviation 0.1, so the
    95% interval is exp(-+ t_{0.975, 2} 0.1 / sqrt(3)), t_{0.975, 2} = 4.302653 (tables)."""
    import math

    from bench.common import ratio_interval, round_ratios, verdict

    r = ratio_interval([math.exp(-0.1), 1.0, math.exp(0.1)])
    half = 4.302653 * 0.1 / math.sqrt(3)
    assert r["geometric_mean"] == pytest.approx(1.0)
    assert r["interval"] == pytest.approx([math.exp(-half), math.exp(half)], rel=1e-6)
    assert ratio_interval([0.9])["interval"] is None
    # round_ratios carries it, computed from its own per-round ratios
    rr = round_ratios([2.0, 1.0, 1.1], [1.9, 1.05, 0.9])
    assert rr["geometric_mean"] == pytest.approx((0.95 * 1.05 * 0.9 / 1.1) ** (1 / 3))
    assert rr["interval"] == pytest.approx(ratio_interval(rr["per_round"])["interval"])
    # the verdict reads the whole interval against the target
    assert verdict([0.951, 0.99], 0.95) == "met"
    assert verdict([0.90, 0.949], 0.95) == "not met"
    assert verdict([0.94, 0.96], 0.95) == "not resolved"
    assert verdict(None, 0.95) == "not resolved"


def test_rounds_alternate_the_order_of_their_turns():
    from bench.common import time_in_turns, turns

    assert turns([1, 2, 3], 0) == [1, 2, 3] and turns([1, 2, 3], 1) == [3, 2, 1]
    order = []
    time_in_turns({"a": lambda: order.append("a"), "b": lambda: order.append("b")}, 3)
    assert order == ["a", "b", "b", "a", "a", "b", "b", "a"]  # the warm-up round, then 3
