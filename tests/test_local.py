"""The vectorized per-example optimizer (q*) against the linear-Gaussian closed forms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortjax.data.synthetic import linear_gaussian_vae
from amortjax.families import DiagonalGaussian
from amortjax.inference.local import fit_local, local_elbo


@pytest.fixture(scope="module")
def case(lg_correlated):
    lg = lg_correlated
    model, _, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(7), 40)
    return lg, model, params, x


def _exact_elbo(lg, x, lam):
    return np.asarray(lg.elbo(x, lam[:, :3], np.exp(lam[:, 3:])))


def test_local_elbo_matches_the_analytic_elbo(case):
    lg, model, params, x = case
    loc, scale = lg.best_diagonal(x)
    lam = DiagonalGaussian().pack(loc, scale)
    est = jax.vmap(
        lambda xi, li: local_elbo(
            model, params, xi, li, jax.random.key(0), family=DiagonalGaussian(), num_samples=20000
        )
    )(x[:5], lam[:5])
    np.testing.assert_allclose(est, lg.elbo(x[:5], loc[:5], scale[:5]), atol=0.02)


def test_q_star_reaches_the_best_diagonal_gaussian(case):
    lg, model, params, x = case
    fit = fit_local(
        model,
        params,
        x,
        jax.random.key(1),
        z_dim=3,
        num_samples=20,
        learning_rate=1e-3,
        final_samples=5000,
        batch_size=16,  # 40 = 16 + 16 + 8: the last chunk is padded
    )
    best = np.asarray(lg.elbo(x, *lg.best_diagonal(x)))
    reached = _exact_elbo(lg, x, fit.params)
    assert np.all(best - reached < 0.01), (best - reached).max()
    assert np.all(best - reached > -1e-4)  # nothing beats the optimum: the formulas agree
    loc, scale = lg.best_diagonal(x)
    np.testing.assert_allclose(fit.params[:, :3], loc, atol=0.05)
    np.testing.assert_allclose(
        np.exp(fit.params[:, 3:]), np.broadcast_to(scale, (40, 3)), rtol=0.05
    )
    # the reported ELBO is a 5000-draw estimate of the same quantity
    np.testing.assert_allclose(fit.elbo, reached, atol=0.05)
    assert np.all(fit.iwae > fit.elbo)
    assert np.all(fit.iwae < np.asarray(lg.log_marginal(x)) + 0.03)


def test_each_datapoint_stops_on_its_own(case):
    lg, model, params, x = case
    fam = DiagonalGaussian()
    at_optimum = fam.pack(*lg.best_diagonal(x[:20]))
    far = jnp.tile(fam.pack(jnp.full(3, 3.0), jnp.full(3, 0.1)), (20, 1))
    fit = fit_local(
        model,
        params,
        x[:40],
        jax.random.key(2),
        init=jnp.concatenate([at_optimum, far]),
        num_samples=20,
        learning_rate=1e-3,
        final_samples=100,
        block_size=50,
        patience=5,
    )
    # Started at the optimum, a datapoint stops after about `patience` blocks; far away, it has
    # to travel first. Both halves were in the same compiled batch.
    assert fit.steps[:20].max() < fit.steps[20:].min(), fit.steps
    assert fit.steps[:20].min() >= 5 * 50
    best = np.asarray(lg.elbo(x, *lg.best_diagonal(x)))
    # a shorter patience than the default stops a little earlier: looser than 0.01
    assert np.all(best - _exact_elbo(lg, x, fit.params) < 0.05)


def test_max_steps_caps_every_datapoint(case):
    _, model, params, x = case
    fit = fit_local(
        model,
        params,
        x[:8],
        jax.random.key(3),
        z_dim=3,
        max_steps=200,
        block_size=100,
        final_samples=10,
    )
    assert np.all(fit.steps == 200)


def test_bad_arguments(case):
    _, model, params, x = case
    with pytest.raises(ValueError, match="z_dim"):
        fit_local(model, params, x, jax.random.key(0))
    with pytest.raises(ValueError, match=r"init must have shape \[40, num_params\]; got \(39, 6\)"):
        fit_local(model, params, x, jax.random.key(0), init=jnp.zeros((39, 6)))
