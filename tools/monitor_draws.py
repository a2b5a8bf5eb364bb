"""What the number of monitor draws M (`QStarSettings.monitor_samples`) buys and costs.

q*'s monitor scores each block's averaged iterate with M draws fixed for the datapoint. Fewer
draws cost less; this measures how much less, and what they lose:

- accuracy: the tests' correlated factor-analysis posterior (x_dim 8, z_dim 3, noise 0.7; 40
  points; Adam in blocks of 50 with patience 4, no certificate rounds), the diagonal Gaussian
  q*'s shortfall from the best diagonal Gaussian in exact ELBO (closed forms), mean and max
  over the points, for three keys, at S = 1 and S = 4 draws per step, for M = 4, 8, 16, 32 and
  for the per-step average (M = 0);
- cost: the compiled chunk of `fit_local` (as `python -m bench local_optimizer` times it:
  B = 100 binarized-MNIST test digits, decoder 20-400-784 relu, blocks of 100 steps) against
  the gradient-only hand-written floor, at S = 1 (1,000 steps) and S = 4 (200 steps), the
  variants taking turns over
  `rounds` rounds after a warm-up.

Writes `bench/results/monitor_draws.json` and prints both tables.

    python tools/monitor_draws.py
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.inference.local import fit_local
from amortjax.models import vae_model
from amortjax.models.linear_gaussian import make_linear_gaussian
from amortjax.nets import MLP
from bench.common import RESULTS_DIR, median, time_call
from bench.local_optimizer import HandLocal, decoder_params, library_chunk, load_test

DRAWS = (4, 8, 16, 32)


def accuracy(samples: tuple[int, ...] = (1, 4), keys: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    lg = make_linear_gaussian(jax.random.key(0), x_dim=8, z_dim=3, noise_scale=0.7)
    model, _, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(7), 40)
    best = np.asarray(lg.elbo(x, *lg.best_diagonal(x)))
    rows = []
    for s in samples:
        for m in (0, *DRAWS):
            for k in keys:
                fit = fit_local(
                    model,
                    params,
                    x,
                    jax.random.key(k),
                    z_dim=3,
                    final_samples=0,
                    batch_size=16,
                    method="adam",
                    num_samples=s,
                    monitor_samples=m,
                    block_size=50,
                    patience=4,
                    certify_retries=0,
                )  # fmt: skip  (every M at the blocks it was measured at; no continuation)
                lam = np.asarray(fit.params)
                short = best - np.asarray(lg.elbo(x, lam[:, :3], np.exp(lam[:, 3:])))
                rows.append({"S": s, "M": m, "key": k, "mean_shortfall": float(short.mean()),
                             "max_shortfall": float(short.max()),
                             "steps_mean": float(np.mean(fit.steps))})  # fmt: skip
                print(f"accuracy S={s} M={m} key={k}: shortfall mean {short.mean():.4f} "
                      f"max {short.max():.3f}", flush=True)  # fmt: skip
    return rows


def cost(samples: tuple[int, ...] = (1, 4), rounds: int = 3, batch: int = 100) -> list[dict]:
    steps_of = {s: max(100, 1000 // s // 100 * 100) for s in samples}  # whole blocks of 100
    x = jnp.asarray(load_test(batch, 784, "binarized_mnist", 0)[0])
    model = vae_model(MLP((400,), 784, "relu"), z_dim=20, likelihood="bernoulli")
    params = decoder_params(model, x=x[:2], x_dim=784, hidden=400, z_dim=20, seed=0)
    lam0 = jnp.zeros((batch, 40))

    def library(s, m):
        return library_chunk(model, params, x, samples=s, steps=steps_of[s], monitor=m,
                             learning_rate=1e-3, key=jax.random.key(1))  # fmt: skip

    jobs = {}
    for s in samples:
        hand = HandLocal(params, num_samples=s, learning_rate=1e-3, steps=steps_of[s])
        jobs[(s, "floor")] = lambda hand=hand: hand.fit(x, lam0, jax.random.key(2))
        for m in DRAWS:
            jobs[(s, m)] = library(s, m)
    times = {job: [] for job in jobs}
    for r in range(rounds + 1):  # round 0 compiles
        for job, thunk in jobs.items():
            t = time_call(thunk)
            if r:
                times[job].append(t)
    rows = []
    for s in samples:
        floor = median(times[(s, "floor")])
        for m in DRAWS:
            ratio = floor / median(times[(s, m)])
            rows.append({"S": s, "M": m, "library_over_floor": ratio})
            print(f"cost S={s} M={m}: library / gradient-only floor {ratio:.3f}", flush=True)
    return rows


def main() -> dict:
    out = {"accuracy": accuracy(), "cost": cost()}
    path = Path(RESULTS_DIR) / "monitor_draws.json"
    path.write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
