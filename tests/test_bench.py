"""The training-speed benchmark runs end to end on tiny sizes and writes sane results.

Timings are never asserted (they depend on the machine); the values are only checked to be
positive and finite. The real check is that the hand-written floor computes the library's
objective: the same per-datapoint -ELBO at initialization.
"""

import importlib
import json
import math

import pytest

from bench.__main__ import BENCHMARKS
from bench.common import run_and_save

TINY = dict(
    steps_per_epoch=3,
    batch_size=32,
    hidden=64,
    z_dim=4,
    x_dim=784,
    data="random",
    repeats=1,
    matmul_sizes=(32, 64),
    matmul_repeats=1,
    init_draws=8,
    seed=0,
)
VARIANTS = (
    "library (Trainer.run_epoch)",
    "hand-written lax.scan epoch",
    "hand-written Python loop",
)


def _positive_finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result, report = run_and_save("train_step", quick=True, out_dir=out, **TINY)
    on_disk = json.loads((out / "train_step.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert (out / "train_step.md").read_text() == report
    return result


def test_registry_modules_expose_run():
    for name in BENCHMARKS:
        assert callable(importlib.import_module(f"bench.{name}").run)


def test_result_fields(result):
    assert result["quick"] is True
    for key in ("processor", "cpu_count", "jax_version", "jax_backend", "date"):
        assert key in result["machine"]
    assert result["sizes"]["n_data"] == 3 * 32
    assert result["flops_per_step"] == 6 * 32 * (784 * 64 + 64 * 8 + 4 * 64 + 64 * 784)
    assert "flops_formula" in result
    assert _positive_finite(result["matmul"]["peak_gflops"])
    assert set(result["variants"]) == set(VARIANTS)
    for timing in result["variants"].values():
        for key in ("seconds_per_epoch_median", "steps_per_s", "ms_per_step", "gflops"):
            assert _positive_finite(timing[key]), key
        assert _positive_finite(timing["fraction_of_peak"])
        assert math.isfinite(timing["mean_loss_last_epoch"])
    for value in result["ratios"].values():
        assert _positive_finite(value)
    assert len(result["table"]["rows"]) == len(VARIANTS) + 1


def test_hand_written_loss_matches_library_at_init(result):
    init = result["init_loss_per_datapoint"]
    for key in ("library", "hand_same_params", "hand_own_init"):
        assert _positive_finite(init[key]), key
    # Same parameters, independent noise: Monte Carlo estimates of the same -ELBO.
    assert init["hand_same_params"] == pytest.approx(init["library"], rel=0.02)
    # Independent initializations: both the -ELBO of a random network of this shape.
    assert init["hand_own_init"] == pytest.approx(init["library"], rel=0.05)
