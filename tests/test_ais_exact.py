"""AIS and BDMC against exact log-marginals computed in float64: a non-Gaussian model, an
informative likelihood, and the quality of BDMC brackets.

- Gamma-Poisson: rate_i ~ Gamma(a, b), x_ij ~ Poisson(rate_i), j = 1..m. The chains run in
  u = log rate (the library's unconstrained space, with the log-Jacobian), where the posterior
  is a log-gamma distribution, skewed for small counts, and

      log p(x_i) = lgamma(a + S_i) - lgamma(a) + a log b - (a + S_i) log(b + m)
                   - sum_j lgamma(x_ij + 1),     S_i = sum_j x_ij.

- Linear-Gaussian at observation noise 1e-3 (posterior widths ~1e-3 against a prior width 1),
  log p(x_i) = log N(x_i; b, W W^T + diag(psi^2)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortjax.evaluation.ais import AISWarning, ais, bdmc
from amortjax.families import DiagonalGaussian
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.latents import find_local_latents
from amortjax.models import simulate
from amortjax.models.gamma_poisson import gamma_poisson_log_marginal as log_marginal
from amortjax.models.gamma_poisson import gamma_poisson_model
from amortjax.models.linear_gaussian import make_linear_gaussian

ALPHA, BETA, M = 1.5, 0.5, 3


gamma_poisson = gamma_poisson_model(ALPHA, BETA)


def gamma_poisson_log_marginal(x: np.ndarray) -> np.ndarray:
    return log_marginal(x, ALPHA, BETA)


# The default pilot (4 chains through every temperature, acceptance 0.65) and the quick
# amortization_gap preset's (1 chain through every 4th temperature, interpolated, aiming at 0.9).
PILOTS = {
    "default": {},
    "coarse": {"pilot_chains": 1, "pilot_temperatures": 50, "target_accept": 0.9, "step_size": 0.3},
}


@pytest.mark.parametrize("pilot", PILOTS.values(), ids=PILOTS.keys())
def test_ais_is_a_lower_bound_within_its_error_on_a_gamma_poisson_model(pilot):
    n = 400
    rng = np.random.default_rng(0)
    x = rng.poisson(rng.gamma(ALPHA, 1 / BETA, n)[:, None], (n, M)).astype(np.float32)
    exact = gamma_poisson_log_marginal(x)
    layout = find_local_latents(gamma_poisson, jnp.asarray(x))
    run = ais(
        gamma_poisson, {}, x, jax.random.key(1), site=layout, num_chains=16,
        num_temperatures=200, batch_size=n, **pilot,
    )  # fmt: skip
    err = run.log_px - exact
    se = err.std(ddof=1) / np.sqrt(n)
    # E[p-hat] = p(x): log p-hat is a lower bound up to its Monte Carlo error. An estimate
    # biased upward by the 0.026 nats that adapting the step sizes on the estimating chains
    # gave on a Gamma/Beta model would fail here (5 standard errors).
    assert err.mean() <= 2 * se, (err.mean(), se)
    assert abs(err.mean()) < 0.05, err.mean()
    assert np.abs(err).max() < 1.0, err  # measured 0.50
    # measured: default -0.011 +- 0.005, acceptance 0.69 to 0.86; coarse -0.004 +- 0.005,
    # acceptance 0.47 to 0.98 (one chain's acceptance steers the pilot: noisier step sizes)
    assert np.all(run.acceptance > (0.4 if pilot else 0.5))
    # aiming at 0.9, a few 1-d posteriors end above the band's 0.97 (and are warned about)
    assert run.warnings == () or pilot, run.warnings
    assert run.step_size.shape == (n, 200) and run.step_scale.shape == (n, 1)


@pytest.fixture(scope="module")
def informative():
    """Noise 1e-3, x_dim 10, z_dim 2, loadings 0.9 correlated: the posterior is ~1e-3 wide and
    correlated (-0.88), so the best diagonal Gaussian misses log p(x) by 0.75 nats."""
    lg = make_linear_gaussian(jax.random.key(5), x_dim=10, z_dim=2, noise_scale=1e-3)
    w = lg.weight
    lg = lg._replace(weight=w.at[:, 1].set(w[:, 0] + 0.45 * w[:, 1]))
    model, _, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(6), 20)
    # Exact answers in float64 from the float32 parameters the model uses.
    weight, bias, noise = (np.asarray(a, np.float64) for a in (lg.weight, lg.bias, lg.noise_scale))
    resid = np.asarray(x, np.float64) - bias
    chol = np.linalg.cholesky(weight @ weight.T + np.diag(noise**2))
    white = np.linalg.solve(chol, resid.T)
    exact = (
        -0.5 * (white**2).sum(0)
        - np.log(np.diag(chol)).sum()
        - 0.5 * x.shape[1] * np.log(2 * np.pi)
    )
    precision = np.eye(2) + (weight / noise[:, None] ** 2).T @ weight
    cov = np.linalg.inv(precision)
    mean = resid @ (weight / noise[:, None] ** 2) @ cov.T
    scale = np.broadcast_to(1 / np.sqrt(np.diag(precision)), mean.shape)  # the best diagonal
    diagonal_gap = 0.5 * np.log(np.prod(np.diag(precision)) / np.linalg.det(precision))
    return model, params, x, exact, mean, scale, diagonal_gap


def test_ais_from_a_fitted_q_is_exact_at_an_informative_likelihood(informative):
    model, params, x, exact, mean, scale, diagonal_gap = informative
    assert 0.7 < diagonal_gap < 0.8  # the start q0 alone is 0.75 nats off
    lam = DiagonalGaussian().pack(jnp.asarray(mean, jnp.float32), jnp.asarray(scale, jnp.float32))
    run = ais(
        model, params, x, jax.random.key(1), init_params=lam, num_chains=32,
        num_temperatures=200, step_size=0.5,
    )  # fmt: skip
    err = run.log_px - exact
    assert abs(err.mean()) < 0.1, err  # measured +0.005
    assert np.all(np.abs(err) < 0.3), err  # measured at most 0.17
    # step_scale="q0": q0's standard deviations, ~1e-3, set the step per dimension; the pilot
    # adapted the global step size on top of them to ~1.
    np.testing.assert_allclose(run.step_scale, scale, rtol=0.2)
    assert np.all((run.step_size[:, -1] > 0.3) & (run.step_size[:, -1] < 3))
    assert run.warnings == () and np.all((run.acceptance > 0.5) & (run.acceptance < 0.9))


def test_ais_from_the_prior_at_an_informative_likelihood_warns(informative):
    model, params, x, exact, *_ = informative
    with pytest.warns(AISWarning, match=r"20 of 20 datapoints is outside \[0.2, 0.97\]"):
        run = ais(
            model, params, x, jax.random.key(1), num_chains=32, num_temperatures=200,
            step_size=0.5,
        )  # fmt: skip
    # Unit step scales against a posterior 1e-3 wide: every proposal is rejected and the
    # estimate is off by orders of magnitude. The warning says so, and how to fix it.
    assert np.all(run.acceptance < 0.2)
    assert np.all(run.log_px - exact < -1000)
    message, spread = run.warnings
    assert "below 0.2" in message and "init_params" in message and "step_scale" in message
    assert "log-weights spread" in spread


@pytest.fixture(scope="module")
def simulated(lg_correlated):
    model, _, params = linear_gaussian_vae(lg_correlated)
    x, latents = simulate(model, params, jax.random.key(3), jnp.zeros((100, 8)))
    return model, params, x, latents["z"]


def _check_quality(b):
    width = b.upper - b.lower
    assert b.ordered_fraction == np.mean(width >= 0)
    assert b.mean_width == pytest.approx(width.mean(), abs=1e-12)
    assert b.mean_width_se == pytest.approx(width.std(ddof=1) / np.sqrt(width.size))
    summary = b.summary()
    assert summary["mean_lower"] == pytest.approx(b.lower.mean())
    assert summary["mean_upper"] == pytest.approx(b.upper.mean())
    assert summary["ordered_fraction"] == b.ordered_fraction
    assert summary["mean_width"] == b.mean_width


def test_bdmc_reports_the_quality_of_its_brackets(simulated):
    model, params, x, z = simulated
    # A loose bracket (5 temperatures, 4 chains): nats wide, and ordered almost everywhere.
    loose = bdmc(
        model, params, x, z, jax.random.key(4), num_chains=4, num_temperatures=5,
        step_size=0.5,
    )  # fmt: skip
    _check_quality(loose)
    assert loose.ordered_fraction >= 0.9 and loose.mean_width > 1.0, loose.summary()
    assert loose.warnings == ()
    # A tight bracket (200 temperatures, 16 chains): its width (0.04 nats) is below the Monte
    # Carlo error of each bound (0.1-0.2 nats per datapoint), so many brackets invert by
    # chance (measured 39 of 100; 50 at 2000 temperatures) although both bounds are right:
    # no warning, since the mean width is not significantly negative.
    tight = bdmc(model, params, x, z, jax.random.key(4), num_chains=16, num_temperatures=200)
    _check_quality(tight)
    assert 0.3 < tight.ordered_fraction < 0.9, tight.summary()
    assert 0 < tight.mean_width < 0.1 and tight.mean_width > -3 * tight.mean_width_se
    assert tight.warnings == () and tight.forward.warnings == tight.reverse.warnings == ()


def test_bdmc_warns_when_its_brackets_invert_systematically(simulated):
    model, params, x, _ = simulated
    # Reverse AIS from prior draws instead of posterior draws is no upper bound: with a linear
    # schedule and 50 temperatures its estimates fall below the forward ones everywhere.
    z_prior = jax.random.normal(jax.random.key(9), (x.shape[0], 3))
    with pytest.warns(AISWarning) as record:
        b = bdmc(
            model, params, x, z_prior, jax.random.key(4), num_chains=16, num_temperatures=50,
            schedule="linear",
        )  # fmt: skip
    _check_quality(b)
    assert b.ordered_fraction < 0.2 and b.mean_width < -3 * b.mean_width_se, b.summary()
    (message,) = b.warnings
    assert message.startswith("BDMC: the brackets are inverted") and message in [
        str(w.message) for w in record
    ]
    assert "exact posterior draws" in message and "num_temperatures" in message


def test_ais_warns_when_its_anneal_is_too_coarse_and_not_when_it_is_fine_enough():
    """Linear-Gaussian, x_dim 60, z_dim 50, noise 1e-3, AIS from the exact best diagonal
    Gaussian: acceptance is fine at any T, but 200 temperatures leave the estimate 0.68 nats
    low. The chains' log-weight spread says so (median 1.65 nats; the warning names the fix);
    3,000 temperatures make the estimate exact within its error (spread 0.79), and the warning
    goes."""
    lg = make_linear_gaussian(jax.random.key(3), x_dim=60, z_dim=50, noise_scale=1e-3)
    model, _, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(4), 20)
    exact = lg.log_marginal(x)
    loc, scale = lg.best_diagonal(x)
    scale = np.broadcast_to(scale, loc.shape)
    lam = DiagonalGaussian().pack(jnp.asarray(loc, jnp.float32), jnp.asarray(scale, jnp.float32))

    def run(num_temperatures):
        return ais(
            model, params, x, jax.random.key(1), init_params=lam, num_chains=16,
            num_temperatures=num_temperatures,
        )  # fmt: skip

    with pytest.warns(AISWarning, match="log-weights spread by a median of"):
        coarse = run(200)
    err = coarse.log_px - exact
    se = err.std(ddof=1) / np.sqrt(err.size)
    assert err.mean() < -3 * se and err.mean() < -0.4, (err.mean(), se)  # measured -0.68 +- 0.21
    assert np.all((coarse.acceptance > 0.5) & (coarse.acceptance < 0.9))  # no help from it
    (message,) = coarse.warnings
    assert "num_temperatures" in message and "likely low" in message

    fine = run(3000)
    assert fine.warnings == ()
    err = fine.log_px - exact
    assert abs(err.mean()) < 0.15, err.mean()  # measured +0.05 +- 0.06


def test_ais_is_a_lower_bound_on_the_item_response_model_by_quadrature():
    """A second non-Gaussian model with an exact marginal: a 1-D trait per student, 30 logistic
    questions with the true parameters fixed, 400 students; log p(x_i) by a 4,001-point grid in
    float64 (it agrees with a 20,001-point grid on [-10, 10] to 1.4e-12). AIS at its defaults
    (from the prior): not above the truth by more than 2 SE, and within a few hundredths of it
    (measured -0.0043 +- 0.0025, per student -0.18 to +0.21)."""
    from amortjax.models.core import with_fixed_params
    from amortjax.models.irt import grid_log_marginal, irt_model, simulate_irt

    x, truth = simulate_irt(jax.random.key(0), 400, 30, 1)
    fixed = with_fixed_params(
        irt_model(30, 1),
        {"discrimination": truth["discrimination"], "difficulty": truth["difficulty"]},
    )
    layout = find_local_latents(fixed, jnp.asarray(x))
    result = ais(fixed, {}, x, jax.random.key(1), site=layout)
    with jax.enable_x64(True):
        a, b = (np.asarray(truth[k], np.float64) for k in ("discrimination", "difficulty"))
        exact = np.concatenate([
            np.asarray(grid_log_marginal(np.asarray(x[i : i + 100], np.float64), a, b,
                                         grid_size=4001, limit=8.0))
            for i in range(0, 400, 100)
        ])  # fmt: skip
    diff = np.asarray(result.log_px, np.float64) - exact
    mean, se = diff.mean(), diff.std(ddof=1) / np.sqrt(diff.size)
    assert mean <= 2 * se, (mean, se)
    assert mean > -0.03, (mean, se)
