"""The closed forms of the linear-Gaussian model, checked against independent computations."""

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.stats import multivariate_normal, norm


def _log_joint(lg, x, z):
    prior = norm.logpdf(z).sum(-1)
    lik = norm.logpdf(x, z @ lg.weight.T + lg.bias, lg.noise_scale).sum(-1)
    return prior + lik


def test_bayes_rule_holds_for_every_z(lg_correlated):
    # log p(x) = log p(x, z) - log p(z | x) for any z: ties marginal, posterior and joint.
    lg = lg_correlated
    x, _ = lg.sample(jax.random.key(2), 6)
    mean, cov = lg.posterior(x)
    for i in range(3):
        z = jax.random.normal(jax.random.key(10 + i), (6, lg.z_dim)) * 2.0
        log_post = multivariate_normal.logpdf(z, mean, cov)
        np.testing.assert_allclose(
            _log_joint(lg, x, z) - log_post, lg.log_marginal(x), rtol=0, atol=2e-4
        )


def test_sample_moments_match_the_marginal(lg_correlated):
    lg = lg_correlated
    x, _ = lg.sample(jax.random.key(3), 200_000)
    cov = lg.weight @ lg.weight.T + jnp.diag(lg.noise_scale**2)
    np.testing.assert_allclose(x.mean(0), lg.bias, atol=0.03)
    np.testing.assert_allclose(jnp.cov(x.T), cov, atol=0.08)


def test_best_diagonal_is_a_kl_minimum(lg_correlated):
    lg = lg_correlated
    x, _ = lg.sample(jax.random.key(4), 5)
    loc, scale = lg.best_diagonal(x)
    kl_best = lg.kl_to_posterior(x, loc, scale)
    assert np.all(kl_best > 1e-3)  # the posterior is correlated, so the family misses it
    for i in range(20):
        k1, k2 = jax.random.split(jax.random.key(100 + i))
        loc2 = loc + 0.05 * jax.random.normal(k1, loc.shape)
        scale2 = scale * jnp.exp(0.05 * jax.random.normal(k2, scale.shape))
        assert np.all(lg.kl_to_posterior(x, loc2, scale2) > kl_best)


def test_diagonal_posterior_option_gives_zero_kl(lg_diagonal):
    lg = lg_diagonal
    x, _ = lg.sample(jax.random.key(5), 5)
    _, cov = lg.posterior(x)
    np.testing.assert_allclose(cov - jnp.diag(jnp.diag(cov)), 0.0, atol=1e-6)
    loc, scale = lg.best_diagonal(x)
    np.testing.assert_allclose(lg.kl_to_posterior(x, loc, scale), 0.0, atol=1e-4)
    np.testing.assert_allclose(lg.elbo(x, loc, scale), lg.log_marginal(x), atol=1e-4)


def test_closed_forms_are_float64_and_exact_for_narrow_posteriors():
    """Noise 1e-3: the float32 closed forms were off by up to 1.5 nats, or NaN at z_dim 50."""
    from scipy import stats

    from amortjax.models.linear_gaussian import make_linear_gaussian

    for x_dim, z_dim in ((10, 1), (60, 50)):
        lg = make_linear_gaussian(jax.random.key(5), x_dim=x_dim, z_dim=z_dim, noise_scale=1e-3)
        x, _ = lg.sample(jax.random.key(6), 20)
        w, b, psi = (np.asarray(a, np.float64) for a in (lg.weight, lg.bias, lg.noise_scale))
        dense = stats.multivariate_normal(b, w @ w.T + np.diag(psi**2)).logpdf(np.asarray(x))
        log_px = lg.log_marginal(x)
        assert log_px.dtype == np.float64 and np.all(np.isfinite(log_px))
        # scipy's dense Cholesky of the near-singular W W^T + psi^2 I loses ~1e-6 itself
        np.testing.assert_allclose(log_px, dense, rtol=0, atol=1e-5)
        # Bayes' rule at the posterior mean, in float64: log p(x) = log p(x, m) - log p(m | x)
        mean, cov = lg.posterior(x)
        joint = stats.norm.logpdf(mean).sum(-1) + stats.norm.logpdf(
            np.asarray(x, np.float64), mean @ w.T + b, psi
        ).sum(-1)
        post = np.array([stats.multivariate_normal(m, cov).logpdf(m) for m in mean])
        np.testing.assert_allclose(joint - post, log_px, rtol=0, atol=1e-5)
        # the best diagonal Gaussian's KL is positive and the exact ELBO below log p(x)
        loc, scale = lg.best_diagonal(x)
        kl = lg.kl_to_posterior(x, loc, scale)
        assert np.all(kl >= 0) and np.all(np.isfinite(kl))
        # the ELBO against its direct float64 form E_q[log p(x | z) + log p(z) - log q(z)] (the
        # class computes log p(x) - KL), at the best diagonal Gaussian and at a perturbed one
        xs = np.asarray(x, np.float64)
        rng = np.random.default_rng(x_dim)
        moved = (loc + 0.01 * rng.normal(size=loc.shape),
                 scale * np.exp(0.1 * rng.normal(size=scale.shape)))  # fmt: skip
        for m, sd in ((loc, scale), moved):
            mean_x = m @ w.T + b
            expected_log_lik = np.sum(
                -0.5 * np.log(2 * np.pi * psi**2)
                - ((xs - mean_x) ** 2 + sd**2 @ (w**2).T) / (2 * psi**2),
                axis=-1,
            )
            expected_log_prior = np.sum(-0.5 * np.log(2 * np.pi) - 0.5 * (m**2 + sd**2), axis=-1)
            entropy = np.sum(0.5 * np.log(2 * np.pi * np.e * sd**2), axis=-1)
            direct = expected_log_lik + expected_log_prior + entropy
            np.testing.assert_allclose(lg.elbo(x, m, sd), direct, rtol=1e-9, atol=1e-5)
        # the full-rank KL of the exact posterior is 0
        tril = np.linalg.cholesky(cov)
        np.testing.assert_allclose(lg.gaussian_kl_to_posterior(x, mean, tril), 0.0, atol=1e-6)
