"""The per-datapoint engine: how N datapoints are cut into compiled calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortjax.engine import even_chunk, map_datapoints, memory_maps


@pytest.mark.parametrize(
    ("n", "most", "multiple", "size"),
    [
        (10_000, 100, 1, 100),  # divides: unchanged
        (500, 400, 1, 250),  # two calls of 250, not 400 + a padded 100
        (40, 16, 1, 14),  # three calls: 42 rows of work, not 48
        (50, 400, 1, 50),  # one call, no padding
        (10, 8, 4, 8),  # two calls of 5, rounded up to the 4 devices
        (9, 8, 2, 6),
    ],
)
def test_even_chunk(n, most, multiple, size):
    assert even_chunk(n, most, multiple) == size
    calls = -(-n // size)
    assert size <= most and size % multiple == 0 and calls == -(-n // most)


def test_map_datapoints_calls_equal_chunks_and_keeps_every_row():
    sizes = []

    def batch_fn(params, keys, xb):
        sizes.append(xb.shape[0])
        return xb * params + jax.vmap(lambda k: jax.random.uniform(k))(keys)

    x = jnp.arange(500.0)
    out = map_datapoints(batch_fn, 2.0, jax.random.key(0), [x], batch_size=400)
    assert sizes == [250, 250]
    # each datapoint's key is its own, whatever the chunk
    again = map_datapoints(batch_fn, 2.0, jax.random.key(0), [x], batch_size=7)
    np.testing.assert_allclose(out, again, rtol=1e-6)
    # ...and it is fold_in(key, i): the rows' draws, exactly, and all distinct
    uniforms = jax.vmap(lambda i: jax.random.uniform(jax.random.fold_in(jax.random.key(0), i)))(
        jnp.arange(500, dtype=jnp.uint32)
    )
    np.testing.assert_allclose(out - 2.0 * x, uniforms, atol=1e-4)
    assert len(np.unique(np.asarray(uniforms))) == 500
    # given indices, row j draws from fold_in(key, indices[j])
    idx = jnp.array([7, 3, 499])
    sub = map_datapoints(batch_fn, 2.0, jax.random.key(0), [x[idx]], batch_size=2, indices=idx)
    np.testing.assert_allclose(sub, out[idx], rtol=1e-6)


def test_every_entry_point_refuses_a_key_that_is_not_one_prng_key():
    """An int seed or an array of keys failed with JAX's internal messages (or, for fit_local
    and ais, 'invalid PRNG key data'); now each entry point names the argument and the fix."""
    import amortjax as aj
    from amortjax.evaluation.ais import reverse_ais
    from amortjax.evaluation.bounds import evaluate_pair
    from amortjax.families import DiagonalGaussian
    from amortjax.guides.linear_gaussian import linear_gaussian_vae
    from amortjax.models.linear_gaussian import make_linear_gaussian

    lg = make_linear_gaussian(jax.random.key(0), x_dim=3, z_dim=2)
    model, guide, params = linear_gaussian_vae(lg)
    x = jnp.zeros((4, 3))
    lam = jnp.zeros((4, 4))
    trainer = aj.Trainer(model, guide, aj.make_optimizer(1e-3), n_data=4, batch_size=2)
    calls = {
        "evaluate_bounds": lambda k: aj.evaluate_bounds(model, guide, params, x, k),
        "evaluate_pair": lambda k: evaluate_pair(
            model, params, x, lam, lam, k, family=DiagonalGaussian()
        ),
        "fit_local": lambda k: aj.fit_local(model, params, x, k, z_dim=2),
        "ais": lambda k: aj.ais(model, params, x, k),
        "reverse_ais": lambda k: reverse_ais(model, params, x, jnp.zeros((4, 2)), k),
        "bdmc": lambda k: aj.bdmc(model, params, x, jnp.zeros((4, 2)), k),
        "refine": lambda k: aj.refine(model, params, x, lam, k, family=DiagonalGaussian()),
        "gap_decomposition": lambda k: aj.gap_decomposition(model, params, x, lam, k),
        "fit": lambda k: aj.fit(trainer, x, key=k, epochs=1, progress=False),
        "Trainer.init": lambda k: trainer.init(k, x),
        "simulate": lambda k: aj.simulate(model, params, k, x),
        "dynamic_binarize": lambda k: aj.dynamic_binarize(k, x),
    }
    for name, call in calls.items():
        for key, got in ((0, "int 0"), (jax.random.split(jax.random.key(0), 3), "of shape")):
            with pytest.raises(ValueError, match=rf"{name}: key must be one JAX PRNG key.*{got}"):
                call(key)
    legacy = jax.random.PRNGKey(3)
    np.testing.assert_array_equal(
        aj.dynamic_binarize(legacy, x + 0.5), aj.dynamic_binarize(jax.random.key(3), x + 0.5)
    )


@pytest.mark.skipif(memory_maps() is None, reason="needs Linux's /proc")
def test_compiled_programs_are_dropped_near_the_kernels_cap_on_memory_mappings(monkeypatch):
    """Each compiled program holds memory mappings while JAX caches it; at the kernel's cap
    (vm.max_map_count) the next compilation aborts the process (the fate of `make bench` in one
    process). Past MAP_COUNT_SHARE of the cap every entry point drops them, with a warning, and
    the numbers do not change; below it nothing is dropped. Here amortjax's own programs are
    not enough to get below KEEP_SHARE, so every program goes, the caller's too."""
    import amortjax.engine as engine

    batch_fn = jax.jit(lambda p, keys, x: x * p)
    x = jnp.arange(6.0)[:, None]
    expected = map_datapoints(batch_fn, 2.0, jax.random.key(0), [x], batch_size=4)
    # below the share: nothing dropped (clear_caches would fail the test)
    monkeypatch.setattr(jax, "clear_caches", lambda: pytest.fail("dropped below the share"))
    assert not engine.release_compiled_programs()
    monkeypatch.undo()
    # programs that hold mappings, kept alive as a notebook keeps its models
    kept = [jax.jit(lambda v, i=i: jnp.sin(v) * i + v**i) for i in range(2, 30)]
    for f in kept:
        f(jnp.ones(3)).block_until_ready()
    held = memory_maps()[0]
    # a cap just above what the process holds now: past the share, and still past half the cap
    # once amortjax's programs are gone
    monkeypatch.setattr(engine, "memory_maps", lambda: (held, held + 1))
    with pytest.warns(RuntimeWarning, match=r"vm\.max_map_count.*not enough.*jax\.clear_caches"):
        again = map_datapoints(batch_fn, 2.0, jax.random.key(0), [x], batch_size=4)
    np.testing.assert_array_equal(again, expected)
    monkeypatch.undo()
    assert memory_maps()[0] < held - 28  # the compiled programs' mappings were given back
    assert all(f._cache_size() == 0 for f in kept)


@pytest.mark.skipif(memory_maps() is None, reason="needs Linux's /proc")
def test_a_release_drops_amortjaxs_own_programs_first_and_keeps_the_callers(
    monkeypatch, lg_diagonal
):
    """Where dropping amortjax's compiled programs gets the process below KEEP_SHARE of the cap,
    the caller's own jitted functions keep theirs (a notebook's work is not recompiled)."""
    import amortjax.engine as engine
    import amortjax.inference.local  # noqa: F401  (the walk below meets the optimizer's too)
    from amortjax.guides.linear_gaussian import linear_gaussian_vae
    from amortjax.traces import _support_rows, check_data

    model, _, params = linear_gaussian_vae(lg_diagonal)
    check_data(model, params, jnp.ones((5, 8)))  # compiles one of amortjax's programs
    assert _support_rows._cache_size() >= 1
    import amortjax.regimes as regimes
    from amortjax.nets import MLP

    encode_fn = regimes._encode_jit(MLP((), 2 * lg_diagonal.z_dim))  # a cached factory's program
    assert regimes._encode_jit.cache_info().currsize >= 1
    ours, factories = engine.library_programs()
    names = {f.__name__ for f in ours}
    assert {"_support_rows", "_optimize", "bounds_batch", "_anneal_batch"} <= names
    assert {f.__name__ for f in factories} == {"_encode_jit", "_refine_jit"}
    mine = jax.jit(lambda v: jnp.cos(v) * 3.0)
    mine(jnp.ones(2)).block_until_ready()
    counts = iter([(900, 1000), (400, 1000)])  # past the share; then below half the cap
    monkeypatch.setattr(engine, "memory_maps", lambda: next(counts))
    monkeypatch.setattr(jax, "clear_caches", lambda: pytest.fail("the caller's programs dropped"))
    kept = r"Dropped amortjax.s own compiled programs \(yours are kept\)"
    with pytest.warns(RuntimeWarning, match=kept):
        assert engine.release_compiled_programs()
    assert mine._cache_size() == 1
    assert all(f._cache_size() == 0 for f in ours)
    assert regimes._encode_jit.cache_info().currsize == 0  # its functions, and programs, go
    del encode_fn
