"""The regime objects: each produces the lambda its guide would, against the closed forms of
the linear-Gaussian model, and the three train and infer through one loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortjax.families import DiagonalGaussian
from amortjax.guides.amortized import encode
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.inference.local import QStarSettings, fit_local
from amortjax.inference.refine import RefineSettings, refine
from amortjax.inference.training import Trainer, fit
from amortjax.models.linear_gaussian import LinearGaussian
from amortjax.nets import MLP
from amortjax.regimes import Amortized, PerExample, SemiAmortized


@pytest.fixture(scope="module")
def case(lg_correlated):
    lg = lg_correlated
    model, _, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(7), 24)
    encoder = MLP(hidden_sizes=(), out_size=2 * lg.z_dim)
    return lg, model, params, np.asarray(x), encoder


def test_evaluators_take_typed_settings_and_keyword_overrides(case):
    """fit_local(settings) and fit_local(**fields) are the same call; an unknown name or a
    settings value of the wrong type is refused with the valid fields."""
    _, model, params, x, _ = case
    settings = QStarSettings(method="newton", max_steps=40, final_samples=0)
    a = fit_local(model, params, x[:4], jax.random.key(1), settings, z_dim=3)
    b = fit_local(model, params, x[:4], jax.random.key(1), z_dim=3, method="newton",
                  max_steps=40, final_samples=0)  # fmt: skip
    np.testing.assert_array_equal(a.params, b.params)
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['learning_rte'\].*num_decays"):
        fit_local(model, params, x[:4], jax.random.key(1), z_dim=3, learning_rte=1e-3)
    c = fit_local(model, params, x[:4], jax.random.key(1), settings._asdict(), z_dim=3)
    np.testing.assert_array_equal(a.params, c.params)  # a dict of the fields is the same
    with pytest.raises(TypeError, match="settings must be a QStarSettings or a dict"):
        fit_local(model, params, x[:4], jax.random.key(1), [40], z_dim=3)
    with pytest.raises(TypeError, match="RefineSettings needs .*num_steps"):
        refine(model, params, x[:4], np.zeros((4, 6)), jax.random.key(1),
               family=DiagonalGaussian())  # fmt: skip


def test_amortized_infers_the_encoders_output_the_exact_best_diagonal(case):
    lg, model, params, x, encoder = case
    inferred = Amortized(encoder).infer(model, params, x)
    loc, scale = lg.best_diagonal(x)
    np.testing.assert_allclose(inferred.params[:, :3], loc, atol=1e-4)
    np.testing.assert_allclose(np.exp(inferred.params[:, 3:]), np.broadcast_to(scale, loc.shape),
                               rtol=1e-4)  # fmt: skip
    assert np.all(inferred.steps == 0) and inferred.seconds > 0


def test_semi_amortized_infers_the_refined_encoder_output(case):
    lg, model, params, x, encoder = case
    settings = RefineSettings(num_steps=4, step_size=0.05)
    key = jax.random.key(3)
    inferred = SemiAmortized(encoder, settings, site="z").infer(model, params, x, key)
    lam0 = encode(encoder, params, x)
    expected = refine(model, params, x, lam0, key, family=DiagonalGaussian(), num_steps=4,
                      step_size=0.05)  # fmt: skip
    np.testing.assert_allclose(inferred.params, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inferred.start, lam0, rtol=1e-6)
    # a subset given its indices refines as it does inside the whole set (its draws are keyed
    # by the datapoint's index, not its position; without them, row 0 of x[5:] drew as row 0)
    regime = SemiAmortized(encoder, settings, site="z")
    part = regime.infer(model, params, x[5:], key, indices=np.arange(5, x.shape[0]))
    np.testing.assert_allclose(part.params, inferred.params[5:], rtol=1e-5, atol=1e-6)
    shifted = regime.infer(model, params, x[5:], key)
    assert np.abs(shifted.params - inferred.params[5:]).max() > 1e-3
    with pytest.raises(ValueError, match=r"SemiAmortized.infer: indices must be"):
        regime.infer(model, params, x[5:], key, indices=np.arange(3))
    # from the prior (no encoder): K steps raise the exact ELBO above the prior's
    prior = SemiAmortized(None, settings, site="z", z_dim=3).infer(model, params, x, key)
    np.testing.assert_allclose(prior.start, 0.0)
    elbo = lambda lam: lg.elbo(x, lam[:, :3], np.exp(lam[:, 3:]))  # noqa: E731
    assert np.all(elbo(prior.params) > elbo(prior.start))
    with pytest.raises(ValueError, match="unknown mode 'savae'"):
        SemiAmortized(encoder, settings, mode="savae")
    with pytest.raises(TypeError, match="RefineSettings"):
        SemiAmortized(encoder, {"num_steps": 4})


def test_regimes_name_parameters_they_cannot_use(case):
    """Each used to run: an encoder of the wrong output size gave lambda of the wrong width
    (Amortized.infer), a negative step size trained downhill (SemiAmortized), missing trained
    parameters raised a bare KeyError."""
    from amortjax.families import FullRankGaussian
    from amortjax.guides.semi_amortized import semi_amortized_guide

    _, model, params, x, encoder = case
    with pytest.raises(ValueError, match=r"the encoder outputs 6 values.*full_rank.*needs .* = 9"):
        Amortized(encoder, family=FullRankGaussian()).infer(model, params, x)
    no_encoder = {k: v for k, v in params.items() if k != "encoder$params"}
    with pytest.raises(ValueError, match=r"Amortized.infer: params has no 'encoder\$params'"):
        Amortized(encoder).infer(model, no_encoder, x)
    with pytest.raises(ValueError, match=r"SemiAmortized.infer: params has no 'encoder\$params'"):
        SemiAmortized(encoder, RefineSettings(2)).infer(model, no_encoder, x, jax.random.key(0))
    with pytest.raises(ValueError, match="PerExample.training_params: params has no 'local"):
        PerExample().training_params(params)
    downhill = RefineSettings(2, step_size=-0.1)
    with pytest.raises(ValueError, match="SemiAmortized: step_size must be finite and > 0"):
        SemiAmortized(encoder, downhill)
    with pytest.raises(ValueError, match="semi_amortized_guide: step_size must be finite and > 0"):
        semi_amortized_guide(encoder, model, x_dim=x.shape[1], **downhill._asdict())


def test_per_example_infers_q_star_from_its_settings(case):
    """From N(0, I), q* reaches the analytic best diagonal Gaussian within 0.01 nats."""
    lg, model, params, x, _ = case
    settings = QStarSettings(method="newton", final_samples=0, batch_size=8)
    inferred = PerExample(settings, site="z", z_dim=3).infer(model, params, x, jax.random.key(1))
    best = lg.elbo(x, *lg.best_diagonal(x))
    reached = lg.elbo(x, inferred.params[:, :3], np.exp(inferred.params[:, 3:]))
    assert np.all(best - reached < 0.01), (best - reached).max()
    np.testing.assert_allclose(inferred.start, 0.0)
    assert inferred.fit is not None and np.all(inferred.steps == inferred.fit.steps)


def test_the_three_regimes_train_in_one_loop_and_infer_new_data(case):
    lg, model, _, x, encoder = case
    x_new = np.asarray(lg.sample(jax.random.key(8), 5)[0])
    refine_settings = RefineSettings(num_steps=2, step_size=0.01)
    regimes = [
        Amortized(encoder),
        PerExample(QStarSettings(final_samples=0, max_steps=200)),
        SemiAmortized(encoder, refine_settings, mode="svi"),
    ]
    for regime in regimes:
        trainer = Trainer(model, regime.guide(model, x), regime.optimizer(1e-2), n_data=24,
                          batch_size=8)  # fmt: skip
        result = fit(trainer, x, key=jax.random.key(0), epochs=3, progress=False)
        losses = result.history["train_loss"][1]
        assert np.all(np.isfinite(losses)) and losses[-1] < losses[0], (regime.name, losses)
        inferred = regime.infer(model, result.params, x_new, jax.random.key(2))
        assert inferred.params.shape == (5, 6), regime.name
        # Scored exactly under the model it learned (a linear-Gaussian one): every q is below
        # log p(x); q* on new data reaches that model's best diagonal Gaussian; refinement
        # climbs from the encoder's output.
        p = result.params
        learned = LinearGaussian(
            p["decoder$params"]["Dense_0"]["kernel"].T,
            p["decoder$params"]["Dense_0"]["bias"],
            jnp.broadcast_to(jnp.exp(p["log_noise_scale"]), (x.shape[1],)),
        )

        def exact_elbo(lam, learned=learned):
            return learned.elbo(x_new, lam[:, :3], np.exp(lam[:, 3:]))

        elbo = exact_elbo(inferred.params)
        assert np.all(elbo < learned.log_marginal(x_new)), regime.name
        if isinstance(regime, PerExample):
            best = learned.elbo(x_new, *learned.best_diagonal(x_new))
            assert np.all(best - elbo < 0.01), (best - elbo).max()
        if isinstance(regime, SemiAmortized):
            assert np.all(elbo > exact_elbo(inferred.start)), elbo - exact_elbo(inferred.start)
        if isinstance(regime, PerExample):  # one trained row per training datapoint
            assert regime.training_params(result.params).shape == (24, 6)
