"""How often does the encoder start q* in a lower basin than N(0, I) reaches?

Every certificate of `fit_local` is local. This measures what `QStarSettings.second_start`
(q* fitted again from N(0, I), the better of the two kept per digit on common random numbers)
finds on the FFG models of a quick `amortization_gap` run, reloaded from its checkpoints: the
z = 50 MNIST model of the table and the z = 2 MNIST model of the latent figure, on `points`
seeded test digits each, q* with the run's own settings started at the encoder's output.
Reports, per model, the digits where the second start ended higher by more than 0 / 0.25 (the
certificate's tolerance) / 1 nats, the largest lead, where its q* was kept, and the mean gain
of L[q*] (by how much the amortization gap's estimate rises), with q*'s time each way. Writes
`bench/results/second_start.json`.

    python tools/second_start.py [RUN_FOLDER] [--points 200]
"""

import argparse
import dataclasses
import json
import sys
import time
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amortjax.evaluation.bounds import mean_and_stderr
from amortjax.evaluation.subsets import random_subset
from amortjax.guides import encode
from amortjax.inference.local import fit_local
from amortjax.inference.training import fit
from bench.common import RESULTS_DIR
from experiments import amortization_gap as ag
from experiments.runner import config_from_dict


def _model(config, run: Path, data, z2: bool):
    """The run's MNIST FFG model (z = 50, or the latent figure's z = 2), from its checkpoint."""
    key = jax.random.key(config.seed)
    if z2:
        config = dataclasses.replace(config, z_dim=2, epochs=config.latent_epochs)
    setup = ag._Setup(config, "diagonal", data.train.shape[1], data.train.shape[0],
                      data.dynamic_binarization)  # fmt: skip
    name, fold = ("mnist_z2_diagonal", 7000) if z2 else ("mnist_diagonal", 0)
    result = fit(setup.trainer, data.train, key=jax.random.fold_in(key, fold),
                 epochs=config.epochs, checkpoint_dir=run / "checkpoints" / name,
                 checkpoint_every=config.checkpoint_every, progress=False)  # fmt: skip
    return config, setup, result.params


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs = sorted(Path("results/amortization_gap").glob("*_quick"))
    parser.add_argument("run", nargs="?", type=Path, default=runs[-1] if runs else None)
    parser.add_argument("--points", type=int, default=200)
    args = parser.parse_args()
    if args.run is None or not (args.run / "config.json").exists():
        raise SystemExit("give a quick amortization_gap results folder (make experiment first)")
    saved = json.loads((args.run / "config.json").read_text())["config"]
    config = config_from_dict(ag.Config, ag.upgrade_saved_config(saved))
    data = ag._load(config, "mnist")
    x = data.test[random_subset(len(data.test), args.points, config.seed + 13)]
    out = {"run": str(args.run), "points": args.points}
    for label, z2 in (("mnist_ffg_z50", False), ("mnist_ffg_z2", True)):
        model_config, setup, params = _model(config, args.run, data, z2)
        settings = ag.qstar_settings(model_config, setup.family)
        init = encode(setup.encoder, params, jnp.asarray(x))
        fits, seconds = {}, {}
        for second in (False, True):
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fits[second] = fit_local(setup.model, params, x, jax.random.key(11), settings,
                                         family=setup.family, init=init, final_samples=0,
                                         second_start=second)  # fmt: skip
            seconds[second] = time.perf_counter() - start
        gap = fits[True].basin_gap
        # The first of the two fits is the one-start fit (same key): a row that differs took
        # the second start's q*.
        taken = (np.asarray(fits[True].params) != np.asarray(fits[False].params)).any(axis=1)
        gain, se = mean_and_stderr(np.where(taken, gap, 0.0))
        row = {
            "won": int((gap > 0).sum()),
            "won_by_0.25": int((gap > 0.25).sum()),
            "won_by_1": int((gap > 1.0).sum()),
            "taken": int(taken.sum()),
            "max_gain": float(gap.max()),
            "mean_gain": gain,
            "mean_gain_stderr": se,
            "seconds_one_start": seconds[False],
            "seconds_second_start": seconds[True],
            "text_one_start": fits[False].convergence()["text"],
            "text": fits[True].convergence()["text"],
        }
        out[label] = row
        print(f"{label}: second start higher on {row['won']} of {args.points} digits, by > 0.25 "
              f"on {row['won_by_0.25']}, by > 1 on {row['won_by_1']} (max {row['max_gain']:.3f});"
              f" kept on {row['taken']}, mean gain of L[q*] {gain:.4f} +- {se:.4f} nats; q* "
              f"{seconds[False]:.0f} s -> "
              f"{seconds[True]:.0f} s")  # fmt: skip
    path = RESULTS_DIR / "second_start.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
