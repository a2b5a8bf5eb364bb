"""Objectives by name, KL weights as a handler and their schedules, learning-rate schedules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import Trace_ELBO

from amortjax.guides import amortized_guide
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.inference.objectives import (
    iwae_schedule,
    kl_schedule,
    kl_warmup_weight,
    kl_weighted,
    make_objective,
    make_optimizer,
)
from amortjax.inference.training import Trainer
from amortjax.models import vae_model
from amortjax.models.linear_gaussian import make_linear_gaussian
from amortjax.nets import MLP


def test_kl_weight_interpolates_reconstruction_and_elbo(lg_correlated):
    # With the same draws, loss(beta) = -E[log p(x|z)] - beta (E[log p(z)] - E[log q(z|x)]) is
    # affine in beta: loss(0.25) = 0.75 loss(0) + 0.25 loss(1), and loss(1) is the plain loss.
    model, guide, params = linear_gaussian_vae(lg_correlated)
    x, _ = lg_correlated.sample(jax.random.key(0), 16)
    m, g = kl_weighted(model), kl_weighted(guide)
    elbo = Trace_ELBO()

    def loss(beta):
        return float(elbo.loss(jax.random.key(1), params, m, g, x, kl_weight=beta))

    plain = float(elbo.loss(jax.random.key(1), params, model, guide, x))
    assert loss(1.0) == pytest.approx(plain, rel=1e-6)
    assert loss(0.25) == pytest.approx(0.75 * loss(0.0) + 0.25 * loss(1.0), rel=1e-5)
    assert loss(0.0) < loss(1.0)  # the KL term is positive on average here


def test_warmup_weight():
    assert float(kl_warmup_weight(0, 0)) == 1.0
    np.testing.assert_allclose(
        [float(kl_warmup_weight(s, 4)) for s in range(6)], [0.25, 0.5, 0.75, 1, 1, 1]
    )


def test_iwae_schedule_follows_burda_et_al():
    sched = iwae_schedule(1e-3, steps_per_epoch=10)
    decay = 10 ** (-1 / 7)
    # stage i covers epochs [sum_{j<i} 3^j, sum_{j<=i} 3^j)
    for epoch, stage in [(0, 0), (1, 1), (3, 1), (4, 2), (12, 2), (13, 3), (1093, 7), (3279, 7)]:
        assert float(sched(epoch * 10)) == pytest.approx(1e-3 * decay**stage, rel=1e-5), epoch
    assert sum(3**i for i in range(8)) == 3280


def test_unknown_objective_and_schedule():
    with pytest.raises(ValueError, match="'kl'.*elbo"):
        make_objective("kl")
    with pytest.raises(ValueError, match="num_particles"):
        make_objective("iwae", 0)
    with pytest.raises(ValueError, match="'cosine'.*constant"):
        make_optimizer(1e-3, schedule="cosine")


@pytest.mark.parametrize(("name", "k"), [("elbo", 1), ("iwae", 5)])
def test_every_objective_is_exact_when_q_is_the_posterior(lg_diagonal, name, k):
    # q = p(z|x) makes every log-weight equal log p(x): Trace_ELBO and the IWAE bound give
    # -sum_i log p(x_i), draw for draw.
    model, guide, params = linear_gaussian_vae(lg_diagonal)
    x, _ = lg_diagonal.sample(jax.random.key(0), 12)
    loss = make_objective(name, k).loss(jax.random.key(1), params, model, guide, x)
    np.testing.assert_allclose(loss, -lg_diagonal.log_marginal(x).sum(), rtol=1e-5)


def test_the_iwae_objective_is_the_iwae_bound_where_q_is_not_the_posterior(lg_correlated):
    """Where q is not the posterior (the best diagonal Gaussian of a correlated posterior:
    log p(x) - ELBO is 0.09 nats per point), the "iwae" loss is -sum_i IWAE-k(x_i), a
    log-sum-exp over k particles per datapoint: its mean over 4,000 keys matches
    `evaluate_bounds`' IWAE-5 (another implementation, 2,000 draws per point) within 4
    standard errors and lies between the closed-form ELBO and log p(x), far above the ELBO
    (which Trace_ELBO with 5 particles would give, as would a log-sum-exp over the whole
    batch's summed weights, nearly). With n_data the loss is scaled to the dataset."""
    from amortjax.evaluation.bounds import evaluate_bounds

    lg = lg_correlated
    model, guide, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(0), 12)
    objective = make_objective("iwae", 5)
    keys = jax.random.split(jax.random.key(1), 4000)
    losses = np.asarray(
        jax.jit(jax.vmap(lambda k: objective.loss(k, params, model, guide, x)))(keys), np.float64
    )
    iwae, se = -losses.mean(), losses.std(ddof=1) / np.sqrt(len(losses))
    elbo = float(np.asarray(lg.elbo(x, *lg.best_diagonal(x)), np.float64).sum())
    log_px = float(np.asarray(lg.log_marginal(x), np.float64).sum())
    assert log_px - elbo > 1.0  # the family misses the posterior: room between the bounds
    assert elbo + 0.3 * (log_px - elbo) < iwae < log_px + 4 * se
    # the same bound by evaluate_bounds: 400 independent IWAE-5 draws per point
    reps = 400
    b = evaluate_bounds(model, guide, params, np.tile(np.asarray(x), (reps, 1)),
                        jax.random.key(2), num_samples=5, batch_size=1200)  # fmt: skip
    per_rep = np.asarray(b.iwae, np.float64).reshape(reps, 12).sum(1)
    se_b = per_rep.std(ddof=1) / np.sqrt(reps)
    assert iwae == pytest.approx(per_rep.mean(), abs=4 * np.hypot(se, se_b))
    # a minibatch of a dataset of 1,200: the loss is the batch's, times 1,200 / 12
    scaled = objective.loss(jax.random.key(1), params, model, guide, x, n_data=1200)
    one = objective.loss(jax.random.key(1), params, model, guide, x)
    assert float(scaled) == pytest.approx(100 * float(one), rel=1e-5)


def test_meanfield_elbo_is_exact_in_expectation(lg_diagonal):
    # With the KL term analytic, a draw estimates E_q[log p(x|z)] - KL, which is log p(x) only
    # on average: many particles bring it within Monte Carlo error.
    model, guide, params = linear_gaussian_vae(lg_diagonal)
    x, _ = lg_diagonal.sample(jax.random.key(0), 12)
    one = make_objective("meanfield_elbo", 1).loss(jax.random.key(1), params, model, guide, x)
    many = make_objective("meanfield_elbo", 4000).loss(jax.random.key(1), params, model, guide, x)
    exact = -float(lg_diagonal.log_marginal(x).sum())
    assert abs(float(one) - exact) > 0.05  # one draw is noisy...
    assert float(many) == pytest.approx(exact, abs=0.1)  # ...their mean is not


def test_kl_schedules_at_known_steps():
    steps = np.arange(12)
    assert float(kl_schedule("constant", beta=4.0)(7)) == 4.0
    # The linear warm-up is kl_warmup_weight scaled by beta.
    linear = kl_schedule("linear", beta=2.0, warmup_steps=4)
    np.testing.assert_allclose([float(linear(s)) for s in range(6)], [0.5, 1, 1.5, 2, 2, 2])
    np.testing.assert_allclose(
        [float(kl_warmup_weight(s, 4)) for s in steps],
        [float(kl_schedule("linear", warmup_steps=4)(s)) for s in steps],
    )
    assert float(kl_schedule("linear", beta=3.0)(0)) == 3.0  # no warm-up
    # Kim et al.'s warm-up starts at 0.1: 0.1 + 0.9 (s + 1) / 4
    kim = kl_schedule("linear", warmup_steps=4, start=0.1)
    np.testing.assert_allclose([float(kim(s)) for s in range(5)], [0.325, 0.55, 0.775, 1, 1],
                               rtol=1e-6)  # fmt: skip
    # Fu et al.: 2 cycles of 4 steps, each ramping 0 -> beta over its first half; beta from
    # total_steps on.
    cyc = kl_schedule("cyclical", beta=2.0, cycles=2, total_steps=8)
    expected = [0, 1, 2, 2, 0, 1, 2, 2, 2, 2, 2, 2]
    np.testing.assert_allclose([float(cyc(s)) for s in steps], expected)
    # Traceable: jit and vmap over int32 steps give the same values.
    np.testing.assert_allclose(jax.jit(jax.vmap(cyc))(jnp.asarray(steps, jnp.int32)), expected)
    # Periods need not be whole steps: 3 cycles over 10 steps, P = 10/3.
    thirds = kl_schedule("cyclical", cycles=3, total_steps=10)
    np.testing.assert_allclose(
        [float(thirds(s)) for s in range(10)], [0, 0.6, 1, 1, 0.4, 1, 1, 0.2, 0.8, 1], rtol=1e-6
    )
    # Exact far past float32's consecutive integers (2^24): a step just after a cycle starts.
    long = kl_schedule("cyclical", cycles=4, total_steps=4 * 2**23)
    assert float(long(3 * 2**23 + 1)) == pytest.approx(2 / 2**23, rel=1e-6)
    # and where step * cycles passes 2^31 (int32 wrapped it: 0.34 here, in and out of jit)
    many = kl_schedule("cyclical", cycles=100, total_steps=30_000_000)
    expected = (25_000_000 % 300_000) / 300_000 / 0.5  # (s mod P) / P / ratio, P = 3e5
    for weight in (many(25_000_000), jax.jit(many)(jnp.int32(25_000_000))):
        assert float(weight) == pytest.approx(expected, rel=1e-6)
    huge = kl_schedule("cyclical", cycles=4, total_steps=2_000_000_000)
    assert float(huge(600_000_000)) == pytest.approx(0.2 / 0.5, rel=1e-6)  # P = 5e8


def test_kl_schedule_rejects_bad_options():
    with pytest.raises(ValueError, match="'cosine'.*constant"):
        kl_schedule("cosine")
    with pytest.raises(ValueError, match="total_steps"):
        kl_schedule("cyclical", cycles=4)
    with pytest.raises(ValueError, match="cycles must be"):
        kl_schedule("cyclical", cycles=0, total_steps=10)
    with pytest.raises(ValueError, match=r"below 2\*\*31"):
        kl_schedule("cyclical", cycles=2, total_steps=2**31)
    with pytest.raises(ValueError, match="beta"):
        kl_schedule("constant", beta=-1.0)
    with pytest.raises(ValueError, match="'linear' schedule, not 'constant'"):
        kl_schedule("constant", warmup_steps=10)
    with pytest.raises(ValueError, match="'cyclical' schedule, not 'linear'"):
        kl_schedule("linear", total_steps=10)


def _linear_vae_trainer(n, **kwargs):
    model = vae_model(MLP((), 8), z_dim=3, likelihood="gaussian")
    guide = amortized_guide(MLP((), 6), x_dim=8)
    return Trainer(model, guide, make_optimizer(0.0), n_data=n, batch_size=16, **kwargs)


def test_trainer_applies_the_schedule_at_each_global_step(lg_correlated):
    # A zero learning rate keeps the parameters and the draws of every step the same across
    # trainers, so each step's loss is affine in its KL weight w:
    # loss(w) = loss(0) + w (loss(1) - loss(0)). Two epochs of 4 steps check the global step.
    n = 64
    x, _ = lg_correlated.sample(jax.random.key(0), n)

    def losses(**kwargs):
        trainer = _linear_vae_trainer(n, **kwargs)
        state = trainer.init(jax.random.key(1), x)
        out = []
        for _ in range(2):
            state, step_losses = trainer.run_epoch(state, jnp.asarray(x))
            out.append(np.asarray(step_losses))
        return np.concatenate(out)

    plain = losses()
    zero = losses(kl_schedule=kl_schedule("constant", beta=0.0))
    assert np.all(zero < plain)  # without its KL term the loss drops at every step
    schedule = kl_schedule("cyclical", cycles=2, total_steps=6)
    weights = np.array([float(schedule(s)) for s in range(8)])
    np.testing.assert_allclose(weights, [0, 2 / 3, 1, 0, 2 / 3, 1, 1, 1], rtol=1e-6)
    cyclical = losses(kl_schedule=schedule)
    np.testing.assert_allclose(cyclical, zero + weights * (plain - zero), rtol=1e-5)
    # Where the weight is 1 the loss is the plain ELBO's, where it is 0 the beta = 0 one.
    np.testing.assert_allclose(cyclical[weights == 1], plain[weights == 1], rtol=1e-6)
    np.testing.assert_allclose(cyclical[weights == 0], zero[weights == 0], rtol=1e-6)


def test_trainer_takes_a_warm_up_or_a_schedule_not_both():
    with pytest.raises(ValueError, match="not both"):
        _linear_vae_trainer(64, kl_warmup_epochs=1, kl_schedule=kl_schedule("constant"))


def test_epoch_kl_schedule_counts_in_epochs():
    """Lengths in epochs become lengths in optimizer steps; the plain ELBO is None."""
    from amortjax.inference.objectives import epoch_kl_schedule

    warm = epoch_kl_schedule("linear", steps_per_epoch=3, warmup_epochs=2, start=0.1)
    ref = kl_schedule("linear", warmup_steps=6, start=0.1)
    np.testing.assert_allclose(
        [float(warm(s)) for s in range(8)], [float(ref(s)) for s in range(8)]
    )
    assert epoch_kl_schedule("linear", steps_per_epoch=3) is None
    assert float(epoch_kl_schedule("constant", steps_per_epoch=3, beta=4.0)(5)) == 4.0
    cyc = epoch_kl_schedule("cyclical", steps_per_epoch=2, cycles=2, epochs=4)
    ref = kl_schedule("cyclical", cycles=2, total_steps=8)
    np.testing.assert_allclose([float(cyc(s)) for s in range(9)], [float(ref(s)) for s in range(9)])


def _exact_weighted_loss_grad(params, x, n_data, beta):
    """The gradient of -(n_data / B) sum_i [E_q log p(x_i | z) - beta KL(q(z | x_i) || p(z))] for
    a linear-Gaussian VAE with a linear encoder, from its closed form, in float64."""
    from jax.flatten_util import ravel_pytree

    with jax.enable_x64(True):
        p64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        x64 = jnp.asarray(np.asarray(x, np.float64))

        def loss(p):
            dec, enc = p["decoder$params"]["Dense_0"], p["encoder$params"]["Dense_0"]
            w, log_psi = dec["kernel"].T, p["log_noise_scale"]
            lam = x64 @ enc["kernel"] + enc["bias"]
            mu, log_s = jnp.split(lam, 2, axis=-1)
            s2 = jnp.exp(2 * log_s)
            resid2 = (x64 - mu @ w.T - dec["bias"]) ** 2 + s2 @ (w**2).T
            rec = -0.5 * jnp.sum(
                jnp.log(2 * jnp.pi) + 2 * log_psi + resid2 / jnp.exp(2 * log_psi), -1
            )
            kl = 0.5 * jnp.sum(mu**2 + s2 - 1 - 2 * log_s, -1)
            return -(n_data / x64.shape[0]) * jnp.sum(rec - beta * kl)

        return np.asarray(ravel_pytree(jax.grad(loss)(p64))[0])


def test_the_trainers_gradient_is_unbiased_for_the_exact_objective_at_a_narrow_posterior():
    """Observation noise 1e-2 (posterior sd ~0.01), an encoder moved off the optimum: the mean of
    the Trainer's stochastic loss gradient over 2,000 keys against the exact gradient of the
    closed-form ELBO, and of the KL-weighted objective (beta 0.5), in float64, parameter by
    parameter (the decoder's, the noise scale and the encoder's, 94 numbers; measured chi^2 /
    dof 0.79, largest |z| 2.0). The check has power: the beta-0.5 gradient against the plain
    ELBO's gives chi^2 / dof 718."""
    import optax
    from jax.flatten_util import ravel_pytree

    lg = make_linear_gaussian(jax.random.key(0), x_dim=8, z_dim=3, noise_scale=1e-2)
    model, guide, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(1), 100)
    rng = np.random.default_rng(7)
    enc = params["encoder$params"]["Dense_0"]
    kernel, bias = np.array(enc["kernel"]), np.array(enc["bias"])
    kernel[:, :3] *= 1 + 0.01 * rng.standard_normal((8, 3))  # the means off the optimum
    kernel[:, 3:] += 0.02 * rng.standard_normal((8, 3))  # scales that vary with x
    bias[3:] += 0.3 * rng.standard_normal(3)
    params = {**params, "encoder$params": {"Dense_0": {"kernel": kernel, "bias": bias}}}

    def mean_grad(beta):
        schedule = None if beta == 1.0 else kl_schedule("constant", beta=beta)
        trainer = Trainer(model, guide, optax.sgd(0.0), n_data=300, batch_size=100,
                          kl_schedule=schedule)  # fmt: skip
        kw = {"n_data": 300, "data_indices": jnp.arange(100)}
        if schedule is not None:
            kw["kl_weight"] = schedule(jnp.zeros((), jnp.int32))
        svi = trainer.svi

        def grad(key):
            g = jax.grad(lambda p: svi.loss.loss(key, p, svi.model, svi.guide, x, **kw))(params)
            return ravel_pytree(g)[0]

        keys = jax.random.split(jax.random.key(2), 2000)
        grads = np.concatenate([np.asarray(jax.jit(jax.vmap(grad))(keys[i : i + 500]), np.float64)
                                for i in range(0, 2000, 500)])  # fmt: skip
        return grads.mean(0), grads.std(0, ddof=1) / np.sqrt(len(grads))

    half = None
    for beta in (1.0, 0.5):
        mean, se = mean_grad(beta)
        z = (mean - _exact_weighted_loss_grad(params, x, 300, beta)) / se
        assert np.mean(z**2) < 1.6 and np.abs(z).max() < 5, (beta, np.mean(z**2), np.abs(z).max())
        half = (mean, se)
    z_wrong = (half[0] - _exact_weighted_loss_grad(params, x, 300, 1.0)) / half[1]
    assert np.mean(z_wrong**2) > 100
