"""A user's own model with a mistake in it fails loudly, naming the problem and the fix.

Each case below trained or evaluated silently before (a wrong objective, latents fitted from
their prior, NaN ELBOs) or stopped with an error from deep inside NumPyro or Flax.
"""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import amortjax as aj
from amortjax.families import DiagonalGaussian, FullRankGaussian, check_num_params
from amortjax.models import data_plate
from amortjax.nets import MLP

N, D, K = 60, 6, 2
X = np.random.default_rng(0).poisson(3.0, size=(N, D)).astype(np.float32)
FAM = DiagonalGaussian()


def _poisson_pca(site="z", plate=None, pass_n_data=True):
    def model(x, n_data=None):
        w = numpyro.param("w", jnp.full((K, D), 0.1))
        if plate is None:
            rows = data_plate(x, n_data if pass_n_data else None)
        else:
            rows = numpyro.plate(plate, n_data or x.shape[0], subsample_size=x.shape[0])
        with rows:
            u = numpyro.sample(site, dist.Normal(0, 1).expand([K]).to_event(1))
            numpyro.sample("x", dist.Poisson(jnp.exp(u @ w)).to_event(1), obs=x)

    return model


def _init(model, guide):
    trainer = aj.Trainer(model, guide, aj.make_optimizer(1e-3), n_data=N, batch_size=20)
    return trainer.init(jax.random.key(0), jnp.asarray(X))


def test_a_correct_model_and_guide_pass_the_checks():
    encoder = MLP((8,), FAM.num_params(K))
    _init(_poisson_pca(), aj.amortized_guide(encoder, x_dim=D))


def test_a_guide_that_misses_the_models_latent_is_refused():
    encoder = MLP((8,), FAM.num_params(K))
    with pytest.raises(ValueError, match=r"does not draw the model's latent sites \['u'\].*"
                       r"site=find_local_latents\(model, x\)"):  # fmt: skip
        _init(_poisson_pca(site="u"), aj.amortized_guide(encoder, x_dim=D))
    model = _poisson_pca(site="u")  # the fix the message names
    _init(model, aj.amortized_guide(encoder, x_dim=D, model=model))


def test_a_plate_of_another_name_or_without_n_data_is_refused():
    encoder = MLP((8,), FAM.num_params(K))
    guide = aj.amortized_guide(encoder, x_dim=D)
    with pytest.raises(ValueError, match=r"no plate named 'data' \(its plates: \['rows'\]\)"):
        _init(_poisson_pca(plate="rows"), guide)
    with pytest.raises(ValueError, match=r"data plate has size 20, but .* n_data=60.*pass n_data"):
        _init(_poisson_pca(pass_n_data=False), guide)


def test_a_guide_of_the_wrong_latent_size_is_refused():
    wrong = MLP((8,), FAM.num_params(K + 1))  # z of size 3 against the model's 2
    with pytest.raises(ValueError, match=r"draws site 'z' with shape \(20, 3\).*\(20, 2\)"):
        _init(_poisson_pca(), aj.amortized_guide(wrong, x_dim=D))
    odd = MLP((8,), 7)
    with pytest.raises(ValueError, match="outputs 7 values per datapoint.*num_params"):
        _init(_poisson_pca(), aj.amortized_guide(odd, x_dim=D))
    layout = aj.find_local_latents(_poisson_pca(), X)
    with pytest.raises(ValueError, match=r"needs family.num_params\(2\) = 5"):
        check_num_params(FullRankGaussian(), 4, layout.size)


def test_global_latents_must_be_fixed_before_evaluating():
    def model(x, n_data=None):
        w = numpyro.sample("w", dist.Normal(0, 1).expand([K, D]).to_event(2))
        with data_plate(x, n_data):
            u = numpyro.sample("z", dist.Normal(0, 1).expand([K]).to_event(1))
            numpyro.sample("x", dist.Poisson(jnp.exp(0.1 * u @ w)).to_event(1), obs=x)

    with pytest.raises(
        ValueError, match=r"fit_local: .*outside the data plate \['w'\].*fix_globals"
    ):
        aj.fit_local(model, {}, X, jax.random.key(0), z_dim=K, max_steps=20)
    encoder = MLP((8,), FAM.num_params(K))
    with pytest.raises(ValueError, match=r"latent sites \['w'\].*global_guide=global_guide"):
        _init(model, aj.amortized_guide(encoder, x_dim=D))


def test_a_constrained_latent_given_by_name_is_refused_not_scored_as_nan():
    def model(x, n_data=None):
        with data_plate(x, n_data):
            rate = numpyro.sample("rate", dist.Gamma(2.0, 1.0))
            numpyro.sample("x", dist.Poisson(rate[:, None] * jnp.ones(D)).to_event(1), obs=x)

    with pytest.raises(ValueError, match="site 'rate' has support Positive.*find_local_latents"):
        aj.fit_local(model, {}, X, jax.random.key(0), site="rate", z_dim=1, max_steps=20)
    with pytest.raises(
        ValueError, match=r"no local latent site 'z' \(its local latents: \['rate'\]"
    ):
        aj.ais(model, {}, X, jax.random.key(0), z_dim=1, num_temperatures=3)
    layout = aj.find_local_latents(model, X)  # the fix: q* on log(rate), scored right
    fit = aj.fit_local(model, {}, X, jax.random.key(0), site=layout, max_steps=20)
    # against the exact marginal (a missing or doubled log-Jacobian would move every point by
    # E_q[log rate], about a nat; measured: IWAE-1000 within 0.015 of it, the ELBO at most 0.004
    # above it on any point, its Monte Carlo noise)
    from amortjax.models.gamma_poisson import gamma_poisson_log_marginal

    exact = gamma_poisson_log_marginal(X, 2.0, 1.0)
    np.testing.assert_allclose(fit.iwae, exact, atol=0.05)
    assert abs(float(np.mean(fit.iwae - exact))) < 0.01
    assert (fit.elbo - exact).max() < 0.02 and float(np.mean(fit.elbo - exact)) < 0


def test_plates_that_vectorize_a_local_latent_are_refused_with_the_fix():
    def nested(x, n_data=None):
        with data_plate(x, n_data):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([K]).to_event(1))
            with numpyro.plate("features", D, dim=-1):
                numpyro.sample("x", dist.Poisson(jnp.exp(z.sum(-1, keepdims=True))), obs=x)

    def outside(x, n_data=None):
        with numpyro.plate("features", D, dim=-1), data_plate(x, n_data):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([K]).to_event(1))
            numpyro.sample("x", dist.Poisson(jnp.exp(z.sum(-1))).to_event(1), obs=x.T)

    for model in (nested, outside):
        with pytest.raises(ValueError, match=r"event dimensions, e.g. .*to_event\(1\)"):
            aj.find_local_latents(model, X)
    with pytest.raises(ValueError, match="two plates of the model ask for the same batch dim"):
        aj.evaluate_bounds(nested, aj.amortized_guide(MLP((), 4), x_dim=D), {}, X,
                           jax.random.key(0), num_samples=2)  # fmt: skip


def test_raw_counts_into_an_encoder_are_explained_and_an_input_transform_fixes_them():
    big = np.random.default_rng(1).poisson(300.0, size=(N, D)).astype(np.float32)

    def model(x, n_data=None):
        b = numpyro.param("b", jnp.zeros(D))
        with data_plate(x, n_data):
            z = numpyro.sample("z", dist.Normal(0, 1).expand([K]).to_event(1))
            numpyro.sample("x", dist.Poisson(jnp.exp(z.sum(-1, keepdims=True) + b)).to_event(1),
                           obs=x)  # fmt: skip

    def init(transform):
        encoder = MLP((64,), FAM.num_params(K), input_transform=transform)
        trainer = aj.Trainer(model, aj.amortized_guide(encoder, x_dim=D), aj.make_optimizer(1e-2),
                             n_data=N, batch_size=20)  # fmt: skip
        return trainer, trainer.init(jax.random.key(1), jnp.asarray(big))

    trainer, state = None, None
    # refused at init when the first batch's draws overflow, else when the first step diverges
    with pytest.raises((ValueError, FloatingPointError), match=r"\|x\|.*input_transform='log1p'"):
        trainer, _ = init("identity")
        aj.fit(trainer, big, key=jax.random.key(1), epochs=1, progress=False)
    trainer, state = init("log1p")
    _, losses = trainer.run_epoch(state, jnp.asarray(big))
    assert np.isfinite(np.asarray(losses)).all()
    standardize = aj.nets.Standardize.fit(big, log1p=True)
    trainer, state = init(standardize)
    assert np.isfinite(np.asarray(trainer.run_epoch(state, jnp.asarray(big))[1])).all()
    scaled = np.asarray(standardize(jnp.asarray(big)))
    np.testing.assert_allclose(np.log1p(big).mean(0), np.asarray(standardize.mean), rtol=1e-5)
    assert abs(scaled.mean()) < 1e-4 and abs(scaled.std() - 1) < 1e-3
    # the transform is part of the encoder: encode() applies it as training did
    encoder = MLP((), 4, input_transform="log1p")
    variables = encoder.init(jax.random.key(0), big[:2])
    plain = MLP((), 4).apply(variables, np.log1p(big[:5]))
    np.testing.assert_allclose(aj.encode(encoder, {"encoder$params": variables["params"]},
                                         big[:5]), plain, rtol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="unknown input_transform 'sqrt'"):
        MLP((), 4, input_transform="sqrt").init(jax.random.key(0), big[:2])


def test_mlp_output_bias_starts_the_decoder_at_given_logits():
    """Burda et al.'s decoder init: the output bias at logit(mean pixel); a wrong length is
    refused."""
    bias = (-2.0, 0.0, 3.0)
    net = aj.MLP((4,), 3, output_bias=bias)
    params = net.init(jax.random.key(0), jnp.zeros((1, 5)))
    np.testing.assert_allclose(params["params"]["Dense_1"]["bias"], bias)
    with pytest.raises(ValueError, match="output_bias has 2 values for out_size 3"):
        aj.MLP((4,), 3, output_bias=(0.0, 1.0)).init(jax.random.key(0), jnp.zeros((1, 5)))


def test_mean_logits_are_the_logits_of_the_clipped_pixel_means():
    """By hand: means 0.25, 0.5, 0 (clipped to 1e-3) and 1 (clipped to 1 - 1e-3)."""
    from amortjax.nets import mean_logits

    x = np.array([[1, 1, 0, 1], [0, 0, 0, 1], [0, 1, 0, 1], [0, 0, 0, 1]], np.float32)
    expected = (np.log(1 / 3), 0.0, np.log(1e-3 / 0.999), np.log(0.999 / 1e-3))
    np.testing.assert_allclose(mean_logits(x), expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"x must be \[N, D\]"):
        mean_logits(np.zeros(4))


def test_parameters_left_out_are_refused_not_freshly_initialized():
    """Without a value for a param site, every evaluator ran the model (or the guide) with its
    initial value (for a Flax network a random one) and reported finite numbers."""
    from amortjax.nets import MLP

    model = _poisson_pca()
    encoder = MLP((8,), FAM.num_params(K), input_transform="log1p")
    guide = aj.amortized_guide(encoder, x_dim=D, family=FAM)
    trainer = aj.Trainer(model, guide, aj.make_optimizer(1e-3), n_data=N, batch_size=20)
    params = trainer.params(trainer.init(jax.random.key(0), jnp.asarray(X)))
    x, key = jnp.asarray(X[:8]), jax.random.key(1)
    assert set(params) == {"w", "encoder$params"}
    bounds = aj.evaluate_bounds(model, guide, params, x, key, num_samples=4)
    assert np.all(np.isfinite(bounds.elbo))
    fix = r"pass the trained parameters.*with_fixed_params"
    model_only = {"encoder$params": params["encoder$params"]}
    for call in (
        lambda: aj.evaluate_bounds(model, guide, model_only, x, key, num_samples=4),
        lambda: aj.fit_local(model, {}, x, key, z_dim=K, max_steps=10),
        lambda: aj.ais(model, {}, x, key, num_temperatures=10),
    ):
        with pytest.raises(
            ValueError, match=r"no value for the model's parameter sites \['w'\].*" + fix
        ):
            call()
    with pytest.raises(
        ValueError, match=r"no value for the guide's parameter sites \['encoder\$params'\].*" + fix
    ):
        aj.evaluate_bounds(model, guide, {"w": params["w"]}, x, key, num_samples=4)


def test_the_model_and_guide_checks_run_once_per_structure_and_failures_are_never_remembered(
    monkeypatch,
):
    """The checks that trace the model or guide on one datapoint cost an evaluator ~50 ms a
    call (5% of IWAE-5000 on 100 MNIST digits): they run again only for arguments of another
    structure (other params, shapes or functions), and a refusal is never remembered."""
    from amortjax import traces

    model = _poisson_pca()
    guide = aj.amortized_guide(MLP((8,), FAM.num_params(K)), x_dim=D, family=FAM)
    trainer = aj.Trainer(model, guide, aj.make_optimizer(1e-3), n_data=N, batch_size=20)
    params = trainer.params(trainer.init(jax.random.key(0), jnp.asarray(X)))
    ran = []
    for name in ("_check_model", "_check_guide_draws"):
        real = getattr(traces, name)
        monkeypatch.setattr(traces, name, lambda *a, real=real, name=name: ran.append(name)
                            or real(*a))  # fmt: skip
    monkeypatch.setattr(traces, "_PASSED", type(traces._PASSED)())
    key = jax.random.key(1)
    bounds = partial(aj.evaluate_bounds, model, guide, key=key, num_samples=4)
    first = bounds(params, jnp.asarray(X[:8]))
    again = bounds(params, jnp.asarray(X[8:20]))  # other rows, the same structure: no check
    assert ran == ["_check_model", "_check_guide_draws"]
    assert np.all(np.isfinite(again.elbo)) and first.elbo.shape == (8,)
    with pytest.raises(ValueError, match=r"no value for the guide's parameter sites"):
        bounds({"w": params["w"]}, jnp.asarray(X[:8]))  # another structure: checked
    with pytest.raises(ValueError, match=r"no value for the guide's parameter sites"):
        bounds({"w": params["w"]}, jnp.asarray(X[:8]))  # and refused again
    assert ran.count("_check_guide_draws") == 3


def test_nan_in_given_parameters_or_latents_is_refused_naming_the_rows():
    """refine, reverse AIS / BDMC and evaluate_bounds returned NaN for such rows, silently."""
    from amortjax.evaluation.ais import reverse_ais
    from amortjax.guides.linear_gaussian import linear_gaussian_vae
    from amortjax.models.linear_gaussian import make_linear_gaussian

    lg = make_linear_gaussian(jax.random.key(0), x_dim=3, z_dim=2)
    model, _, params = linear_gaussian_vae(lg)
    x, z = lg.sample(jax.random.key(1), 6)
    lam = jnp.zeros((6, 4)).at[4, 1].set(jnp.nan)
    z = z.at[2, 0].set(jnp.inf)
    key, rows = jax.random.key(2), r"NaN or infinite values in 1 of 6 rows \(first rows \[{}\]\)"
    guide = aj.given_params_guide(FAM)
    calls = [
        ("fit_local: init", 4, lambda: aj.fit_local(model, params, x, key, init=lam)),
        ("ais: init_params", 4, lambda: aj.ais(model, params, x, key, init_params=lam)),
        ("refine: lam0", 4, lambda: aj.refine(model, params, x, lam, key, num_steps=2, family=FAM)),
        (
            r"evaluate_bounds: guide_args\[0\]",
            4,
            lambda: aj.evaluate_bounds(model, guide, params, x, key, guide_args=(lam,)),
        ),
        ("reverse AIS: z", 2, lambda: reverse_ais(model, params, x, z, key)),
        ("reverse AIS: z", 2, lambda: aj.bdmc(model, params, x, z, key)),
    ]
    for name, row, call in calls:
        with pytest.raises(ValueError, match=name + " has " + rows.format(row)):
            call()


def test_a_parameter_fixed_inside_the_model_is_held_fixed_or_refused():
    """substitute(model, {decoder: P}) trained the decoder from P (SVI's own substitute wins);
    block(model, hide=[decoder]) re-initialized it at random on every call, so the encoder
    trained against noise and evaluate_bounds scored a random decoder. with_fixed_params holds
    it fixed (the decoder after training is P exactly)."""
    from numpyro import handlers

    from amortjax.models import vae_model, with_fixed_params

    x = (np.random.default_rng(0).uniform(size=(32, 6)) < 0.5).astype(np.float32)
    model = vae_model(MLP((8,), 6), z_dim=2)
    guide = aj.amortized_guide(MLP((8,), 4), x_dim=6)
    trainer = aj.Trainer(model, guide, aj.make_optimizer(1e-2), n_data=32, batch_size=16)
    decoder = trainer.params(trainer.init(jax.random.key(0), jnp.asarray(x)))["decoder$params"]
    fixed = {"decoder$params": decoder}
    wrong = {
        "set inside it": handlers.substitute(model, data=fixed),
        "changes between two runs": handlers.block(model, hide=["decoder$params"]),
    }
    for match, variant in wrong.items():
        t = aj.Trainer(variant, guide, aj.make_optimizer(1e-2), n_data=32, batch_size=16)
        with pytest.raises(ValueError, match=match + ".*with_fixed_params"):
            t.init(jax.random.key(1), jnp.asarray(x))
    with pytest.raises(ValueError, match="changes between two runs"):
        aj.fit_local(wrong["changes between two runs"], {}, jnp.asarray(x[:4]), jax.random.key(2),
                     z_dim=2)  # fmt: skip
    right = with_fixed_params(model, fixed)
    t = aj.Trainer(right, guide, aj.make_optimizer(1e-2), n_data=32, batch_size=16)
    result = aj.fit(t, x, key=jax.random.key(1), epochs=2, progress=False)
    assert set(result.params) == {"encoder$params"}
    z = jnp.full((3, 2), 0.7)
    trace = handlers.trace(
        handlers.seed(handlers.substitute(right, data={**result.params, "z": z}), jax.random.key(3))
    ).get_trace(jnp.asarray(x[:3]))
    np.testing.assert_array_equal(
        trace["x"]["fn"].base_dist.logits, MLP((8,), 6).apply({"params": decoder}, z)
    )


def test_data_of_another_width_than_the_model_or_the_guide_is_named_by_the_trainer():
    """Both failed with Flax's ScopeParamShapeError from inside the encoder: the guide ran
    before anything compared x with the model."""
    from amortjax.models import vae_model

    x = (np.random.default_rng(0).uniform(size=(16, 6)) < 0.5).astype(np.float32)
    model = vae_model(MLP((8,), 6), z_dim=2)
    guide = aj.amortized_guide(MLP((8,), 4), x_dim=6)
    trainer = aj.Trainer(model, guide, aj.make_optimizer(1e-2), n_data=16, batch_size=8)
    with pytest.raises(ValueError, match=r"x gives it shape \(8, 5\) but the model's .*\(8, 6\)"):
        trainer.init(jax.random.key(0), jnp.asarray(x[:, :5]))
    narrow = aj.amortized_guide(MLP((8,), 4), x_dim=5)
    trainer = aj.Trainer(model, narrow, aj.make_optimizer(1e-2), n_data=16, batch_size=8)
    with pytest.raises(ValueError, match=r"the guide cannot run on a batch of x of shape \(8, 6\)"):
        trainer.init(jax.random.key(0), jnp.asarray(x))


def test_parameters_of_a_model_of_another_size_are_named_as_such():
    """A decoder's params from a model of x_dim 6 given with a model of x_dim 5 (and data that
    fit it): the message blamed only x's shape, which was right."""
    from amortjax.models import vae_model

    x = (np.random.default_rng(0).uniform(size=(8, 6)) < 0.5).astype(np.float32)
    model = vae_model(MLP((8,), 6), z_dim=2)
    guide = aj.amortized_guide(MLP((8,), 4), x_dim=6)
    trainer = aj.Trainer(model, guide, aj.make_optimizer(1e-2), n_data=8, batch_size=8)
    params = trainer.params(trainer.init(jax.random.key(0), jnp.asarray(x)))
    small = vae_model(MLP((8,), 5), z_dim=2)
    with pytest.raises(ValueError, match=r"params are those of this model.*another size"):
        aj.evaluate_bounds(small, aj.amortized_guide(MLP((8,), 4), x_dim=5), params, x[:, :5],
                           jax.random.key(1), num_samples=2)  # fmt: skip
