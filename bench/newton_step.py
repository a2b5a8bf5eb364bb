"""Speed of `fit_local`'s Newton steps, the default q* of the Gaussian families, against a
hand-written floor.

For a diagonal Gaussian q = N(mu, diag sigma^2), one Newton step of one datapoint draws S
antithetic points z_s = mu + sigma eps_s, computes log p(x, z_s), its gradient and its Hessian in
z (a Hessian costs about z_dim gradients: `jax.hessian`, forward over reverse), takes the
eigendecomposition of the mean Hessian (saddle-free: |eigenvalues|), and moves mu by a solve and
the precision towards the curvature's diagonal (`amortjax.inference.local._newton_one`). Its
stopping signal is each step's ELBO estimate, computed from the same draws (a quadratic control
variate), averaged over blocks of 10 steps.

Measured in one run, the variants taking turns (median of the rounds after a compile warm-up;
the target, library / floor >= 0.95, judged by the geometric mean of the rounds' own ratios
and its 95% interval, `bench.common.ratio_interval`):

1. the library: `fit_local`'s compiled chunk (`_optimize`, method "newton" with its default
   `newton_frame`, "auto": each Hessian's condition number tested, a second Hessian in its
   eigenbasis only where it passes 1e5; and again with frame "z", which never tests), its
   default step 0.5, S = 4 and blocks of 10) on B datapoints for exactly `steps` steps from N(0, I)
   (patience too large to stop). Its first block scores the start without moving (the
   reference of its plateau rule), a block of Newton steps like any other: its work is steps +
   one block, and its rate is counted so (the rate of its moving steps alone is reported too);
2. a hand-written floor: the same step written directly in JAX for the bench's decoder (two
   matmuls and the Bernoulli log-density written out, the weights as arguments), `vmap` over the
   B datapoints, `lax.scan` over the steps, each block's mean ELBO estimate kept (the signal)
   and its iterates averaged (the library's end point is the last block's average), from one
   batched draw per step.

As a check that both compute the same optimizer, the two fits' q are scored by the same ELBO
estimator (`evaluate_bounds`, common random numbers) after the run.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amortjax.evaluation.bounds import evaluate_pair
from amortjax.families import DiagonalGaussian
from amortjax.inference.local import _MIN_CURVATURE, DEFAULTS, QStarSettings, _optimize
from amortjax.models import vae_model
from amortjax.nets import MLP
from bench.common import (
    RATIO_TARGET,
    describe_rounds,
    hand_bernoulli_log_px,
    median,
    round_ratios,
    time_in_turns,
)
from bench.local_optimizer import decoder_params, load_test

STEP_SIZE, BLOCK, _ = DEFAULTS["newton"]  # (its patience is not timed)
NUM_SAMPLES = QStarSettings().num_samples
FRAME = QStarSettings().newton_frame
VARIANTS = {
    "library": f"library (fit_local chunk, Newton, frame {FRAME})",
    "library_z": "library, frame z",
    "floor": "hand-written Newton floor",
}


class HandNewton:
    """The hand-written floor: damped Newton steps of B diagonal-Gaussian q's, in plain JAX.

    log p(x, z) = sum_j [x_j l_j - softplus(l_j)] - |z|^2 / 2 (up to a constant), l = relu(z W1
    + b1) W2 + b2. Per datapoint and step, with S antithetic draws, g = mean grad log p, H = mean
    hess log p, A = -H with |eigenvalues| floored at `_MIN_CURVATURE`:

        mu <- mu + a A^-1 g,    1 / sigma^2 <- (1 - a) / sigma^2 + a diag(A),

    and the step's ELBO estimate mean_s [log p(z_s) - (1/2) d_s^T H d_s] + (1/2) tr(H diag
    sigma^2) + sum log sigma (d_s = sigma eps_s: the quadratic term as a control variate).
    """

    def __init__(self, params: dict, *, num_samples: int, steps: int, block: int, step: float):
        if steps % block:
            raise ValueError(f"steps {steps} is not a multiple of the block {block}")
        dec = params["decoder$params"]
        self.weights = tuple(dec[f"Dense_{i}"][n] for i in (0, 1) for n in ("kernel", "bias"))
        self.num_samples, self.steps, self.block, self.step = num_samples, steps, block, step
        self._fit_jit = jax.jit(self._fit)

    def fit(self, x: jax.Array, lam: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`steps` Newton steps from lam `[B, 2 z_dim]` on x `[B, x_dim]`: the average of the last
        block's iterates (where `fit_local` ends) and each datapoint's best block score `[B]`."""
        return self._fit_jit(self.weights, x, lam, key)

    def _one(self, weights, x, lam, eps):
        w1, b1, w2, b2 = weights

        def log_p(z):
            logits = jax.nn.relu(z @ w1 + b1) @ w2 + b2
            return hand_bernoulli_log_px(x, logits) - 0.5 * jnp.sum(z * z)

        loc, log_scale = jnp.split(lam, 2)
        offsets = jnp.exp(log_scale) * eps
        lp, grads = jax.vmap(jax.value_and_grad(log_p))(loc + offsets)
        hess = jax.vmap(jax.hessian(log_p))(loc + offsets).mean(0)
        hess = 0.5 * (hess + hess.T)
        w, v = jnp.linalg.eigh(-hess)
        curvature = (v * jnp.maximum(jnp.abs(w), _MIN_CURVATURE)) @ v.T
        quad = 0.5 * jnp.einsum("si,ij,sj->s", offsets, hess, offsets)
        elbo = (jnp.mean(lp - quad) + 0.5 * jnp.sum(jnp.diag(hess) * jnp.exp(2 * log_scale))
                + jnp.sum(log_scale))  # fmt: skip
        precision = (1 - self.step) * jnp.exp(-2 * log_scale) + self.step * jnp.diag(curvature)
        new = jnp.concatenate(
            [
                loc + self.step * jnp.linalg.solve(curvature, grads.mean(0)),
                -0.5 * jnp.log(precision),
            ]
        )
        return new, elbo

    def _fit(self, weights, x, lam, key):
        batch, z_dim = lam.shape[0], lam.shape[1] // 2

        def step(lam, k):
            half = jax.random.normal(k, (batch, self.num_samples // 2, z_dim))
            eps = jnp.concatenate([half, -half], axis=1)
            return jax.vmap(lambda xi, li, ei: self._one(weights, xi, li, ei))(x, lam, eps)

        def summed_step(carry, k):  # a step, and the running sum of the iterates
            lam, lam_sum = carry
            lam, elbo = step(lam, k)
            return (lam, lam_sum + lam), elbo

        def block(carry, keys):
            lam, _, best = carry
            (lam, lam_sum), elbos = jax.lax.scan(summed_step, (lam, jnp.zeros_like(lam)), keys)
            return (lam, lam_sum / self.block, jnp.maximum(best, elbos.mean(0))), None

        keys = jax.random.split(key, self.steps).reshape(-1, self.block)
        init = (lam, lam, jnp.full(batch, -jnp.inf))
        (_, average, best), _ = jax.lax.scan(block, init, keys)
        return average, best


def run(
    quick: bool = False,
    *,
    datapoints: int | None = None,
    steps: int | None = None,
    x_dim: int = 784,
    hidden: int = 400,
    z_dim: int = 20,
    repeats: int | None = None,
    score_samples: int | None = None,
    data: str = "binarized_mnist",
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the benchmark and returns its result (see the module docstring).

    Args:
        quick: small problems and few repeats, for tests and smoke runs.
        datapoints: B (default 100, quick 20).
        steps: Newton steps per datapoint, a multiple of the block of 10 (default 100, quick 20).
        x_dim, hidden, z_dim: the decoder z_dim-hidden-x_dim (relu, Bernoulli).
        repeats: timed rounds after a warm-up round (default 10, quick 1).
        score_samples: draws of the agreement check's ELBO (default 1000, quick 200).
        data: "binarized_mnist" (random data if it cannot be loaded) or "random".
        seed: seed of the parameters, noise and data.

    Returns:
        A dict with sizes, the two variants' timings and rates, their ratio, the agreement check
        and a `table`.
    """
    batch = datapoints or (20 if quick else 100)
    steps = steps or (20 if quick else 100)
    repeats = repeats or (1 if quick else 10)
    score_samples = score_samples or (200 if quick else 1000)
    if steps % BLOCK:
        raise ValueError(f"steps {steps} is not a multiple of the block {BLOCK}")
    x_np, data_note = load_test(batch, x_dim, data, seed)
    x = jnp.asarray(x_np)
    family = DiagonalGaussian()
    model = vae_model(MLP((hidden,), x_dim, "relu"), z_dim=z_dim, likelihood="bernoulli")
    params = decoder_params(model, x=x[:2], x_dim=x_dim, hidden=hidden, z_dim=z_dim, seed=seed)
    lam0 = jnp.zeros((batch, family.num_params(z_dim)))

    def library(method=f"newton_{FRAME}"):
        return _optimize(
            model, family, "z", method, NUM_SAMPLES, BLOCK, 0, batch, False, False, params, x,
            lam0, jax.random.key(seed + 1), jnp.float32(STEP_SIZE), jnp.int32(2**30),
            jnp.int32(steps), jnp.float32(0.0), jnp.float32(0.3), jnp.int32(0),
        ).out_lam  # fmt: skip

    hand = HandNewton(params, num_samples=NUM_SAMPLES, steps=steps, block=BLOCK, step=STEP_SIZE)
    jobs = {  # the library and its floor timed one after the other in each round
        "library": library,
        "floor": lambda: hand.fit(x, lam0, jax.random.key(seed + 2))[0],
        "library_z": lambda: library("newton"),
    }
    times, compile_s = time_in_turns(jobs, repeats)
    # the library's start-scoring block
    work = {"library": steps + BLOCK, "library_z": steps + BLOCK, "floor": steps}
    results = {
        name: {
            "seconds_median": median(ts),
            "seconds_all": ts,
            "first_call_seconds_incl_compile": compile_s[name],
            "steps_of_work": work[name],
            "datapoint_steps_per_s": batch * work[name] / median(ts),
            "moving_datapoint_steps_per_s": batch * steps / median(ts),
        }
        for name, ts in sorted(times.items(), key=lambda item: list(VARIANTS).index(item[0]))
    }
    ratio = results["library"]["datapoint_steps_per_s"] / results["floor"]["datapoint_steps_per_s"]
    by_round = round_ratios(
        times["library"], times["floor"], work["library"], work["floor"]
    )  # per step of work, round by round
    auto_over_z = (results["library"]["datapoint_steps_per_s"]
                   / results["library_z"]["datapoint_steps_per_s"])  # fmt: skip
    moving_ratio = (results["library"]["moving_datapoint_steps_per_s"]
                    / results["floor"]["moving_datapoint_steps_per_s"])  # fmt: skip

    # The same optimizer: both fits' q on the same draws (common random numbers).
    pair = evaluate_pair(
        model, params, x, np.asarray(library()), np.asarray(jobs["floor"]()),
        jax.random.key(seed + 3), family=family, num_samples=score_samples,
    )  # fmt: skip
    diff = np.asarray(pair.elbo_a, np.float64) - np.asarray(pair.elbo_b, np.float64)
    agreement = {
        "mean_elbo_library": float(np.mean(pair.elbo_a)),
        "mean_elbo_floor": float(np.mean(pair.elbo_b)),
        "mean_difference": float(diff.mean()),
        "difference_se": float(diff.std(ddof=1) / np.sqrt(diff.size)),
        "elbo_samples": score_samples,
    }
    rows = [
        {
            "variant": VARIANTS[name],
            "B": batch,
            "S": NUM_SAMPLES,
            "steps": steps,
            "steps of work": r["steps_of_work"],
            "s (median)": r["seconds_median"],
            "datapoint-steps/s": r["datapoint_steps_per_s"],
            "x floor": r["datapoint_steps_per_s"] / results["floor"]["datapoint_steps_per_s"],
        }
        for name, r in results.items()
    ]  # fmt: skip
    notes = [
        data_note,
        f"decoder {z_dim}-{hidden}-{x_dim} relu, Bernoulli, random init; diagonal Gaussian q from "
        f"N(0, I); Newton step {STEP_SIZE}, S = {NUM_SAMPLES} antithetic draws, blocks of "
        f"{BLOCK}; median of {repeats} rounds after a warm-up round, variants taking turns (in "
        "reverse order every other round)",
        f"library / floor {ratio:.3f} per step of work (the library's start-scoring block "
        f"counted), {moving_ratio:.3f} per moving step; round by round, per step of work, "
        + describe_rounds(by_round, RATIO_TARGET),
        f"newton_frame '{FRAME}' (the default: a test of each Hessian's condition number, a "
        f"second Hessian only where it passes 1e5) / 'z': {auto_over_z:.3f}",
        f"same optimizer: mean ELBO ({score_samples} common draws) library "
        f"{agreement['mean_elbo_library']:.3f}, floor {agreement['mean_elbo_floor']:.3f}, "
        f"difference {agreement['mean_difference']:+.4f} +- {agreement['difference_se']:.4f}",
    ]
    return {
        "sizes": {
            "datapoints": batch,
            "steps": steps,
            "x_dim": x_dim,
            "hidden": hidden,
            "z_dim": z_dim,
            "repeats": repeats,
            "num_samples": NUM_SAMPLES,
            "block": BLOCK,
            "step_size": STEP_SIZE,
        },
        "data": data_note,
        "results": results,
        "library_over_floor": ratio,
        "library_over_floor_moving_steps": moving_ratio,
        "library_over_floor_by_round": by_round,
        "default_frame_over_z_frame": auto_over_z,
        "agreement": agreement,
        "table": {"columns": list(rows[0]), "rows": rows},
        "notes": notes,
    }
