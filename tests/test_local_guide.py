"""Free per-datapoint variational parameters trained on minibatches: the plate carries the true
indices, row-sparse Adam leaves other rows alone, and training reaches the best diagonal q."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
import pytest
from numpyro import handlers
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import optax_to_numpyro

from amortjax.evaluation.bounds import evaluate_bounds
from amortjax.families import DiagonalGaussian, FullRankGaussian
from amortjax.guides import LOCAL_PARAMS, given_params_guide, local_guide
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.inference.sparse import (
    RowSparseAdamState,
    make_local_optimizer,
    row_sparse_adam,
)
from amortjax.inference.training import Trainer, fit, with_data_indices
from amortjax.models import data_plate

N_DATA, BATCH = 64, 16


@pytest.fixture(scope="module")
def lg_problem(lg_correlated):
    x, _ = lg_correlated.sample(jax.random.key(1), N_DATA)
    model, _, params = linear_gaussian_vae(lg_correlated)
    return lg_correlated, x, model, params


def _row_sparse_state(opt_state) -> RowSparseAdamState:
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, RowSparseAdamState))
        if isinstance(s, RowSparseAdamState)
    ]
    assert len(found) == 1
    return found[0]


def _frozen(model, params):
    """The model with its params fixed: substituted, and hidden from SVI so none is trained."""
    return handlers.block(
        handlers.substitute(model, data=params), hide_fn=lambda msg: msg["type"] == "param"
    )


def test_trainer_plate_holds_the_minibatch_indices():
    # x_i = i, and the model's only density is -|x_i - ind_i|: the loss is 0 in every step
    # exactly when the plate's indices are the rows of the minibatch.
    x = jnp.arange(N_DATA, dtype=jnp.float32)[:, None]

    def model(x, *, n_data=None):
        with data_plate(x, n_data) as ind:
            numpyro.factor("mismatch", -jnp.abs(x[:, 0] - ind))

    def guide(x, *, n_data=None):
        numpyro.param("unused", jnp.zeros(()))

    trainer = Trainer(model, guide, optax.adam(1e-3), n_data=N_DATA, batch_size=BATCH)
    _, losses = trainer.run_epoch(trainer.init(jax.random.key(0), x), x)
    np.testing.assert_array_equal(losses, 0.0)
    # NumPyro's own subsample indices (what the trainer used before) do not match the batch.
    svi = SVI(model, guide, optax_to_numpyro(optax.adam(1e-3)), Trace_ELBO())
    svi_state = svi.init(jax.random.key(0), x[:BATCH], n_data=N_DATA)
    assert svi.evaluate(svi_state, x[BATCH : 2 * BATCH], n_data=N_DATA) > 1.0


def test_local_guide_layout_and_checks(lg_problem):
    lg, x, _, _ = lg_problem
    family = FullRankGaussian()
    guide = local_guide(N_DATA, lg.z_dim, family)
    trace = handlers.trace(handlers.seed(guide, jax.random.key(0))).get_trace(x[:5])
    lam = trace[LOCAL_PARAMS]["value"]
    assert lam.shape == (N_DATA, family.num_params(lg.z_dim))
    np.testing.assert_array_equal(
        lam, jnp.broadcast_to(family.standard_params(lg.z_dim), lam.shape)
    )
    assert trace["z"]["value"].shape == (5, lg.z_dim)
    noisy = local_guide(N_DATA, lg.z_dim, init_scale=0.1)
    lam = handlers.trace(handlers.seed(noisy, jax.random.key(0))).get_trace(x)[LOCAL_PARAMS]
    assert 0.05 < float(jnp.std(lam["value"])) < 0.2
    with pytest.raises(ValueError, match="n_data=10"):
        handlers.seed(guide, jax.random.key(0))(x[:5], n_data=10)
    with pytest.raises(ValueError, match="batch of 64"):
        handlers.seed(local_guide(8, lg.z_dim), jax.random.key(0))(x)


def _svi(model, guide, optimizer):
    return SVI(
        with_data_indices(model),
        with_data_indices(guide),
        optax_to_numpyro(optimizer),
        Trace_ELBO(),
    )


def _step(svi, svi_state, x, idx):
    update = jax.jit(functools.partial(svi.update, n_data=N_DATA))
    return update(svi_state, x[idx], data_indices=jnp.asarray(idx))[0]


def test_plain_adam_moves_rows_outside_the_minibatch(lg_problem):
    lg, x, model, _ = lg_problem
    svi = _svi(model, local_guide(N_DATA, lg.z_dim), optax.adam(1e-2))
    state = svi.init(jax.random.key(0), x[:BATCH], n_data=N_DATA, data_indices=jnp.arange(BATCH))
    state = _step(svi, state, x, np.arange(BATCH))  # row 0 is updated once
    before = svi.get_params(state)[LOCAL_PARAMS]
    state = _step(svi, state, x, np.arange(BATCH, 2 * BATCH))  # row 0 is not in this batch
    after = svi.get_params(state)[LOCAL_PARAMS]
    assert float(jnp.abs(after[0] - before[0]).max()) > 1e-3
    # Rows never in any batch stay put under plain Adam too (their moments are all zero).
    np.testing.assert_array_equal(after[2 * BATCH :], before[2 * BATCH :])


def test_row_sparse_adam_leaves_untouched_rows_bit_identical(lg_problem):
    lg, x, model, _ = lg_problem
    epochs = 3
    trainer = Trainer(
        model,
        local_guide(N_DATA, lg.z_dim),
        make_local_optimizer(1e-2, 3e-2),
        n_data=N_DATA,
        batch_size=BATCH,
    )
    result = fit(trainer, x, key=jax.random.key(0), epochs=epochs, progress=False)
    state = result.state.svi_state
    # Each epoch visits every datapoint once: a row's own count is the number of epochs.
    sparse = _row_sparse_state(state.optim_state)
    np.testing.assert_array_equal(sparse.count[LOCAL_PARAMS], epochs)

    idx = np.random.default_rng(0).choice(N_DATA, BATCH, replace=False)
    untouched = np.setdiff1d(np.arange(N_DATA), idx)
    new = trainer.svi.update(state, x[idx], n_data=N_DATA, data_indices=jnp.asarray(idx))[0]
    old_params, new_params = trainer.params(result.state), trainer.svi.get_params(new)
    old_sparse, new_sparse = sparse, _row_sparse_state(new.optim_state)
    for old, fresh in [
        (old_params[LOCAL_PARAMS], new_params[LOCAL_PARAMS]),
        (old_sparse.mu[LOCAL_PARAMS], new_sparse.mu[LOCAL_PARAMS]),
        (old_sparse.nu[LOCAL_PARAMS], new_sparse.nu[LOCAL_PARAMS]),
        (old_sparse.count[LOCAL_PARAMS], new_sparse.count[LOCAL_PARAMS]),
    ]:
        np.testing.assert_array_equal(fresh[untouched], old[untouched])
        assert np.all(np.any(np.asarray(fresh[idx] != old[idx]).reshape(BATCH, -1), axis=1))
    np.testing.assert_array_equal(new_sparse.count[LOCAL_PARAMS][idx], epochs + 1)
    # The decoder is global: ordinary Adam moves it.
    kernel = ("decoder$params", "Dense_0", "kernel")
    old_k, new_k = old_params, new_params
    for k in kernel:
        old_k, new_k = old_k[k], new_k[k]
    assert float(jnp.abs(new_k - old_k).max()) > 0


@pytest.mark.parametrize("jit", [False, True])
def test_each_row_follows_adam_on_its_own_steps(jit):
    # Gradients independent of the params, each row nonzero in a random subset of steps: row i's
    # updates under row-sparse Adam must be those of optax.adam fed only row i's steps.
    n_rows, dim, steps, lr = 6, 4, 25, 0.1
    rng = np.random.default_rng(0)
    grads = rng.normal(size=(steps, n_rows, dim)).astype(np.float32)
    active = rng.random((steps, n_rows)) < 0.4
    grads = grads * active[..., None]

    opt = row_sparse_adam(lr)
    update = jax.jit(opt.update) if jit else opt.update
    params = jnp.asarray(rng.normal(size=(n_rows, dim)), jnp.float32)
    state = opt.init(params)
    updates = []
    for g in grads:
        u, state = update(jnp.asarray(g), state, params)
        params = optax.apply_updates(params, u)
        updates.append(np.asarray(u))
    updates = np.stack(updates)

    dense = optax.adam(lr)
    dense_update = jax.jit(dense.update) if jit else dense.update
    for i in range(n_rows):
        np.testing.assert_array_equal(updates[~active[:, i], i], 0.0)
        row_state = dense.init(jnp.zeros(dim))
        own = []
        for g in grads[active[:, i], i]:
            u, row_state = dense_update(jnp.asarray(g), row_state)
            own.append(np.asarray(u))
        np.testing.assert_allclose(updates[active[:, i], i], np.stack(own), rtol=1e-6, atol=1e-9)
        assert int(state[0].count[i]) == int(active[:, i].sum())


def test_make_local_optimizer_splits_params_by_name():
    opt = make_local_optimizer(1e-2, 0.5, clip_norm=1.0)
    params = {"local$params": jnp.ones((3, 2)), "w": jnp.ones(4)}
    grads = {"local$params": jnp.array([[1.0, 2.0], [0.0, 0.0], [3.0, -1.0]]), "w": jnp.ones(4)}
    updates, _ = opt.update(grads, opt.init(params), params)
    np.testing.assert_array_equal(updates["local$params"][1], 0.0)
    # First Adam step: -lr * sign(g) per entry (up to eps), at each part's own rate.
    np.testing.assert_allclose(updates["local$params"][0], [-0.5, -0.5], rtol=1e-5)
    clipped = optax.clip_by_global_norm(1.0).update(grads["w"], None)[0]
    want = optax.adam(1e-2).update(clipped, optax.adam(1e-2).init(params["w"]))[0]
    np.testing.assert_allclose(updates["w"], want, rtol=1e-6)


def test_local_guide_reaches_the_best_diagonal_elbo(lg_problem):
    # Decoder frozen at the true parameters: each row's optimum is the best diagonal Gaussian
    # q*(z_i), known in closed form, and its ELBO is log p(x_i) - KL(q* || p(z_i | x_i)).
    lg, x, model, true_params = lg_problem
    epochs, steps = 500, N_DATA // BATCH
    trainer = Trainer(
        _frozen(model, true_params),
        local_guide(N_DATA, lg.z_dim),
        make_local_optimizer(1e-3, optax.cosine_decay_schedule(0.05, epochs * steps, 0.01)),
        n_data=N_DATA,
        batch_size=BATCH,
        objective="meanfield_elbo",
        num_particles=16,
    )
    result = fit(trainer, x, key=jax.random.key(2), epochs=epochs, progress=False)
    assert list(result.params) == [LOCAL_PARAMS]  # only the local rows were trained
    lam = result.params[LOCAL_PARAMS]
    loc, log_scale = DiagonalGaussian().split(lam)
    best_loc, best_scale = lg.best_diagonal(x)
    best_elbo = np.asarray(lg.elbo(x, best_loc, best_scale))

    np.testing.assert_allclose(loc, best_loc, atol=0.05)
    np.testing.assert_allclose(
        jnp.exp(log_scale), jnp.broadcast_to(best_scale, loc.shape), rtol=0.1
    )
    exact_gap = best_elbo - np.asarray(lg.elbo(x, loc, jnp.exp(log_scale)))
    assert np.all(exact_gap >= -1e-4) and np.all(exact_gap < 0.02), exact_gap.max()
    bounds = evaluate_bounds(
        model,
        given_params_guide(),
        true_params,
        x,
        jax.random.key(3),
        num_samples=2000,
        guide_args=(lam,),
    )
    np.testing.assert_allclose(bounds.elbo, best_elbo, atol=0.05)
    assert abs(float(bounds.elbo.mean() - best_elbo.mean())) < 0.02
