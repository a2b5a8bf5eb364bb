"""Active units (Burda et al. 2016) and the KL per latent dimension."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

from amortjax.evaluation.activity import active_units, kl_per_dimension, latent_activity
from amortjax.families import DiagonalGaussian, FullRankGaussian
from amortjax.guides import encode
from amortjax.nets import MLP


def _alternating(n, amplitude, centre=0.0):
    """n values centre +- amplitude, alternating: population variance exactly amplitude^2."""
    return centre + amplitude * (-1.0) ** np.arange(n)


def test_active_units_finds_exactly_the_varying_dimensions():
    n = 100
    means = np.stack(
        [
            _alternating(n, 1.0),  # variance 1: active
            np.full(n, 0.3),  # constant: collapsed, variance 0
            _alternating(n, 0.05, 2.0),  # variance 0.0025 < 0.01: inactive although it moves
            _alternating(n, 0.2),  # variance 0.04: active
            np.full(n, -1.0),  # constant
        ],
        axis=1,
    )
    units = active_units(means)
    np.testing.assert_allclose(units.variance, [1.0, 0.0, 0.0025, 0.04, 0.0], atol=1e-12)
    np.testing.assert_array_equal(units.active, [True, False, False, True, False])
    assert units.num_active == 2 and units.threshold == 0.01
    # A lower threshold lets the small mover in; JAX input gives the same answer.
    low = active_units(jnp.asarray(means, jnp.float32), threshold=0.001)
    np.testing.assert_array_equal(low.active, [True, False, True, True, False])
    assert low.num_active == 3


def test_active_units_is_the_variance_over_data_of_random_means():
    means = np.random.default_rng(0).normal(size=(500, 4)) * np.array([2.0, 0.5, 0.05, 0.0])
    units = active_units(means)
    np.testing.assert_allclose(units.variance, means.var(axis=0), rtol=1e-12)
    np.testing.assert_array_equal(units.active, [True, True, False, False])


def test_active_units_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, dim\].*\(10,\)"):
        active_units(np.zeros(10))
    with pytest.raises(ValueError, match="at least 2 datapoints"):
        active_units(np.zeros((1, 3)))
    bad = np.zeros((5, 3))
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="1 non-finite entries.*row 3"):
        active_units(bad)
    with pytest.raises(ValueError, match="threshold"):
        active_units(np.zeros((5, 3)), threshold=-1.0)


def test_kl_per_dimension_matches_numpyro_kl_divergence():
    z_dim, n = 6, 40
    lam = np.random.default_rng(1).normal(size=(n, 2 * z_dim)).astype(np.float32)
    mu, log_sigma = np.split(lam, 2, axis=1)
    reference = dist.kl_divergence(dist.Normal(mu, np.exp(log_sigma)), dist.Normal(0.0, 1.0))
    per_point = kl_per_dimension(lam, per_datapoint=True)
    assert per_point.shape == (n, z_dim)
    np.testing.assert_allclose(per_point, reference, rtol=1e-5)
    kl = kl_per_dimension(lam)
    np.testing.assert_allclose(kl, np.asarray(reference).mean(axis=0), rtol=1e-5)
    # Summed over dimensions it is the KL of the whole diagonal Gaussian q(z|x) to N(0, I).
    family = DiagonalGaussian()
    prior = dist.Normal(jnp.zeros(z_dim), 1.0).to_event(1)
    total = dist.kl_divergence(family.distribution(jnp.asarray(lam)), prior)
    np.testing.assert_allclose(kl.sum(), np.asarray(total).mean(), rtol=1e-5)
    # q = p costs nothing.
    np.testing.assert_allclose(kl_per_dimension(np.zeros((3, 2 * z_dim))), 0.0, atol=1e-15)


def test_kl_per_dimension_rejects_bad_input():
    with pytest.raises(ValueError, match="odd number"):
        kl_per_dimension(np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"\[N, dim\]"):
        kl_per_dimension(np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="non-finite"):
        kl_per_dimension(np.array([[0.0, np.inf]]))


def _linear_encoder(x_dim, z_dim, dead):
    """A linear encoder whose mean of each unit in `dead` ignores x (a collapsed unit)."""
    encoder = MLP((), 2 * z_dim)
    variables = encoder.init(jax.random.key(0), jnp.zeros((1, x_dim)))
    kernel = variables["params"]["Dense_0"]["kernel"]
    kernel = kernel.at[:, np.asarray(dead)].set(0.0)
    params = {"encoder$params": {"Dense_0": {**variables["params"]["Dense_0"], "kernel": kernel}}}
    return encoder, params


def test_latent_activity_encodes_in_batches_and_finds_collapsed_units():
    x_dim, z_dim, n = 7, 5, 37
    encoder, params = _linear_encoder(x_dim, z_dim, dead=[1, 3])
    x = np.random.default_rng(2).normal(size=(n, x_dim)).astype(np.float32)
    act = latent_activity(encoder, params, x, batch_size=10)  # 4 batches, the last padded
    lam = np.asarray(encode(encoder, params, jnp.asarray(x)))
    np.testing.assert_allclose(act.means, lam[:, :z_dim], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(act.kl, kl_per_dimension(lam), rtol=1e-5)
    np.testing.assert_array_equal(act.active, [True, False, True, False, True])
    assert act.num_active == 3
    np.testing.assert_allclose(act.variance[[1, 3]], 0.0, atol=1e-12)
    s = act.summary()  # the JSON record the experiments save
    assert (s["points"], s["z_dim"], s["num_active"]) == (n, z_dim, 3)
    assert s["kl_total"] == pytest.approx(float(act.kl.sum()))
    assert s["kl_active"] == pytest.approx(float(act.kl[[0, 2, 4]].sum()))
    # A family whose KL does not split over dimensions: means and activity, no KL.
    full = FullRankGaussian()
    encoder_fr = MLP((), full.num_params(3))
    params_fr = {
        "encoder$params": encoder_fr.init(jax.random.key(1), jnp.zeros((1, x_dim)))["params"]
    }
    act_fr = latent_activity(encoder_fr, params_fr, x, family=full)
    assert act_fr.means.shape == (n, 3) and act_fr.kl is None
    with pytest.raises(ValueError, match=r"\[N, x_dim\]"):
        latent_activity(encoder, params, x[0])
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        latent_activity(encoder, params, x, batch_size=0)


def test_latent_activity_refuses_bad_data_and_settings_naming_the_fix():
    encoder, params = _linear_encoder(7, 5, dead=[0])
    x = np.random.default_rng(2).normal(size=(20, 7)).astype(np.float32)
    bad = x.copy()
    bad[[3, 11], 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite values in 2 of 20 rows \\(first: row 3"):
        latent_activity(encoder, params, bad)
    with pytest.raises(ValueError, match="encoder cannot run on x of shape \\(20, 6\\).*x_dim"):
        latent_activity(encoder, params, x[:, :6])
    with pytest.raises(ValueError, match="threshold must be a finite number in \\[0, inf\\)"):
        latent_activity(encoder, params, x, threshold=-0.01)
    with pytest.raises(ValueError, match="no 'encoder\\$params'.*fit\\(...\\).params"):
        latent_activity(encoder, params["encoder$params"], x)
    # 10 outputs are lambda of a diagonal Gaussian over 5 dims, but of no full-rank Gaussian
    # (z^2 + 3z = 20 has no integer root): a bare "not num_params(z_dim)" before
    with pytest.raises(ValueError, match="the encoder outputs 10 values.*full_rank.*num_params"):
        latent_activity(encoder, params, x, family=FullRankGaussian())


def test_activity_and_kl_of_a_narrow_correlated_posterior_match_the_closed_forms():
    """Linear-Gaussian, x_dim 4 < z_dim 8, noise 1e-3, the encoder at the best diagonal Gaussian:
    its mean is the exact posterior mean m(x) = S W^T Psi^-1 (x - b), S = (I + W^T Psi^-1 W)^-1,
    and its variances 1 / P_uu (P = S^-1). In float64 on the same 20,000 x: the activity
    Var_x(m_u) and the KL per dimension mean_x [m_u^2 + s_u^2 - 1 - log s_u^2] / 2; against the
    population values 1 - S_uu (Cov(z) = I = E Cov(z | x) + Cov E(z | x)) within 4 standard
    errors, so that the active units are those of the model."""
    from amortjax.guides.linear_gaussian import linear_gaussian_vae
    from amortjax.models.linear_gaussian import make_linear_gaussian

    lg = make_linear_gaussian(jax.random.key(2), x_dim=4, z_dim=8, noise_scale=1e-3)
    _, _, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(3), 20_000)
    act = latent_activity(MLP((), 16), params, x)
    w, b, psi = (np.asarray(a, np.float64) for a in (lg.weight, lg.bias, lg.noise_scale))
    precision = np.eye(8) + (w / psi[:, None] ** 2).T @ w
    cov = np.linalg.inv(precision)
    means = (np.asarray(x, np.float64) - b) @ (w / psi[:, None] ** 2) @ cov.T
    s2 = 1 / np.diag(precision)
    np.testing.assert_allclose(act.variance, means.var(0), rtol=1e-4)
    kl = 0.5 * (means**2 + s2 - 1 - np.log(s2))
    np.testing.assert_allclose(act.kl, kl.mean(0), rtol=1e-4, atol=1e-5)
    population = 1 - np.diag(cov)
    se = np.sqrt(((means - means.mean(0)) ** 2).var(0) / len(means))
    assert np.all(np.abs(act.variance - population) < 4 * se), (act.variance, population)
    assert act.num_active == int(np.sum(population > 0.01))
