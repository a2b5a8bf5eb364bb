"""The VAE model: input checks, subsampling scale, likelihoods."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer import Trace_ELBO

from amortjax.families import DiagonalGaussian, get_family
from amortjax.guides import amortized_guide, encode
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.inference.objectives import make_optimizer
from amortjax.inference.training import Trainer
from amortjax.models import (
    check_observations,
    decode_mean,
    get_likelihood,
    vae_model,
    with_fixed_params,
)
from amortjax.nets import MLP, activation_fn
from amortjax.traces import log_joint


def test_minibatch_loss_is_scaled_to_the_whole_dataset(lg_diagonal):
    # With the exact posterior as q every draw gives loss = -sum_i log p(x_i): no MC noise.
    model, guide, params = linear_gaussian_vae(lg_diagonal)
    x, _ = lg_diagonal.sample(jax.random.key(0), 10)
    elbo = Trace_ELBO()
    full = elbo.loss(jax.random.key(1), params, model, guide, x)
    np.testing.assert_allclose(full, -lg_diagonal.log_marginal(x).sum(), rtol=1e-5)
    scaled = elbo.loss(jax.random.key(1), params, model, guide, x, n_data=1000)
    np.testing.assert_allclose(scaled, 100.0 * full, rtol=1e-5)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (np.zeros((4, 5)), r"shape \[num_datapoints, x_dim=6\].*\(4, 5\)"),
        (np.zeros(6), r"got shape \(6,\)"),
        (np.zeros((0, 6)), "num_datapoints > 0"),
        (np.array([[0.0] * 5 + [np.nan]] * 2), r"NaN.*x\[0, 5\]"),
        (np.full((2, 6), 0.5), r"Bernoulli.*binary.*x\[0, 0\] = .*0\.5.*binarization"),
        (np.full((2, 6), 2.0), r"Bernoulli.*\{0, 1\}"),
    ],
)
def test_bad_observations_are_named(x, match):
    with pytest.raises(ValueError, match=match):
        check_observations(x, x_dim=6, likelihood="bernoulli")


def test_grey_levels_accepted_only_when_binarized_by_the_trainer():
    grey = np.full((2, 6), 0.5)
    check_observations(grey, x_dim=6, likelihood="bernoulli", grey_ok=True)
    check_observations(grey * 7.0, x_dim=6, likelihood="gaussian")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        check_observations(grey * 3.0, x_dim=6, likelihood="bernoulli", grey_ok=True)


def test_unknown_names_list_the_choices():
    with pytest.raises(ValueError, match="'poisson'.*bernoulli"):
        get_likelihood("poisson")
    with pytest.raises(ValueError, match="'iaf'.*diagonal.*flow"):
        get_family("iaf")
    with pytest.raises(ValueError, match="'swish'.*relu"):
        activation_fn("swish")


def test_bernoulli_vae_scores_binary_data_with_its_decoder():
    decoder, encoder = MLP((16,), 6), MLP((16,), 4)
    model = vae_model(decoder, z_dim=2)
    guide = amortized_guide(encoder, x_dim=6)
    x = jnp.array([[0, 1, 1, 0, 1, 0]] * 3, dtype=jnp.float32)
    from numpyro.infer import SVI
    from numpyro.optim import Adam

    svi = SVI(model, guide, Adam(1e-3), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.key(0), x))
    z = jnp.zeros((3, 2))
    probs = decode_mean(decoder, params, z)
    expected = (x * jnp.log(probs) + (1 - x) * jnp.log1p(-probs)).sum(-1) - jnp.log(
        2 * jnp.pi
    )  # log N(0; 0, I_2) = -log(2 pi)
    np.testing.assert_allclose(log_joint(model, params, x, {"z": z}), expected, rtol=1e-5)
    lam = encode(encoder, params, x)
    assert lam.shape == (3, 4)
    np.testing.assert_allclose(DiagonalGaussian().mean(lam), lam[:, :2])


def test_with_fixed_params_trains_the_encoder_only(lg_correlated):
    lg = lg_correlated
    model, guide, params = linear_gaussian_vae(lg, encoder="prior")
    fixed = {k: v for k, v in params.items() if not k.startswith("encoder")}
    frozen = with_fixed_params(model, fixed)
    x, _ = lg.sample(jax.random.key(0), 64)
    trainer = Trainer(frozen, guide, make_optimizer(1e-2), n_data=64, batch_size=16)
    state = trainer.init(jax.random.key(1), x)
    assert set(trainer.params(state)) == {"encoder$params"}  # SVI never sees the decoder
    losses = []
    for _ in range(30):
        state, loss = trainer.run_epoch(state, x)
        losses.append(float(loss.mean()))
    # The frozen model is the exact linear-Gaussian one: its -log p(x) bounds the loss below.
    exact = -float(lg.log_marginal(x).mean())
    assert losses[-1] < losses[0] - 1.0
    assert losses[-1] > exact - 0.5
    # Its log joint still uses the fixed decoder: identical to the unfrozen model's.
    z = jnp.zeros((4, lg.z_dim))
    np.testing.assert_allclose(
        log_joint(frozen, {}, x[:4], {"z": z}), log_joint(model, params, x[:4], {"z": z}), rtol=1e-6
    )


def test_lean_bernoulli_log_mass_and_gradients_are_numpyros():
    import numpyro.distributions as dist

    from amortjax.models import BernoulliLogits

    logits = jnp.linspace(-60.0, 60.0, 241)
    for x in (0.0, 1.0, 0.3):  # 0.3: a grey level (cross-entropy; NumPyro says -inf there)
        value = jnp.full_like(logits, x)
        ours = BernoulliLogits(logits=logits).log_prob(value)
        if x in (0.0, 1.0):
            theirs = dist.Bernoulli(logits=logits).log_prob(value)
            np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
        # exact in float64: x log sigmoid(l) + (1 - x) log sigmoid(-l)
        l64 = np.asarray(logits, np.float64)
        exact = x * -np.logaddexp(0, -l64) + (1 - x) * -np.logaddexp(0, l64)
        np.testing.assert_allclose(ours, exact, rtol=1e-6, atol=1e-5)
        grad = jax.grad(lambda lg, v=value: BernoulliLogits(logits=lg).log_prob(v).sum())(logits)
        np.testing.assert_allclose(grad, x - jax.nn.sigmoid(logits), atol=1e-6)
    # integer pixels (uint8, int32, bool) score and differentiate like floats (was a float0 crash)
    pixels = jnp.array([[0, 1, 1]])
    for dtype in (jnp.uint8, jnp.int32, jnp.bool_):
        value = pixels.astype(dtype)
        grad = jax.grad(lambda lg, v=value: BernoulliLogits(logits=lg).log_prob(v).sum())
        np.testing.assert_allclose(grad(jnp.zeros(3)), [-0.5, 0.5, 0.5])
    d = get_likelihood("bernoulli").distribution(jnp.zeros((3, 5)))
    assert d.event_shape == (5,) and d.batch_shape == (3,)
    assert d.sample(jax.random.key(0)).shape == (3, 5)
