"""What Adam's stopping signal costs at the block length q* runs with, and what a longer block
buys: the measurement behind the monitor's default blocks (`inference.local.DEFAULTS`).

`python -m bench local_optimizer` times `fit_local`'s compiled chunk at the monitor's default
blocks (400 steps). Adam's monitor is scored once per block, so its cost per step falls with the
block: it was 50 until 2026-12-07 (patience 4), where it costs eight times as much per step.
This times, on the bench's problem (B = 100 binarized-MNIST test digits, decoder 20-400-784
relu, Adam 1e-3 from N(0, I), patience too large to stop), at S = 1 (1,200 steps) and S = 4
(400 steps):

- the gradient-only hand-written floor (`bench.local_optimizer.HandLocal`);
- the library's chunk with its 32-draw monitor and the floor computing the same monitor, at
  blocks of 50, 100 and 400;
- the library with the per-step signal (`monitor_samples=0`, the flows' default) at blocks of 50,
  and the floor returning every step's values;

the variants taking turns over 3 rounds after a warm-up round (medians). Then what a longer
block buys or loses: Adam q* (`fit_local`, method "adam", 32-draw monitor, no certificate rounds)
with blocks of 50 and patience 4 (the old defaults: a plateau is 200 steps without a better
score), blocks of 100 and patience 2 (the same 200 steps), blocks of 100 and patience 4, and
blocks of 400 and patience 1 (the defaults now), on two correlated linear-Gaussian posteriors
(factor analysis x 8, z 3, noise 0.7; x 3 < z 5, noise 0.1; 40 points each, keys 1-3, S = 1 and
4): each q*'s shortfall from the best diagonal Gaussian in exact ELBO (closed forms), mean and
worst, and its steps. Writes `bench/results/monitor_block.json` and prints both tables.

    python tools/monitor_block.py
"""

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from amortjax.families import DiagonalGaussian
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.inference.local import MONITOR_SAMPLES, _optimize, fit_local
from amortjax.models import vae_model
from amortjax.models.linear_gaussian import make_linear_gaussian
from amortjax.nets import MLP
from bench.common import RESULTS_DIR, machine_info, median, time_in_turns
from bench.local_optimizer import HandLocal, decoder_params, load_test

BATCH, RATE = 100, 1e-3


def main(rounds: int = 3) -> dict:
    x_np, data_note = load_test(BATCH, 784, "binarized_mnist", 0)
    x = jnp.asarray(x_np)
    model = vae_model(MLP((400,), 784, "relu"), z_dim=20, likelihood="bernoulli")
    params = decoder_params(model, x=x[:2], x_dim=784, hidden=400, z_dim=20, seed=0)
    family = DiagonalGaussian()
    lam0 = jnp.zeros((BATCH, family.num_params(20)))

    def library(samples: int, steps: int, block: int, monitor: int):
        return lambda: _optimize(
            model, family, "z", "adam", samples, block, monitor, BATCH, False, False, params,
            x, lam0, jax.random.key(1), jnp.float32(RATE), jnp.int32(2**30), jnp.int32(steps),
            jnp.float32(0.0), jnp.float32(0.3), jnp.int32(0),
        ).out_lam  # fmt: skip

    def floor(samples: int, steps: int, block: int, monitor: int = 0, with_value=False):
        hand = HandLocal(params, num_samples=samples, learning_rate=RATE, steps=steps,
                         with_value=with_value, monitor=monitor, block=block)  # fmt: skip
        return lambda: hand.fit(x, lam0, jax.random.key(2))

    jobs = {}
    for samples, steps in ((1, 1200), (4, 400)):
        jobs[("floor", samples, 100)] = floor(samples, steps, 100)
        for block in (50, 100, 400):
            jobs[("library_monitor", samples, block)] = library(
                samples, steps, block, MONITOR_SAMPLES
            )
            jobs[("floor_monitor", samples, block)] = floor(
                samples, steps, block, monitor=MONITOR_SAMPLES
            )
        jobs[("library_values", samples, 50)] = library(samples, steps, 50, 0)
        jobs[("floor_values", samples, 100)] = floor(samples, steps, 100, with_value=True)
    times, _ = time_in_turns(jobs, rounds)
    seconds = {job: median(t) for job, t in times.items()}
    rows = []
    for (variant, samples, block), s in seconds.items():
        ratio = seconds[("floor", samples, 100)] / s
        rows.append({"variant": variant, "S": samples, "block": block, "seconds": s,
                     "x_gradient_only_floor": ratio})  # fmt: skip
        print(f"{variant:16s} S={samples} block={block:3d}: {s:.3f} s, "
              f"x gradient-only floor {ratio:.3f}", flush=True)  # fmt: skip
    out = {"machine": machine_info(), "data": data_note, "batch": BATCH,
           "monitor_samples": MONITOR_SAMPLES, "rounds": rounds, "rows": rows,
           "accuracy": accuracy()}  # fmt: skip
    (RESULTS_DIR / "monitor_block.json").write_text(json.dumps(out, indent=1))
    return out


def accuracy(keys: tuple[int, ...] = (1, 2, 3)) -> list[dict]:
    """Adam q*'s shortfall from the best diagonal Gaussian per (case, S, block, patience)."""
    cases = {
        "factor analysis x 8, z 3, noise 0.7": make_linear_gaussian(
            jax.random.key(0), x_dim=8, z_dim=3, noise_scale=0.7
        ),
        "x 3 < z 5, noise 0.1": make_linear_gaussian(
            jax.random.key(3), x_dim=3, z_dim=5, noise_scale=0.1
        ),
    }
    rows = []
    for case, lg in cases.items():
        model, _, params = linear_gaussian_vae(lg)
        x, _ = lg.sample(jax.random.key(7), 40)
        best = np.asarray(lg.elbo(x, *lg.best_diagonal(x)))
        for samples in (1, 4):
            for block, patience in ((50, 4), (100, 2), (100, 4), (400, 1)):
                short, steps = [], []
                for k in keys:
                    fit = fit_local(
                        model, params, x, jax.random.key(k), z_dim=lg.z_dim, final_samples=0,
                        batch_size=40, method="adam", num_samples=samples, block_size=block,
                        patience=patience, certify_retries=0,
                    )  # fmt: skip
                    lam = np.asarray(fit.params, np.float64)
                    scale = np.exp(lam[:, lg.z_dim :])
                    short.append(best - np.asarray(lg.elbo(x, lam[:, : lg.z_dim], scale)))
                    steps.append(np.mean(fit.steps))
                short = np.concatenate(short)
                rows.append({"case": case, "S": samples, "block": block, "patience": patience,
                             "shortfall_mean": float(short.mean()),
                             "shortfall_max": float(short.max()),
                             "steps_mean": float(np.mean(steps))})  # fmt: skip
                print(f"{case}, S={samples}, block {block}, patience {patience}: short "
                      f"{short.mean():.4f} (worst {short.max():.3f}), {np.mean(steps):.0f} steps",
                      flush=True)  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
