"""How often does the encoder start q* in a lower basin than N(0, I) reaches?

Every certificate of `fit_local` is local. This measures what `QStarSettings.second_start`
(q* fitted again from N(0, I), the better of the two kept per digit on common random numbers)
finds on the FFG models of a quick `amortization_gap` run, reloaded from its checkpoints: the
z = 50 MNIST model of the table and the z = 2 MNIST model of the latent figure, on `points`
seeded test digits each, q* with the run's own settings started at the encoder's output.
Reports, per model, the digits where the second start ended higher by more than 0 / 0.25 (the
certificate's tolerance) / 1 nats, the largest lead, where its q* was kept, and the mean gain
of L[q*] (by how much the amortization gap's estimate rises), with q*'s time each way, and
what `random_starts` further starts drawn from the prior add after both; then, on the z = 2
model, the latent figure's third start (`fit_local(starts=)`): each family's q*
as a start for the other's (the Flow encoder trained on the frozen z = 2 decoder, reloaded).
Writes `bench/results/second_start.json`.

    python tools/second_start.py [RUN_FOLDER] [--points 200] [--random-starts 4]
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


def _cross_family(config, setup, params, data, x, run: Path, ffg) -> dict:
    """The latent figure's third start: each family's q* as a start for the other's (the Flow
    from the FFG's q* as its base; the FFG from the Flow's q* matched in mean and variance), on
    the z = 2 model's digits, after both of each family's own starts (`ffg`: the FFG's)."""
    key = jax.random.key(config.seed)
    flow_family, flow_encoder, flow_params = ag._train_encoder(
        config, setup, params, "flow", config.encoder_hidden, data, jax.random.fold_in(key, 7001),
        run, "mnist_z2_flow_on_frozen", config.latent_epochs, False,
    )  # fmt: skip
    init = encode(flow_encoder, flow_params, jnp.asarray(x))
    fl_settings = ag.qstar_settings(config, flow_family)
    ffg_settings = ag.qstar_settings(config, setup.family)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kw = dict(family=flow_family, init=init, final_samples=0, second_start=True)
        base = flow_family.with_base(*jnp.split(jnp.asarray(ffg.params), 2, axis=-1))
        flow = fit_local(setup.model, params, x, jax.random.key(12), fl_settings, starts=[base],
                         **kw)  # fmt: skip
        matched = ag._matched_diagonal(flow_family, flow.params, key, np.arange(len(x)))
        again = fit_local(setup.model, params, x, jax.random.key(13), ffg_settings,
                          family=setup.family, init=ffg.params, starts=[matched],
                          final_samples=0)  # fmt: skip
    seconds = time.perf_counter() - start
    # The Flow's fits: 0 from its encoder, 1 from the FFG's q*, 2 from its default start;
    # basin_gap is the lead over the encoder's start. The FFG's: 0 its best of two starts, 1
    # from the Flow's q*; basin_gap the lead over the best of its own two.
    flow_gain = np.where(flow.start == 1, flow.basin_gap, 0.0)
    ffg_gain = np.where(again.start == 1, again.basin_gap, 0.0)
    ffg_mean, ffg_se = mean_and_stderr(ffg_gain)
    row = {
        "flow_second_start_kept": int((flow.start == 2).sum()),
        "flow_from_ffg_kept": int((flow.start == 1).sum()),
        "flow_from_ffg_kept_by_1": int((flow_gain > 1).sum()),
        "flow_from_ffg_max_gain": float(flow_gain.max()),
        "ffg_from_flow_kept": int((again.start == 1).sum()),
        "ffg_from_flow_kept_by_1": int((ffg_gain > 1).sum()),
        "ffg_from_flow_max_gain": float(ffg_gain.max()),
        "ffg_from_flow_max_gain_digit": int(ffg_gain.argmax()),
        "flow_from_ffg_max_gain_digit": int(flow_gain.argmax()),
        "ffg_mean_gain": ffg_mean,
        "ffg_mean_gain_stderr": ffg_se,
        "seconds": seconds,
    }
    print(f"cross-family starts, z = 2: the FFG's q* as a start kept for the Flow on "
          f"{row['flow_from_ffg_kept']} digits ({row['flow_from_ffg_kept_by_1']} by > 1 nat, "
          f"max {row['flow_from_ffg_max_gain']:.3f}); the Flow's q* as a start kept for the FFG "
          f"on {row['ffg_from_flow_kept']} ({row['ffg_from_flow_kept_by_1']} by > 1, max "
          f"{row['ffg_from_flow_max_gain']:.3f}, mean gain {row['ffg_mean_gain']:.4f} +- "
          f"{row['ffg_mean_gain_stderr']:.4f}; largest on digit "
          f"{row['ffg_from_flow_max_gain_digit']}); {seconds:.0f} s")  # fmt: skip
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    runs = sorted(Path("results/amortization_gap").glob("*_quick"))
    parser.add_argument("run", nargs="?", type=Path, default=runs[-1] if runs else None)
    parser.add_argument("--points", type=int, default=200)
    parser.add_argument("--random-starts", type=int, default=4)
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
        taken = fits[True].start > 0  # the second start's q* kept
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
        # Further starts drawn from the prior, after both starts (`random_starts`).
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rnd = fit_local(setup.model, params, x, jax.random.key(14), settings,
                            family=setup.family, init=fits[True].params, final_samples=0,
                            random_starts=args.random_starts)  # fmt: skip
        lead = np.where(rnd.start > 0, rnd.basin_gap, 0.0)
        lead_mean, lead_se = mean_and_stderr(lead)
        row["random_starts"] = {
            "starts": args.random_starts,
            "kept": int((rnd.start > 0).sum()),
            "kept_by_0.25": int((lead > 0.25).sum()),
            "kept_by_1": int((lead > 1.0).sum()),
            "max_gain": float(lead.max()),
            "max_gain_digit": int(lead.argmax()),  # its position among the seeded digits
            "mean_gain": lead_mean,
            "mean_gain_stderr": lead_se,
            "seconds": time.perf_counter() - start,
        }
        out[label] = row
        print(f"{label}: second start higher on {row['won']} of {args.points} digits, by > 0.25 "
              f"on {row['won_by_0.25']}, by > 1 on {row['won_by_1']} (max {row['max_gain']:.3f});"
              f" kept on {row['taken']}, mean gain of L[q*] {gain:.4f} +- {se:.4f} nats; q* "
              f"{seconds[False]:.0f} s -> "
              f"{seconds[True]:.0f} s")  # fmt: skip
        r = row["random_starts"]
        print(f"{label}: {r['starts']} prior-drawn starts after both: kept on {r['kept']} digits, "
              f"by > 0.25 on {r['kept_by_0.25']}, by > 1 on {r['kept_by_1']} (max "
              f"{r['max_gain']:.3f}), mean gain {r['mean_gain']:.4f} +- "
              f"{r['mean_gain_stderr']:.4f}, largest on digit {r['max_gain_digit']}; "
              f"{r['seconds']:.0f} s")  # fmt: skip
        if z2:
            out["mnist_z2_cross_family"] = _cross_family(
                model_config, setup, params, data, x, args.run, fits[True]
            )
    path = RESULTS_DIR / "second_start.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
