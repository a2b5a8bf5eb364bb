"""Speed of the vectorized per-example optimizer (`fit_local`) against a one-at-a-time loop.

Per-example inference fits each datapoint's diagonal-Gaussian lambda_i (2 * z_dim numbers) by
Adam on its local ELBO with S reparameterized samples per step, under a fixed decoder
(z_dim-hidden-x_dim relu MLP, Bernoulli likelihood). Measured in one run, on the same data:

1. the machine's float32 matmul peak (`bench.train_step.matmul_peak`), and a square matmul
   timed again in every round, so that each variant is compared with what the (shared) machine
   gave in the same minutes;
2. the library: the compiled chunk of `fit_local` (`vmap` over datapoints, `lax.scan` over a
   block of steps, `lax.while_loop` over blocks), B datapoints for a fixed number of steps
   (patience so large that no datapoint stops early), timed directly so that the final
   evaluation and compilation are left out; `fit_local` end to end is timed once as well. Its
   stopping signal is its default one (each block's averaged iterate scored with
   `monitor_samples` fixed draws, the steps computing gradients only) at its default blocks
   (`MONITOR_BLOCK`, or the whole run where shorter), and once more Cremer et al.'s
   (`monitor_samples=0`: every step's ELBO values, averaged over blocks of 100), whose first
   block scores the start without moving (counted as work: steps + one block). The
   chunk runs with the plain reparameterization gradient (`stl=False`), the gradient the floor
   and the loop compute (`fit_local`'s default, sticking the landing, differs only in the
   gradient of log q, a few operations per latent dimension);
3. a hand-written vectorized floor: the same objective and Adam written directly in JAX (one
   `[B, S, z_dim]` noise draw, the decoder as two matmuls, the Bernoulli log-density written
   out), to tell the library's overhead from the machine's limits; and the same floor doing
   the work of each stopping signal as well: scoring the start and every block's averaged
   iterate with the monitor's fixed draws, or returning every step's per-datapoint ELBO values
   (which the per-step signal, `monitor_samples=0`, averages over each block). A gradient-only
   loop computes neither. Each library row's ratio to the floor with its signal is the
   library's own overhead; that floor's ratio to the gradient-only one is what the signal
   costs any implementation;
4. the baseline of the papers' released code: one datapoint at a time, a jitted single-datapoint
   Adam step (`local_elbo` of one datapoint, its gradient, an optax Adam update) called from a
   Python loop for each step of each datapoint in turn.

Throughput is datapoint-steps per second (datapoints * steps / seconds), the median over rounds
after a compile warm-up; in each round the variants take turns (in reverse order every other
round). Each round's library / gradient-only floor gives a ratio of its own; their geometric
mean and 95% Student-t interval (`bench.common.ratio_interval`) judge the target (>= 0.95 at
B = 100): met, not met, or not resolved by this run's rounds. As a check that both optimize
the same objective, `fit_local` and the loop start from N(0, I) on the same datapoints for the
same number of steps, and their fitted q are scored by the same ELBO estimator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO

from amortjax.evaluation.bounds import evaluate_bounds
from amortjax.families import DiagonalGaussian
from amortjax.guides import amortized_guide
from amortjax.guides.local import given_params_guide, local_elbo
from amortjax.inference.local import QStarSettings, _optimize, fit_local
from amortjax.models import vae_model
from amortjax.nets import MLP
from bench.common import (
    RATIO_TARGET,
    describe_rounds,
    hand_bernoulli_log_px,
    load_binarized,
    median,
    round_ratios,
    time_call,
    time_in_turns,
)
from bench.train_step import matmul_peak

MONITOR = QStarSettings(method="adam").monitor_for(DiagonalGaussian())
MONITOR_BLOCK = QStarSettings(method="adam").step_and_block(DiagonalGaussian())[1]
"""The block Adam runs its monitor with by default (400 steps: the monitor costs M forward
passes per block); the per-step signal's rows keep Cremer et al.'s blocks of 100."""

FLOP_FORMULA = (
    "flops_per_datapoint_step = S * 2 * 2 * (z_dim*hidden + hidden*x_dim): per sample the"
    " decoder's forward matmuls (2 FLOPs per MAC) and, in the backward pass, only the gradient"
    " with respect to the decoder's input (another forward's worth: the decoder's parameters are"
    " fixed, so no weight gradients are computed); elementwise work and Adam ignored"
)


def load_test(n: int, x_dim: int, data: str, seed: int) -> tuple[np.ndarray, str]:
    """The first n binarized-MNIST test images, or random binary vectors (see
    `bench.common.load_binarized`)."""
    return load_binarized("test", n, x_dim, data, seed)


def decoder_params(
    model: Callable, *, x: jax.Array, x_dim: int, hidden: int, z_dim: int, seed: int
) -> dict:
    """Randomly initialized model parameters, as NumPyro's SVI initializes them."""
    guide = amortized_guide(MLP((hidden,), 2 * z_dim, "relu"), x_dim=x_dim)
    svi = SVI(model, guide, optax.adam(1e-3), Trace_ELBO())
    params = svi.get_params(svi.init(jax.random.key(seed), x))
    return {name: value for name, value in params.items() if not name.startswith("encoder")}


class HandLocal:
    """The hand-written vectorized floor: Adam on B local ELBOs, written directly in JAX.

    L(lambda_i; x_i) = mean_s [log p(x_i | z_is) + log N(z_is; 0, I) - log q(z_is; lambda_i)],
    z_is = mu_i + sigma_i * eps_is; the Gaussians' normalizing constants cancel and are left
    out (they do not change the gradient).

    With `with_value=True` every step also returns each datapoint's ELBO estimate, as
    `fit_local` must for its per-step stopping rule (block averages of the per-step values):
    the value costs what the gradient alone does not, log1p(exp(-|l|)) for each of the B S
    x_dim logits (the gradient needs only the sigmoid), so this floor tells that cost from the
    library's own overhead. With `monitor=M > 0` the steps compute gradients only, and the
    start and every block's averaged iterate (blocks of `block` steps) are scored with M draws
    drawn once per datapoint, the best score kept: the work of `fit_local`'s monitor
    (`QStarSettings.monitor_samples`), written directly.
    """

    def __init__(
        self,
        params: dict,
        *,
        num_samples: int,
        learning_rate: float,
        steps: int,
        with_value: bool = False,
        monitor: int = 0,
        block: int = 100,
    ):
        if with_value and monitor:
            raise ValueError("with_value and monitor are two stopping signals: choose one")
        if monitor and steps % block:
            raise ValueError(f"steps {steps} is not a multiple of the block {block}")
        dec = params["decoder$params"]
        # The weights are arguments of the compiled fit, as the library's are: closed over, they
        # would be constants that XLA lays out for free (and whose zero biases it folds away).
        self.weights = tuple(dec[f"Dense_{i}"][n] for i in (0, 1) for n in ("kernel", "bias"))
        self.num_samples, self.steps, self.with_value = num_samples, steps, with_value
        self.monitor, self.block = monitor, block
        self.tx = optax.adam(learning_rate)
        self._fit_jit = jax.jit(self._fit)

    def fit(self, x: jax.Array, lam: jax.Array, key: jax.Array) -> Any:
        """`steps` Adam steps from lam `[B, 2 z_dim]` on x `[B, x_dim]`: the final lam (and, with
        `with_value`, the mean over steps of each datapoint's per-step ELBO value; with
        `monitor`, each datapoint's best monitor score, the start's included)."""
        return self._fit_jit(self.weights, x, lam, key)

    def elbos(self, lam: jax.Array, x: jax.Array, eps: jax.Array, weights=None) -> jax.Array:
        """The B datapoints' S-sample local ELBOs (up to a constant), `[B]`."""
        w1, b1, w2, b2 = self.weights if weights is None else weights
        loc, log_scale = jnp.split(lam, 2, axis=-1)
        z = loc[:, None] + jnp.exp(log_scale)[:, None] * eps
        logits = jax.nn.relu(z @ w1 + b1) @ w2 + b2
        log_px = hand_bernoulli_log_px(x[:, None], logits)
        log_pz_minus_log_qz = jnp.sum(0.5 * (eps**2 - z**2) + log_scale[:, None], axis=-1)
        return jnp.mean(log_px + log_pz_minus_log_qz, axis=1)

    def _fit(self, weights: tuple, x: jax.Array, lam: jax.Array, key: jax.Array) -> Any:
        def step(carry, k):
            lam, opt_state = carry
            eps = jax.random.normal(k, (lam.shape[0], self.num_samples, lam.shape[1] // 2))
            if self.with_value:
                values, vjp = jax.vjp(lambda lam: self.elbos(lam, x, eps, weights), lam)
                (grad,) = vjp(jnp.ones_like(values))
            else:
                elbo_sum = lambda lam: jnp.sum(self.elbos(lam, x, eps, weights))  # noqa: E731
                values, grad = None, jax.grad(elbo_sum)(lam)
            updates, opt_state = self.tx.update(-grad, opt_state, lam)
            return (lam + updates, opt_state), values

        init = (lam, self.tx.init(lam))
        step_keys = jax.random.split(key, self.steps)
        if not self.monitor:
            (lam, _), values = jax.lax.scan(step, init, step_keys)
            return lam if values is None else (lam, values.mean(0))

        eps_monitor = self.monitor_draws(key, lam.shape)  # the same draws for every block

        def summed_step(carry, k):  # a step, and the running sum of the iterates
            state, lam_sum = carry
            state = step(state, k)[0]
            return (state, lam_sum + state[0]), None

        def block(carry, keys):
            state, best = carry
            (state, lam_sum), _ = jax.lax.scan(summed_step, (state, jnp.zeros_like(state[0])), keys)
            score = self.elbos(lam_sum / self.block, x, eps_monitor, weights)
            return (state, jnp.maximum(best, score)), None

        best = self.elbos(lam, x, eps_monitor, weights)  # the start's score
        blocks = step_keys.reshape(self.steps // self.block, self.block)
        ((lam, _), best), _ = jax.lax.scan(block, (init, best), blocks)
        return lam, best

    def monitor_draws(self, key: jax.Array, shape: tuple[int, int]) -> jax.Array:
        """The monitor's draws `[B, M, z_dim]` for lam of `shape` `[B, 2 z_dim]`."""
        return jax.random.normal(
            jax.random.fold_in(key, 2**31), (shape[0], self.monitor, shape[1] // 2)
        )


class LoopLocal:
    """The papers' baseline: one datapoint at a time, one jitted Adam step per Python call."""

    def __init__(self, model: Callable, *, num_samples: int, learning_rate: float):
        self.model, self.num_samples = model, num_samples
        self.family = DiagonalGaussian()
        self.tx = optax.adam(learning_rate)
        self.step = jax.jit(self._step)
        # The same call with no work: what the Python loop and JAX's dispatch cost alone.
        self.noop = jax.jit(lambda params, x, lam, opt_state, key, t: (lam, opt_state))

    def _step(
        self, params: dict, x: jax.Array, lam: jax.Array, opt_state: Any, key: jax.Array, t: int
    ) -> tuple[jax.Array, Any]:
        grad = jax.grad(
            lambda lam: local_elbo(
                self.model,
                params,
                x,
                lam,
                jax.random.fold_in(key, t),
                family=self.family,
                num_samples=self.num_samples,
            )
        )(lam)
        updates, opt_state = self.tx.update(-grad, opt_state, lam)
        return lam + updates, opt_state

    def fit(
        self,
        params: dict,
        xs: list[jax.Array],
        lam0: jax.Array,
        keys: list[jax.Array],
        steps: int,
        *,
        dispatch_only: bool = False,
    ) -> jax.Array:
        """Fits each datapoint in turn for `steps` steps; returns the lambdas `[n, P]`.

        With `dispatch_only`, calls a jitted function of the same arguments that does nothing.
        """
        step = self.noop if dispatch_only else self.step
        lams = []
        for x, key in zip(xs, keys, strict=True):
            lam, opt_state = lam0, self.tx.init(lam0)
            for t in range(steps):
                lam, opt_state = step(params, x, lam, opt_state, key, t)
            lams.append(lam)
        return jnp.stack(lams)


class TorchLoopLocal:
    """The papers' released code, in kind: PyTorch, eager, one datapoint at a time.

    For each datapoint in turn, a `torch.optim.Adam` over its own lambda (2 z_dim numbers)
    takes `steps` steps on the S-sample local ELBO under the same decoder weights (copied from
    the JAX parameters), as Cremer et al.'s `optimize_local_gaussian` does. The objective is the
    one `HandLocal` writes out. Only available when PyTorch is installed.
    """

    def __init__(self, params: dict, *, num_samples: int, learning_rate: float, seed: int):
        import torch

        self.torch = torch
        dec = params["decoder$params"]

        def t(a):
            return torch.from_numpy(np.asarray(a, np.float32).copy())

        self.w1, self.b1 = t(dec["Dense_0"]["kernel"]), t(dec["Dense_0"]["bias"])
        self.w2, self.b2 = t(dec["Dense_1"]["kernel"]), t(dec["Dense_1"]["bias"])
        self.num_samples, self.learning_rate = num_samples, learning_rate
        self.generator = torch.Generator().manual_seed(seed)

    def fit(self, xs: list[np.ndarray], num_params: int, steps: int) -> np.ndarray:
        """Fits each datapoint in turn from N(0, I); returns the lambdas `[n, P]`."""
        torch = self.torch
        f = torch.nn.functional
        z_dim = num_params // 2
        lams = []
        for x_np in xs:
            x = torch.from_numpy(np.asarray(x_np, np.float32))
            lam = torch.zeros(num_params, requires_grad=True)
            opt = torch.optim.Adam([lam], lr=self.learning_rate)
            for _ in range(steps):
                opt.zero_grad()
                loc, log_scale = lam[:z_dim], lam[z_dim:]
                eps = torch.randn(self.num_samples, z_dim, generator=self.generator)
                z = loc + log_scale.exp() * eps
                logits = f.relu(z @ self.w1 + self.b1) @ self.w2 + self.b2
                log_px = (x * logits - f.softplus(logits)).sum(-1)
                log_pz_minus_log_qz = (0.5 * (eps**2 - z**2) + log_scale).sum(-1)
                loss = -(log_px + log_pz_minus_log_qz).mean()
                loss.backward()
                opt.step()
            lams.append(lam.detach().numpy().copy())
        return np.stack(lams)


def library_chunk(
    model: Callable,
    params: dict,
    x: jax.Array,
    *,
    samples: int,
    steps: int,
    monitor: int,
    learning_rate: float,
    key: jax.Array,
    block: int | None = None,
) -> Callable[[], Any]:
    """A thunk running `fit_local`'s compiled chunk (`_optimize`) on x `[B, x_dim]` from
    N(0, I): B slots, S = `samples` draws per step, exactly `steps` Adam steps in blocks of
    `block` (None: min(100, steps); patience too large to stop), the plain reparameterization
    gradient, the stopping signal's `monitor` draws (0: per-step values); returns the fitted
    lambdas."""
    family = DiagonalGaussian()
    batch = x.shape[0]
    lam0 = jnp.zeros((batch, family.num_params(_z_dim(params))))
    return lambda: _optimize(
        model, family, "z", "adam", samples, block or min(100, steps), monitor, batch, False,
        False,
        params, x, lam0, key, jnp.float32(learning_rate), jnp.int32(2**30), jnp.int32(steps),
        jnp.float32(0.0), jnp.float32(0.3), jnp.int32(0),
    ).out_lam  # fmt: skip


def _torch_available() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def step_cost_analysis(
    model: Callable, params: dict, x: jax.Array, num_samples: int
) -> dict[str, float]:
    """XLA's cost analysis of one vectorized step: the gradients of B local ELBOs in lambda."""
    family = DiagonalGaussian()
    batch = x.shape[0]

    def grads(lam: jax.Array, key: jax.Array) -> jax.Array:
        keys = jax.random.split(key, batch)

        def elbos(lam):
            return jax.vmap(
                lambda xi, li, ki: local_elbo(
                    model, params, xi, li, ki, family=family, num_samples=num_samples
                )
            )(x, lam, keys)

        per_point, vjp = jax.vjp(elbos, lam)
        return vjp(jnp.ones_like(per_point))[0]

    lam = jnp.zeros((batch, family.num_params(_z_dim(params))))
    try:
        cost = jax.jit(grads).lower(lam, jax.random.key(0)).compile().cost_analysis()
        if isinstance(cost, list):
            cost = cost[0]
        return {k: float(cost[k]) for k in ("flops", "transcendentals") if k in cost}
    except Exception:  # cost analysis is best effort
        return {}


def _z_dim(params: dict) -> int:
    return int(params["decoder$params"]["Dense_0"]["kernel"].shape[0])


def run(
    quick: bool = False,
    *,
    configs: tuple[tuple[int, int, int], ...] | None = None,
    loop_datapoints: int | None = None,
    loop_steps: int | None = None,
    x_dim: int = 784,
    hidden: int = 400,
    z_dim: int = 20,
    learning_rate: float = 1e-3,
    repeats: int | None = None,
    matmul_sizes: tuple[int, ...] | None = None,
    matmul_repeats: int | None = None,
    agreement_samples: int | None = None,
    end_to_end: bool = True,
    torch_loop_baseline: bool = True,
    data: str = "binarized_mnist",
    seed: int = 0,
) -> dict[str, Any]:
    """Runs the benchmark and returns its result (see the module docstring).

    Args:
        quick: small problems and few repeats, for tests and smoke runs.
        configs: (B datapoints, S samples, steps) for the vectorized optimizers; steps is a
            multiple of the blocks min(100, steps) (the per-step signal's) and
            min(MONITOR_BLOCK, steps) (the monitor's). Default (100, 1, 1200), (500, 1, 200),
            (100, 10, 100), (500, 10, 20), about equal work per row; quick (20, 1, 50),
            (20, 4, 50).
        loop_datapoints: datapoints of the one-at-a-time loop (default 10, quick 3).
        loop_steps: steps per datapoint of the loop (default 200, quick 50).
        x_dim, hidden, z_dim: the decoder z_dim-hidden-x_dim.
        learning_rate: Adam's step size for every optimizer.
        repeats: timed rounds after a warm-up round (default 10, quick 1).
        matmul_sizes: square sizes of the up-front peak (default 1024, 2048; quick 128, 256);
            the largest is also timed in every round.
        matmul_repeats: timed matmuls per size up front (default 5, quick 2).
        agreement_samples: draws of the ELBO estimate behind the agreement check (default
            2000, quick 500).
        end_to_end: also time `fit_local` end to end (with its final evaluation).
        torch_loop_baseline: also time the PyTorch one-at-a-time loop (`TorchLoopLocal`) when
            PyTorch is installed.
        data: "binarized_mnist" (random data if it cannot be loaded) or "random".
        seed: seed of the parameters, noise and data.

    Returns:
        A dict with sizes, FLOP formula, matmul peak, per-config timings of the library, the
        hand-written floor and the loop, their ratios, the agreement check and a `table`.
    """
    configs = configs or (
        ((20, 1, 50), (20, 4, 50))
        if quick
        else ((100, 1, 1200), (500, 1, 200), (100, 10, 100), (500, 10, 20))
    )
    loop_datapoints = loop_datapoints or (3 if quick else 10)
    loop_steps = loop_steps or (50 if quick else 200)
    repeats = repeats or (1 if quick else 10)
    matmul_sizes = matmul_sizes or ((128, 256) if quick else (1024, 2048))
    matmul_repeats = matmul_repeats or (2 if quick else 5)
    agreement_samples = agreement_samples or (500 if quick else 2000)
    for _, _, steps in configs:
        if steps % min(100, steps) or steps % min(MONITOR_BLOCK, steps):
            raise ValueError(
                f"steps {steps} is not a multiple of the blocks 100 and {MONITOR_BLOCK} (the "
                "per-step signal's and the monitor's)"
            )

    peak = matmul_peak(tuple(matmul_sizes), matmul_repeats)
    round_n = int(max(peak["gflops_by_size"], key=peak["gflops_by_size"].get))
    x_all_np, data_note = load_test(max(b for b, _, _ in configs), x_dim, data, seed)
    x_all = jnp.asarray(x_all_np)
    family = DiagonalGaussian()
    model = vae_model(MLP((hidden,), x_dim, "relu"), z_dim=z_dim, likelihood="bernoulli")
    params = decoder_params(model, x=x_all[:2], x_dim=x_dim, hidden=hidden, z_dim=z_dim, seed=seed)
    flops_per_dp_sample = 4 * (z_dim * hidden + hidden * x_dim)
    num_params = family.num_params(z_dim)

    # The variants: name -> (config -> (thunk, datapoint-steps per call)).
    def library(batch: int, samples: int, steps: int, monitor: int = MONITOR) -> Callable[[], Any]:
        return library_chunk(
            model, params, x_all[:batch], samples=samples, steps=steps, monitor=monitor,
            learning_rate=learning_rate, key=jax.random.key(seed + 1),
            block=min(MONITOR_BLOCK if monitor else 100, steps),
        )  # fmt: skip

    def floor(
        batch: int, samples: int, steps: int, with_value: bool = False, monitor: int = 0
    ) -> Callable[[], Any]:
        hand = HandLocal(
            params,
            num_samples=samples,
            learning_rate=learning_rate,
            steps=steps,
            with_value=with_value,
            monitor=monitor,
            block=min(MONITOR_BLOCK if monitor else 100, steps),
        )
        x = x_all[:batch]
        lam0 = jnp.zeros((batch, num_params))
        return lambda: hand.fit(x, lam0, jax.random.key(seed + 2))

    loop_xs = [x_all[i] for i in range(loop_datapoints)]
    loop_keys = [jax.random.fold_in(jax.random.key(seed + 3), i) for i in range(loop_datapoints)]
    loopers: dict[int, LoopLocal] = {}

    def loop(samples: int, dispatch_only: bool = False) -> Callable[[], Any]:
        looper = loopers.setdefault(
            samples, LoopLocal(model, num_samples=samples, learning_rate=learning_rate)
        )
        lam0 = jnp.zeros(num_params)
        return lambda: looper.fit(
            params, loop_xs, lam0, loop_keys, loop_steps, dispatch_only=dispatch_only
        )

    use_torch = torch_loop_baseline and _torch_available()
    loop_xs_np = [np.asarray(x) for x in loop_xs]

    def torch_loop(samples: int) -> Callable[[], Any]:
        looper = TorchLoopLocal(
            params, num_samples=samples, learning_rate=learning_rate, seed=seed + 8
        )
        return lambda: looper.fit(loop_xs_np, num_params, loop_steps)

    dot = jax.jit(jnp.dot)
    ka, kb = jax.random.split(jax.random.key(seed + 4))
    mat_a = jax.random.normal(ka, (round_n, round_n))
    mat_b = jax.random.normal(kb, (round_n, round_n))

    jobs: dict[tuple[str, tuple[int, int, int]], Callable[[], Any]] = {}
    for cfg in configs:
        jobs[("library", cfg)] = library(*cfg)
        jobs[("library_values", cfg)] = library(*cfg, monitor=0)
        jobs[("floor", cfg)] = floor(*cfg)
        jobs[("floor_value", cfg)] = floor(*cfg, with_value=True)
        jobs[("floor_monitor", cfg)] = floor(*cfg, monitor=MONITOR)
    for samples in sorted({s for _, s, _ in configs}):
        jobs[("loop", (loop_datapoints, samples, loop_steps))] = loop(samples)
        if use_torch:
            jobs[("torch_loop", (loop_datapoints, samples, loop_steps))] = torch_loop(samples)
    jobs[("dispatch", (loop_datapoints, 0, loop_steps))] = loop(configs[0][1], True)
    jobs[("matmul", (round_n, 0, 0))] = lambda: dot(mat_a, mat_b)
    times, compile_s = time_in_turns(jobs, repeats)
    round_peak = 2.0 * round_n**3 / median(times[("matmul", (round_n, 0, 0))]) / 1e9
    dispatch_us = (
        1e6
        * median(times[("dispatch", (loop_datapoints, 0, loop_steps))])
        / (loop_datapoints * loop_steps)
    )

    configs_out: list[dict[str, Any]] = []
    rows: list[dict[str, Any]] = []
    loop_rate: dict[int, float] = {}
    torch_rate: dict[int, float] = {}
    for (variant, (batch, samples, steps)), ts in times.items():
        if variant in ("matmul", "dispatch"):
            continue
        sec = median(ts)
        # With the per-step signal, the library's first block scores the start without moving
        # (a block of gradient evaluations like any other): its work is steps + one block.
        rate = batch * (steps + (min(100, steps) if variant == "library_values" else 0)) / sec
        gflops = rate * samples * flops_per_dp_sample / 1e9
        entry = {
            "variant": variant,
            "datapoints": batch,
            "num_samples": samples,
            "steps": steps,
            "seconds_median": sec,
            "seconds_all": ts,
            "first_call_seconds_incl_compile": compile_s[(variant, (batch, samples, steps))],
            "datapoint_steps_per_s": rate,
            "gflops": gflops,
            "fraction_of_peak": gflops / peak["peak_gflops"],
            "fraction_of_round_matmul": gflops / round_peak,
        }
        configs_out.append(entry)
        if variant == "loop":
            loop_rate[samples] = rate
        if variant == "torch_loop":
            torch_rate[samples] = rate
    by_key = {(e["variant"], e["datapoints"], e["num_samples"]): e for e in configs_out}
    for e in configs_out:
        if e["variant"] == "library":
            e["over_loop"] = e["datapoint_steps_per_s"] / loop_rate[e["num_samples"]]
            if e["num_samples"] in torch_rate:
                e["over_torch_loop"] = e["datapoint_steps_per_s"] / torch_rate[e["num_samples"]]
            floor_e = by_key[("floor", e["datapoints"], e["num_samples"])]
            e["over_floor"] = e["datapoint_steps_per_s"] / floor_e["datapoint_steps_per_s"]
            e["over_floor_by_round"] = round_ratios(e["seconds_all"], floor_e["seconds_all"])
        # Each library row against the floor that computes its stopping signal too.
        signal = {"library": "floor_monitor", "library_values": "floor_value"}.get(e["variant"])
        if signal:
            signal_e = by_key[(signal, e["datapoints"], e["num_samples"])]
            e["over_floor_signal"] = e["datapoint_steps_per_s"] / signal_e["datapoint_steps_per_s"]
        if e["variant"] in ("floor_value", "floor_monitor"):
            floor_e = by_key[("floor", e["datapoints"], e["num_samples"])]
            e["over_floor"] = e["datapoint_steps_per_s"] / floor_e["datapoint_steps_per_s"]
        if e["variant"] in ("floor", "floor_value", "floor_monitor"):
            e["over_loop"] = e["datapoint_steps_per_s"] / loop_rate[e["num_samples"]]
    order = {"library": 0, "floor": 1, "floor_monitor": 2, "library_values": 3,
             "floor_value": 4, "loop": 5, "torch_loop": 6}  # fmt: skip
    configs_out.sort(key=lambda e: (e["num_samples"], order[e["variant"]], e["datapoints"]))
    names = {
        "library": (
            f"library (fit_local chunk, vectorized; monitor of {MONITOR} draws per block of "
            f"{MONITOR_BLOCK} or of the run)"
        ),
        "library_values": "library, per-step ELBO values as the signal (monitor_samples=0)",
        "floor": "hand-written vectorized floor",
        "floor_value": "hand-written floor + per-step ELBO values",
        "floor_monitor": "hand-written floor + the library's monitor and blocks",
        "loop": "one-at-a-time loop (jitted step)",
        "torch_loop": "one-at-a-time loop (PyTorch eager, as the papers' code)",
    }
    for e in configs_out:
        rows.append(
            {
                "variant": names[e["variant"]],
                "B": e["datapoints"],
                "S": e["num_samples"],
                "steps": e["steps"],
                "datapoint-steps/s": e["datapoint_steps_per_s"],
                "GFLOP/s": e["gflops"],
                "% of peak": 100 * e["fraction_of_peak"],
                "% of round matmul": 100 * e["fraction_of_round_matmul"],
                "x loop": e.get("over_loop", 1.0 if e["variant"] == "loop" else ""),
                "x torch loop": e.get(
                    "over_torch_loop", 1.0 if e["variant"] == "torch_loop" else ""
                ),
                "x floor": e.get("over_floor", ""),
                "x floor+signal": e.get("over_floor_signal", ""),
            }
        )
    rows.append({"variant": "matmul peak (jnp.dot f32, up front)", "GFLOP/s": peak["peak_gflops"]})
    rows.append({"variant": f"matmul {round_n}^3 timed in each round", "GFLOP/s": round_peak})

    # Same objective: fit_local and the loop from N(0, I), same datapoints, steps and S.
    # fit_local ends at its last block's averaged iterate: short blocks keep that average near
    # the loop's last iterate (a block spanning the whole run would average in the start).
    agree_s = configs[0][1]
    block = max(1, min(10, loop_steps))
    loop_lam = np.asarray(loopers[agree_s].fit(params, loop_xs, jnp.zeros(num_params),
                                               loop_keys, loop_steps))  # fmt: skip
    x_loop = x_all[:loop_datapoints]
    fit = fit_local(
        model, params, x_loop, jax.random.key(seed + 5), family=family, z_dim=z_dim,
        num_samples=agree_s, learning_rate=learning_rate, block_size=block, patience=2**30,
        max_steps=loop_steps, final_samples=1, method="adam",

    )  # fmt: skip

    score_guide = given_params_guide(family)  # one guide: the estimator compiles once

    def score(lam: np.ndarray) -> np.ndarray:
        return evaluate_bounds(
            model,
            score_guide,
            params,
            x_loop,
            jax.random.key(seed + 6),
            num_samples=agreement_samples,
            batch_size=loop_datapoints,
            guide_args=(lam,),
        ).elbo

    init_elbo = score(np.zeros((loop_datapoints, num_params), np.float32))
    loop_elbo, vec_elbo = score(loop_lam), score(fit.params)
    torch_elbo = None
    if use_torch:
        torch_lam = TorchLoopLocal(
            params, num_samples=agree_s, learning_rate=learning_rate, seed=seed + 9
        ).fit(loop_xs_np, num_params, loop_steps)
        torch_elbo = score(torch_lam).tolist()
    agreement = {
        "num_datapoints": loop_datapoints,
        "steps": loop_steps,
        "num_samples": agree_s,
        "elbo_samples": agreement_samples,
        "init_elbo": init_elbo.tolist(),
        "loop_elbo": loop_elbo.tolist(),
        "fit_local_elbo": vec_elbo.tolist(),
        "mean_init_elbo": float(init_elbo.mean()),
        "mean_loop_elbo": float(loop_elbo.mean()),
        "mean_fit_local_elbo": float(vec_elbo.mean()),
        "max_abs_diff": float(np.abs(loop_elbo - vec_elbo).max()),
        "max_rel_gain_diff": float(
            np.abs(loop_elbo - vec_elbo).max() / np.abs(loop_elbo - init_elbo).mean()
        ),
        "fit_local_steps": fit.steps.tolist(),
        "torch_loop_elbo": torch_elbo,
    }

    end_to_end_out: dict[str, Any] = {}
    if end_to_end:
        batch, samples, steps = configs[0]
        block = min(MONITOR_BLOCK, steps)  # (the chunk's, timed beside)

        def call(fam: DiagonalGaussian | None) -> Callable[[], Any]:
            return lambda: fit_local(
                model, params, x_all[:batch], jax.random.key(seed + 7), family=fam, z_dim=z_dim,
                num_samples=samples, learning_rate=learning_rate, block_size=block,
                patience=2**30, max_steps=steps, final_samples=1, batch_size=batch, method="adam",

            ).elbo  # fmt: skip

        call(family)()  # compiles the chunk for this family instance
        end_to_end_out = {
            "datapoints": batch,
            "num_samples": samples,
            "steps": steps,
            "chunk_seconds": time_call(jobs[("library", configs[0])]),
            "fit_local_seconds_family_given": time_call(call(family)),
            "fit_local_seconds_default_family": time_call(call(None)),
        }

    analysis = step_cost_analysis(model, params, x_all[: configs[0][0]], configs[0][1])
    analytic = configs[0][0] * configs[0][1] * flops_per_dp_sample
    lib_rows = [e for e in configs_out if e["variant"] == "library"]
    values_rows = [by_key[("library_values", e["datapoints"], e["num_samples"])] for e in lib_rows]
    best = max(lib_rows, key=lambda e: e["fraction_of_peak"])
    notes = [
        data_note,
        f"decoder {z_dim}-{hidden}-{x_dim} relu, Bernoulli, random init (NumPyro SVI init); Adam "
        f"lr {learning_rate}; lambda_0 = N(0, I); median of {repeats} rounds after a warm-up "
        "round, variants taking turns (in reverse order every other round)",
        f"FLOPs per datapoint-step = S x {flops_per_dp_sample / 1e6:.3f} M: {FLOP_FORMULA}",
        "XLA cost analysis of one vectorized gradient step "
        f"(B={configs[0][0]}, S={configs[0][1]}): "
        + (
            f"{analysis['flops'] / 1e6:.1f} MFLOP vs {analytic / 1e6:.1f} M analytic"
            if "flops" in analysis
            else "unavailable"
        ),
        "matmul peak by size (GFLOP/s): "
        + ", ".join(f"{n}: {g:.1f}" for n, g in peak["gflops_by_size"].items())
        + f"; {round_n}^3 in each round: {round_peak:.1f}",
        f"loop: {loop_datapoints} datapoints x {loop_steps} steps, one jitted call per step; "
        + ", ".join(
            f"S={s}: {1e6 / loop_rate[s]:.0f} us per step, of which the matmuls would take "
            f"{1e6 * s * flops_per_dp_sample / (round_peak * 1e9):.0f} us at the round's "
            "matmul rate"
            for s in sorted(loop_rate)
        )
        + f"; the same loop calling a jitted no-op: {dispatch_us:.0f} us per call",
        f"best library row: {100 * best['fraction_of_peak']:.0f}% of the up-front peak "
        f"(B={best['datapoints']}, S={best['num_samples']}; target >= 70%); library / loop "
        + ", ".join(
            f"{e['over_loop']:.1f}x (B={e['datapoints']}, S={e['num_samples']})" for e in lib_rows
        )
        + " (target >= 50x)"
        + (
            "; library / PyTorch loop "
            + ", ".join(
                f"{e['over_torch_loop']:.1f}x (B={e['datapoints']}, S={e['num_samples']})"
                for e in lib_rows
                if "over_torch_loop" in e
            )
            if torch_rate
            else "; PyTorch not installed: no PyTorch loop"
        ),
        "library / floor (gradient only) "
        + ", ".join(
            f"{e['over_floor']:.3f} (B={e['datapoints']}, S={e['num_samples']})" for e in lib_rows
        )
        + "; library / the floor that also computes its monitor "
        + ", ".join(f"{e['over_floor_signal']:.3f}" for e in lib_rows)
        + "; the library with per-step values as its signal (monitor_samples=0) / the floor "
        "that also returns every step's values "
        + ", ".join(f"{e['over_floor_signal']:.3f}" for e in values_rows)
        + "; what each signal costs a hand-written loop, floor with monitor / floor "
        + ", ".join(
            f"{by_key[('floor_monitor', e['datapoints'], e['num_samples'])]['over_floor']:.3f}"
            for e in lib_rows
        )
        + ", floor with values / floor "
        + ", ".join(
            f"{by_key[('floor_value', e['datapoints'], e['num_samples'])]['over_floor']:.3f}"
            for e in lib_rows
        ),
        "library / floor (gradient only) round by round, the two timed in the same round: "
        + "; ".join(
            f"B={e['datapoints']}, S={e['num_samples']}: "
            + describe_rounds(e["over_floor_by_round"], RATIO_TARGET)
            for e in lib_rows
        ),
        f"same objective: after {loop_steps} steps (S={agree_s}) from N(0, I) on "
        f"{loop_datapoints} datapoints, mean local ELBO ({agreement_samples} draws) loop "
        f"{agreement['mean_loop_elbo']:.2f}, fit_local {agreement['mean_fit_local_elbo']:.2f}, "
        f"at init {agreement['mean_init_elbo']:.2f}; largest per-datapoint difference "
        f"{agreement['max_abs_diff']:.2f} nats",
    ]
    if end_to_end_out:
        notes.append(
            f"fit_local end to end (B={end_to_end_out['datapoints']}, "
            f"S={end_to_end_out['num_samples']}, {end_to_end_out['steps']} steps, final_samples"
            f"=1): {end_to_end_out['fit_local_seconds_family_given']:.2f} s with a family "
            f"instance passed, {end_to_end_out['fit_local_seconds_default_family']:.2f} s with "
            f"the default family, vs {end_to_end_out['chunk_seconds']:.2f} s for the "
            "compiled chunk alone, timed just before"
        )
    return {
        "sizes": {
            "configs": [list(c) for c in configs],
            "loop_datapoints": loop_datapoints,
            "loop_steps": loop_steps,
            "x_dim": x_dim,
            "hidden": hidden,
            "z_dim": z_dim,
            "learning_rate": learning_rate,
            "repeats": repeats,
        },
        "data": data_note,
        "flops_per_datapoint_sample_step": flops_per_dp_sample,
        "flops_formula": FLOP_FORMULA,
        "xla_cost_analysis_one_step": {
            **analysis,
            "datapoints": configs[0][0],
            "num_samples": configs[0][1],
            "analytic_flops": analytic,
        },
        "matmul": {**peak, "round_size": round_n, "round_gflops": round_peak},
        "loop_dispatch_us_per_call": dispatch_us,
        "results": configs_out,
        "agreement": agreement,
        "end_to_end": end_to_end_out,
        "table": {"columns": list(rows[0]), "rows": rows},
        "notes": notes,
    }
