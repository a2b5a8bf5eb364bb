"""The per-datapoint adapter from NumPyro models and guides to log-densities."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.stats import norm

from amortjax.data.synthetic import linear_gaussian_vae
from amortjax.models import DATA_PLATE
from amortjax.traces import log_joint, log_weights, sample_guide


def test_log_joint_of_the_vae_model_equals_the_formula(lg_correlated):
    lg = lg_correlated
    model, _, params = linear_gaussian_vae(lg)
    x, z = lg.sample(jax.random.key(0), 7)
    expected = norm.logpdf(z).sum(-1) + norm.logpdf(
        x, z @ lg.weight.T + lg.bias, lg.noise_scale
    ).sum(-1)
    got = log_joint(model, params, x, {"z": z})
    assert got.shape == (7,)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_log_joint_ignores_the_subsampling_scale(lg_correlated):
    model, _, params = linear_gaussian_vae(lg_correlated)
    x, z = lg_correlated.sample(jax.random.key(0), 4)
    scaled = log_joint(model, params, x, {"z": z}, n_data=400)
    np.testing.assert_allclose(scaled, log_joint(model, params, x, {"z": z}), rtol=1e-6)


def test_guide_samples_and_log_q_match_its_distribution(lg_correlated):
    lg = lg_correlated
    _, guide, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(0), 5)
    latents, log_q = sample_guide(guide, params, x, jax.random.key(1))
    loc, scale = lg.best_diagonal(x)
    np.testing.assert_allclose(log_q, norm.logpdf(latents["z"], loc, scale).sum(-1), rtol=1e-5)


def test_exact_posterior_gives_constant_log_weights(lg_diagonal):
    lg = lg_diagonal
    model, guide, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(0), 5)
    lw = jax.vmap(lambda k: log_weights(model, guide, params, x, k))(
        jax.random.split(jax.random.key(1), 50)
    )
    np.testing.assert_allclose(lw, jnp.broadcast_to(lg.log_marginal(x), lw.shape), atol=1e-4)


def test_missing_latent_is_named(lg_correlated):
    model, _, params = linear_gaussian_vae(lg_correlated)
    x, _ = lg_correlated.sample(jax.random.key(0), 3)
    with pytest.raises(ValueError, match=r"latent sites \['z'\]"):
        log_joint(model, params, x, {})


def test_site_outside_the_data_plate_is_rejected():
    def model(x):
        scale = numpyro.sample("global_scale", dist.LogNormal(0.0, 1.0))
        with numpyro.plate(DATA_PLATE, x.shape[0]):
            numpyro.sample("x", dist.Normal(0.0, scale), obs=x)

    with pytest.raises(ValueError, match="global_scale"):
        log_joint(model, {}, jnp.zeros(3), {"global_scale": jnp.ones(())})
