"""Bad input at the public entry points fails before anything runs, naming the problem and the fix.

Each case was found by probing the entry points as a user would (an independent audit,
2026-12-07). Before, the first three gave silently wrong results: a random encoder scored by
`log_weights`, a model trained backwards by a negative step size, q* run past its `max_steps`;
the others stopped with errors from deep inside NumPyro, optax or JAX that did not name the
argument.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import amortjax as aj
from amortjax.families import FullRankGaussian
from amortjax.models import data_plate
from amortjax.nets import MLP

N, D, Z = 8, 6, 2
X = (np.random.default_rng(0).uniform(size=(N, D)) < 0.5).astype(np.float32)
KEY = jax.random.key(1)


@pytest.fixture(scope="module")
def vae():
    model = aj.vae_model(MLP((8,), D), z_dim=Z)
    guide = aj.amortized_guide(MLP((8,), 2 * Z), x_dim=D)
    trainer = aj.Trainer(model, guide, aj.make_optimizer(1e-2), n_data=N, batch_size=4)
    return model, guide, trainer.params(trainer.init(jax.random.key(0), jnp.asarray(X)))


def test_log_weights_refuses_a_guide_without_its_parameters_and_a_seed_for_a_key(vae):
    model, guide, params = vae
    decoder_only = {"decoder$params": params["decoder$params"]}
    with pytest.raises(ValueError, match=r"guide's parameter sites \['encoder\$params'\]"):
        aj.log_weights(model, guide, decoder_only, X, KEY)  # was: a random encoder's numbers
    with pytest.raises(ValueError, match=r"log_weights: key must be one JAX PRNG key"):
        aj.log_weights(model, guide, params, X, 0)
    # the checks leave traced calls alone (a vmap over keys with x closed over, a jit)
    lw = jax.vmap(lambda k: aj.log_weights(model, guide, params, X, k))(jax.random.split(KEY, 3))
    jitted = jax.jit(lambda p, x, k: aj.log_weights(model, guide, p, x, k))(params, X, KEY)
    assert lw.shape == (3, N) and np.isfinite(lw).all()
    np.testing.assert_allclose(jitted, aj.log_weights(model, guide, params, X, KEY), rtol=1e-5)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: aj.make_optimizer(-3e-2), r"learning_rate must be .* \[0, inf\), got -0.03; "),
        (lambda: aj.make_optimizer("1e-2"), r"learning_rate must be .* got '1e-2'"),
        (lambda: aj.make_optimizer(None), r"learning_rate must be .* got None"),
        (lambda: aj.make_optimizer(1e-3, clip_norm=-1.0), r"clip_norm must be .* or None"),
        (lambda: aj.make_optimizer(1e-3, b1=1.0), r"b1 must be .* \[0, 1\)"),
        (lambda: aj.make_local_optimizer(1e-3, -1e-3), r"make_local_optimizer: learning_rate"),
        (lambda: aj.make_local_optimizer(-1e-3), r"make_local_optimizer: learning_rate"),
    ],
)
def test_an_optimizer_that_would_climb_the_loss_or_fail_inside_optax_is_refused(make, match):
    """A negative step size (or clipping norm) trained the model backwards without a word
    (loss 4.6 -> 58 in six epochs); a string failed inside optax at the first step."""
    with pytest.raises(ValueError, match=match):
        make()


def test_max_steps_is_a_cap_and_a_learning_rate_string_is_refused(vae):
    """Steps come in blocks (here 50): `max_steps=20` used to run 50 steps, and 120 ran
    150. Now no datapoint passes its cap."""
    model, _, params = vae
    kwargs = dict(z_dim=Z, method="adam", final_samples=0, certify_retries=0)
    short = aj.fit_local(model, params, X, KEY, max_steps=20, **kwargs)
    assert short.steps.max() == 20  # one block, shortened to the cap
    ragged = aj.fit_local(
        model, params, X, KEY, max_steps=120, block_size=50, patience=100, **kwargs
    )
    np.testing.assert_array_equal(ragged.steps, 100)  # the last whole block within 120
    assert ragged.hit_max_steps.all()
    for method in ("adam", "auto"):  # (the Newton step's own range check came first)
        with pytest.raises(ValueError, match=r"fit_local: learning_rate must be .* got '1e-3'"):
            aj.fit_local(model, params, X, KEY, z_dim=Z, method=method, learning_rate="1e-3")


def test_step_and_block_resolves_auto_with_the_family_or_says_how():
    """`QStarSettings().step_and_block()` raised `KeyError: 'auto'` at the default method."""
    settings = aj.QStarSettings()
    with pytest.raises(ValueError, match=r"step_and_block\(family\)"):
        settings.step_and_block()
    assert settings.step_and_block(aj.DiagonalGaussian()) == (0.5, 10)  # Newton's defaults
    assert settings.step_and_block(aj.AffineCouplingFlow()) == (3e-3, 50)  # Adam's
    assert settings._replace(max_steps=20).step_and_block(aj.AffineCouplingFlow())[1] == 20
    # Adam's blocks and patience follow its stopping signal: the monitor's (the Gaussians')
    # blocks of 400 with patience 1, the per-step average's (the flows') 50 with patience 4
    adam = settings._replace(method="adam")
    assert adam.step_and_block(aj.DiagonalGaussian()) == (3e-3, 400)
    assert adam.patience_for(aj.FullRankGaussian()) == 1
    assert adam.patience_for(aj.AffineCouplingFlow()) == 4
    assert settings.patience_for(aj.DiagonalGaussian()) == 4  # Newton's
    assert adam._replace(monitor_samples=0).step_and_block() == (3e-3, 50)
    assert adam._replace(patience=7).patience_for() == 7
    for where in ("step_and_block", "patience_for"):
        with pytest.raises(ValueError, match=rf"{where}\(family\)"):
            getattr(adam, where)()
    with pytest.raises(ValueError, match=r"method must be one of .*'sgd'"):
        settings._replace(method="sgd").step_and_block()


def test_trainer_init_refuses_nan_data_instead_of_blaming_the_model(vae):
    """A NaN in the first batch was reported as "the model's likelihood changes between two
    runs" (hidden randomness), an inf as an encoder overflow; one past the first batch
    trained to NaN losses."""
    model, guide, _ = vae
    trainer = aj.Trainer(model, guide, aj.make_optimizer(1e-2), n_data=N, batch_size=4)
    for row, value in ((0, np.nan), (6, np.nan), (0, np.inf)):
        bad = X.copy()
        bad[row, 0] = value
        with pytest.raises(ValueError, match=rf"NaN or infinite values in 1 of {N} rows .*{row}"):
            trainer.init(KEY, jnp.asarray(bad))


def test_parameters_of_a_diverged_fit_are_named(vae):
    """NaN parameters stopped with NumPyro's "BernoulliLogits distribution got invalid logits
    parameter", which names neither the argument nor the fix."""
    model, guide, params = vae
    bad = jax.tree.map(lambda a: a * jnp.nan, params)
    match = r"params\['decoder\$params'\].*NaN or infinite entries.*diverged"
    for call in (
        lambda: aj.evaluate_bounds(model, guide, bad, X, KEY, num_samples=3),
        lambda: aj.fit_local(model, bad, X, KEY, z_dim=Z, max_steps=10),
        lambda: aj.ais(model, bad, X, KEY, z_dim=Z, num_temperatures=3),
    ):
        with pytest.raises(ValueError, match=match):
            call()


def test_a_family_by_name_or_by_class_is_refused_with_the_instance_to_pass(vae):
    model, _, params = vae
    name = r"family must be a family instance.*get_family\('full_rank'\)"
    cls = r"got the class FullRankGaussian: call it, FullRankGaussian\(\)"
    for where, call in (
        ("fit_local", lambda f: aj.fit_local(model, params, X, KEY, z_dim=Z, family=f)),
        ("ais", lambda f: aj.ais(model, params, X, KEY, z_dim=Z, family=f)),
        (
            "gap_decomposition",
            lambda f: aj.gap_decomposition(model, params, X, None, KEY, family=f),
        ),
        ("amortized_guide", lambda f: aj.amortized_guide(MLP((8,), 4), x_dim=D, family=f)),
        ("given_params_guide", lambda f: aj.given_params_guide(f)),
        ("Amortized", lambda f: aj.Amortized(MLP((8,), 4), family=f)),
        ("PerExample", lambda f: aj.PerExample(family=f)),
    ):
        with pytest.raises(ValueError, match=rf"{where}: {name}"):
            call("full_rank")
        with pytest.raises(ValueError, match=rf"{where}: .*{cls}"):
            call(FullRankGaussian)
    with pytest.raises(ValueError, match=r"got int, which lacks \['num_params'"):
        aj.fit_local(model, params, X, KEY, z_dim=Z, family=3)


def test_keys_given_as_seeds_are_named_before_jit_traces_them(vae):
    """A seed reached `refine` inside jit ("got DynamicJaxprTracer of shape ()") and AIS's
    pilot key failed in JAX ("invalid PRNG key data")."""
    model, _, params = vae
    regime = aj.SemiAmortized(MLP((8,), 2 * Z), aj.RefineSettings(num_steps=2, step_size=0.1))
    with pytest.raises(ValueError, match=r"SemiAmortized.infer: key must be one JAX PRNG key.*int"):
        regime.infer(model, params, X, 0)
    with pytest.raises(ValueError, match=r"ais \(pilot_key\): key must be one JAX PRNG key"):
        aj.ais(model, params, X, KEY, z_dim=Z, num_temperatures=3, pilot_key=5)


def test_evaluate_bounds_names_a_bool_count_and_guide_args_that_are_not_a_tuple(vae):
    model, guide, params = vae
    with pytest.raises(ValueError, match=r"num_samples must be an integer >= 1, got True"):
        aj.evaluate_bounds(model, guide, params, X, KEY, num_samples=True)
    lam = np.zeros((N, 2 * Z), np.float32)
    with pytest.raises(ValueError, match=r"guide_args must be a tuple .* guide_args=\(lam,\)"):
        aj.evaluate_bounds(model, aj.given_params_guide(), params, X, KEY, guide_args=lam)


def _model(x, n_data=None):
    with data_plate(x, n_data):
        z = numpyro.sample("z", dist.Normal(0, 1).expand([Z]).to_event(1))
        numpyro.sample("x", dist.Normal(z.sum(-1, keepdims=True), 1).to_event(1), obs=x)


@pytest.mark.parametrize("n_data", [3, 0, 8.0, True])
def test_a_dataset_smaller_than_its_batch_or_not_a_count_is_refused(n_data):
    with pytest.raises(ValueError, match=r"data_plate: n_data must be an integer >= the batch's"):
        numpyro.handlers.seed(_model, 0)(jnp.ones((4, 1)), n_data=n_data)
    trace = numpyro.handlers.trace(numpyro.handlers.seed(_model, 0)).get_trace(
        jnp.ones((4, 1)), n_data=100
    )
    assert float(trace["x"]["scale"]) == 25.0  # a minibatch of 4 of 100


def test_a_model_without_the_data_plate_is_told_to_use_it():
    def no_plate(x, n_data=None):
        numpyro.sample("z", dist.Normal(0, 1).expand([x.shape[0], Z]).to_event(2))
        numpyro.sample("x", dist.Normal(0, 1).expand(x.shape).to_event(2), obs=x)

    with pytest.raises(ValueError, match=r"inside the plate 'data'.*data_plate\(x, n_data\)"):
        aj.find_local_latents(no_plate, X)


def test_one_datapoint_without_its_batch_axis_is_told_to_add_it(vae):
    """`gap_decomposition` read the width as N and blamed encoder_params; every evaluator said
    the shapes differ without the fix."""
    model, guide, params = vae
    lam = np.zeros((1, 2 * Z), np.float32)
    fix = r"for one datapoint pass x\[None\], of shape \(1, 6\)"
    with pytest.raises(ValueError, match=fix):
        aj.gap_decomposition(model, params, X[0], lam, KEY)
    with pytest.raises(ValueError, match=fix):
        aj.evaluate_bounds(model, guide, params, X[0], KEY)
    from amortjax.inference.refine import refine

    with pytest.raises(ValueError, match=r"refine: lam0 must have shape \[batch=6.*" + fix):
        refine(
            model, params, X[0], lam, KEY, aj.RefineSettings(2, 0.1), family=aj.DiagonalGaussian()
        )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((8, 4), r"hidden_sizes must be a tuple of positive widths.*got 8"),
        (((8,), 0), r"out_size must be a positive integer; got 0"),
        (((0,), 4), r"hidden_sizes must be a tuple of positive widths"),
    ],
)
def test_an_mlp_of_impossible_sizes_is_refused_when_built(args, match):
    with pytest.raises(ValueError, match=match):
        MLP(*args)


def test_an_encoder_that_does_not_fit_its_parameters_is_named(vae):
    """Flax's bare ScopeParamShapeError (or a KeyError for params without the encoder's)."""
    model, _, params = vae
    with pytest.raises(ValueError, match=r"encode: the encoder's parameters do not fit"):
        aj.Amortized(MLP((8,), 6)).infer(model, params, X)  # trained with out_size 4
    with pytest.raises(ValueError, match=r"encode: params has no 'encoder\$params'"):
        aj.encode(MLP((8,), 4), {"decoder$params": params["decoder$params"]}, X)


def test_settings_that_failed_only_at_fit_time_are_refused_when_given(vae):
    """A string for a schedule or a preprocessing function failed at the first epoch ("'str'
    object is not callable"), a float z_dim inside Flax, a string beta inside a ufunc."""
    model, guide, _ = vae
    optimizer = aj.make_optimizer(1e-2)
    with pytest.raises(ValueError, match=r"Trainer: kl_schedule must be a function .*'linear'"):
        aj.Trainer(model, guide, optimizer, n_data=N, batch_size=4, kl_schedule="linear")
    with pytest.raises(ValueError, match=r"Trainer: preprocess must be a function .*'binarize'"):
        aj.Trainer(model, guide, optimizer, n_data=N, batch_size=4, preprocess="binarize")
    with pytest.raises(ValueError, match=r"vae_model: z_dim must be an integer >= 1, got 2.0"):
        aj.vae_model(MLP((8,), D), z_dim=2.0)
    with pytest.raises(ValueError, match=r"kl_schedule: beta must be a finite number .* '1'"):
        aj.kl_schedule("constant", beta="1")
