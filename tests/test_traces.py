"""The per-datapoint adapter from NumPyro models and guides to log-densities."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.stats import norm

from amortjax.guides.linear_gaussian import linear_gaussian_vae
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


# --- the data check every evaluator runs first ------------------------------------------------


@pytest.fixture(scope="module")
def bernoulli_vae():
    from amortjax.guides import amortized_guide
    from amortjax.inference.objectives import make_optimizer
    from amortjax.inference.training import Trainer
    from amortjax.models import vae_model
    from amortjax.nets import MLP

    model = vae_model(MLP((16,), 784), z_dim=3)
    guide = amortized_guide(MLP((16,), 6), x_dim=784)
    x = (np.random.default_rng(0).random((12, 784)) < 0.2).astype(np.float32)
    trainer = Trainer(model, guide, make_optimizer(1e-3), n_data=12, batch_size=4)
    return model, guide, trainer.params(trainer.init(jax.random.key(0), x)), x


def _bad_inputs(x):
    grey = x.copy()
    grey[7, 5] = 0.5
    nan = x.copy()
    nan[3, 0] = np.nan
    return [
        (grey, r"1 rows of x \(first: row 7, with values \[0.5\]; support .*\) are outside"),
        (nan, r"NaN or infinite values in 1 of 12 rows \(first: row 3\)"),
        (x[:, :700], r"x gives it shape \(12, 700\) but the model's distribution has shape"),
        (x[:0], "at least one row"),
    ]


def test_every_evaluator_refuses_data_its_model_cannot_score(bernoulli_vae):
    from amortjax.evaluation.ais import ais
    from amortjax.evaluation.bounds import evaluate_bounds
    from amortjax.inference.local import fit_local
    from amortjax.traces import check_data

    model, guide, params, x = bernoulli_vae
    check_data(model, params, x)  # binary data passes
    key = jax.random.key(0)
    calls = {
        "evaluate_bounds": lambda d: evaluate_bounds(model, guide, params, d, key, num_samples=2),
        "fit_local": lambda d: fit_local(model, params, d, key, z_dim=3, max_steps=2),
        "ais": lambda d: ais(model, params, d, key, num_chains=2, num_temperatures=2),
    }
    for name, call in calls.items():
        for bad, match in _bad_inputs(x):
            with pytest.raises(ValueError, match=match):
                call(bad)
                pytest.fail(f"{name} accepted bad data")


def test_log_weights_refuses_data_the_model_cannot_score(lg_correlated):
    """Called on concrete data (here closed over by a vmap) it checks them as every evaluator
    does; before, a NaN went on into NaN weights and a wrong width into a Flax shape error."""
    model, guide, params = linear_gaussian_vae(lg_correlated)
    x, _ = lg_correlated.sample(jax.random.key(0), 5)
    keys = jax.random.split(jax.random.key(1), 3)
    with pytest.raises(ValueError, match=r"NaN or infinite values in 1 of 5 rows \(first: row 2"):
        jax.vmap(lambda k: log_weights(model, guide, params, x.at[2, 0].set(jnp.nan), k))(keys)
    with pytest.raises(ValueError, match=r"x gives it shape \(5, 7\) but .* x_dim"):
        log_weights(model, guide, params, x[:, :7], keys[0])
    assert jax.vmap(lambda k: log_weights(model, guide, params, x, k))(keys).shape == (3, 5)
