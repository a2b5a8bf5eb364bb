"""The experiments' quick presets, run in full (minutes each): `make test-slow`."""

import json

import pytest

from experiments.runner import run_experiment


@pytest.mark.slow
def test_vae_mnist_quick_preset(tmp_path):
    workdir, metrics = run_experiment("vae_mnist", results_root=tmp_path)
    t = metrics["test"]
    # A 784-400-20 VAE after 100 epochs on static MNIST: ELBO near -95, IWAE-5000 near -90;
    # far from chance (-543) and from a failed training run.
    assert -102 < t["elbo"] < -85
    assert t["elbo_on_iwae_points"] + 2 < t["iwae"] < -80
    assert json.loads((workdir / "metrics.json").read_text())["test"] == t
