"""AIS with HMC transitions and BDMC against the exact log p(x) of a linear-Gaussian model.

Every run goes through the library's own VAE code path (`linear_gaussian_vae`: a linear decoder
with a Gaussian likelihood in a NumPyro model), so log p(x, z) comes from `traces.log_joint`.
Compilation dominates the cost on CPU, so the tests share a few compiled shapes: 12 datapoints,
64 chains, L = 10 leapfrog steps, T = 2000 or 50 temperatures.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortjax.evaluation.ais import (
    AISWarning,
    ais,
    annealing_schedule,
    bdmc,
    log_weight_spread,
    reverse_ais,
    reverse_step_sizes,
    run_hmc,
)
from amortjax.families import FullRankGaussian
from amortjax.guides import encode
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.models import simulate
from amortjax.models.linear_gaussian import make_linear_gaussian
from amortjax.nets import MLP

N, X_DIM, Z_DIM = 12, 12, 3
SETTINGS = {"num_chains": 64, "num_temperatures": 2000, "leapfrog_steps": 10}
SHORT = {**SETTINGS, "num_temperatures": 50}


@pytest.fixture(scope="module")
def case():
    """A factor-analysis model whose posterior is correlated and far from the prior, and data
    simulated from it with the latents that generated them."""
    lg = make_linear_gaussian(jax.random.key(0), x_dim=X_DIM, z_dim=Z_DIM, noise_scale=1.0)
    model, _, params = linear_gaussian_vae(lg)
    x, latents = simulate(model, params, jax.random.key(3), jnp.zeros((N, X_DIM)))
    return lg, model, params, x, latents["z"], np.asarray(lg.log_marginal(x), np.float64)


@pytest.fixture(scope="module")
def bracket(case):
    """BDMC from the prior; its forward run is `ais` (with the first half of the split key)."""
    _, model, params, x, z, _ = case
    return bdmc(model, params, x, z, jax.random.key(4), **SETTINGS)


def test_ais_from_the_prior_matches_the_exact_log_marginal(case, bracket):
    lg, _, _, x, _, exact = case
    # Not an easy target: the prior is 50+ nats of KL from the posterior, so plain importance
    # sampling from it with 64 draws would miss log p(x) by nats.
    prior_gap = exact - np.asarray(lg.elbo(x, jnp.zeros((N, Z_DIM)), jnp.ones(Z_DIM)))
    assert prior_gap.mean() > 40
    run = bracket.forward
    err = run.log_px - exact
    assert run.log_px.shape == (N,) and run.log_weights.shape == (N, 64)
    assert abs(err.mean()) < 0.03, err
    # Per datapoint: the Monte Carlo standard error is ~0.04 nats (64 chains whose log-weights
    # spread by ~0.33); 0.2 is 5 of them.
    assert np.abs(err).max() < 0.2, err
    assert 0.6 < run.acceptance.mean() < 0.75  # the pilot adapted toward target_accept = 0.65
    assert np.all(run.ess > 40) and np.all(run.ess <= 64)
    # The pilot's schedule, one step size per datapoint and transition; q0 = N(0, I) gives
    # step scales ~1 (q0's standard deviation from 256 draws).
    assert run.step_size.shape == (N, 2000) and run.step_scale.shape == (N, Z_DIM)
    np.testing.assert_allclose(run.step_scale, 1.0, atol=0.2)
    np.testing.assert_allclose(run.step_size[:, 0], 0.1)  # the pilot's start
    assert np.all(run.step_size[:, -1] > 0.2)  # grown toward the posterior's scale
    assert run.warnings == ()
    settings = (run.num_chains, run.num_temperatures, run.schedule, run.leapfrog_steps)
    assert settings == (64, 2000, "sigmoid", 10)


def test_ais_from_the_encoder_needs_fewer_temperatures(case):
    lg, model, params, x, _, exact = case
    lam = encode(MLP(hidden_sizes=(), out_size=2 * Z_DIM), params, x)  # the best diagonal q
    diag_gap = exact - np.asarray(lg.elbo(x, *lg.best_diagonal(x)))
    assert diag_gap.mean() > 0.1  # the diagonal q alone misses log p(x)
    # The pilots start at 0.5 (of q0's per-dimension standard deviations, step_scale="q0"):
    # from 0.1 they could not grow the steps enough in 50 transitions (acceptance 0.996, an
    # AISWarning).
    from_q = ais(model, params, x, jax.random.key(1), init_params=lam, step_size=0.5, **SHORT)
    with pytest.warns(AISWarning, match="log-weights spread by a median of"):
        from_prior = ais(model, params, x, jax.random.key(1), step_size=0.5, **SHORT)
    err_q, err_prior = from_q.log_px - exact, from_prior.log_px - exact
    assert abs(err_q.mean()) < 0.02, err_q  # measured -0.007
    assert np.abs(err_q).max() < 0.1, err_q  # measured 0.08
    # With the same 50 temperatures, the prior start is far worse (measured 0.34 nats mean
    # absolute error against 0.03, ESS 8 against 61).
    assert np.abs(err_prior).mean() > 3 * np.abs(err_q).mean(), (err_q, err_prior)
    assert from_q.ess.mean() > 1.5 * from_prior.ess.mean()
    # q's scales are the best diagonal's, narrower than the prior's 1.
    np.testing.assert_allclose(from_q.step_scale, np.exp(lam[:, Z_DIM:]), rtol=0.2)
    # The prior start's chains end with log-weights spread by 4.75 nats (median): the warning
    # says its anneal is too coarse; the acceptance alone would not have told.
    assert from_q.warnings == ()
    (message,) = from_prior.warnings
    assert "likely low" in message


def test_ais_is_unbiased_for_any_number_of_temperatures(case):
    # E[w] = p(x) holds for every T, not only as T grows: with T = 2 and 2048 chains from the
    # encoder's q, log p-hat is within Monte Carlo error of log p(x). Weight increments taken
    # at the wrong state (after the transition instead of before) miss it here by ~0.3 nats.
    _, model, params, x, _, exact = case
    lam = encode(MLP(hidden_sizes=(), out_size=2 * Z_DIM), params, x)
    run = ais(
        model, params, x, jax.random.key(6), init_params=lam, num_chains=2048,
        num_temperatures=2, schedule="linear", leapfrog_steps=10, step_size=1.0,
    )  # fmt: skip
    err = run.log_px - exact
    assert abs(err.mean()) < 0.02, err  # measured: -0.004
    assert np.abs(err).max() < 0.06, err


def test_bdmc_brackets_the_exact_log_marginal(case, bracket):
    *_, exact = case
    b = bracket
    # Stochastic bounds: each may cross log p(x) by its Monte Carlo error (per-datapoint
    # standard error ~0.04 nats from the spread of 64 chains' log-weights, ~0.01 for the mean
    # over 12 datapoints); the tolerances are 4-5 of them.
    assert np.all(b.lower <= exact + 0.2), b.lower - exact
    assert np.all(b.upper >= exact - 0.2), b.upper - exact
    assert b.lower.mean() <= exact.mean() + 0.05
    assert b.upper.mean() >= exact.mean() - 0.05
    assert -0.02 < b.gap.mean() < 0.05, b.gap  # tight
    np.testing.assert_array_equal(b.gap, b.upper - b.lower)
    assert b.reverse.log_px is b.upper and b.forward.log_px is b.lower
    assert 0.6 < b.reverse.acceptance.mean() < 0.75
    # The bracket's quality, from the arrays.
    assert b.ordered_fraction == np.mean(b.upper >= b.lower)
    assert b.mean_width == pytest.approx(np.mean(b.upper - b.lower), abs=1e-12)
    assert b.mean_width_se == pytest.approx(np.std(b.gap, ddof=1) / np.sqrt(N))
    assert b.summary() == {
        "ordered_fraction": b.ordered_fraction,
        "mean_width": b.mean_width,
        "mean_width_se": b.mean_width_se,
        "mean_lower": pytest.approx(b.lower.mean()),
        "mean_upper": pytest.approx(b.upper.mean()),
    }
    # A bracket this tight is within Monte Carlo error of 0 wide, so some brackets invert by
    # chance (6 of 12 are ordered): no fault, no warning (see test_ais_exact.py).
    assert b.mean_width > -3 * b.mean_width_se
    assert b.warnings == b.forward.warnings == b.reverse.warnings == ()
    # The reverse run used the forward pilot's kernels, temperature by temperature.
    np.testing.assert_array_equal(b.reverse.step_size, reverse_step_sizes(b.forward.step_size))
    np.testing.assert_array_equal(b.reverse.step_scale, b.forward.step_scale)


def _posterior_samples(lg, x, key, chains):
    mean, cov = lg.posterior(x)
    eps = jax.random.normal(key, (x.shape[0], chains, Z_DIM))
    return mean[:, None, :] + eps @ jnp.linalg.cholesky(cov).T


def _moments_match(lg, x, z, *, mean_tol, cov_tol):
    """Pooled residuals z - E[z | x] have mean 0 (within mean_tol standard errors) and the
    posterior covariance (within cov_tol of its largest variance)."""
    mean, cov = lg.posterior(x)
    resid = np.asarray(z - mean[:, None, :]).reshape(-1, Z_DIM)
    se = np.sqrt(np.diag(cov) / len(resid))
    assert np.all(np.abs(resid.mean(0)) < mean_tol * se), resid.mean(0) / se
    np.testing.assert_allclose(np.cov(resid.T), cov, atol=cov_tol * np.max(np.diag(cov)))


def test_hmc_at_b1_leaves_the_exact_posterior_invariant(case):
    lg, model, params, x, _, _ = case
    x = x[:8]
    z0 = _posterior_samples(lg, x, jax.random.key(10), 512)
    _moments_match(lg, x, z0, mean_tol=4, cov_tol=0.05)
    # Step size 0.25 accepts ~70%, close to the leapfrog's stability limit (2 x the smallest
    # posterior standard deviation, 0.33): without the Metropolis correction the chains would
    # drift to the shadow Hamiltonian's distribution, twice as wide in the stiffest direction.
    out = run_hmc(
        model, params, x, z0, jax.random.key(11), num_steps=20, step_size=0.25,
        adapt_step_size=False,
    )  # fmt: skip
    assert 0.6 < out.acceptance.mean() < 0.8
    np.testing.assert_array_equal(out.step_size, 0.25 * np.ones((8, 512), np.float32))
    assert np.abs(out.z - z0).mean() > 0.1  # the chains moved
    _moments_match(lg, x, out.z, mean_tol=4, cov_tol=0.05)
    # A datapoint's chains draw by its index: two of them alone, given theirs, move as above.
    idx = np.array([6, 1])
    pair = run_hmc(
        model, params, x[idx], z0[idx], jax.random.key(11), num_steps=20, step_size=0.25,
        adapt_step_size=False, indices=idx,
    )  # fmt: skip
    np.testing.assert_allclose(pair.z, out.z[idx], atol=1e-5)


def test_hmc_with_step_scales_leaves_the_exact_posterior_invariant(case):
    # A diagonal mass matrix: step eps * s_d in dimension d with unit momenta, i.e. leapfrog
    # in u = z / s and the Metropolis test with u's Hamiltonian. With scales 10x apart the
    # chains keep the posterior's moments, and every dimension moves by about a posterior
    # standard deviation per 20 transitions at 0.9 acceptance (with the momentum update left
    # unscaled, the acceptance drops to 0.4).
    lg, model, params, x, _, _ = case
    x = x[:8]
    z0 = _posterior_samples(lg, x, jax.random.key(15), 512)
    _, cov = lg.posterior(x)
    scale = np.array([0.3, 1.0, 3.0], np.float32) * np.sqrt(np.diag(cov))
    out = run_hmc(
        model, params, x, z0, jax.random.key(16), num_steps=20, step_size=0.34,
        step_scale=scale, adapt_step_size=False,
    )  # fmt: skip
    assert 0.8 < out.acceptance.mean() < 0.95, out.acceptance
    moved = np.abs(np.asarray(out.z - z0)).mean((0, 1)) / np.sqrt(np.diag(cov))
    assert np.all(moved > 0.3), moved  # every dimension moved
    _moments_match(lg, x, out.z, mean_tol=4, cov_tol=0.05)


@pytest.mark.parametrize("start", [0.01, 1.0])
def test_step_size_adaptation_moves_the_acceptance_to_the_target(case, start):
    lg, model, params, x, _, _ = case
    x = x[:8]
    z0 = _posterior_samples(lg, x, jax.random.key(12), 512)
    kwargs = {"num_steps": 20, "leapfrog_steps": 10}
    fixed = run_hmc(
        model, params, x, z0, jax.random.key(13), step_size=start, adapt_step_size=False, **kwargs
    )
    assert abs(fixed.acceptance.mean() - 0.65) > 0.3  # far from the target
    adapted = run_hmc(model, params, x, z0, jax.random.key(13), step_size=start, **kwargs)
    acceptance = []
    for i in range(14):  # 300 adapted transitions in all: enough to move 0.01 to 0.3
        adapted = run_hmc(
            model, params, x, adapted.z, jax.random.key(14 + i), step_size=adapted.step_size,
            **kwargs,
        )  # fmt: skip
        acceptance.append(adapted.acceptance)
    # Over the last 100 transitions the mean acceptance is at the target for every datapoint.
    # (Over 20 it swings by +-0.08: the adapted step size sits near the leapfrog's stability
    # limit, where a 2% change of the step size moves the acceptance a lot.)
    np.testing.assert_allclose(np.mean(acceptance[-5:], axis=0), 0.65, atol=0.05)
    assert np.all((adapted.step_size > 0.22) & (adapted.step_size < 0.33))
    # Per-datapoint adaptation: all chains of a datapoint share one step size.
    np.testing.assert_allclose(
        adapted.step_size, np.broadcast_to(adapted.step_size[:, :1], adapted.step_size.shape)
    )
    _moments_match(lg, x, adapted.z, mean_tol=5, cov_tol=0.06)


def test_same_key_same_numbers_and_batch_size_does_not_matter(case):
    _, model, params, x, _, _ = case
    first = ais(model, params, x, jax.random.key(2), **SHORT)
    again = ais(model, params, x, jax.random.key(2), **SHORT)
    np.testing.assert_array_equal(again.log_weights, first.log_weights)
    np.testing.assert_array_equal(again.step_size, first.step_size)
    np.testing.assert_array_equal(again.step_scale, first.step_scale)
    # Batches of 7, the last one padded: every datapoint draws from its own key, in the pilot,
    # in q0's draws for the step scales and in the estimating run.
    batched = ais(model, params, x, jax.random.key(2), batch_size=7, **SHORT)
    np.testing.assert_allclose(batched.log_weights, first.log_weights, atol=1e-3)
    np.testing.assert_allclose(batched.acceptance, first.acceptance, atol=1e-4)
    np.testing.assert_allclose(batched.step_size, first.step_size, rtol=1e-4)
    np.testing.assert_allclose(batched.step_scale, first.step_scale, rtol=1e-5)
    other = ais(model, params, x, jax.random.key(3), **SHORT)
    assert np.abs(other.log_weights - first.log_weights).mean() > 0.1


def test_the_estimating_run_uses_kernels_fixed_by_the_pilot(case):
    _, model, params, x, z, _ = case
    pilot = jax.random.key(7)
    first = ais(model, params, x, jax.random.key(2), pilot_key=pilot, **SHORT)
    # The schedule is the pilot's adaptation path: from the start, x1.02 or x0.98 per
    # transition, per datapoint.
    assert first.step_size.shape == (N, 50)
    np.testing.assert_allclose(first.step_size[:, 0], 0.1)
    ratios = first.step_size[:, 1:] / first.step_size[:, :-1]
    assert np.all(np.isclose(ratios, 1.02, rtol=1e-5) | np.isclose(ratios, 0.98, rtol=1e-5))
    assert len({tuple(row) for row in first.step_size}) > 1  # each datapoint its own
    # Another key with the same pilot key: the same kernels, other chains.
    second = ais(model, params, x, jax.random.key(5), pilot_key=pilot, **SHORT)
    np.testing.assert_array_equal(second.step_size, first.step_size)
    np.testing.assert_array_equal(second.step_scale, first.step_scale)
    assert np.abs(second.log_weights - first.log_weights).mean() > 0.1
    # The pilot never sees the estimating chains: with 8 of them instead of 64, the same
    # kernels (the pilot runs min(pilot_chains=4, num_chains) chains of its own).
    fewer = ais(model, params, x, jax.random.key(2), pilot_key=pilot, **{**SHORT, "num_chains": 8})
    np.testing.assert_array_equal(fewer.step_size, first.step_size)
    # Without a pilot_key, the pilot's key is derived from the key: another key, another pilot.
    own = ais(model, params, x, jax.random.key(2), **SHORT)
    assert not np.array_equal(own.step_size, first.step_size)
    # Given kernels ([N, T] step sizes and the scales) are used as they are, with no pilot; the
    # estimating run's draws depend on the key only.
    reuse = ais(
        model, params, x, jax.random.key(2), step_size=own.step_size, step_scale=own.step_scale,
        **SHORT,
    )  # fmt: skip
    np.testing.assert_array_equal(reuse.log_weights, own.log_weights)
    # adapt_step_size=False: the given step size at every transition.
    fixed = ais(model, params, x, jax.random.key(2), adapt_step_size=False, step_size=0.3, **SHORT)
    np.testing.assert_array_equal(fixed.step_size, np.full((N, 50), 0.3, np.float32))
    # A pilot through every 5th temperature: its adaptation path at transitions 5, 10, ..., 50
    # (those targeting its temperatures), log-linear in between, its first step size before.
    coarse = ais(model, params, x, jax.random.key(2), pilot_temperatures=10, **SHORT)
    knots = coarse.step_size[:, 4::5]
    np.testing.assert_allclose(knots[:, 0], 0.1)
    ratios = knots[:, 1:] / knots[:, :-1]
    assert np.all(np.isclose(ratios, 1.02, rtol=1e-5) | np.isclose(ratios, 0.98, rtol=1e-5))
    np.testing.assert_allclose(coarse.step_size[:, :5], 0.1)
    log_eps = np.log(coarse.step_size[:, 4:]).reshape(N, 46)
    steps = np.diff(log_eps, axis=1).reshape(N, 9, 5)  # 5 equal steps between two knots
    np.testing.assert_allclose(steps, steps[:, :, :1].repeat(5, axis=2), atol=1e-5)
    # reverse_ais on its own runs the same forward pilot and uses its kernels in reverse order.
    rev = reverse_ais(model, params, x, z, jax.random.key(8), pilot_key=pilot, **SHORT)
    np.testing.assert_array_equal(rev.step_size, reverse_step_sizes(first.step_size))
    np.testing.assert_array_equal(rev.step_scale, first.step_scale)


def test_reverse_step_sizes_pair_the_kernels_by_temperature():
    # Forward transition t (1..T) is at b_t; reverse transition s at b_{T-s}, so it takes forward
    # transition T - s's step size, and the last one (at b_0) forward transition 1's.
    forward = np.array([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    np.testing.assert_array_equal(
        reverse_step_sizes(forward), [[3.0, 2.0, 1.0, 1.0], [7.0, 6.0, 5.0, 5.0]]
    )
    np.testing.assert_array_equal(reverse_step_sizes(np.array([[0.5]])), [[0.5]])


def test_schedules():
    for name in ("linear", "sigmoid"):
        b = annealing_schedule(name, 100)
        assert b.shape == (101,) and b[0] == 0.0 and b[-1] == 1.0
        assert np.all(np.diff(b) > 0)
    np.testing.assert_allclose(annealing_schedule("linear", 4), [0, 0.25, 0.5, 0.75, 1])
    b = annealing_schedule("sigmoid", 100, sigmoid_delta=4.0)
    np.testing.assert_allclose(b + b[::-1], 1.0, atol=1e-12)  # symmetric about the middle
    s = 1 / (1 + np.exp(-4.0 * np.array([-1.0, -0.98, 1.0])))
    assert b[1] == pytest.approx((s[1] - s[0]) / (s[2] - s[0]))
    # Small steps at the ends, where the target changes fastest.
    assert np.diff(b)[0] < 0.2 * np.diff(b)[50]
    np.testing.assert_allclose(annealing_schedule("sigmoid", 1), [0.0, 1.0])


def test_simulate_draws_from_the_joint(case):
    lg, model, params, *_ = case
    x, latents = simulate(model, params, jax.random.key(20), jnp.zeros((4000, X_DIM)))
    assert x.shape == (4000, X_DIM) and x.dtype == jnp.float32
    z = np.asarray(latents["z"])
    assert set(latents) == {"z"} and z.shape == (4000, Z_DIM)
    np.testing.assert_allclose(z.mean(0), 0, atol=0.07)
    np.testing.assert_allclose(np.cov(z.T), np.eye(Z_DIM), atol=0.08)
    # x given z: the residual is the observation noise.
    resid = np.asarray(x - z @ lg.weight.T - lg.bias)
    np.testing.assert_allclose(resid.std(0), lg.noise_scale, rtol=0.06)
    np.testing.assert_allclose(resid.mean(0), 0, atol=0.1)


def test_invalid_inputs_raise_clear_errors(case):
    _, model, params, x, _, _ = case
    key = jax.random.key(0)
    cases = [
        ({"schedule": "cosine"}, "unknown schedule 'cosine'"),
        ({"num_temperatures": 0}, "num_temperatures must be an integer >= 1"),
        ({"num_chains": 0}, "num_chains must be an integer >= 1"),
        ({"leapfrog_steps": 0}, "leapfrog_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"target_accept": 1.5}, "target_accept"),
        ({"step_size": -0.1}, "step_size must be positive"),
        ({"step_size": np.ones((3, 2))}, r"step_size must be a float, one per datapoint \[num"),
        ({"step_size": np.ones((N, 7))}, r"or a schedule \[num_datapoints=12, num_temperatures="),
        ({"step_scale": "prior"}, r"step_scale must be 'q0'"),
        (
            {"step_scale": np.ones(2)},
            r"step_scale must be 'q0' or per-dimension scales \[z_dim=3\]",
        ),
        ({"step_scale": np.array([1.0, 0.0, 1.0])}, "step_scale must be positive and finite"),
        ({"pilot_chains": 0}, "pilot_chains must be an integer >= 1"),
        ({"pilot_temperatures": 0}, "pilot_temperatures must be None"),
        ({"init_params": np.zeros((N, 5))}, r"init_params must be \[6\] or \[num_datapoints=12"),
        ({"init_params": np.zeros((N, 6)), "family": FullRankGaussian()}, r"must be \[9\]"),
        ({"z_dim": 4}, r"ais: z_dim=4, but the model's local latents \['z'\] have 3 dimensions"),
        (
            {"site": "w"},
            "ais: the model has no local latent site 'w' \\(its local latents: \\['z'\\]\\)",
        ),
        ({"sigmoid_delta": 0.0}, "sigmoid_delta"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ais(model, params, x, key, **kwargs)
    with pytest.raises(TypeError, match="adapt_per"):  # removed: the pilot adapts per datapoint
        ais(model, params, x, key, adapt_per="chain")
    with pytest.raises(ValueError, match="at least one row"):
        ais(model, params, x[:0], key)
    with pytest.raises(ValueError, match=r"z must be \[num_datapoints=12, z_dim=3\]"):
        bdmc(model, params, x, jnp.zeros((N, 2)), key)
    with pytest.raises(ValueError, match="num_steps"):
        run_hmc(model, params, x, jnp.zeros((N, 4, Z_DIM)), key, num_steps=0)
    with pytest.raises(ValueError, match="beta"):
        run_hmc(model, params, x, jnp.zeros((N, 4, Z_DIM)), key, num_steps=1, beta=2.0)
    with pytest.raises(ValueError, match="num_chains, z_dim"):
        run_hmc(model, params, x, jnp.zeros((N, Z_DIM)), key, num_steps=1)
    with pytest.raises(ValueError, match="step_scale must be positive"):
        run_hmc(
            model,
            params,
            x,
            jnp.zeros((N, 4, Z_DIM)),
            key,
            num_steps=1,
            step_scale=np.full(3, -1.0),
        )
    with pytest.raises(ValueError, match="exactly one observed site"):
        simulate(lambda x: None, {}, key, x)


def test_bdmc_does_not_depend_on_batch_size(case):
    """Both directions draw per datapoint: batches of 5 (the last padded) change nothing."""
    _, model, params, x, z, _ = case
    short = {**SHORT, "num_chains": 8}
    whole = bdmc(model, params, x, z, jax.random.key(9), **short)
    batched = bdmc(model, params, x, z, jax.random.key(9), batch_size=5, **short)
    np.testing.assert_allclose(batched.lower, whole.lower, atol=1e-3)
    np.testing.assert_allclose(batched.upper, whole.upper, atol=1e-3)
    assert np.abs(whole.upper - whole.lower).mean() > 1e-3  # a bracket with some width


def test_log_weight_spread_is_the_chains_standard_deviation():
    log_w = np.array([[0.0, 2.0], [1.0, 1.0]])
    np.testing.assert_allclose(log_weight_spread(log_w), [np.sqrt(2.0), 0.0])
    assert np.isnan(log_weight_spread(np.zeros((3, 1)))).all()  # one chain: no spread to judge
    with pytest.raises(ValueError, match=r"log-weights \[N, C\].*got shape \(4,\)"):
        log_weight_spread(np.zeros(4))


def test_bdmc_maps_simulated_latents_and_catches_constrained_ones():
    """A positive local latent (Gamma-Poisson rate): reverse AIS runs in u = log rate. simulate's
    dict of latents is mapped through the layout (the same run as u given by hand); the
    constrained values given as u start the reverse chains far from the posterior, and the
    bracket check says so (bounds 1e31 nats off, one of them NaN, were silent before)."""
    from amortjax.latents import find_local_latents
    from amortjax.models.gamma_poisson import gamma_poisson_log_marginal, gamma_poisson_model

    model = gamma_poisson_model(2.0, 0.1)
    x, latents = simulate(model, {}, jax.random.key(0), jnp.zeros((20, 100)))
    assert x.shape == (20, 100)  # the likelihood follows x's shape when x is not observed
    layout = find_local_latents(model, x)
    short = {"num_chains": 4, "num_temperatures": 50, "site": layout}
    mapped = bdmc(model, {}, x, latents, jax.random.key(1), **short)
    by_hand = bdmc(model, {}, x, jnp.log(latents["rate"])[:, None], jax.random.key(1), **short)
    np.testing.assert_array_equal(mapped.upper, by_hand.upper)
    exact = gamma_poisson_log_marginal(x, 2.0, 0.1).mean()
    # a bracket of the exact value on average, as wide as 4 chains x 50 temperatures leave it
    # (measured: lower -10.7 +- 4.0, upper +2.7 +- 0.6 nats from it)
    assert mapped.lower.mean() < exact < mapped.upper.mean() < exact + 6.0
    with pytest.warns(AISWarning, match="BDMC: the brackets are inverted .* not by chance"):
        bdmc(model, {}, x, latents["rate"][:, None], jax.random.key(1), **short)
    with pytest.raises(ValueError, match=r"without the local latent site\(s\) \['rate'\]"):
        bdmc(model, {}, x, {"z": latents["rate"]}, jax.random.key(1), **short)


def test_bracket_check_bounds_wide_inversions_by_markovs_inequality():
    """Correct bounds invert by more than 6 nats for at most 2 e^-3 of the datapoints on average,
    whatever the spread of the widths; a few such (or NaN) widths among many are chance."""
    from amortjax.evaluation.ais import _bracket_warnings

    rng = np.random.default_rng(0)
    width = rng.normal(0.0, 0.05, 200)
    assert _bracket_warnings(width, 0.5, 0.004) == ()  # tight brackets invert half the time
    width[:10] = [-50.0] * 9 + [np.nan]  # 5%: within the bound
    assert _bracket_warnings(width, 0.5, 1.0) == ()
    width[:60] = -50.0  # 30%, with a spread that hides the mean's shift
    with pytest.warns(AISWarning, match="60 are inverted by more than 6 nats"):
        assert _bracket_warnings(width, 0.35, 20.0)


def test_simulate_refuses_a_likelihood_that_only_broadcasts():
    import numpyro
    import numpyro.distributions as dist

    from amortjax.models import data_plate

    def model(x, *, n_data=None):
        with data_plate(x, n_data):
            rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
            numpyro.sample("x", dist.Poisson(rate[..., None]).to_event(1), obs=x)

    with pytest.raises(ValueError, match=r"shape \(5, 1\), not x_like's \(5, 30\).*expand"):
        simulate(model, {}, jax.random.key(0), jnp.zeros((5, 30)))


def test_simulate_names_an_x_like_of_the_wrong_shape(case):
    """x_like of the wrong width was blamed on the likelihood; an empty one failed with
    NumPyro's 'size of plate should be positive' AssertionError."""
    _, model, params, *_ = case
    key = jax.random.key(0)
    with pytest.raises(
        ValueError, match=rf"x_like has shape \(5, 9\): give x_like .*\(5, {X_DIM}\)"
    ):
        simulate(model, params, key, jnp.zeros((5, 9)))
    with pytest.raises(ValueError, match=r"x_like must be \[n, ...\] with n >= 1"):
        simulate(model, params, key, jnp.zeros((0, X_DIM)))
