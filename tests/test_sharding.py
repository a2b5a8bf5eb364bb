"""Data-parallel training and evaluation on 4 simulated CPU devices match one device.

XLA's device count is fixed when JAX starts, so the multi-device runs happen in a subprocess
started with `--xla_force_host_platform_device_count=4`; it trains a small VAE for two epochs
and runs the evaluators (ELBO and IWAE bounds, the local optimizer, AIS) with and without a
4-device data mesh, and the parent compares the numbers.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from amortjax.sharding import check_divisible, data_mesh

SCRIPT = textwrap.dedent(
    """
    import json
    import jax
    import jax.numpy as jnp
    import numpy as np

    import contextlib

    from amortjax.evaluation.ais import ais
    from amortjax.evaluation.bounds import evaluate_bounds
    from amortjax.inference.local import fit_local
    from amortjax.guides import amortized_guide
    from amortjax.inference.objectives import make_optimizer
    from amortjax.inference.training import Trainer, fit
    from amortjax.models import vae_model
    from amortjax.nets import MLP
    from amortjax.sharding import data_mesh, data_parallel

    assert len(jax.devices()) == 4, jax.devices()
    rng = np.random.default_rng(0)
    x = (rng.random((256, 64)) < 0.3).astype(np.float32)
    model = vae_model(MLP((32,), 64), z_dim=4)
    guide = amortized_guide(MLP((32,), 8), x_dim=64)
    out = {}
    for name, mesh in (("one", None), ("four", data_mesh())):
        trainer = Trainer(model, guide, make_optimizer(1e-2), n_data=256, batch_size=32, mesh=mesh)
        result = fit(trainer, x, key=jax.random.key(1), epochs=2, progress=False)
        scope = contextlib.nullcontext() if mesh is None else data_parallel(mesh)
        with scope:
            b = evaluate_bounds(
                model, guide, result.params, x[:40], jax.random.key(2), num_samples=64,
                batch_size=8,
            )
            q = fit_local(
                model, result.params, x[:12], jax.random.key(3), z_dim=4, block_size=10,
                max_steps=30, learning_rate=1e-2, final_samples=16, batch_size=8, method="adam",
            )
            a = ais(
                model, result.params, x[:12], jax.random.key(4), num_chains=3,
                num_temperatures=6, leapfrog_steps=2, batch_size=8,
            )
        leaves = jax.tree.leaves(result.params)
        hlo = trainer._run_epoch.lower(result.state, trainer.place(jnp.asarray(x))).compile()
        out[name] = {
            "params": [np.asarray(v).ravel().tolist() for v in leaves],
            "loss": result.history["train_loss"][1],
            "elbo": b.elbo.tolist(),
            "iwae": b.iwae.tolist(),
            "qstar": q.params.tolist(),
            "ais": a.log_px.tolist(),
            "sharding": str(jax.tree.leaves(result.state.svi_state)[0].sharding),
            "all_reduce": "all-reduce" in hlo.as_text(),
        }
    print("RESULT" + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def runs():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT"))
    return json.loads(line[len("RESULT") :])


@pytest.mark.slow  # ~75 s: two fresh processes with 1 and 4 XLA host devices
def test_training_on_four_devices_matches_one(runs):
    one, four = runs["one"], runs["four"]
    assert "data" in four["sharding"]  # the state lives on the mesh, replicated
    # The compiled epoch really is data parallel: gradients are summed across devices.
    assert four["all_reduce"] and not one["all_reduce"]
    np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-4)
    for a, b in zip(four["params"], one["params"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)


@pytest.mark.slow  # shares the ~75 s fixture of two fresh processes (1 and 4 XLA devices)
def test_bounds_on_four_devices_match_one(runs):
    one, four = runs["one"], runs["four"]
    np.testing.assert_allclose(four["elbo"], one["elbo"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(four["iwae"], one["iwae"], rtol=1e-5, atol=1e-4)


@pytest.mark.slow  # the same fixture
def test_local_optimizer_and_ais_on_four_devices_match_one(runs):
    one, four = runs["one"], runs["four"]
    np.testing.assert_allclose(four["qstar"], one["qstar"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(four["ais"], one["ais"], rtol=1e-5, atol=1e-3)


def test_batches_must_split_evenly():
    mesh = data_mesh(jax.devices()[:1])
    check_divisible(7, mesh)  # one device takes any batch
    fake = type("FakeMesh", (), {"shape": {"data": 4}})()
    with pytest.raises(ValueError, match="batch_size=30 must be a multiple of the 4 devices"):
        check_divisible(30, fake)
