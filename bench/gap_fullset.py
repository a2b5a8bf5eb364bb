"""The gap decomposition at the quick preset's accuracy on the whole MNIST test set, and the
budget-doubling check of q*.

Trains the `amortization_gap` quick preset's MNIST models (Cremer et al.'s 784-200-200 ELU
encoder and decoder, z=50, dynamic binarization, 20 epochs of batch 100, seed 0) exactly as the
experiment does (`experiments.amortization_gap._Setup`), checkpointed under
`bench/results/gap_fullset_models/` so that a rerun reuses them. Then:

- budget doubling: q* of `points` seeded random test digits with the quick preset's settings and
  with every budget doubled (draws per step, block length, patience, step-size reductions and
  max_steps); both q*'s are scored on the same 5,000 common random draws per digit
  (`evaluate_pair`), so the change of mean L[q*] is resolved to a few hundredths of a nat. Target
  (the "Trustworthy estimates" issue): below 0.05 nats for the FFG, 0.1 for the Flow.
- the full decomposition (`gap_decomposition` with the quick preset's q*, IWAE-5000 and AIS
  8 x 200 x 5 from q* after the preset's 1-chain pilot through 50 of the temperatures) on all
  10,000 test digits of the FFG model: wall time, each stage's
  seconds and share, the fraction of q* compute spent on empty slots. Target: 20 minutes on
  2 CPU cores.

`--quick` runs 20 digits for the doubling check and 200 for the decomposition.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amortjax.data import load_data
from amortjax.evaluation.bounds import evaluate_pair, mean_and_stderr
from amortjax.evaluation.gaps import gap_decomposition
from amortjax.evaluation.subsets import random_subset
from amortjax.guides import encode
from amortjax.inference.local import QStarSettings, fit_local
from amortjax.inference.training import fit
from bench.common import RESULTS_DIR
from experiments.amortization_gap import Config, _ais_settings, _Setup, qstar_settings


def _doubled(settings: QStarSettings) -> QStarSettings:
    """Every budget of q* doubled: draws (per step and of the stopping rule's monitor), block
    length, patience, step-size reductions, steps, and the polishing stage's steps and draws
    (a None block length, the method's default, stays)."""
    fields = ("num_samples", "monitor_samples", "block_size", "patience", "num_decays",
              "max_steps", "polish_steps", "polish_samples")  # fmt: skip
    return settings._replace(
        **{f: 2 * getattr(settings, f) for f in fields if getattr(settings, f) is not None}
    )


MODEL_DIR = RESULTS_DIR / "gap_fullset_models"
"""Where `run` (with the default out_dir) and the tools checkpoint the trained quick models."""


def seeded_test_digits(config: Config, data, n: int) -> np.ndarray:
    """`n` seeded random MNIST test digits, those of the benchmark (and of the tools that
    reuse its models), `[n, 784]` float32."""
    test = np.asarray(data.test, np.float32)
    return test[random_subset(len(test), min(n, len(test)), config.seed + 13)]


def _train(config: Config, family: str, data, model_dir: Path) -> tuple[_Setup, dict, float]:
    setup = _Setup(config, family, data.train.shape[1], data.train.shape[0], True)
    key = jax.random.fold_in(jax.random.key(config.seed), 0 if family == "diagonal" else 1)
    start = time.perf_counter()
    result = fit(
        setup.trainer,
        data.train,
        key=key,
        epochs=config.epochs,
        checkpoint_dir=model_dir / family,
        progress=False,
    )
    return setup, result.params, time.perf_counter() - start


def _doubling(config, setup, params, x, key) -> dict[str, Any]:
    lam = np.asarray(encode(setup.encoder, params, jnp.asarray(x)))
    base_settings = qstar_settings(config, setup.family)
    runs = {}
    for name, settings in (("quick", base_settings), ("doubled", _doubled(base_settings))):
        start = time.perf_counter()
        q = fit_local(
            setup.model, params, x, key, family=setup.family, init=lam, final_samples=0,
            batch_size=config.eval_batch_size, settings=settings,
        )  # fmt: skip
        runs[name] = (q, time.perf_counter() - start, settings._asdict())
    pair = evaluate_pair(
        setup.model, params, x, runs["quick"][0].params, runs["doubled"][0].params,
        jax.random.fold_in(key, 1), family=setup.family, num_samples=5000,
    )  # fmt: skip
    diff, se = mean_and_stderr(pair.elbo_b - pair.elbo_a)
    return {
        "family": setup.family.name,
        "points": len(x),
        "elbo_qstar_quick": float(pair.elbo_a.mean()),
        "elbo_qstar_doubled": float(pair.elbo_b.mean()),
        "change": diff,
        "change_se": se,
        **{
            f"{name}_{k}": v
            for name, (q, seconds, settings) in runs.items()
            for k, v in (
                ("seconds", seconds),
                ("steps_mean", float(q.steps.mean())),
                ("converged", float(q.converged.mean())),
                ("settings", settings),
            )
        },
    }


def run(
    quick: bool = False,
    *,
    points: int | None = None,
    fullset: int | None = None,
    out_dir: Path = RESULTS_DIR,
) -> dict:
    """Trains (or reloads) the quick models, runs the doubling check and the full decomposition.

    Args:
        quick: small sizes (20 and 200 digits).
        points: digits of the doubling check (default 100; 20 when quick).
        fullset: digits of the decomposition (default all 10,000; 200 when quick).
        out_dir: the results folder; the trained models are checkpointed in its
            `gap_fullset_models/` (not committed).

    Returns:
        The result dict with `wall_seconds`, `stages`, `qstar_stopped_fraction`, `doubling` and
        a `table`.
    """
    points = points or (20 if quick else 100)
    config = Config(datasets=("mnist",))
    data = load_data("mnist", seed=config.seed)
    fullset = min(fullset or (200 if quick else len(data.test)), len(data.test))
    model_dir = Path(out_dir) / MODEL_DIR.name
    trained = {f: _train(config, f, data, model_dir) for f in ("diagonal", "flow")}
    x_check = seeded_test_digits(config, data, points)
    doubling = {
        f: _doubling(config, setup, params, x_check, jax.random.key(config.seed + 21))
        for f, (setup, params, _) in trained.items()
    }
    setup, params, _ = trained["diagonal"]
    x = seeded_test_digits(config, data, fullset)
    start = time.perf_counter()
    lam = np.asarray(encode(setup.encoder, params, jnp.asarray(x)))
    gaps = gap_decomposition(
        setup.model, params, x, lam, jax.random.key(config.seed + 22), family=setup.family,
        iwae_samples=config.iwae_samples, qstar=qstar_settings(config, setup.family),
        ais_settings=_ais_settings(config), batch_size=config.eval_batch_size, progress="fullset",
    )  # fmt: skip
    wall = time.perf_counter() - start
    stages = gaps.info["seconds"]
    summary = gaps.summary()
    rows = [
        {"stage": name, "seconds": sec, "share": sec / wall} for name, sec in stages.items()
    ] + [{"stage": "whole decomposition", "seconds": wall, "share": 1.0}]
    for f, d in doubling.items():
        rows.append(
            {
                "stage": f"doubling check, {f} ({d['points']} digits)",
                "seconds": d["quick_seconds"] + d["doubled_seconds"],
                "share": None,
            }
        )
    return {
        "datapoints": fullset,
        "wall_seconds": wall,
        "stages": stages,
        "qstar_stopped_fraction": gaps.info["qstar_stopped_fraction"],
        "train_seconds": {f: t for f, (_, _, t) in trained.items()},
        "gaps": {
            k: summary[k]
            for k in ("log_px", "elbo_qstar", "elbo_q", "approximation_gap", "amortization_gap")
        },
        "log_px_estimator": summary["log_px_estimator"],
        "qstar_convergence": summary["qstar_convergence"],
        "ais_diagnostics": gaps.info["ais_diagnostics"],
        "doubling": doubling,
        "table": {"columns": ["stage", "seconds", "share"], "rows": rows},
        "notes": [
            f"gap decomposition of {fullset} MNIST test digits, quick preset accuracy: "
            f"{wall / 60:.1f} min; q* compute on empty slots "
            f"{100 * gaps.info['qstar_stopped_fraction']:.1f}%",
            *(
                f"doubling every q* budget moved mean L[q*] of the {f} model by "
                f"{d['change']:+.3f} ± {d['change_se']:.3f} nats on {d['points']} digits"
                for f, d in doubling.items()
            ),
        ],
    }
