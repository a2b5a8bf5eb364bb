"""Which AIS pilot for the quick amortization_gap preset: estimates and seconds of each.

On the quick preset's MNIST FFG model (trained or reloaded exactly as `bench gap_fullset` does,
checkpointed in `bench/results/gap_fullset_models/`), `points` seeded random test digits (300 by
default): q* by the quick preset's settings, then AIS from q* with the preset's estimating run
(8 chains x 200 temperatures x 5 leapfrog steps) and each pilot below, on the same key. Every
AIS estimate is a stochastic lower bound of log p(x) whatever its pilot did (the pilot's
randomness is independent of the estimating chains), so the pilot whose estimates are highest
on average is the better one; differences are per digit, with their standard errors.

- "4 chains, all T, 0.65": the library's default pilot (the preset's until 2026-12-05);
- "1 chain, all T, 0.65": the same rule on one chain;
- "1 chain, T/4, 0.9": the preset's now: one chain through every 4th temperature (the step sizes
  in between interpolated), aiming at acceptance 0.9, from step size 0.3.

About 3 minutes on 2 CPU cores with the model cached: `PYTHONPATH=. python
tools/ais_pilot_check.py [points]`; writes `bench/results/ais_pilot_check.json`.
"""

from __future__ import annotations

import json
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from amortjax.data import load_data
from amortjax.evaluation.ais import AISSettings, AISWarning, ais
from amortjax.evaluation.bounds import mean_and_stderr
from amortjax.guides import encode
from amortjax.inference.local import fit_local
from bench.common import RESULTS_DIR
from bench.gap_fullset import MODEL_DIR, _train, seeded_test_digits
from experiments.amortization_gap import Config, qstar_settings

OUT = RESULTS_DIR / "ais_pilot_check.json"

PILOT_FIELDS = ("pilot_chains", "pilot_temperatures", "target_accept", "step_size")
DEFAULT_PILOT = {k: getattr(AISSettings(), k) for k in PILOT_FIELDS}
PILOTS = {
    "4 chains, all T, 0.65": DEFAULT_PILOT,
    "1 chain, all T, 0.65": {**DEFAULT_PILOT, "pilot_chains": 1},
    "1 chain, T/4, 0.9 (preset)": {},
}


def main(points: int = 300) -> dict:
    config = Config(datasets=("mnist",))
    data = load_data("mnist", seed=config.seed)
    setup, params, _ = _train(config, "diagonal", data, MODEL_DIR)
    x = seeded_test_digits(config, data, points)
    lam = np.asarray(encode(setup.encoder, params, jnp.asarray(x)))
    qstar = fit_local(
        setup.model, params, x, jax.random.key(1), family=setup.family, init=lam,
        final_samples=0, batch_size=config.eval_batch_size,
        settings=qstar_settings(config, setup.family),
    )  # fmt: skip
    runs, out = {}, {"points": points, "estimating_run": None, "pilots": {}}
    for name, pilot in PILOTS.items():
        settings = config.ais._replace(**pilot)
        out["estimating_run"] = {
            k: settings._asdict()[k] for k in ("num_chains", "num_temperatures", "leapfrog_steps")
        }
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AISWarning)
            run = ais(
                setup.model, params, x, jax.random.key(5), settings, family=setup.family,
                init_params=qstar.params, batch_size=config.eval_batch_size,
            )  # fmt: skip
        seconds = time.perf_counter() - start
        runs[name] = run.log_px
        first = next(iter(runs.values()))
        diff, se = mean_and_stderr(run.log_px - first)
        out["pilots"][name] = {
            "settings": {k: getattr(settings, k) for k in PILOT_FIELDS},
            "seconds": seconds,
            "log_px_mean": float(np.mean(run.log_px)),
            "minus_first": {"mean": diff, "se": se},
            "acceptance_mean": float(np.mean(run.acceptance)),
            "acceptance_range": [float(run.acceptance.min()), float(run.acceptance.max())],
        }
        print(name, json.dumps(out["pilots"][name]), flush=True)
    out["note"] = (
        "seconds include each variant's compile; the first variant's also the warm-up of the "
        "shared parts"
    )
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    print("wrote", OUT)
    return out


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 300)
