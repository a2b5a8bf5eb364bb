"""What shrinking q*'s tail saves (`amortjax.inference.local`, `SHRINK_SECONDS`): the quick
preset's MNIST FFG and Flow models (trained, or reloaded from `bench/results/gap_fullset_models/`),
100 seeded test digits in 100 slots, q* with the quick preset's settings (the Flow's without its
polishing stage, which has no slots), each fitted twice in one process with the tail never
shrunk and twice with the library's rule, in turns. In the first ("cold") pair the never-shrunk
fit compiles the 100-slot loop and the library's fit only the smaller loops it shrinks to; the
second pair compiles nothing. The fitted parameters must agree (the results depend on no
slot). Writes `bench/results/qstar_tail.json` and prints one line per fit.

    python tools/qstar_tail.py
"""

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amortjax.data import load_data
from amortjax.guides import encode
from amortjax.inference import local
from bench.common import RESULTS_DIR
from bench.gap_fullset import MODEL_DIR, _train, seeded_test_digits
from experiments.amortization_gap import Config, qstar_settings


def main(points: int = 100) -> dict:
    config = Config(datasets=("mnist",))
    data = load_data("mnist", seed=config.seed)
    x = seeded_test_digits(config, data, points)
    key = jax.random.key(config.seed + 21)
    out = {"points": points, "slots": points, "shrink_seconds": local.SHRINK_SECONDS, "fits": []}
    for family in ("diagonal", "flow"):
        setup, params, _ = _train(config, family, data, MODEL_DIR)
        lam = np.asarray(encode(setup.encoder, params, jnp.asarray(x)))
        settings = qstar_settings(config, setup.family)._replace(polish_steps=0)
        fitted = {}
        for run in ("cold", "warm"):
            for rule, threshold in (("never", float("inf")), ("library", local.SHRINK_SECONDS)):
                local.SHRINK_SECONDS = threshold
                start = time.perf_counter()
                q = local.fit_local(
                    setup.model, params, x, key, family=setup.family, init=lam,
                    final_samples=0, batch_size=points, settings=settings,
                )  # fmt: skip
                seconds = time.perf_counter() - start
                fitted[rule] = q.params
                row = {
                    "family": family,
                    "rule": rule,
                    "run": run,
                    "seconds": seconds,
                    "stopped_fraction": q.stopped_fraction,
                    "steps_mean": float(q.steps.mean()),
                }
                out["fits"].append(row)
                print(json.dumps(row), flush=True)
            local.SHRINK_SECONDS = out["shrink_seconds"]
        diff = float(np.abs(fitted["never"] - fitted["library"]).max())
        out[f"{family}_max_param_difference"] = diff
        print(f"{family}: largest parameter difference between the rules {diff:.2e}", flush=True)
    path = Path(RESULTS_DIR) / "qstar_tail.json"
    path.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
