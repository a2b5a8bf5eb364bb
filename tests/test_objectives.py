"""Objectives by name, KL warm-up as a handler, learning-rate schedules."""

import jax
import numpy as np
import pytest
from numpyro.infer import Trace_ELBO

from amortjax.data.synthetic import linear_gaussian_vae
from amortjax.inference.objectives import (
    iwae_schedule,
    kl_warmup_weight,
    kl_weighted,
    make_objective,
    make_optimizer,
)


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
