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

from amortjax.data.synthetic import linear_gaussian_vae, make_linear_gaussian
from amortjax.evaluation.ais import ais, annealing_schedule, bdmc, run_hmc
from amortjax.families import FullRankGaussian
from amortjax.guides import encode
from amortjax.nets import MLP
from amortjax.traces import simulate

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
    assert 0.6 < run.acceptance.mean() < 0.75  # adapted toward target_accept = 0.65
    assert np.all(run.ess > 40) and np.all(run.ess <= 64)
    assert run.step_size.shape == (N, 64)
    settings = (run.num_chains, run.num_temperatures, run.schedule, run.leapfrog_steps)
    assert settings == (64, 2000, "sigmoid", 10)


def test_ais_from_the_encoder_needs_fewer_temperatures(case):
    lg, model, params, x, _, exact = case
    lam = encode(MLP(hidden_sizes=(), out_size=2 * Z_DIM), params, x)  # the best diagonal q
    diag_gap = exact - np.asarray(lg.elbo(x, *lg.best_diagonal(x)))
    assert diag_gap.mean() > 0.1  # the diagonal q alone misses log p(x)
    from_q = ais(model, params, x, jax.random.key(1), init_params=lam, **SHORT)
    from_prior = ais(model, params, x, jax.random.key(1), **SHORT)
    err_q, err_prior = from_q.log_px - exact, from_prior.log_px - exact
    assert abs(err_q.mean()) < 0.02, err_q
    assert np.abs(err_q).max() < 0.1, err_q
    # With the same 50 temperatures, the prior start is far worse.
    assert np.abs(err_prior).mean() > 3 * np.abs(err_q).mean(), (err_q, err_prior)
    assert from_q.ess.mean() > 1.5 * from_prior.ess.mean()


def test_ais_is_unbiased_for_any_number_of_temperatures(case):
    # E[w] = p(x) holds for every T, not only as T grows: with T = 2 and 2048 chains from the
    # encoder's q, log p-hat is within Monte Carlo error of log p(x). Weight increments taken
    # at the wrong state (after the transition instead of before) miss it here by ~0.3 nats.
    _, model, params, x, _, exact = case
    lam = encode(MLP(hidden_sizes=(), out_size=2 * Z_DIM), params, x)
    run = ais(
        model, params, x, jax.random.key(6), init_params=lam, num_chains=2048,
        num_temperatures=2, schedule="linear", leapfrog_steps=10, step_size=0.2,
    )  # fmt: skip
    err = run.log_px - exact
    assert abs(err.mean()) < 0.02, err  # measured: -0.0002
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
    # Batches of 7, the last one padded: every datapoint draws from its own key.
    batched = ais(model, params, x, jax.random.key(2), batch_size=7, **SHORT)
    np.testing.assert_allclose(batched.log_weights, first.log_weights, atol=1e-3)
    np.testing.assert_allclose(batched.acceptance, first.acceptance, atol=1e-4)
    np.testing.assert_allclose(batched.step_size, first.step_size, rtol=1e-4)
    other = ais(model, params, x, jax.random.key(3), **SHORT)
    assert np.abs(other.log_weights - first.log_weights).mean() > 0.1


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
        ({"step_size": np.ones((3, 2))}, r"step_size must be a float or broadcastable"),
        ({"init_params": np.zeros((N, 5))}, r"init_params must be \[6\] or \[num_datapoints=12"),
        ({"init_params": np.zeros((N, 6)), "family": FullRankGaussian()}, r"must be \[9\]"),
        ({"z_dim": 4}, "z_dim=4 but the model's site 'z' has z_dim=3"),
        ({"site": "w"}, "no latent site 'w'"),
        ({"sigmoid_delta": 0.0}, "sigmoid_delta"),
        ({"adapt_per": "batch"}, "unknown adapt_per"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ais(model, params, x, key, **kwargs)
    with pytest.raises(ValueError, match="num_datapoints > 0"):
        ais(model, params, x[:0], key)
    with pytest.raises(ValueError, match=r"z must be \[num_datapoints=12, z_dim=3\]"):
        bdmc(model, params, x, jnp.zeros((N, 2)), key)
    with pytest.raises(ValueError, match="num_steps"):
        run_hmc(model, params, x, jnp.zeros((N, 4, Z_DIM)), key, num_steps=0)
    with pytest.raises(ValueError, match="beta"):
        run_hmc(model, params, x, jnp.zeros((N, 4, Z_DIM)), key, num_steps=1, beta=2.0)
    with pytest.raises(ValueError, match="num_chains, z_dim"):
        run_hmc(model, params, x, jnp.zeros((N, Z_DIM)), key, num_steps=1)
    with pytest.raises(ValueError, match="exactly one observed site"):
        simulate(lambda x: None, {}, key, x)


@pytest.mark.slow
def test_per_chain_adaptation_is_biased_and_per_datapoint_is_not():
    # Wu et al.'s per-chain rule makes each chain's kernel depend on where it is; pooled over
    # a datapoint's chains the dependence is 1/C. A long run exposes the difference.
    lg = make_linear_gaussian(jax.random.key(0), x_dim=8, z_dim=3, noise_scale=0.7)
    model, _, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(1), 100)
    exact = np.asarray(lg.log_marginal(x), np.float64)
    settings = {"num_chains": 16, "num_temperatures": 2000, "leapfrog_steps": 5}
    errors = {}
    for per in ("chain", "datapoint"):
        runs = [
            ais(model, params, x, jax.random.key(k), adapt_per=per, **settings).log_px - exact
            for k in range(2)
        ]
        errors[per] = np.concatenate(runs).mean()  # standard error ~0.008
    assert errors["chain"] < -0.06, errors
    assert abs(errors["datapoint"]) < 0.04, errors
