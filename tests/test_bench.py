"""The benchmarks run end to end on tiny sizes and write sane results.

Timings are never asserted (they depend on the machine); the values are only checked to be
positive and finite. The real checks are that each comparison compares like with like: the
hand-written training floor computes the library's objective (the same per-datapoint -ELBO at
initialization), and the one-at-a-time local optimizer and `fit_local` climb the same local ELBO
to the same height.
"""

import importlib
import json
import math

import numpy as np
import pytest

from bench.__main__ import BENCHMARKS
from bench.common import run_and_save

# All benchmark tests run in `make test-slow` (and `make bench` runs the benchmarks themselves):
# their fixtures run real benchmark sweeps, about 2 minutes of the 2-core default run.
pytestmark = pytest.mark.slow

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
    pyro_baseline=False,
    seed=0,
)
VARIANTS = (
    "library (Trainer.run_epoch)",
    "NumPyro style: jit(svi.update) in a Python loop",
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
    # the code that ran: the commit (None outside git) and the package versions
    code = result["machine"]["code"]
    assert code["packages"]["jax"] == result["machine"]["jax_version"]
    assert code["backend"] == result["machine"]["jax_backend"]
    assert code["commit"] is None or len(code["commit"]) == 40
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


# --- local_optimizer: fit_local's vectorized Adam against a one-at-a-time loop ---------------

LOCAL_TINY = dict(
    configs=((6, 2, 20),),
    loop_datapoints=3,
    loop_steps=60,
    hidden=32,
    z_dim=4,
    x_dim=784,
    learning_rate=0.05,
    repeats=1,
    matmul_sizes=(32, 64),
    matmul_repeats=1,
    agreement_samples=400,
    end_to_end=False,
    torch_loop_baseline=False,
    data="random",
    seed=0,
)


@pytest.fixture(scope="module")
def local_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result, report = run_and_save("local_optimizer", quick=True, out_dir=out, **LOCAL_TINY)
    assert json.loads((out / "local_optimizer.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "local_optimizer.md").read_text() == report
    return result


def test_local_optimizer_fields(local_result):
    assert local_result["flops_per_datapoint_sample_step"] == 4 * (4 * 32 + 32 * 784)
    assert "flops_formula" in local_result
    assert _positive_finite(local_result["matmul"]["peak_gflops"])
    assert _positive_finite(local_result["matmul"]["round_gflops"])
    assert _positive_finite(local_result["loop_dispatch_us_per_call"])
    rows = local_result["results"]
    # library and both floors for each (B, S), the loop for each S
    assert sorted((r["variant"], r["num_samples"]) for r in rows) == [
        ("floor", 2),
        ("floor_monitor", 2),
        ("floor_value", 2),
        ("library", 2),
        ("library_values", 2),
        ("loop", 2),
    ]
    for row in rows:
        for key in ("seconds_median", "datapoint_steps_per_s", "gflops", "fraction_of_peak"):
            assert _positive_finite(row[key]), key
        if row["variant"] == "library":
            assert _positive_finite(row["over_loop"]) and _positive_finite(row["over_floor"])
        if row["variant"] in ("library", "library_values"):
            assert _positive_finite(row["over_floor_signal"])
        if row["variant"] in ("floor_value", "floor_monitor"):
            assert _positive_finite(row["over_floor"])
    assert len(local_result["table"]["rows"]) == len(rows) + 2
    for row in rows:
        if row["variant"] == "library":
            by_round = row["over_floor_by_round"]
            assert by_round["ratio_of_medians"] == pytest.approx(row["over_floor"])
            assert len(by_round["per_round"]) == len(row["seconds_all"])


def test_floor_with_values_takes_the_same_steps():
    """Returning the per-step ELBO values leaves the floor's optimization untouched, and the
    values are the ELBO estimates of the iterates it passes through."""
    import jax
    import jax.numpy as jnp

    from amortjax.models import vae_model
    from amortjax.nets import MLP
    from bench.local_optimizer import HandLocal, decoder_params

    model = vae_model(MLP((16,), 784, "relu"), z_dim=3, likelihood="bernoulli")
    x = (jax.random.uniform(jax.random.key(0), (5, 784)) < 0.3).astype(jnp.float32)
    params = decoder_params(model, x=x[:2], x_dim=784, hidden=16, z_dim=3, seed=0)
    lam0 = jnp.zeros((5, 6))
    kwargs = dict(num_samples=2, learning_rate=0.05, steps=40)
    plain = HandLocal(params, **kwargs).fit(x, lam0, jax.random.key(1))
    lam, _ = HandLocal(params, **kwargs, with_value=True).fit(x, lam0, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(lam))
    # one step: its value is the ELBO estimate at the start, on the step's own draws
    one = HandLocal(params, **{**kwargs, "steps": 1}, with_value=True)
    key = jax.random.key(2)
    eps = jax.random.normal(jax.random.split(key, 1)[0], (5, 2, 3))
    np.testing.assert_allclose(one.fit(x, lam0, key)[1], one.elbos(lam0, x, eps), rtol=1e-6)
    # The monitor (its steps gradient-only) takes the same steps too; with one block of one
    # step its best score is the better of the start's and the end's on the monitor's draws.
    lam_m, _ = HandLocal(params, **kwargs, monitor=4, block=10).fit(x, lam0, jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(lam_m))
    mon = HandLocal(params, **{**kwargs, "steps": 1}, monitor=4, block=1)
    end, best = mon.fit(x, lam0, key)
    eps_m = mon.monitor_draws(key, lam0.shape)
    expected = np.maximum(mon.elbos(lam0, x, eps_m), mon.elbos(end, x, eps_m))
    np.testing.assert_allclose(best, expected, rtol=1e-6)


def test_loop_and_fit_local_optimize_the_same_objective(local_result):
    agree = local_result["agreement"]
    assert agree["fit_local_steps"] == [60, 60, 60]
    init = np.array(agree["init_elbo"])
    loop = np.array(agree["loop_elbo"])
    vec = np.array(agree["fit_local_elbo"])
    assert np.isfinite([init, loop, vec]).all()
    gain_loop, gain_vec = loop - init, vec - init
    # Both climb the same local ELBO by a clear margin ...
    assert (gain_loop > 5.0).all() and (gain_vec > 5.0).all()
    # ... and reach the same height: independent noise paths, the same objective.
    np.testing.assert_allclose(vec, loop, rtol=0, atol=0.1 * gain_loop.mean())


# --- sa_step: SA-VAE and VAE+SVI training steps against a VAE step --------------------------

SA_TINY = dict(
    num_steps=(2,),
    modes=("sa", "svi"),
    steps_per_epoch=2,
    batch_size=8,
    hidden=16,
    z_dim=3,
    x_dim=784,
    repeats=1,
    xla_flops=False,  # checked on its own below: each count compiles the step once more
    data="random",
    seed=0,
)


@pytest.fixture(scope="module")
def sa_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result, report = run_and_save("sa_step", quick=True, out_dir=out, **SA_TINY)
    assert json.loads((out / "sa_step.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "sa_step.md").read_text() == report
    return result


def test_sa_step_fields(sa_result):
    from bench.sa_step import analytic_flops

    rows = sa_result["results"]
    assert [(r["mode"], r["num_steps"]) for r in rows] == [("vae", 0), ("sa", 2), ("svi", 2)]
    sizes = dict(batch=8, x_dim=784, hidden=16, z_dim=3)
    for row in rows:
        for key in ("ms_per_step", "time_ratio", "analytic_flops", "analytic_flop_ratio"):
            assert _positive_finite(row[key]), key
        assert row["analytic_flops"] == analytic_flops(row["mode"], row["num_steps"], **sizes)
        assert math.isfinite(row["mean_loss_last_epoch"])
        if row["xla_flops"] is not None:  # XLA's count, where the backend gives one
            assert _positive_finite(row["xla_flops"]) and _positive_finite(row["xla_flop_ratio"])
    vae, sa, svi = rows
    assert vae["time_ratio"] == 1.0 and vae["analytic_flop_ratio"] == 1.0
    # Refinement adds work, and differentiating through it adds more.
    assert sa["analytic_flop_ratio"] > svi["analytic_flop_ratio"] > 1.0
    if sa["xla_flops"] is not None:
        assert sa["xla_flops"] > svi["xla_flops"] > vae["xla_flops"]
    assert len(sa_result["table"]["rows"]) == 3


def test_sa_step_reports_a_diverged_variant_instead_of_failing(tmp_path, monkeypatch):
    """Training whose loss is not finite (here forced: every epoch's losses made NaN): the run
    still writes its JSON (no NaN in it), marks each loss as diverged and says so in a note."""
    import jax.numpy as jnp

    from amortjax.inference.training import Trainer

    run_epoch = Trainer.run_epoch

    def nan_losses(self, state, x):
        state, losses = run_epoch(self, state, x)
        return state, losses * jnp.nan

    monkeypatch.setattr(Trainer, "run_epoch", nan_losses)
    result, report = run_and_save("sa_step", quick=True, out_dir=tmp_path, **SA_TINY)
    assert [r["mean_loss_last_epoch"] for r in result["results"]] == [None, None, None]
    assert "diverged" in report and "sa K=2, svi K=2" in report
    assert all(_positive_finite(r["ms_per_step"]) for r in result["results"])
    json.loads((tmp_path / "sa_step.json").read_text())


def test_sa_step_xla_flops_of_a_vae_step():
    import jax
    import jax.numpy as jnp

    from amortjax.guides import amortized_guide
    from amortjax.inference.objectives import make_optimizer
    from amortjax.inference.training import Trainer
    from amortjax.models import vae_model
    from amortjax.nets import MLP
    from bench.sa_step import analytic_flops, xla_step_flops

    model = vae_model(MLP((16,), 784), z_dim=3)
    guide = amortized_guide(MLP((16,), 6), x_dim=784)
    trainer = Trainer(model, guide, make_optimizer(1e-3), n_data=8, batch_size=8)
    x = jnp.asarray(np.random.default_rng(0).random((8, 784)) < 0.13, jnp.float32)
    flops = xla_step_flops(trainer, trainer.init(jax.random.key(0), x), x)
    if flops is None:
        pytest.skip("this backend gives no cost analysis")
    # XLA counts the matmuls (less the encoder's unneeded input gradient) and elementwise work.
    analytic = analytic_flops("vae", 0, batch=8, x_dim=784, hidden=16, z_dim=3)
    assert 0.6 * analytic < flops < 1.5 * analytic


# --- evaluators: IWAE and AIS throughput ------------------------------------------------------


def test_evaluators_benchmark_counts_work_and_reports_rates(tmp_path):
    result, report = run_and_save(
        "evaluators",
        quick=True,
        out_dir=tmp_path,
        datapoints=3,
        iwae_samples=8,
        ais_chains=2,
        ais_temperatures=3,
        ais_leapfrog=2,
        hidden=(16, 16),
        z_dim=4,
        data="random",
    )
    assert (tmp_path / "evaluators.md").read_text() == report
    iwae, ais = result["results"]["IWAE"], result["results"]["AIS"]
    assert iwae["decoder_evaluations"] == 3 * 8
    # AIS counts its pilot pass too (min(4, chains) chains over the same temperatures)
    assert ais["decoder_evaluations"] == 3 * (2 + 2) * 3 * 2
    forward = 2 * (4 * 16 + 16 * 16 + 16 * 784)
    assert iwae["flops_per_evaluation"] == forward
    assert ais["flops_per_evaluation"] == 2 * forward
    assert result["results"]["IWAE floor"]["decoder_evaluations"] == 3 * 8
    assert result["results"]["IWAE floor, per-draw keys"]["decoder_evaluations"] == 3 * 8
    assert result["results"]["AIS floor"]["decoder_evaluations"] == 3 * 2 * 6
    for ceiling in ("ceiling: matmuls", "ceiling: matmuls + ELU"):
        assert result["results"][ceiling]["decoder_evaluations"] == 3 * 8
        assert result["results"][ceiling]["flops_per_evaluation"] == forward
    for r in result["results"].values():
        assert r["finite"]
        for key in ("seconds_median", "decoder_evaluations_per_s", "gflops", "fraction_of_peak"):
            assert _positive_finite(r[key]), key
    ratios = {row["estimator"]: row["library / floor"] for row in result["table"]["rows"][:4]}
    assert _positive_finite(ratios["IWAE"]) and _positive_finite(ratios["AIS"])
    for name in ("IWAE", "AIS"):  # the same ratio, and round by round
        by_round = result["results"][name]["over_floor_by_round"]
        assert by_round["ratio_of_medians"] == pytest.approx(ratios[name])


def test_evaluator_floors_score_the_library_models_log_joint():
    """The hand-written floor computes the same log p(x, z) as the NumPyro model it races."""
    import jax
    import jax.numpy as jnp

    from amortjax.models import vae_model
    from amortjax.nets import MLP
    from amortjax.traces import log_joint
    from bench.evaluators import hand_log_joint
    from bench.local_optimizer import decoder_params

    x = (jax.random.uniform(jax.random.key(0), (5, 784)) < 0.3).astype(jnp.float32)
    model = vae_model(MLP((16, 16), 784, "elu"), z_dim=4)
    params = decoder_params(model, x=x[:2], x_dim=784, hidden=16, z_dim=4, seed=0)
    z = jax.random.normal(jax.random.key(1), (5, 4))
    constant = -0.5 * 4 * np.log(2 * np.pi)
    np.testing.assert_allclose(
        hand_log_joint(params, z, x) + constant, log_joint(model, params, x, {"z": z}), rtol=1e-5
    )


def test_torch_loop_climbs_the_same_local_elbo(tmp_path):
    pytest.importorskip("torch")
    result, _ = run_and_save(
        "local_optimizer",
        quick=True,
        out_dir=tmp_path,
        **{**LOCAL_TINY, "torch_loop_baseline": True},
    )
    agree = result["agreement"]
    init, loop = np.array(agree["init_elbo"]), np.array(agree["loop_elbo"])
    torch_elbo = np.array(agree["torch_loop_elbo"])
    gain = loop - init
    assert (torch_elbo - init > 5.0).all()
    np.testing.assert_allclose(torch_elbo, loop, rtol=0, atol=0.1 * gain.mean())
    variants = {r["variant"] for r in result["results"]}
    assert "torch_loop" in variants
    lib = [r for r in result["results"] if r["variant"] == "library"]
    assert all(_positive_finite(r["over_torch_loop"]) for r in lib)


def test_pyro_vae_baseline_trains_the_same_model(tmp_path):
    pytest.importorskip("pyro")
    result, _ = run_and_save(
        "train_step", quick=True, out_dir=tmp_path, **{**TINY, "pyro_baseline": True}
    )
    pyro_run = result["variants"]["Pyro SVI (PyTorch)"]
    lib_run = result["variants"]["library (Trainer.run_epoch)"]
    assert _positive_finite(pyro_run["steps_per_s"])
    # Same model, data and objective: after two short epochs both -ELBOs are in the same range.
    assert abs(pyro_run["mean_loss_last_epoch"] - lib_run["mean_loss_last_epoch"]) < 0.2 * abs(
        lib_run["mean_loss_last_epoch"]
    )


# --- memory: peak memory of IWAE-k and fit_local, each measured in a fresh process -----------

MEMORY_TINY = dict(
    datapoints=(100, 400),
    chunks=(10, 100),
    estimators=("iwae",),
    iwae_samples=100,
    iwae_batch=50,
    hidden=(16, 16),
    z_dim=4,
    x_dim=784,
    calibration_mib=64,
    data="random",
    seed=0,
)


@pytest.fixture(scope="module")
def memory_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    result, report = run_and_save("memory", quick=True, out_dir=out, **MEMORY_TINY)
    assert json.loads((out / "memory.json").read_text()) == json.loads(json.dumps(result))
    assert (out / "memory.md").read_text() == report
    return result


def test_memory_calibration_measures_a_known_allocation(memory_result):
    from bench.memory import reset_peak_rss

    calibration = memory_result["calibration"]
    assert calibration["spec"] == {"what": "calibration", "mib": 64}
    # A 64 MiB array, measured in its own process above the baseline: the method is in MiB,
    # starts from the right baseline and sees the peak, not the size after the array is freed.
    assert 0.9 * 64 < calibration["peak_mib"] < 1.25 * 64
    if reset_peak_rss():  # Linux: the peaks of each phase are measured on their own
        assert all(m["peak_reset"] for m in memory_result["measurements"])


def test_memory_peaks_and_xla_analysis_follow_the_chunk_not_n(memory_result):
    rows = memory_result["measurements"]
    assert [(m["spec"]["n"], m["spec"]["chunk"]) for m in rows] == [
        (100, 10),
        (400, 10),
        (100, 100),
    ]
    for m in rows:
        assert m["spec"]["what"] == "iwae"
        for key in ("baseline_rss_mib", "first_chunk_peak_mib", "peak_mib", "run_seconds"):
            assert _positive_finite(m[key]), key
        assert m["peak_mib"] >= m["first_chunk_peak_mib"]
        assert m["peak_mib"] >= m["run_peak_mib"]
    xla = [m["xla_memory_analysis"]["bounds_batch"] for m in rows]
    if xla[0] is None:
        pytest.skip("this backend gives no memory analysis")
    small, large_n, large_chunk = (x["temp_mib"] for x in xla)
    assert small > 0
    # The compiled chunk is the same whatever N: memory is bounded by the chunk ...
    assert large_n == small
    # ... and grows with it: 50 datapoints x 100 draws at once against 50 x 10.
    assert large_chunk > 3 * small
    summary = memory_result["summary"]["iwae"]
    assert summary["xla_temp_ratio_large_chunk_over_small"] == pytest.approx(large_chunk / small)
    assert _positive_finite(summary["peak_ratio_large_n_over_small_n"])
    assert len(memory_result["table"]["rows"]) == 1 + 3


def test_memory_of_fit_local_measured_in_process():
    from bench.memory import measure

    spec = dict(
        what="local", n=40, chunk=20, hidden=[16], z_dim=3, x_dim=784, data="random", seed=0,
        local_steps=5, local_samples=2, final_samples=10,
    )  # fmt: skip
    m = measure(spec)
    assert _positive_finite(m["baseline_rss_mib"]) and m["peak_mib"] >= 0
    assert _positive_finite(m["run_seconds"])
    analysis = m["xla_memory_analysis"]
    assert set(analysis) == {"fit_chunk", "final_bounds_batch"}
    if analysis["fit_chunk"] is not None:
        # arguments hold at least the chunk's data: 20 datapoints x 784 float32
        assert analysis["fit_chunk"]["argument_mib"] * 2**20 >= 20 * 784 * 4
        assert analysis["final_bounds_batch"]["temp_mib"] > 0


# --- scaling: time against N, z_dim and the samples, with log-log slopes ----------------------


def test_loglog_slope_recovers_power_laws():
    from bench.scaling import loglog_slope

    sizes = np.array([10, 20, 40, 80, 160])
    noise = 1 + 0.02 * np.random.default_rng(0).standard_normal(sizes.size)
    for power in (0.0, 0.5, 1.0, 2.0):
        assert loglog_slope(sizes, 3e-4 * sizes**power * noise) == pytest.approx(power, abs=0.05)
    # a fixed cost plus a linear one: the slope lies between 0 and 1
    assert 0.2 < loglog_slope(sizes, 1.0 + 0.05 * sizes) < 0.9
    with pytest.raises(ValueError, match="two or more distinct sizes"):
        loglog_slope([10, 10], [1.0, 2.0])
    with pytest.raises(ValueError, match="must be positive"):
        loglog_slope([1, 2], [0.0, 1.0])


def test_time_sweep_recovers_a_linear_cost():
    import time

    from bench.scaling import loglog_slope, time_sweep

    calls: dict[int, int] = {}

    def make(n):
        def cost():
            calls[n] = calls.get(n, 0) + 1
            time.sleep(0.01 * n)

        return cost

    sizes = [1, 2, 4, 8]
    linear = time_sweep(make, sizes, repeats=2)
    assert calls == {n: 3 for n in sizes}  # one first call and two timed rounds each
    assert [len(t) for t in linear["seconds_all"]] == [2] * 4
    assert loglog_slope(sizes, linear["seconds"]) == pytest.approx(1.0, abs=0.15)
    constant = time_sweep(lambda n: lambda: time.sleep(0.02), sizes, repeats=1)
    assert loglog_slope(sizes, constant["seconds"]) == pytest.approx(0.0, abs=0.15)


def test_scaling_benchmark_writes_documented_json_and_plot(tmp_path):
    from bench.scaling import FIGURE_NAME, RESULT_KEYS, SWEEP_KEYS, forward_flops

    result, report = run_and_save(
        "scaling",
        quick=True,
        out_dir=tmp_path,
        axes=("N", "z_dim", "S"),
        n_grid=(8, 16),
        z_grid=(2, 4),
        k_grid=(4, 8),
        s_grid=(1, 2),
        base_n=8,
        base_z=3,
        iwae_samples=4,
        iwae_samples_z_sweep=4,
        local_samples_z_sweep=2,
        local_steps=2,
        batch_size=8,  # one compiled batch for every N
        hidden=(16,),
        repeats=1,
        data="random",
    )
    on_disk = json.loads((tmp_path / "scaling.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert (tmp_path / "scaling.md").read_text() == report
    for key in RESULT_KEYS:
        assert key in on_disk, key
    assert on_disk["figure"] == FIGURE_NAME
    assert (tmp_path / FIGURE_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sweeps = {(s["estimator"], s["axis"]): s for s in on_disk["sweeps"]}
    assert set(sweeps) == {(e, a) for e in ("iwae", "local") for a in ("N", "z_dim", "S")}
    for s in sweeps.values():
        assert set(SWEEP_KEYS) <= set(s)
        assert len(s["seconds"]) == len(s["sizes"]) == 2
        assert all(_positive_finite(t) for t in s["seconds"])
        assert math.isfinite(s["time_slope"])
    assert sweeps[("iwae", "N")]["sizes"] == [8, 16] and sweeps[("iwae", "S")]["sizes"] == [4, 8]
    # Work doubles with N, k and S; with z_dim only the first layer grows.
    for key in (("iwae", "N"), ("iwae", "S"), ("local", "N")):
        assert sweeps[key]["flop_slope"] == pytest.approx(1.0), key
    assert 0 < sweeps[("iwae", "z_dim")]["flop_slope"] < 0.1
    assert sweeps[("iwae", "N")]["flops"] == [n * 4 * forward_flops(3, (16,), 784) for n in (8, 16)]
    assert on_disk["slopes"]["iwae/N"] == sweeps[("iwae", "N")]["time_slope"]
    assert len(on_disk["table"]["rows"]) == 6 * 2


# --- paper presets: one epoch each, projected training time -----------------------------------


def test_paper_preset_projection_counts_every_model_and_epoch():
    """Hours = copies x epochs x the second epoch's seconds, per model kind of each experiment;
    amortization_gap counts each family once per dataset of the paper preset."""
    from bench.paper_presets import project, trained_models
    from experiments.runner import load_experiment, resolve_config

    vae = resolve_config(load_experiment("vae_mnist"), "paper")
    rows = project(trained_models("vae_mnist", {"epoch_seconds": [30.0, 1.8]}, vae))
    assert rows[0]["seconds_per_epoch"] == 1.8
    assert rows[0]["projected_hours"] == pytest.approx(3280 * 1.8 / 3600)
    gap = resolve_config(load_experiment("amortization_gap"), "paper")
    metrics = {
        "models": {
            "mnist_diagonal": {"family": "diagonal", "epoch_seconds": [9.0, 2.0, 4.0]},
            "mnist_flow": {"family": "flow", "epoch_seconds": [9.0, 5.0]},
        }
    }
    rows = {r["model"]: r for r in project(trained_models("amortization_gap", metrics, gap))}
    assert rows["diagonal VAE"]["projected_hours"] == pytest.approx(2 * 3280 * 3.0 / 3600)
    assert rows["flow VAE"]["projected_hours"] == pytest.approx(2 * 3280 * 5.0 / 3600)
    with pytest.raises(ValueError, match="ran no epoch"):
        project(trained_models("vae_mnist", {"epoch_seconds": []}, vae))
    with pytest.raises(ValueError, match="unknown experiment 'nope'"):
        trained_models("nope", {}, vae)


def test_paper_presets_benchmark_times_real_epochs(tmp_path):
    """Quick mode trains item_response's regimes for two epochs and projects from their times."""
    result, report = run_and_save("paper_presets", quick=True, out_dir=tmp_path)
    assert (tmp_path / "paper_presets.md").read_text() == report
    item = result["experiments"]["item_response"]
    assert {m["model"] for m in item["models"]} == {"amortized", "per_example", "semi_amortized"}
    for m in item["models"]:
        assert len(m["epoch_seconds"]) == 2 and all(t > 0 for t in m["epoch_seconds"])
        assert m["projected_hours"] == pytest.approx(m["epochs"] * m["epoch_seconds"][1] / 3600)
    total = sum(m["projected_hours"] for m in item["models"])
    assert item["projected_hours"] == pytest.approx(total)


# --- newton_step: fit_local's Newton q* against a hand-written Newton floor -------------------


def test_hand_newton_takes_the_librarys_step():
    """On the same draws the floor's Newton step is the library's (`_newton_one`): the same new
    q, and the same ELBO estimate up to the normalizing constants it leaves out (z_dim / 2)."""
    import jax
    import jax.numpy as jnp

    from amortjax.families import DiagonalGaussian
    from amortjax.inference.local import _antithetic, _newton_one
    from amortjax.models import vae_model
    from amortjax.nets import MLP
    from bench.local_optimizer import decoder_params
    from bench.newton_step import HandNewton

    model = vae_model(MLP((32,), 784, "relu"), z_dim=4, likelihood="bernoulli")
    x = (jax.random.uniform(jax.random.key(0), (2, 784)) < 0.3).astype(jnp.float32)
    params = decoder_params(model, x=x, x_dim=784, hidden=32, z_dim=4, seed=0)
    hand = HandNewton(params, num_samples=4, steps=10, block=10, step=0.5)
    lam = jnp.concatenate([0.3 * jnp.ones(4), -0.5 * jnp.ones(4)])
    key = jax.random.key(1)
    new, elbo = _newton_one(model, DiagonalGaussian(), "z", 4, params, x[0], lam, key, 0.5)
    hand_new, hand_elbo = hand._one(hand.weights, x[0], lam, _antithetic(key, 4, 4, lam.dtype))
    np.testing.assert_allclose(hand_new, new, rtol=1e-4, atol=1e-5)
    assert float(elbo - hand_elbo) == pytest.approx(2.0, abs=1e-3)


def test_newton_step_runs_and_both_fits_agree(tmp_path):
    tiny = dict(datapoints=6, steps=20, hidden=32, z_dim=4, repeats=1, score_samples=400,
                data="random")  # fmt: skip
    result, report = run_and_save("newton_step", quick=True, out_dir=tmp_path, **tiny)
    assert set(result["results"]) == {"library", "library_z", "floor"}
    assert result["results"]["library"]["steps_of_work"] == 30  # its start-scoring block
    assert _positive_finite(result["default_frame_over_z_frame"])
    assert _positive_finite(result["library_over_floor"])
    by_round = result["library_over_floor_by_round"]
    assert by_round["ratio_of_medians"] == pytest.approx(result["library_over_floor"])
    agreement = result["agreement"]
    assert abs(agreement["mean_difference"]) < 4 * agreement["difference_se"] + 0.02
    assert "library / floor" in report


def test_several_benchmarks_run_each_in_its_own_process_and_a_failure_costs_only_its_own(
    tmp_path, monkeypatch, capsys
):
    """`python -m bench A B` runs each in a fresh `python -m bench NAME` (one process ran out of
    memory mappings for compiled code after nine modules); a failed one does not stop the
    others, and the command fails at the end naming it."""
    import subprocess
    import sys

    import bench.__main__ as cli

    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 1 if "sa_step" in command else 0)

    monkeypatch.setattr(cli.subprocess, "run", fake_run)
    with pytest.raises(SystemExit, match=r"1 of 3 benchmarks failed: \['sa_step'\]"):
        cli.main(["train_step", "sa_step", "evaluators", "--quick", "--out-dir", str(tmp_path)])
    assert [c[3] for c in commands] == ["train_step", "sa_step", "evaluators"]
    for c in commands:
        assert c[:3] == [sys.executable, "-m", "bench"] and "--quick" in c and str(tmp_path) in c
    assert "sa_step FAILED" in capsys.readouterr().err
    commands.clear()
    cli.main(["train_step", "evaluators"])  # all pass: no exit
    assert len(commands) == 2 and all("--quick" not in c for c in commands)


def test_a_result_records_its_process_memory_and_mappings(result):
    process = result["process"]
    if process["memory_maps"] is None:
        pytest.skip("needs Linux's /proc")
    assert process["peak_rss_mib"] > 100  # jax alone takes more
    assert 0 < process["memory_maps"] < process["max_map_count"]
