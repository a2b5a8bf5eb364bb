"""Paper presets: one training epoch of each experiment's `paper` preset, timed, and the training
time of the whole preset projected from it, on whatever machine runs the benchmark (the GPU
check of issue 6: `python -m bench paper_presets` on a GPU machine).

Each experiment runs in-process through `experiments.runner.run_experiment` with its paper preset
(the published architecture, batch size, data and learning-rate schedule) and the overrides of
`PROBES[name]`: two epochs (the first one compiles) and the evaluation cut to a handful of
datapoints, samples and steps, so that a probe takes minutes rather than the preset's hours. From
each trained model's `epoch_seconds` (`FitResult`) the time of one epoch is the second epoch's
(`seconds_per_epoch`), and the projection is

    projected training time = sum over the preset's models of  epochs x seconds per epoch.

What the projection leaves out, and says so in its notes: the evaluation at paper scale (IWAE,
AIS and q* on whole test sets, whose cost `bench.evaluators` measures in decoder evaluations per
second), amortization_gap's frozen-decoder and z=2 phases, and checkpoint writing. Models the
probe does not train because they have the same shapes (amortization_gap on Fashion-MNIST, same
sizes as MNIST) are counted with the measured model's epoch time.
"""

from __future__ import annotations

import tempfile
from typing import Any

from amortjax.inference.training import seconds_per_epoch
from experiments.runner import load_experiment, resolve_config, run_experiment

#: Overrides that turn each paper preset into a probe: 2 epochs, tiny evaluation.
PROBES: dict[str, list[str]] = {
    "vae_mnist": ["epochs=2", "iwae_points=20", "valid_points=100"],
    "amortization_gap": (
        "epochs=2 datasets=mnist train_points=5 test_points=5 run_ais=false "
        "iwae_samples=10 qstar.max_steps=100 curve_points=5 curve_iwae_samples=10 "
        "curve_qstar_steps=100 frozen_decoder=false latent_figure=false"
    ).split(),
    "semi_amortized": ["epochs=2", "eval_points=20", "frontier_points=20"],
    "item_response": ["epochs=2", "num_test=100", "qstar.max_steps=100", "grid_size=41"],
}

#: Quick mode (tests, smoke runs): the quick presets with one dataset and tiny evaluations.
QUICK_PROBES: dict[str, list[str]] = {
    "item_response": (
        "epochs=2 num_train=200 num_test=20 num_questions=10 batch_size=50 qstar.max_steps=20 "
        "elbo_samples=10 grid_size=101"
    ).split(),
}


def trained_models(name: str, metrics: dict, config: Any) -> list[dict[str, Any]]:
    """The models one run of experiment `name` trained, with their measured epoch times and how
    many models of that kind and epochs the run's config asks for.

    Args:
        name: the experiment.
        metrics: what its `run` returned.
        config: the config the projection is for (the full paper preset, not the probe).

    Returns:
        One dict per model kind: `model`, `epoch_seconds` (the probe's), `copies` (models of
        that kind in `config`), `epochs` (each one's epochs in `config`).
    """
    if name == "vae_mnist":
        return [_model("VAE", metrics["epoch_seconds"], 1, config.epochs)]
    if name == "amortization_gap":
        families = {m["family"]: m for m in metrics["models"].values()}
        return [
            _model(f"{family} VAE", m["epoch_seconds"], len(config.datasets), config.epochs)
            for family, m in families.items()
        ]
    if name == "semi_amortized":
        return [
            _model(method, m["epoch_seconds"], 1, config.epochs)
            for method, m in metrics["methods"].items()
        ]
    if name == "item_response":
        return [
            _model(regime, m["epoch_seconds"], 1, config.epochs)
            for regime, m in metrics["regimes"].items()
        ]
    raise ValueError(f"unknown experiment {name!r}; choose one of {list(PROBES)}")


def _model(label: str, epoch_seconds: list[float], copies: int, epochs: int) -> dict[str, Any]:
    return {"model": label, "epoch_seconds": epoch_seconds, "copies": copies, "epochs": epochs}


def project(models: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each model kind's seconds per epoch and projected training hours (copies x epochs x
    seconds per epoch)."""
    rows = []
    for m in models:
        per_epoch = seconds_per_epoch(m["epoch_seconds"])
        if per_epoch is None:
            raise ValueError(f"model {m['model']!r} ran no epoch; nothing to project from")
        rows.append(
            {
                **m,
                "seconds_per_epoch": per_epoch,
                "projected_hours": m["copies"] * m["epochs"] * per_epoch / 3600,
            }
        )
    return rows


def run(quick: bool = False, *, experiments: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Probes each experiment's paper preset (quick: item_response's quick preset, tiny) and
    projects its training time.

    Args:
        quick: a seconds-long smoke run of the machinery on a tiny quick preset.
        experiments: which experiments (default: all of `PROBES`; quick: item_response).

    Returns:
        A dict with each experiment's probe overrides, per-model rows and a `table`.
    """
    probes = QUICK_PROBES if quick else PROBES
    names = experiments or tuple(probes)
    preset = "quick" if quick else "paper"
    rows, out = [], {}
    for name in names:
        overrides = probes.get(name) or PROBES[name]
        full = resolve_config(load_experiment(name), preset, [])
        with tempfile.TemporaryDirectory() as tmp:
            _, metrics = run_experiment(name, preset=preset, overrides=overrides, results_root=tmp)
        models = project(trained_models(name, metrics, full))
        total = sum(m["projected_hours"] for m in models)
        out[name] = {"probe_overrides": overrides, "models": models, "projected_hours": total}
        for m in models:
            rows.append(
                {
                    "experiment": name,
                    "model": m["model"],
                    "s / epoch": m["seconds_per_epoch"],
                    "first epoch s (compiles)": m["epoch_seconds"][0],
                    "models x epochs": f"{m['copies']} x {m['epochs']}",
                    "projected training h": m["projected_hours"],
                }
            )
        rows.append({"experiment": name, "model": "total", "projected training h": total})
    return {
        "preset": preset,
        "experiments": out,
        "table": {"columns": list(rows[0]), "rows": rows},
        "notes": [
            f"{preset} presets, each run with its probe overrides (PROBES in "
            "bench/paper_presets.py); s / epoch is the second epoch's wall time (the first "
            "compiles)",
            "projected training h = models x epochs x s / epoch; not included: evaluation at "
            "paper scale (see `evaluators` for its rates), amortization_gap's frozen-decoder and "
            "z=2 phases, checkpoint writing",
            "amortization_gap probes MNIST only; Fashion-MNIST has the same shapes and is counted "
            "at MNIST's epoch time",
        ],
    }
