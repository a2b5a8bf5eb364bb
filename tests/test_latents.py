"""Local latents found in any NumPyro model: layouts, constrained supports, exact answers.

The ground truth here is a Gamma-Poisson model with a positive local latent, where log p(x_i)
is known in closed form:

    lambda_i ~ Gamma(alpha, beta),  x_ij ~ Poisson(lambda_i), j = 1..D
    log p(x_i) = log Gamma(alpha + S_i) - log Gamma(alpha) + alpha log beta
                 - (alpha + S_i) log(beta + D) - sum_j log x_ij!,   S_i = sum_j x_ij,

the posterior is Gamma(a, b) with a = alpha + S_i, b = beta + D, and the best log-normal q (a
diagonal Gaussian over log lambda_i) is known too: setting the derivatives of KL(q || Gamma(a, b))
in mu and sigma to zero gives sigma^2 = 1/a, mu = log(a/b) - 1/(2a), and

    KL_min = lgamma(a) - a log b - a mu + a - 1/2 - log sigma - log(2 pi)/2.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from jax.scipy.special import gammaln

from amortjax import ais, evaluate_bounds, fit_local, given_params_guide
from amortjax.families import DiagonalGaussian
from amortjax.latents import (
    AUX_SITE,
    LocalLatents,
    find_local_latents,
    log_joint_unconstrained,
)
from amortjax.models import data_plate
from amortjax.models.gamma_poisson import gamma_poisson_log_marginal as log_marginal
from amortjax.models.gamma_poisson import gamma_poisson_model
from amortjax.traces import log_joint, sample_guide

ALPHA, BETA, D = 3.0, 1.5, 6


gamma_poisson = gamma_poisson_model(ALPHA, BETA)


def gamma_poisson_log_marginal(x):
    return log_marginal(x, ALPHA, BETA)


def best_lognormal_elbo(x):
    a, b = ALPHA + x.sum(-1), BETA + D
    mu, log_sigma = jnp.log(a / b) - 0.5 / a, -0.5 * jnp.log(a)
    kl = gammaln(a) - a * jnp.log(b) - a * mu + a - 0.5 - log_sigma - 0.5 * jnp.log(2 * jnp.pi)
    return gamma_poisson_log_marginal(x) - kl


@pytest.fixture(scope="module")
def counts():
    key_rate, key_x = jax.random.split(jax.random.key(0))
    rate = jax.random.gamma(key_rate, ALPHA, (40,)) / BETA
    return jax.random.poisson(key_x, rate[:, None], (40, D)).astype(jnp.float32)


def two_site_model(x, *, n_data=None):
    with data_plate(x, n_data):
        scale = numpyro.sample("scale", dist.LogNormal(0.0, 0.5))
        mix = numpyro.sample("mix", dist.Dirichlet(jnp.ones(3)))
        z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        loc = jnp.concatenate([z, mix], -1)
        numpyro.sample("x", dist.Normal(loc, scale[..., None]).to_event(1), obs=x)


def test_find_local_latents_lays_out_shapes_and_supports():
    x = jnp.zeros((4, 5))
    layout = find_local_latents(two_site_model, x)
    assert layout.names == ("scale", "mix", "z")
    assert [s.shape for s in layout.sites] == [(), (3,), (2,)]
    # the simplex of 3 has 2 unconstrained coordinates
    assert [s.unconstrained_shape for s in layout.sites] == [(), (2,), (2,)]
    assert layout.size == 5 and not layout.is_single_vector
    assert layout.global_sites == ()
    # equal layouts hash alike (compiled functions take them as static arguments)
    assert hash(layout) == hash(find_local_latents(two_site_model, x))
    assert layout == find_local_latents(two_site_model, x)


def test_unflatten_inverts_flatten_and_its_log_det_is_the_jacobian():
    layout = find_local_latents(two_site_model, jnp.zeros((1, 5)))
    u = jax.random.normal(jax.random.key(1), (7, layout.size))
    values, log_det = layout.unflatten(u)
    assert values["scale"].shape == (7,) and bool(jnp.all(values["scale"] > 0))
    np.testing.assert_allclose(values["mix"].sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(layout.flatten(values), u, atol=1e-4)

    # log |det dT/du| against autodiff on the map to the (positive, free simplex coords, z)
    def free_coords(ui):
        v, _ = layout.unflatten(ui)
        return jnp.concatenate([v["scale"][None], v["mix"][:2], v["z"]])

    expected = jnp.stack([jnp.linalg.slogdet(jax.jacfwd(free_coords)(ui))[1] for ui in u])
    np.testing.assert_allclose(log_det, expected, rtol=1e-4, atol=1e-4)


def test_guide_density_of_a_positive_latent_is_the_change_of_variables():
    x = jnp.ones((5, D))
    layout = find_local_latents(gamma_poisson, x)
    assert layout.size == 1 and not layout.is_single_vector
    lam = jnp.stack([jnp.linspace(-1, 1, 5), jnp.linspace(-1.0, 0.5, 5)], -1)
    guide = given_params_guide(DiagonalGaussian(), site=layout)
    latents, log_q = sample_guide(guide, {}, x, jax.random.key(0), lam)
    assert set(latents) == {AUX_SITE, "rate"}
    # q over log(rate) is normal, so rate is log-normal
    expected = dist.LogNormal(lam[:, 0], jnp.exp(lam[:, 1])).log_prob(latents["rate"])
    np.testing.assert_allclose(log_q, expected, rtol=1e-5, atol=1e-5)
    u = jnp.log(latents["rate"])[:, None]
    np.testing.assert_allclose(
        log_joint_unconstrained(gamma_poisson, {}, x, u, layout),
        log_joint(gamma_poisson, {}, x, {"rate": latents["rate"]}) + u[:, 0],
        rtol=1e-6,
    )


def test_qstar_iwae_and_ais_match_the_exact_gamma_poisson_marginal(counts):
    layout = find_local_latents(gamma_poisson, counts)
    exact = np.asarray(gamma_poisson_log_marginal(counts))
    fit = fit_local(
        gamma_poisson,
        {},
        counts,
        jax.random.key(1),
        site=layout,
        learning_rate=0.02,
        num_samples=10,
        max_steps=2000,
        final_samples=4000,
        method="adam",
    )
    # q* reaches the best log-normal ELBO, below log p(x) by the approximation gap
    best = np.asarray(best_lognormal_elbo(counts))
    assert np.all(best < exact)
    np.testing.assert_allclose(fit.elbo, best, atol=0.04)
    a = ALPHA + np.asarray(counts).sum(-1)
    np.testing.assert_allclose(fit.params[:, 0], np.log(a / (BETA + D)) - 0.5 / a, atol=0.1)
    np.testing.assert_allclose(fit.iwae, exact, atol=0.02)
    result = ais(
        gamma_poisson,
        {},
        counts,
        jax.random.key(2),
        site=layout,
        num_chains=8,
        num_temperatures=200,
    )
    # AIS runs in the unconstrained space (with the log-Jacobian): a lower bound on average,
    # close to the truth (40 points, 8 chains: a standard error of about 0.02)
    err = result.log_px - exact
    assert np.mean(err) < 2 * np.std(err, ddof=1) / np.sqrt(len(err)) and np.mean(err) > -0.08
    assert np.median(np.abs(result.log_px - exact)) < 0.15


def test_discrete_local_latents_and_sites_outside_the_plate_are_reported():
    def discrete(x, *, n_data=None):
        with data_plate(x, n_data):
            c = numpyro.sample("c", dist.Bernoulli(0.5))
            numpyro.sample("x", dist.Normal(c[..., None], 1.0).to_event(1), obs=x)

    with pytest.raises(ValueError, match="'c' is discrete"):
        find_local_latents(discrete, jnp.zeros((2, 3)))

    def global_only(x, *, n_data=None):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with data_plate(x, n_data):
            numpyro.sample("x", dist.Normal(mu, 1.0).expand([3]).to_event(1), obs=x)

    with pytest.raises(ValueError, match="no latent sample site inside the plate"):
        find_local_latents(global_only, jnp.zeros((2, 3)))


def test_a_vae_site_is_a_single_vector_and_keeps_its_name():
    from amortjax.models import vae_model
    from amortjax.nets import MLP

    model = vae_model(MLP((), 4), z_dim=3, likelihood="gaussian")
    layout = find_local_latents(model, jnp.zeros((2, 4)))
    assert isinstance(layout, LocalLatents) and layout.is_single_vector and layout.size == 3
    guide = given_params_guide(DiagonalGaussian(), site=layout)
    latents, _ = sample_guide(guide, {}, jnp.zeros((2, 4)), jax.random.key(0), jnp.zeros((2, 6)))
    assert set(latents) == {"z"}


def test_bounds_of_the_best_lognormal_q_are_its_analytic_elbo_and_log_px(counts):
    layout = find_local_latents(gamma_poisson, counts)
    a = ALPHA + counts.sum(-1)
    lam = jnp.stack([jnp.log(a / (BETA + D)) - 0.5 / a, -0.5 * jnp.log(a)], -1)
    bounds = evaluate_bounds(
        gamma_poisson,
        given_params_guide(site=layout),
        {},
        counts,
        jax.random.key(3),
        num_samples=4000,
        guide_args=(lam,),
    )
    np.testing.assert_allclose(bounds.elbo, best_lognormal_elbo(counts), atol=0.01)
    np.testing.assert_allclose(bounds.iwae, gamma_poisson_log_marginal(counts), atol=0.01)


def test_guides_find_the_local_latents_in_the_model_by_themselves(counts):
    from numpyro import handlers

    from amortjax import MLP, Trainer, amortized_guide, make_optimizer

    guide = amortized_guide(MLP((8,), 2), x_dim=D, model=gamma_poisson)
    trace = handlers.trace(handlers.seed(guide, 0)).get_trace(counts[:3])
    assert trace[AUX_SITE]["infer"] == {"is_auxiliary": True}
    assert trace["rate"]["fn"].__class__.__name__ == "Delta"
    assert bool(jnp.all(trace["rate"]["value"] > 0))
    trainer = Trainer(gamma_poisson, guide, make_optimizer(1e-2), n_data=40, batch_size=20)
    state = trainer.init(jax.random.key(0), counts)
    state, losses = trainer.run_epoch(state, counts)
    assert np.all(np.isfinite(losses))


def test_log_px_per_datapoint_of_a_non_gaussian_model():
    """gap_decomposition's log p̂(x) against the exact Gamma-Poisson marginal, point by point."""
    from amortjax.evaluation.gaps import gap_decomposition

    rates = jax.random.gamma(jax.random.key(31), ALPHA, (300,)) / BETA
    x = jax.random.poisson(jax.random.key(32), rates[:, None], (300, D)).astype(jnp.float32)
    layout = find_local_latents(gamma_poisson, x)
    start = np.zeros((300, 2), np.float32)  # N(0, 1) over log rate: a poor "encoder"
    g = gap_decomposition(
        gamma_poisson, {}, x, start, jax.random.key(33), site=layout, iwae_samples=1000
    )
    exact = np.asarray(gamma_poisson_log_marginal(x), np.float64)
    err = g.log_px - exact
    assert np.mean(np.abs(err) < 0.05) >= 0.99, np.sort(err)[:5]
    assert np.mean(err) < 2 * np.std(err, ddof=1) / np.sqrt(300)  # a lower bound on average
    # q* is the best log-normal: its ELBO against the closed form
    np.testing.assert_allclose(g.elbo_qstar, np.asarray(best_lognormal_elbo(x)), atol=0.02)
    assert g.approximation.min() > -0.05


def test_a_matrix_latent_given_by_name_is_refused_and_runs_laid_out():
    """A site name stands for one vector [batch, D]; a matrix latent per datapoint given by name
    used to fail inside a guide (fit_local) or on AIS's own shape check only; every evaluator
    now names the fix, and the layout runs and finds the exact posterior: z's first four
    entries (row-major) | x ~ N(0.8 x, 0.2) each, the last two N(0, 1), so the diagonal
    Gaussian holds it and L[q*] = log p(x) = sum_j log N(x_j; 0, 1.25)."""

    def matrix_model(x, *, n_data=None):
        with data_plate(x, n_data):
            z = numpyro.sample("z", dist.Normal(jnp.zeros((2, 3)), 1.0).to_event(2))
            loc = z.reshape((*z.shape[:-2], 6))[..., :4]
            numpyro.sample("x", dist.Normal(loc, 0.5).to_event(1), obs=x)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
    key = jax.random.key(0)
    fix = r"site 'z' has shape \(2, 3\) per datapoint, but a site name stands for one vector"
    with pytest.raises(ValueError, match="fit_local: " + fix):
        fit_local(matrix_model, {}, x, key, z_dim=6, site="z")
    with pytest.raises(ValueError, match="ais: " + fix):
        ais(matrix_model, {}, x, key, site="z")
    layout = find_local_latents(matrix_model, x)
    assert layout.size == 6 and not layout.is_single_vector
    fit = fit_local(matrix_model, {}, x, key, site=layout)
    assert fit.params.shape == (5, 12)
    loc, log_scale = DiagonalGaussian().split(jnp.asarray(fit.params))
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(loc, np.concatenate([0.8 * x64, np.zeros((5, 2))], 1), atol=1e-3)
    sd = np.concatenate([np.full(4, np.sqrt(0.2)), np.ones(2)])
    np.testing.assert_allclose(np.exp(log_scale), np.broadcast_to(sd, (5, 6)), rtol=1e-3)
    log_px = np.sum(-0.5 * np.log(2 * np.pi * 1.25) - x64**2 / 2.5, axis=1)
    np.testing.assert_allclose(fit.elbo, log_px, atol=1e-3)
