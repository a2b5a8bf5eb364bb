"""Differentiable refinement and the semi-amortized guide's three modes."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import Trace_ELBO

from amortjax.families import DiagonalGaussian
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.guides.local import local_elbo
from amortjax.guides.semi_amortized import semi_amortized_guide
from amortjax.inference.objectives import make_optimizer
from amortjax.inference.refine import refine
from amortjax.inference.training import Trainer, fit
from amortjax.models import vae_model
from amortjax.models.linear_gaussian import make_linear_gaussian
from amortjax.nets import MLP

FAM = DiagonalGaussian()


@pytest.fixture(scope="module")
def case(lg_correlated):
    lg = lg_correlated
    model, _, params = linear_gaussian_vae(lg, encoder="prior")
    x, _ = lg.sample(jax.random.key(7), 40)
    return lg, model, params, x


def test_refinement_climbs_to_the_best_diagonal_gaussian(case):
    lg, model, params, x = case
    lam0 = jnp.zeros((40, 6))
    lam = refine(
        model,
        params,
        x,
        lam0,
        jax.random.key(1),
        family=FAM,
        num_steps=20,
        step_size=0.05,
        num_samples=5,
    )
    before = lg.elbo(x, lam0[:, :3], jnp.exp(lam0[:, 3:])).mean()
    after = lg.elbo(x, lam[:, :3], jnp.exp(lam[:, 3:])).mean()
    best = lg.elbo(x, *lg.best_diagonal(x)).mean()
    assert after - before > 40
    assert best - after < 0.5
    assert refine(model, params, x, lam0, jax.random.key(1), family=FAM, num_steps=0) is lam0


def test_refinement_that_lowers_the_elbo_warns_with_the_fix():
    """A narrow posterior (noise 1e-2, x_dim 20, z_dim 10) from a poor start (means 0.05 off,
    scales 5 times too wide): Kim et al.'s step of 1 per datapoint (their default for a
    minibatch mean, this library's default until 2026-12) lowered every point's exact ELBO, by
    up to 1e6 nats, without a word; now a concrete call warns, naming the fix. A step of 1e-4
    climbs on every point and does not warn."""
    lg = make_linear_gaussian(jax.random.key(40), x_dim=20, z_dim=10, noise_scale=1e-2)
    model, _, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(41), 30)
    mean, _ = lg.posterior(x)
    scale = np.asarray(lg.best_diagonal(x)[1])
    rng = np.random.default_rng(0)
    loc0 = mean + 0.05 * rng.normal(size=mean.shape)
    lam0 = FAM.pack(jnp.asarray(loc0, jnp.float32), jnp.asarray(np.tile(5 * scale, (30, 1))))

    def exact(lam):
        return lg.elbo(x, np.asarray(lam[:, :10]), np.exp(np.asarray(lam[:, 10:], np.float64)))

    with pytest.warns(UserWarning, match=r"lowered the ELBO of 30 of 30 .*step_size=1.0 .*lower"):
        big = refine(model, params, x, lam0, jax.random.key(3), family=FAM, num_steps=20,
                     step_size=1.0)  # fmt: skip
    assert np.all(exact(big) < exact(lam0) - 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        small = refine(model, params, x, lam0, jax.random.key(3), family=FAM, num_steps=20,
                       step_size=1e-4)  # fmt: skip
    assert np.all(exact(small) > exact(lam0))


def test_refine_refuses_bad_settings_shapes_and_data_naming_the_fix(case):
    _, model, params, x = case
    lam0 = jnp.zeros((40, 6))

    def call(**changes):
        args = {"x": x, "lam0": lam0, "num_steps": 2, **changes}
        return refine(model, params, key=jax.random.key(0), family=FAM, **args)

    for changes, match in (
        ({"num_steps": -1}, "refine: num_steps must be an integer >= 0, got -1"),
        ({"num_samples": 0}, "refine: num_samples must be an integer >= 1"),
        ({"momentum": 1.0}, r"momentum must be a finite number in \[0, 1\)"),
        ({"max_grad_norm": 0.0}, "max_grad_norm .* or None for no clipping"),
        ({"step_size": float("nan")}, "step_size must be finite and > 0"),
        (
            {"step_size": jnp.ones(5)},
            r"step_size must be a scalar or one per parameter, shape \[6\]",
        ),
        ({"lam0": lam0[:39]}, r"lam0 must have shape \[batch=40, num_params\]"),
        ({"indices": jnp.arange(39)}, r"indices must be \[40\] integers"),
        ({"indices": jnp.zeros(40, int)}, r"indices must be distinct .* 39 repeated"),
        ({"x": x.at[5, 0].set(jnp.nan)}, r"NaN or infinite values in 1 of 40 rows \(first: row 5"),
    ):
        with pytest.raises(ValueError, match=match):
            call(**changes)
    assert call(step_size=jnp.full(6, 0.01)).shape == (40, 6)  # one step size per parameter


@pytest.mark.parametrize(
    ("n", "num_steps"),
    [(1, 2), pytest.param(3, 4, marks=pytest.mark.slow)],  # (3, 4): ~34 s in a fresh CI run
)
def test_gradient_through_refinement_matches_finite_differences(n, num_steps):
    """SA-VAE's gradient: the refined ELBO's derivative through the K momentum steps, with
    respect to the start lambda_0 and a decoder weight, equals a central finite difference in
    float64 along a random direction (relative 1e-6). A dropped momentum term, a stopped
    gradient or a wrong sign in the back-propagation through the steps would not."""
    with jax.enable_x64(True):
        lg = make_linear_gaussian(jax.random.key(0), x_dim=5, z_dim=2, noise_scale=0.7)
        model, _, params = linear_gaussian_vae(lg)
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), params)
        x = jnp.asarray(lg.sample(jax.random.key(1), n)[0], jnp.float64)
        lam0 = jnp.asarray(0.3 * jax.random.normal(jax.random.key(2), (n, 4)), jnp.float64)

        def objective(lam0, kernel):
            theta = {
                **params,
                "decoder$params": {
                    "Dense_0": {**params["decoder$params"]["Dense_0"], "kernel": kernel}
                },
            }
            lam = refine(
                model,
                theta,
                x,
                lam0,
                jax.random.key(3),
                family=FAM,
                num_steps=num_steps,
                step_size=jnp.array([0.1, 0.1, 0.05, 0.05]),
                momentum=0.5,
                max_grad_norm=None,
                num_samples=3,
            )
            keys = jax.random.split(jax.random.key(4), n)
            return jax.vmap(
                lambda xi, li, ki: local_elbo(model, theta, xi, li, ki, family=FAM, num_samples=7)
            )(x, lam, keys).sum()

        kernel = params["decoder$params"]["Dense_0"]["kernel"]
        g_lam, g_kernel = jax.grad(objective, argnums=(0, 1))(lam0, kernel)
        d_lam = jax.random.normal(jax.random.key(5), lam0.shape, jnp.float64)
        d_kernel = jax.random.normal(jax.random.key(6), kernel.shape, jnp.float64)
        eps = 1e-5
        fd = (
            objective(lam0 + eps * d_lam, kernel + eps * d_kernel)
            - objective(lam0 - eps * d_lam, kernel - eps * d_kernel)
        ) / (2 * eps)
        ad = jnp.sum(g_lam * d_lam) + jnp.sum(g_kernel * d_kernel)
        assert abs(float(fd)) > 1.0  # a direction along which the objective really changes
        np.testing.assert_allclose(float(ad), float(fd), rtol=1e-6)


def _grads(model, x, mode, step_size, params):
    guide = semi_amortized_guide(
        MLP((), 6), model, x_dim=8, num_steps=3, mode=mode, step_size=step_size, num_samples=2
    )
    enc = {"encoder$params": {"Dense_0": {"kernel": jnp.full((8, 6), 0.01), "bias": jnp.zeros(6)}}}
    return jax.grad(lambda p: Trace_ELBO().loss(jax.random.key(0), p, model, guide, x))(
        {**params, **enc}
    )


def _close(a, b):
    return all(
        np.allclose(u, v, rtol=1e-5, atol=1e-6)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_modes_route_gradients_where_they_should(case):
    _, model, params, x = case
    sa1, sa2 = (_grads(model, x, "sa", s, params) for s in (0.05, 0.1))
    svi1, svi2 = (_grads(model, x, "svi", s, params) for s in (0.05, 0.1))
    kl1 = _grads(model, x, "svi_kl", 0.05, params)
    # Stop-gradient mode: the encoder learns only from its own ELBO at lambda_0, which does not
    # depend on the refinement, so changing the refinement's step size leaves its gradient alone.
    assert _close(svi1["encoder$params"], svi2["encoder$params"])
    # SA-VAE: the encoder's gradient goes through the K steps and feels the step size.
    assert not _close(sa1["encoder$params"], sa2["encoder$params"])
    # The decoder learns from the refined ELBO in every mode...
    assert not _close(svi1["decoder$params"], svi2["decoder$params"])
    # ...and the encoder's extra loss never reaches it: svi and svi_kl agree on the decoder.
    assert _close(svi1["decoder$params"], kl1["decoder$params"])
    assert not _close(svi1["encoder$params"], kl1["encoder$params"])
    # SA-VAE's decoder gradient also flows through lambda_K(theta): it differs from svi's.
    assert not _close(sa1["decoder$params"], svi1["decoder$params"])


@pytest.mark.parametrize("mode", ["sa", "svi", "svi_kl"])
def test_semi_amortized_training_improves_the_refined_elbo(mode):
    lg = make_linear_gaussian(jax.random.key(0), x_dim=8, z_dim=3, noise_scale=0.7)
    x, _ = lg.sample(jax.random.key(1), 200)
    model = vae_model(MLP((), 8), z_dim=3, likelihood="gaussian")
    guide = semi_amortized_guide(MLP((), 6), model, x_dim=8, num_steps=3, mode=mode, step_size=0.05)
    trainer = Trainer(model, guide, make_optimizer(1e-2), n_data=200, batch_size=50)
    losses = fit(trainer, x, key=jax.random.key(2), epochs=15, progress=False).history[
        "train_loss"
    ][1]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0] - 5.0, losses


def test_unknown_mode():
    with pytest.raises(ValueError, match="'vae'"):
        semi_amortized_guide(MLP((), 6), None, x_dim=8, num_steps=3, mode="vae")


def test_refinement_draws_per_datapoint_so_chunks_do_not_matter(case):
    """Datapoint i draws from fold_in(key, i): refining rows 25..39 as their own batch (with
    their indices) gives the rows of the whole batch's refinement."""
    _, model, params, x = case
    lam0 = jnp.zeros((40, 6))
    kw = dict(family=FAM, num_steps=5, step_size=0.05, num_samples=1)
    whole = refine(model, params, x, lam0, jax.random.key(3), **kw)
    part = refine(model, params, x[25:], lam0[25:], jax.random.key(3),
                  indices=jnp.arange(25, 40), **kw)  # fmt: skip
    np.testing.assert_allclose(part, whole[25:], rtol=1e-5, atol=1e-6)
    shifted = refine(model, params, x[25:], lam0[25:], jax.random.key(3), **kw)
    assert np.abs(np.asarray(shifted - whole[25:])).max() > 1e-3  # other keys, other draws
