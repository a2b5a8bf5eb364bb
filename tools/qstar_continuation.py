"""Is the Flow's q* limited by its gradient's noise or by the problem's conditioning?

The quick preset's MNIST Flow model (trained, or reloaded from
`bench/results/gap_fullset_models/`), the first `points` of the benchmark's seeded test digits:
q* with the quick preset's settings, then `steps` more Adam steps from it (no stopping rule)
at a given step size and number of draws per step. Each continuation is scored against the
quick q* on the same 2,000 common random draws per digit (`evaluate_pair`). If more draws per
step at the same step size climb faster, the end of the run is noise-limited (more draws late
in the run would converge it); if not, a better-conditioned step is what is missing.
Writes `bench/results/qstar_continuation.json`.

    python tools/qstar_continuation.py
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
from amortjax.evaluation.bounds import evaluate_pair, mean_and_stderr
from amortjax.guides import encode
from amortjax.inference.local import fit_local
from bench.common import RESULTS_DIR
from bench.gap_fullset import MODEL_DIR, _train, seeded_test_digits
from experiments.amortization_gap import Config, qstar_settings

# (step size, draws per step); the quick preset's Flow q* ends at 1e-2 x 0.3^3 = 2.7e-4 with 16
VARIANTS = ((2.7e-4, 16), (2.7e-4, 64), (1e-3, 16), (1e-3, 32), (1e-3, 64), (3e-3, 16), (3e-3, 64))


def main(points: int = 50, steps: int = 1000) -> dict:
    config = Config(datasets=("mnist",))
    data = load_data("mnist", seed=config.seed)
    x = seeded_test_digits(config, data, points)
    setup, params, _ = _train(config, "flow", data, MODEL_DIR)
    lam = np.asarray(encode(setup.encoder, params, jnp.asarray(x)))
    quick = qstar_settings(config, setup.family)
    key = jax.random.key(config.seed + 21)

    def fit(settings, init, k):
        start = time.perf_counter()
        q = fit_local(setup.model, params, x, k, family=setup.family, init=init,
                      final_samples=0, settings=settings)  # fmt: skip
        return q, time.perf_counter() - start

    q, seconds = fit(quick, lam, key)
    out = {"points": points, "steps": steps, "quick_steps_mean": float(np.mean(q.steps)),
           "quick_seconds": seconds, "continuations": []}  # fmt: skip
    print(f"quick q*: {np.mean(q.steps):.0f} steps on average, {seconds:.1f} s", flush=True)
    for rate, draws in VARIANTS:
        settings = quick._replace(
            learning_rate=rate, num_samples=draws, patience=10**6, max_steps=steps,
            num_decays=0, block_size=100,
        )  # fmt: skip
        c, seconds = fit(settings, q.params, jax.random.fold_in(key, 7))
        pair = evaluate_pair(setup.model, params, x, q.params, c.params,
                             jax.random.fold_in(key, 1), family=setup.family,
                             num_samples=2000)  # fmt: skip
        gain, se = mean_and_stderr(pair.elbo_b - pair.elbo_a)
        out["continuations"].append({"learning_rate": rate, "num_samples": draws,
                                     "gain": gain, "gain_se": se, "seconds": seconds})  # fmt: skip
        print(f"{steps} more steps at rate {rate:g} with {draws} draws: L[q*] {gain:+.4f} ± "
              f"{se:.4f} nats, {seconds:.1f} s", flush=True)  # fmt: skip
    path = Path(RESULTS_DIR) / "qstar_continuation.json"
    path.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
