"""Annealed importance sampling (AIS) with HMC transitions, and bidirectional Monte Carlo (BDMC).

AIS (Neal 2001) estimates log p(x) of one datapoint x by moving samples from a start
distribution q0(z) to the posterior p(z | x) through the intermediate targets

    log f_b(z) = (1 - b) log q0(z) + b log p(x, z),      0 = b_0 < b_1 < ... < b_T = 1,

(unnormalized; f_0 = q0 has Z_0 = 1 and f_1 = p(x, .) has Z_1 = p(x)). q0 is a variational
family's distribution with per-datapoint parameters lambda_i: by default the family's standard
parameters, N(0, I), which is the prior of a VAE (then f_b(z) = p(z) p(x | z)^b), or e.g. an
encoder's q(z | x_i) or a fitted q*. log p(x, z) comes only from `amortjax.traces.log_joint`, the
library's one adapter from a NumPyro model to per-datapoint densities. For a model whose local
latents are constrained or spread over several sites (a `LocalLatents`), z is their flat
unconstrained vector u and log p(x, z) is `log_joint_unconstrained`, which adds the bijection's
log-Jacobian: the chains run in R^D whatever the supports, and p(x) is unchanged.

One chain: z_0 ~ q0, and for t = 1..T

    log w  +=  log f_{b_t}(z_{t-1}) - log f_{b_{t-1}}(z_{t-1})
            =  (b_t - b_{t-1}) (log p(x, z_{t-1}) - log q0(z_{t-1})),
    z_t     ~  K_t(. | z_{t-1}),   an HMC transition that leaves f_{b_t} invariant.

If the kernels K_1..K_T are fixed before the chain starts, E[w] = p(x), so with C independent
chains

    log p̂(x) = logsumexp_c(log w_c) - log C

is the log of an unbiased estimator of p(x): a stochastic lower bound of log p(x)
(E[log p̂(x)] <= log p(x) by Jensen), whose bias vanishes as T grows. Schedules: "linear",
b_t = t / T, and "sigmoid" (Grosse et al. 2015; Wu et al. 2017), b_t = sigma(delta (2t/T - 1))
rescaled so that b_0 = 0 and b_T = 1 (delta = `sigmoid_delta`, 4 by default): small steps at
both ends, where log f_b changes fastest.

HMC transition with a diagonal mass matrix: momentum r ~ N(0, I); L leapfrog steps

    r += (eps s / 2) grad log f_b(z);   L times: z += eps s r,  r += eps s grad log f_b(z)
    (the last momentum step a half step),

with eps a scalar step size and s `[D]` per-dimension scales (`step_scale`). This is plain
leapfrog HMC with unit momenta in the coordinates u = z / s (grad_u = s grad_z), so it leaves f_b
invariant for any fixed s > 0: the proposal (z', r') is accepted with probability
a = min(1, exp(H(z, r) - H(z', r'))), H(z, r) = -log f_b(z) + |r|^2 / 2 (a non-finite H' is a
rejection). s should be the posterior's width per dimension: by default (`step_scale="q0"`) it
is q0's standard deviation per dimension, estimated from 256 draws of q0 per datapoint (any
family, flows included). From q0 = N(0, I) that is ~1 (a unit mass matrix); from a fitted q
(init_params from an encoder or q*) it is the posterior's scale, which matters when the
likelihood is informative: a posterior 1e-3 wide in one direction and 1 in another cannot be
explored with one step size. The state keeps log p and log q0 and their gradients separately,
so a change of b costs no new gradient: each leapfrog step is one forward and one
input-gradient backward pass of the decoder per chain.

Step sizes: a pilot, then frozen. The argument for E[w] = p(x) needs each K_t to be fixed (or
to depend only on randomness independent of the chain); adapting step sizes on the chains that
produce the estimate makes K_t depend on those chains' past, and the estimate is biased upward,
no longer a lower bound (measured: +0.026 +- 0.008 nats above the exact log p(x) on 60 points of
a Gamma/Beta model with a step size adapted per datapoint during the run, +0.0745 when adapted
per chain). So `ais` runs two passes:

1. The pilot: `pilot_chains` chains per datapoint (4 by default), started from q0 with their own
   randomness (the second half of `split(key)`, or `pilot_key`, folded with the datapoint's
   index), anneal through the same temperatures with the same kernels while adapting the
   global step size eps of each datapoint after every transition toward `target_accept`:
   eps <- 1.02 eps if the mean acceptance probability of the datapoint's pilot chains exceeds the
   target, eps <- 0.98 eps otherwise (the rule of Wu et al. 2017, pooled over chains). The step
   size it used at each transition is recorded: a schedule eps_{i,t}, `[N, T]`. With
   `pilot_temperatures` < T the pilot anneals through that many of the temperatures (evenly
   spaced), and the transitions it skipped take step sizes interpolated log-linearly between
   its own; still a function of the pilot's randomness only.
2. The estimate: `num_chains` new chains with their own randomness (the first half of
   `split(key)`, folded with the datapoint's index) use eps_{i,t} at transition t, unchanged.

The kernels of the estimating run are then fixed before it starts: they depend on x_i, q0 and
the pilot's randomness only (the scales s on q0 and, with step_scale="q0", on q0's draws from
the pilot's key), all independent of the estimating chains. Conditional on the pilot, each
estimating chain is an AIS chain with fixed kernels, so E[w_c | pilot] = p(x_i); hence E[w_c] =
p(x_i) and log p̂(x_i) is a stochastic lower bound, whatever the pilot did. The pilot costs
(pilot_chains / num_chains) (pilot_temperatures / T) more decoder evaluations (a quarter with the
defaults). Which pilot gives the better estimate is an empirical matter: on the quick MNIST VAE
from q*, a 1-chain pilot through every 4th temperature aiming at acceptance 0.9 gave log p̂
0.045 +- 0.015 nats higher than the default (`tools/ais_pilot_check.py`); the estimating
run costs what a run with a fixed step size costs (the schedule is one more scan input, the
scales one multiply). `adapt_step_size=False` skips the pilot and uses the given step size at
every transition; a `[N, T]` step_size (e.g. the `step_size` of an earlier run, with its
`step_scale`) is used as is.

Diagnostics per datapoint: the mean acceptance probability over transitions and chains, the
effective sample size of the normalized final weights, ESS = (sum_c w_c)^2 / sum_c w_c^2 in
[1, C], the step-size schedule and scales. A mean acceptance outside [0.2, 0.97] means the
kernels hardly move the chains (or the step sizes are needlessly small): an `AISWarning` is
issued and recorded in `AISResult.warnings`. At an informative likelihood started from the
prior, for example, the pilot cannot shrink the step size fast enough and the estimate misses
log p(x) by orders of magnitude; starting from a fitted q (whose scales then set s) fixes it.

Good acceptance does not make the anneal fine enough. The spread of a datapoint's final
log-weights over its chains, s = sd_c(log w_c), says how far apart the annealed chains and the
posterior still are: were the weights log-normal, one chain's log-weight would sit s^2 / 2 below
log p(x) on average, and the mean over C chains removes only part of that. Where the median of
s over the datapoints exceeds 1 nat (s^2 / 2 = 0.5), an `AISWarning` says the estimate is likely
loose and asks for more temperatures. Measured (16 chains from the exact best diagonal Gaussian,
linear-Gaussian x_dim 60, z_dim 50, noise 1e-3, 20 datapoints, exact log p(x) in float64, two
keys each; acceptance 0.65-0.80 throughout, so no acceptance warning): 200 temperatures, median s
1.65 and 1.80 nats, AIS - exact -0.68 +- 0.21 and -0.55 +- 0.25; 1,000: s 1.07 and 1.20, -0.17 +-
0.10 and -0.22 +- 0.10; 2,000: s 0.84 and 0.93, -0.09 +- 0.06 and -0.04 +- 0.06; 3,000: s 0.79
and 0.74, +0.05 +- 0.06 and +0.06 +- 0.06; 5,000: s 0.55 and 0.60, -0.02 +- 0.03 and -0.02 +-
0.04. Sound runs sit far below the threshold: the quick amortization_gap preset on its MNIST FFG
model (8 chains x 200 from q*), median s 0.27 (1,000 and 3,000 temperatures change its mean
estimate by -0.003 +- 0.010 and -0.012 +- 0.010); the Gamma-Poisson test (16 x 200), 0.36. The
effective sample size tells the same less clearly (median 3.9, 7.2, 9.4, 10.0, 12.1 of 16 chains
in the first key's runs above).

Bidirectional Monte Carlo (Grosse et al. 2015, 2016): on data simulated from the model,
(x_i, z_i) ~ p(x, z) (`amortjax.models.simulate`), z_i is an exact posterior sample of x_i.
Reverse AIS starts every chain at z_i and anneals from b = 1 down to b = 0 with the same
increments and the same kernels (the forward pilot's step sizes, per temperature, in reverse
order); its weights w' estimate Z_0 / Z_1 = 1 / p(x) without bias, so

    upper(x) = -(logsumexp_c(log w'_c) - log C)

is a stochastic upper bound of log p(x). Forward AIS gives the lower bound; the width
upper - lower bounds the error of either estimate on such data (and on real data drawn from a
similar distribution, with the usual caveat). Both bounds are random, and a tight bracket
inverts by chance: with log-weights of variance s^2 (forward and reverse together), the width's
mean is ~s^2 / (2C) and its Monte Carlo error ~s / sqrt(C), so upper < lower is likely wherever
s^2 is small against C, that is wherever the bracket is good. On a linear-Gaussian model (x_dim
8, z_dim 3, 200 datapoints, 16 chains) 70% of the brackets were ordered at T = 20 (mean width
0.39 nats), 57% at T = 500 and 50% at T = 2000 (mean width 0.003 nats, against a spread of
0.075 nats of each bound's error over the datapoints). More temperatures or chains do not order
such brackets. What does indicate a fault (kernels that are not fixed, z that are not exact
posterior draws) is a systematic inversion, a mean width significantly below 0. `BDMCResult`
reports the fraction of ordered brackets and the mean width with its standard error, and warns
when fewer than 90% are ordered and the mean width is more than 3 standard errors below 0, or
when more brackets are inverted by over 2t = 6 nats than correct bounds allow: a bracket can
invert by 2t only if the lower bound overshoots log p(x) by t or the upper one undershoots it by
t, each of probability at most e^-t (Markov's inequality on p-hat and on 1 / p-hat), so at most
a fraction 2 e^-3 = 0.0996 of the datapoints do on average (this check ignores the spread of
the widths, which one wild bound inflates; a NaN bound counts as inverted).

`run_hmc` runs the same kernel at one fixed b, adapting the step size during the run (it is a
sampler, not an estimator): at b = 1 its chains sample the posterior p(z | x_i).

Layout: a batch of B datapoints with C chains each is one flat batch of B * C rows for the
decoder (big matmuls); log p is separable over rows, so the gradient of its sum is each row's
own gradient. The anneal is one `lax.scan` over temperatures, compiled once per batch shape
(the last batch is padded). Every datapoint draws its randomness from its own key,
`fold_in(key, i)` for datapoint i, so the results depend neither on `batch_size` nor on what
else runs, and the same key gives the same numbers, up to float32 rounding: XLA may round a
batch of another shape differently in the last bit, and over a long anneal an accept test
near its threshold can turn that into another path of the chain, an equally valid draw
(measured on the item-response model, 40 students, batch 7 against 64: identical to 6e-7 at
10 and 50 temperatures; at 200, 4 of 640 chains' log-weights differed by more than 0.01 and
log p(x) by up to 0.0056 nats).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from amortjax.checks import check_finite, check_indices, check_key, resolve_settings
from amortjax.engine import map_datapoints
from amortjax.families import Family, resolve_family
from amortjax.inference import hmc
from amortjax.latents import LocalLatents, Site, check_site
from amortjax.traces import check_data

SCHEDULES = ("linear", "sigmoid")
STEP_SIZE_INCREASE = 1.02
STEP_SIZE_DECREASE = 0.98
SCALE_DRAWS = 256  # draws of q0 per datapoint behind step_scale="q0"
ACCEPTANCE_BAND = (0.2, 0.97)  # mean acceptance outside it: an AISWarning
LOG_WEIGHT_SPREAD = 1.0  # median over datapoints of sd_c(log w_c) above it: an AISWarning
MIN_ORDERED_FRACTION = 0.9  # BDMC: fewer ordered brackets than this: an AISWarning
WIDE_INVERSION = 6.0  # BDMC: nats; correct bounds invert by more for < 2 e^-3 of datapoints


class AISWarning(UserWarning):
    """An AIS or BDMC estimate that is probably off (poor acceptance, inverted brackets)."""


class AISResult(NamedTuple):
    """Per-datapoint results of (forward or reverse) AIS.

    Attributes:
        log_px: the estimate of log p(x_i), `[N]`: logsumexp_c(log w_c) - log C for forward AIS
            (a stochastic lower bound); -(logsumexp_c(log w'_c) - log C) for reverse AIS (a
            stochastic upper bound).
        log_weights: the chains' final log-weights, `[N, C]` (for reverse AIS, the log-weights
            of 1 / p(x)).
        acceptance: mean HMC acceptance probability over transitions and chains, `[N]`.
        ess: effective sample size of the normalized final weights, (sum w)^2 / sum w^2, `[N]`.
        step_size: the step size eps_{i,t} each transition used (the same for all chains of a
            datapoint, fixed during the run), `[N, T]`, in the run's order: for forward AIS
            column t - 1 is transition t (at b_t), and an `ais(..., step_size=result.step_size,
            step_scale=result.step_scale)` call reuses the kernels; for reverse AIS column
            s - 1 is its s-th transition, at b_{T-s}.
        step_scale: the per-dimension scales s of the leapfrog step (eps_{i,t} s is the step in
            each dimension), `[N, D]`.
        num_chains: C.
        num_temperatures: T, the number of weight increments and HMC transitions.
        schedule: "linear" or "sigmoid".
        leapfrog_steps: L, the leapfrog steps per HMC transition.
        warnings: the `AISWarning` messages this run issued (empty when none).
    """

    log_px: np.ndarray
    log_weights: np.ndarray
    acceptance: np.ndarray
    ess: np.ndarray
    step_size: np.ndarray
    step_scale: np.ndarray
    num_chains: int
    num_temperatures: int
    schedule: str
    leapfrog_steps: int
    warnings: tuple[str, ...] = ()


class BDMCResult(NamedTuple):
    """Bidirectional Monte Carlo bounds of log p(x_i) on simulated data.

    Attributes:
        lower: forward AIS estimate, a stochastic lower bound, `[N]`.
        upper: reverse AIS estimate, a stochastic upper bound, `[N]`.
        gap: upper - lower, `[N]`.
        forward: the forward run.
        reverse: the reverse run (its `log_px` is `upper`).
        ordered_fraction: the fraction of datapoints whose bracket is ordered, upper >= lower.
            Both bounds are random, so where the bracket is tighter than their Monte Carlo
            error about half the brackets invert: a low ordered fraction alone is no fault (see
            the module docstring); a significantly negative `mean_width` is.
        mean_width: the mean of upper - lower over the datapoints (nats).
        mean_width_se: the standard error of `mean_width` (from the spread of the widths; for
            one datapoint, from the runs' effective sample sizes).
        warnings: the `AISWarning` messages about the bracket (the runs' own are in
            `forward.warnings` and `reverse.warnings`).
    """

    lower: np.ndarray
    upper: np.ndarray
    gap: np.ndarray
    forward: AISResult
    reverse: AISResult
    ordered_fraction: float
    mean_width: float
    mean_width_se: float
    warnings: tuple[str, ...] = ()

    def summary(self) -> dict[str, float]:
        """The bracket's quality as plain floats: `ordered_fraction`, `mean_width`,
        `mean_width_se`, and `mean_lower` and `mean_upper` (means over the datapoints, nats)."""
        return {
            "ordered_fraction": float(self.ordered_fraction),
            "mean_width": float(self.mean_width),
            "mean_width_se": float(self.mean_width_se),
            "mean_lower": float(np.mean(self.lower)),
            "mean_upper": float(np.mean(self.upper)),
        }


class HMCResult(NamedTuple):
    """Final state of HMC chains run at a fixed temperature.

    Attributes:
        z: the chains' final latents, `[N, C, z_dim]`.
        acceptance: mean acceptance probability over transitions and chains, `[N]`.
        step_size: final per-chain step sizes, `[N, C]`.
    """

    z: np.ndarray
    acceptance: np.ndarray
    step_size: np.ndarray


def annealing_schedule(name: str, num_temperatures: int, *, sigmoid_delta: float = 4.0):
    """The inverse temperatures b_0 = 0 < b_1 < ... < b_T = 1.

    Args:
        name: "linear" (b_t = t / T) or "sigmoid" (b_t = sigma(delta (2t/T - 1)), rescaled to
            start at 0 and end at 1).
        num_temperatures: T >= 1.
        sigmoid_delta: delta of the sigmoid schedule (> 0); larger is steeper in the middle.

    Returns:
        `[T + 1]` float64 array.

    Raises:
        ValueError: unknown name, T < 1 or delta <= 0.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {list(SCHEDULES)}")
    if not isinstance(num_temperatures, int | np.integer) or num_temperatures < 1:
        raise ValueError(f"num_temperatures must be an integer >= 1, got {num_temperatures!r}")
    t = np.linspace(0.0, 1.0, num_temperatures + 1)
    if name == "linear":
        return t
    if not sigmoid_delta > 0:
        raise ValueError(f"sigmoid_delta must be > 0, got {sigmoid_delta!r}")
    s = 1.0 / (1.0 + np.exp(-sigmoid_delta * (2.0 * t - 1.0)))
    betas = (s - s[0]) / (s[-1] - s[0])
    betas[0], betas[-1] = 0.0, 1.0
    return betas


def reverse_step_sizes(step_size: np.ndarray) -> np.ndarray:
    """A forward run's step-size schedule `[N, T]` in the order reverse AIS uses it.

    Forward transition t (t = 1..T) targets f_{b_t}; reverse transition s targets f_{b_{T-s}}.
    Kernel for kernel, reverse transition s < T takes forward transition T - s's step size; the
    last one, at b_0 (after the last weight increment, so it does not change the estimate), takes
    forward transition 1's.
    """
    step_size = np.asarray(step_size)
    return np.concatenate([step_size[:, -2::-1], step_size[:, :1]], axis=1)


def _anneal_batch(
    model: Callable,
    family: Family,
    site: Site,
    num_chains: int,
    leapfrog_steps: int,
    target_accept: float,
    mode: str,
    params: dict,
    x: jax.Array,
    lam: jax.Array,
    z0: jax.Array | None,
    betas: jax.Array,
    step_size: jax.Array,
    scale: jax.Array,
    keys: jax.Array,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """Runs C chains per datapoint through the temperatures `betas` for a batch.

    Args:
        model, family, site, num_chains, leapfrog_steps, target_accept: static settings (see
            `ais`).
        mode: static. "schedule": `step_size` is a schedule `[B, T]`, transition t of
            datapoint b using step_size[b, t - 1] in all its chains (the estimating runs).
            "adapt": `step_size` holds the initial step sizes per chain `[B, C]`, and after
            every transition each datapoint's step sizes are multiplied by 1.02 if the mean
            acceptance probability of its chains exceeds target_accept, by 0.98 otherwise (the
            pilot, `run_hmc`). "fixed": per-chain step sizes `[B, C]`, unchanged (`run_hmc`).
        params: model parameters.
        x: observations, `[B, ...]`.
        lam: q0's parameters, `[B, P]`.
        z0: start positions `[B, C, D]`, or None to draw them from q0.
        betas: the inverse temperatures b_0..b_T, `[T + 1]` (increasing for forward AIS,
            decreasing for reverse AIS, constant for plain HMC).
        step_size: `[B, T]` or `[B, C]`, see `mode`.
        scale: the per-dimension scales of the leapfrog step, `[B, D]`.
        keys: the datapoints' PRNG keys, `[B]` (`amortjax.engine`: fold_in(key, i) for
            datapoint i).

    Returns:
        `(log_w [B, C], acceptance [B], final step sizes [B, C], schedule [B, T],
        z [B, C, D])`; the schedule is the step size each transition used (with per-chain
        step sizes, that of each datapoint's first chain).
    """
    batch, chains = x.shape[0], num_chains
    start_keys, run_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
    if z0 is None:
        z0 = jax.vmap(lambda k, lam_i: family.distribution(lam_i).sample(k, (chains,)))(
            start_keys, lam
        )
    dtype = z0.dtype
    z_dim = z0.shape[-1]
    rows = batch * chains
    x_rows = jnp.repeat(x, chains, axis=0)  # [B * C, ...], datapoint-major
    lam_rows = jnp.repeat(lam, chains, axis=0)
    scale_rows = jnp.repeat(scale.astype(dtype), chains, axis=0)  # [B * C, D]

    def evaluate(z):
        return hmc.densities(model, family, site, params, x_rows, lam_rows, z)

    def draw(k, t):
        k_momentum, k_uniform = jax.random.split(jax.random.fold_in(k, t))
        momentum = jax.random.normal(k_momentum, (chains, z_dim), dtype)
        return momentum, jnp.log(jax.random.uniform(k_uniform, (chains,), dtype))

    def step(carry, inputs):
        chain, eps, log_w, accept_sum = carry
        t, beta_prev, beta, eps_t = inputs
        if mode == "schedule":  # one step size per datapoint, fixed before the run
            eps = jnp.repeat(eps_t, chains)
        log_w = log_w + (beta - beta_prev) * (chain.log_p - chain.log_q)
        momentum, log_u = jax.vmap(draw, (0, None))(run_keys, t)
        chain, accept_prob = hmc.step(
            evaluate,
            chain,
            beta,
            eps[:, None] * scale_rows,
            momentum.reshape(rows, z_dim),
            log_u.reshape(rows),
            leapfrog_steps,
        )
        used = None if mode == "schedule" else eps.reshape(batch, chains)[:, 0]
        if mode == "adapt":  # the mean acceptance over the datapoint's chains
            signal = jnp.repeat(accept_prob.reshape(batch, chains).mean(1), chains)
            eps = eps * jnp.where(signal > target_accept, STEP_SIZE_INCREASE, STEP_SIZE_DECREASE)
        return (chain, eps, log_w, accept_sum + accept_prob), used

    betas = betas.astype(dtype)
    num_temperatures = betas.shape[0] - 1
    if mode == "schedule":
        eps0, schedule_t = jnp.zeros(rows, dtype), step_size.astype(dtype).T  # [T, B]
    else:
        eps0, schedule_t = step_size.reshape(rows).astype(dtype), None
    state0 = hmc.init(evaluate, z0.reshape(rows, z_dim))
    init = (state0, eps0, jnp.zeros(rows, dtype), jnp.zeros(rows, dtype))
    (chain, eps, log_w, accept_sum), used = jax.lax.scan(
        step, init, (jnp.arange(num_temperatures), betas[:-1], betas[1:], schedule_t)
    )
    acceptance = (accept_sum / num_temperatures).reshape(batch, chains).mean(1)
    if mode == "schedule":
        final, schedule = jnp.broadcast_to(step_size[:, -1:], (batch, chains)), step_size
    else:
        final, schedule = eps.reshape(batch, chains), used.T
    return (
        log_w.reshape(batch, chains),
        acceptance,
        final,
        schedule,
        chain.z.reshape(batch, chains, z_dim),
    )


_anneal_batch_jit = jax.jit(_anneal_batch, static_argnums=tuple(range(7)))


def _q0_scale_batch(family: Family, lam: jax.Array, keys: jax.Array):
    """q0's standard deviation per dimension from SCALE_DRAWS draws per datapoint, `[B, D]`;
    each datapoint draws with its own key of `keys` `[B]`."""
    draws = jax.vmap(lambda k, lam_i: family.distribution(lam_i).sample(k, (SCALE_DRAWS,)))(
        keys, lam
    )
    return jnp.std(draws, axis=1)


_q0_scale_jit = jax.jit(_q0_scale_batch, static_argnums=0)


# --------------------------------------------------------------------------------------------
# Input checks and the batched drivers.


def _check_settings(
    num_chains: int,
    leapfrog_steps: int,
    target_accept: float,
    batch_size: int,
) -> None:
    for name, value in (
        ("num_chains", num_chains),
        ("leapfrog_steps", leapfrog_steps),
        ("batch_size", batch_size),
    ):
        if not isinstance(value, int | np.integer) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 < target_accept < 1.0:
        raise ValueError(f"target_accept must be in (0, 1), got {target_accept!r}")


def check_ais_settings(where: str, settings: AISSettings) -> None:
    """Refuses AIS settings that `ais` would refuse, before any work, naming `where` (a caller
    that runs other stages first, as `gap_decomposition` runs q* and the bounds)."""
    try:
        _check_settings(settings.num_chains, settings.leapfrog_steps, settings.target_accept, 1)
        annealing_schedule(
            settings.schedule, settings.num_temperatures, sigmoid_delta=settings.sigmoid_delta
        )
        _check_pilot(settings.pilot_chains, settings.pilot_temperatures)
    except ValueError as err:
        raise ValueError(f"{where} (ais_settings): {err}") from None


def _check_x(x) -> jax.Array:
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be [num_datapoints, ...] with num_datapoints > 0, got {x.shape}")
    return x


def _start_params(family: Family, init_params, z_dim: int, n: int) -> jax.Array:
    """q0's parameters `[n, P]` from None (standard), `[P]` (shared) or `[n, P]`."""
    num_params = family.num_params(z_dim)
    if init_params is None:
        return jnp.broadcast_to(family.standard_params(z_dim), (n, num_params))
    lam = jnp.asarray(init_params)
    if lam.shape not in ((num_params,), (n, num_params)):
        raise ValueError(
            f"init_params must be [{num_params}] or [num_datapoints={n}, {num_params}] "
            f"(family {family.name!r}, z_dim={z_dim}); got shape {lam.shape}"
        )
    check_finite("ais", "init_params", lam if lam.ndim == 2 else lam[None])
    return jnp.broadcast_to(lam, (n, num_params))


def _check_positive(values: np.ndarray, name: str, fix: str) -> None:
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ValueError(f"{name} must be positive and finite; {fix}")


def _start_step_size(step_size, n: int, chains: int) -> jax.Array:
    """`run_hmc`'s initial step sizes `[n, chains]` from a float or an array broadcastable to
    it."""
    eps = jnp.asarray(step_size, jnp.float32)
    try:
        eps = jnp.broadcast_to(eps, (n, chains))
    except ValueError:
        raise ValueError(
            f"step_size must be a float or broadcastable to [num_datapoints={n}, "
            f"num_chains={chains}], got shape {eps.shape}"
        ) from None
    _check_positive(np.asarray(eps), "step_size", "e.g. 0.1")
    return eps


def _ais_step_size(step_size, n: int, num_temperatures: int) -> tuple[np.ndarray, bool]:
    """AIS's step_size as `(eps, is_schedule)`: a start (or fixed) step size per datapoint
    `[n]`, or a complete schedule `[n, T]`."""
    eps = np.asarray(step_size, np.float32)
    if eps.ndim == 0 or eps.shape == (n,):
        eps, is_schedule = np.broadcast_to(eps, (n,)), False
    elif eps.ndim == 2 and eps.shape[1] == num_temperatures and eps.shape[0] in (1, n):
        eps, is_schedule = np.broadcast_to(eps, (n, num_temperatures)), True
    else:
        raise ValueError(
            f"step_size must be a float, one per datapoint [num_datapoints={n}] (the pilot's "
            f"start, or the fixed step size with adapt_step_size=False), or a schedule "
            f"[num_datapoints={n}, num_temperatures={num_temperatures}] (e.g. an earlier run's "
            f"step_size with the same num_temperatures); got shape {eps.shape}"
        )
    _check_positive(eps, "step_size", "e.g. 0.1")
    return eps, is_schedule


def _check_step_scale(step_scale, n: int, z_dim: int) -> np.ndarray | None:
    """step_scale as `[n, D]`, or None for "q0" (estimated later)."""
    if isinstance(step_scale, str):
        if step_scale != "q0":
            raise ValueError(
                f"step_scale must be 'q0' (q0's per-dimension standard deviation) or an array "
                f"[z_dim={z_dim}] or [num_datapoints={n}, z_dim={z_dim}]; got {step_scale!r}"
            )
        return None
    scale = np.asarray(step_scale, np.float32)
    if scale.shape not in ((z_dim,), (n, z_dim)):
        raise ValueError(
            f"step_scale must be 'q0' or per-dimension scales [z_dim={z_dim}] or "
            f"[num_datapoints={n}, z_dim={z_dim}] (e.g. the posterior's standard deviations, "
            f"or an earlier run's step_scale); got shape {scale.shape}"
        )
    _check_positive(scale, "step_scale", "e.g. the posterior's standard deviations, or 'q0'")
    return np.broadcast_to(scale, (n, z_dim))


def _check_z(z, n: int, z_dim: int) -> jax.Array:
    """Reverse AIS's start points `[n, z_dim]`."""
    z = jnp.asarray(z, jnp.float32)
    if z.shape != (n, z_dim):
        raise ValueError(
            f"z must be [num_datapoints={n}, z_dim={z_dim}] (the latents that generated x, in "
            f"the site's unconstrained layout; or the dict of latents that simulate returns), "
            f"got shape {z.shape}"
        )
    check_finite("reverse AIS", "z", z)
    return z


def _check_pilot(pilot_chains: int, pilot_temperatures: int | None) -> None:
    if not isinstance(pilot_chains, int | np.integer) or pilot_chains < 1:
        raise ValueError(
            f"pilot_chains must be an integer >= 1 (the chains per datapoint that adapt the "
            f"step sizes before the estimating run; 4 is plenty), got {pilot_chains!r}"
        )
    if pilot_temperatures is not None and (
        not isinstance(pilot_temperatures, int | np.integer) or pilot_temperatures < 1
    ):
        raise ValueError(
            f"pilot_temperatures must be None (the pilot anneals through all num_temperatures) "
            f"or an integer >= 1 (that many of them, evenly spaced), got {pilot_temperatures!r}"
        )


def _run(
    model: Callable,
    params: dict,
    x: jax.Array,
    key: jax.Array,
    *,
    family: Family,
    site: Site,
    lam: jax.Array,
    z0: jax.Array | None,
    betas: np.ndarray,
    num_chains: int,
    leapfrog_steps: int,
    step_size: jax.Array,
    scale: jax.Array,
    target_accept: float,
    mode: str,
    batch_size: int,
    progress: bool | str,
    desc: str,
    indices: jax.Array | None = None,
) -> tuple[np.ndarray, ...]:
    """Runs `_anneal_batch` over the datapoints with `amortjax.engine.map_datapoints` (fixed-size
    chunks, devices, progress, row i's key fold_in(key, indices[i])); returns numpy arrays
    `(log_w [N, C], acceptance [N], final step sizes [N, C], schedule [N, T], z [N, C, D])`."""

    def batch_fn(shared, keys, xb, lam_b, eps_b, scale_b, *z0_b):
        params, betas = shared
        return _anneal_batch_jit(
            model, family, site, num_chains, leapfrog_steps, float(target_accept), mode,
            params, xb, lam_b, z0_b[0] if z0_b else None, betas, eps_b, scale_b, keys,
        )  # fmt: skip

    rows = [x, lam, step_size, scale] + ([] if z0 is None else [z0])
    return map_datapoints(
        batch_fn,
        (params, jnp.asarray(betas, jnp.float32)),
        key,
        rows,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
        indices=indices,
    )


def _q0_scale(
    family: Family, lam: jax.Array, key: jax.Array, batch_size: int, indices: jax.Array | None
) -> np.ndarray:
    """q0's per-dimension standard deviation for every datapoint, `[N, D]` (see
    `_q0_scale_batch`)."""
    scale = map_datapoints(
        lambda _, keys, lam_b: _q0_scale_jit(family, lam_b, keys), None, key, [lam],
        batch_size=batch_size, indices=indices,
    )  # fmt: skip
    _check_positive(
        scale,
        "q0's standard deviation (step_scale='q0')",
        "q0 is degenerate in some dimension: pass step_scale explicitly",
    )
    return scale


def _log_mean_exp(log_w: np.ndarray) -> np.ndarray:
    """log (1/C) sum_c exp(log_w_c) per row, in float64, `[N, C] -> [N]`."""
    log_w = np.asarray(log_w, np.float64)
    top = log_w.max(1, keepdims=True)
    with np.errstate(invalid="ignore"):  # a row of -inf or NaN stays so (and is warned about)
        return top[:, 0] + np.log(np.exp(log_w - top).mean(1))


def _ess(log_w: np.ndarray) -> np.ndarray:
    """(sum w)^2 / sum w^2 per row, `[N, C] -> [N]`."""
    w = np.exp(np.asarray(log_w, np.float64) - np.max(log_w, 1, keepdims=True))
    return w.sum(1) ** 2 / (w**2).sum(1)


def _acceptance_warnings(acceptance: np.ndarray, what: str) -> tuple[str, ...]:
    """An `AISWarning` (issued, and returned as its message) when the mean acceptance of some
    datapoint is outside ACCEPTANCE_BAND."""
    low, high = ACCEPTANCE_BAND
    too_low = ~(acceptance >= low)  # NaN counts as too low
    too_high = acceptance > high
    if not (too_low.any() or too_high.any()):
        return ()
    bad = acceptance[too_low | too_high]
    parts = []
    if too_low.any():
        parts.append(
            f"{int(too_low.sum())} below {low}: the proposals are rejected and the chains "
            f"hardly move, so the estimate can be far off log p(x)"
        )
    if too_high.any():
        parts.append(
            f"{int(too_high.sum())} above {high}: the steps are needlessly small (the pilot "
            f"could not grow them within the run; start it at a larger step_size)"
        )
    message = (
        f"{what}: the mean HMC acceptance of {int((too_low | too_high).sum())} of "
        f"{acceptance.size} datapoints is outside [{low}, {high}] (from {np.nanmin(bad):.3g} "
        f"to {np.nanmax(bad):.3g}); {'; '.join(parts)}. Fixes: more temperatures "
        f"(num_temperatures); a start q0 closer to the posterior (init_params from a fitted q, "
        f"e.g. the encoder's output or q*, whose spread then sets the step per dimension with "
        f"step_scale='q0'); or step_scale set to the posterior's per-dimension scales."
    )
    return _issue(message)


def log_weight_spread(log_w: np.ndarray) -> np.ndarray:
    """sd_c(log w_c) per datapoint, the chains' log-weight spread (module docstring): `[N, C]`
    -> `[N]` (NaN for one chain)."""
    log_w = np.asarray(log_w, np.float64)
    if log_w.ndim != 2:
        raise ValueError(
            f"log_weight_spread takes the chains' log-weights [N, C] (an AISResult's "
            f"log_weights), got shape {log_w.shape}"
        )
    if log_w.shape[1] < 2:
        return np.full(log_w.shape[0], np.nan)
    return np.std(log_w, axis=1, ddof=1)


def _issue(message: str) -> tuple[str, ...]:
    """Issues an `AISWarning` at the caller of `ais`/`reverse_ais`/`bdmc`; returns the message."""
    warnings.warn(message, AISWarning, stacklevel=4)
    return (message,)


def _spread_warnings(log_w: np.ndarray, what: str, bound: str) -> tuple[str, ...]:
    """An `AISWarning` (issued, and returned as its message) when the median over datapoints of
    the chains' log-weight standard deviation exceeds LOG_WEIGHT_SPREAD (module docstring)."""
    num_chains = log_w.shape[1]
    spread = log_weight_spread(log_w)
    median = float(np.median(spread))
    if not median > LOG_WEIGHT_SPREAD:  # NaN (one chain, or NaN weights): no spread to judge
        return ()
    message = (
        f"{what}: the chains' final log-weights spread by a median of {median:.3g} nats "
        f"(standard deviation over the {num_chains} chains of each datapoint; above "
        f"{LOG_WEIGHT_SPREAD} for {int(np.sum(spread > LOG_WEIGHT_SPREAD))} of {spread.size} "
        f"datapoints): the anneal is too coarse for these posteriors and the estimate is "
        f"likely {bound} by a good part of s^2/2 = {median**2 / 2:.3g} nats (what one chain "
        f"misses if the weights are log-normal; averaging the chains removes only part of it). "
        f"Fixes: more temperatures (num_temperatures), more leapfrog steps, or a start q0 closer "
        f"to the posterior (init_params from q*); num_chains lowers the estimate's noise more "
        f"than its bias."
    )
    return _issue(message)


def _width_se(forward: AISResult, reverse: AISResult) -> float:
    """The standard error of the mean width over the datapoints: from the spread of the widths
    (N >= 2), or for one datapoint from the Monte Carlo error of each bound, var(log p-hat) ~
    var(w) / (C E[w]^2) = 1 / ESS - 1 / C (delta method)."""
    width = reverse.log_px - forward.log_px
    if width.size >= 2:
        return float(np.std(width, ddof=1) / np.sqrt(width.size))
    var = sum(np.maximum(1.0 / run.ess - 1.0 / run.num_chains, 0.0) for run in (forward, reverse))
    return float(np.sqrt(var[0]))


def _bracket_warnings(
    width: np.ndarray, ordered_fraction: float, width_se: float
) -> tuple[str, ...]:
    """An `AISWarning` when the brackets invert more than chance allows (module docstring):
    fewer than MIN_ORDERED_FRACTION ordered and the mean width more than 3 standard errors below
    0, or more of them inverted by over WIDE_INVERSION nats (a NaN width counts) than the
    Markov bound's 2 exp(-WIDE_INVERSION / 2) per datapoint allows, by 3 binomial standard
    errors."""
    n = width.size
    mean = float(np.mean(width))
    wide = int(np.sum(~(width >= -WIDE_INVERSION)))
    p_wide = 2.0 * np.exp(-WIDE_INVERSION / 2)
    too_wide = wide > n * p_wide + 3.0 * np.sqrt(n * p_wide * (1 - p_wide)) + 1
    shifted = ordered_fraction < MIN_ORDERED_FRACTION and mean < -3.0 * width_se
    if not (too_wide or shifted):
        return ()
    message = (
        f"BDMC: the brackets are inverted (upper < lower) for {int(np.sum(~(width >= 0)))} of "
        f"{n} datapoints (ordered fraction {ordered_fraction:.2f}), and not by chance: "
        + (
            f"the mean width is {mean:.4g} nats, {-mean / max(width_se, 1e-30):.1f} standard "
            f"errors ({width_se:.2g}) below 0"
            if shifted
            else f"{wide} are inverted by more than {WIDE_INVERSION:g} nats or not finite, where "
            f"correct bounds do so for at most {p_wide:.3f} of them on average"
        )
        + ". A bound is off: check that z are exact posterior draws of this model with these "
        "parameters (data simulated with amortjax.models.simulate and the same params), given "
        "as simulate's dict of latents or in the site's unconstrained layout (log rate for a "
        "positive rate); then use more temperatures and chains (num_temperatures, num_chains)."
    )
    return _issue(message)


def _start_latents(z: Any, site: Site) -> Any:
    """Reverse AIS's start points as the flat unconstrained vector u `[N, z_dim]`: an array as
    given, or the dict of the local latents' values that `simulate` returns, mapped through
    the site's layout (e.g. rate -> log rate)."""
    if not isinstance(z, dict):
        return z
    names = site.names if isinstance(site, LocalLatents) else (site,)
    missing = [name for name in names if name not in z]
    if missing:
        raise ValueError(
            f"z is a dict of latents without the local latent site(s) {missing} (it has "
            f"{sorted(z)}); pass the latents that `simulate` returned for this model, or the "
            f"unconstrained vector u [N, z_dim] itself"
        )
    if isinstance(site, LocalLatents):
        return site.flatten({name: jnp.asarray(z[name]) for name in names})
    return z[site]


def _nonfinite_warnings(log_px: np.ndarray, what: str) -> tuple[str, ...]:
    """An `AISWarning` when some datapoint's estimate is not finite."""
    bad = int(np.sum(~np.isfinite(log_px)))
    if not bad:
        return ()
    message = (
        f"{what}: the estimate of {bad} of {log_px.size} datapoints is not finite (a log "
        f"density that is -inf or NaN along the chains). "
        + (
            "Reverse AIS starts at z: they must lie in the support, in the site's unconstrained "
            "layout (pass simulate's dict of latents to have them mapped)."
            if what.startswith("reverse")
            else "Check the model's log density at the start q0 (init_params) and the data."
        )
    )
    return _issue(message)


def _prepare(
    model, params, x, z_dim, family, init_params, site, num_chains, leapfrog_steps,
    target_accept, batch_size,
):  # fmt: skip
    """Checks the common inputs; returns `(x, family, lam [N, P], z_dim)`."""
    _check_settings(num_chains, leapfrog_steps, target_accept, batch_size)
    x = check_data(model, params, x)
    z_dim = check_site(model, params, x, site, "ais", z_dim)
    family = resolve_family("ais", family)
    lam = _start_params(family, init_params, z_dim, x.shape[0])
    return x, family, lam, z_dim


def _kernels(
    model: Callable,
    params: dict,
    x: jax.Array,
    key: jax.Array,
    settings: AISSettings,
    *,
    family: Family,
    site: Site,
    lam: jax.Array,
    z_dim: int,
    betas: np.ndarray,
    batch_size: int,
    progress: bool | str,
    indices: jax.Array | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The estimating run's kernels, fixed before it starts: `(step sizes [N, T], scales
    [N, D])` for the forward temperatures `betas`; the pilot (and q0's draws for the scales)
    use `key` only.

    The pilot runs `pilot_chains` chains through `pilot_temperatures` of the temperatures
    (evenly spaced indices into `betas`, the last one b_T), with as many chains per compiled
    call as the estimating run (so more datapoints per call). Its step size at each of its
    transitions is assigned to the transition that targets the same b; the transitions in
    between take the log-linear interpolation of their neighbours' (those before its first
    target take its first step size)."""
    n, num_temperatures = x.shape[0], len(betas) - 1
    _check_pilot(settings.pilot_chains, settings.pilot_temperatures)
    eps, is_schedule = _ais_step_size(settings.step_size, n, num_temperatures)
    scale = _check_step_scale(settings.step_scale, n, z_dim)
    pilot_key, scale_key = jax.random.split(key)
    if scale is None:
        scale = _q0_scale(family, lam, scale_key, batch_size, indices)
    if is_schedule:
        return np.array(eps), scale
    if not settings.adapt_step_size:
        return np.array(np.broadcast_to(eps[:, None], (n, num_temperatures))), scale
    chains = min(settings.pilot_chains, settings.num_chains)
    pilot_temperatures = min(settings.pilot_temperatures or num_temperatures, num_temperatures)
    index = np.unique(np.round(np.linspace(0, num_temperatures, pilot_temperatures + 1)))
    index = index.astype(int)
    _, _, _, schedule, _ = _run(
        model,
        params,
        x,
        pilot_key,
        family=family,
        site=site,
        lam=lam,
        z0=None,
        betas=betas[index],
        num_chains=chains,
        leapfrog_steps=settings.leapfrog_steps,
        step_size=np.broadcast_to(eps[:, None], (n, chains)),
        scale=scale,
        target_accept=settings.target_accept,
        mode="adapt",
        batch_size=min(n, batch_size * max(1, settings.num_chains // chains)),
        progress=f"{progress} (pilot)" if isinstance(progress, str) else progress,
        desc=f"AIS pilot T={len(index) - 1}",
        indices=indices,
    )
    if len(index) - 1 == num_temperatures:
        return schedule, scale
    # Transition t (1..T) targets b_t, the pilot's transition j targeted b_{index[j + 1]}: t sits
    # at the fractional pilot transition f (clamped to the first one), the same for every row.
    log_eps = np.log(np.asarray(schedule, np.float64))
    f = np.interp(np.arange(1, num_temperatures + 1), index[1:], np.arange(len(index) - 1))
    lo = np.floor(f).astype(int)
    hi, w = np.minimum(lo + 1, len(index) - 2), f - lo
    full = log_eps[:, lo] * (1.0 - w) + log_eps[:, hi] * w
    return np.exp(full).astype(np.float32), scale


def _anneal(
    model: Callable,
    params: dict,
    x,
    z,
    key: jax.Array,
    settings: AISSettings,
    *,
    z_dim: int | None,
    family: Family | None,
    init_params,
    site: Site,
    pilot_key: jax.Array | None,
    batch_size: int,
    progress: bool | str,
    indices: jax.Array | None,
) -> AISResult:
    """`ais` (z None: chains start from q0 and anneal b = 0 -> 1) or `reverse_ais` (chains start
    at the exact posterior samples z and anneal b = 1 -> 0 with the forward kernels in reverse
    order); both fix their kernels with `_kernels` before the estimating run."""
    num_chains, num_temperatures = settings.num_chains, settings.num_temperatures
    schedule, leapfrog_steps = settings.schedule, settings.leapfrog_steps
    betas = annealing_schedule(schedule, num_temperatures, sigmoid_delta=settings.sigmoid_delta)
    x, family, lam, z_dim = _prepare(
        model, params, x, z_dim, family, init_params, site, num_chains, leapfrog_steps,
        settings.target_accept, batch_size,
    )  # fmt: skip
    reverse = z is not None
    where = "reverse_ais" if reverse else "ais"
    indices = check_indices(where, indices, x.shape[0])
    if pilot_key is not None:
        pilot_key = check_key(f"{where} (pilot_key)", pilot_key)
    if reverse:
        z = _check_z(_start_latents(z, site), x.shape[0], z_dim)
    run_key, kernel_key = jax.random.split(key)
    eps, scale = _kernels(
        model,
        params,
        x,
        kernel_key if pilot_key is None else pilot_key,
        settings,
        family=family,
        site=site,
        lam=lam,
        z_dim=z_dim,
        betas=betas,
        batch_size=batch_size,
        progress=progress,
        indices=indices,
    )
    what = "reverse AIS" if reverse else "AIS"
    log_w, acceptance, _, eps, _ = _run(
        model,
        params,
        x,
        run_key,
        family=family,
        site=site,
        lam=lam,
        z0=jnp.broadcast_to(z[:, None, :], (x.shape[0], num_chains, z_dim)) if reverse else None,
        betas=betas[::-1].copy() if reverse else betas,
        num_chains=num_chains,
        leapfrog_steps=leapfrog_steps,
        step_size=reverse_step_sizes(eps) if reverse else eps,
        scale=scale,
        target_accept=settings.target_accept,
        mode="schedule",
        batch_size=batch_size,
        progress=progress,
        desc=f"{what} T={num_temperatures}",
        indices=indices,
    )
    log_mean_w = _log_mean_exp(log_w)
    return AISResult(
        log_px=-log_mean_w if reverse else log_mean_w,
        log_weights=log_w,
        acceptance=acceptance,
        ess=_ess(log_w),
        step_size=eps,
        step_scale=np.asarray(scale),
        num_chains=num_chains,
        num_temperatures=num_temperatures,
        schedule=schedule,
        leapfrog_steps=leapfrog_steps,
        warnings=_nonfinite_warnings(log_mean_w, what)
        + _acceptance_warnings(acceptance, what)
        + _spread_warnings(log_w, what, "high" if reverse else "low"),
    )


# --------------------------------------------------------------------------------------------
# Public API.


class AISSettings(NamedTuple):
    """AIS's settings, shared by `ais`, `reverse_ais` and `bdmc` (`ais(..., settings)`); each of
    them also takes any field as a keyword.

    Attributes:
        num_chains: C, independent chains per datapoint in the estimating run.
        num_temperatures: T >= 1, the weight increments (and HMC transitions) per chain.
        schedule: "sigmoid" or "linear" (see `annealing_schedule`).
        sigmoid_delta: steepness of the sigmoid schedule.
        leapfrog_steps: L, leapfrog steps per HMC transition.
        step_size: the global step size eps: a float or one per datapoint `[N]`, the pilot's
            start (or, with `adapt_step_size=False`, the step size of every transition); or a
            complete schedule `[N, T]` (e.g. an earlier run's `step_size`, with its
            `step_scale`), used as is without a pilot.
        step_scale: the per-dimension scales s of the leapfrog step (a diagonal mass matrix
            diag(s)^-2): "q0" (q0's standard deviation per dimension, estimated from 256 draws
            of q0 per datapoint), `[D]` or `[N, D]`, positive.
        target_accept: the acceptance probability that the pilot's adaptation aims at.
        adapt_step_size: run the pilot (True) or use `step_size` as given (False).
        pilot_chains: chains per datapoint in the pilot (at most num_chains are used).
        pilot_temperatures: how many of the temperatures the pilot anneals through (evenly
            spaced, ending at b = 1); None: all of them. The step sizes of the transitions it
            skips are interpolated log-linearly between those of its neighbours. The pilot
            costs pilot_chains * pilot_temperatures / (num_chains * num_temperatures) of the
            estimating run.
    """

    num_chains: int = 16
    num_temperatures: int = 500
    schedule: str = "sigmoid"
    sigmoid_delta: float = 4.0
    leapfrog_steps: int = 10
    step_size: float | np.ndarray | jax.Array = 0.1
    step_scale: str | np.ndarray | jax.Array = "q0"
    target_accept: float = 0.65
    adapt_step_size: bool = True
    pilot_chains: int = 4
    pilot_temperatures: int | None = None


def ais(
    model: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    key: jax.Array,
    settings: AISSettings | None = None,
    *,
    z_dim: int | None = None,
    family: Family | None = None,
    init_params: np.ndarray | jax.Array | None = None,
    site: Site = "z",
    pilot_key: jax.Array | None = None,
    batch_size: int = 100,
    progress: bool | str = False,
    indices: np.ndarray | jax.Array | None = None,
    **overrides: Any,
) -> AISResult:
    """Forward AIS estimates of log p(x_i) (stochastic lower bounds) for every datapoint.

    A pilot pass on separate chains sets the step size of every transition; the estimating
    run uses those step sizes unchanged (see the module docstring for why this keeps
    E[p̂(x)] = p(x)).

    Args:
        model: NumPyro model `model(x)` whose latent `site` is `[batch, z_dim]` inside the data
            plate (see `amortjax.traces`).
        params: model parameters (e.g. a trained decoder).
        x: observations, `[N, ...]`.
        key: PRNG key. `split(key)` gives the estimating run's key and the pilot's (unless
            `pilot_key` is given); row i folds in `indices[i]`.
        z_dim: latent size; read from the model when None (checked against it when given).
        family: the family of q0 (diagonal Gaussian by default).
        init_params: q0's parameters: None for `family.standard_params(z_dim)` (N(0, I), the
            VAE prior), `[P]` shared by all datapoints, or `[N, P]` per datapoint (e.g. an
            encoder's output, `amortjax.guides.encode`, or q*'s parameters). A q0 close to the
            posterior needs far fewer temperatures, and sets the step scales (`step_scale`).
        site: the model's local latents (a site name or a `LocalLatents`).
        settings: the AIS settings (`AISSettings`; None: its defaults).
        pilot_key: the pilot's PRNG key (and that of q0's draws for step_scale="q0"); None
            derives it from `key`. With the same pilot_key, runs with different keys use the
            same kernels.
        batch_size: datapoints per compiled call (B * C chains run at once).
        progress: show a progress bar over batches (a string gives its description).
        indices: each row's index in its dataset, `[N]` distinct integers (None: its position
            in x): `x[idx]` with `indices=idx` gives the whole dataset's rows.
        **overrides: fields of `AISSettings` replacing those of `settings` (e.g.
            `num_chains=8`).

    Returns:
        `AISResult` with `[N]`, `[N, C]`, `[N, T]` and `[N, D]` numpy arrays. An `AISWarning` is
        issued (and recorded in its `warnings`) when some datapoint's mean acceptance is
        outside [0.2, 0.97], and when the chains' log-weights spread by more than 1 nat
        (median over datapoints; see the module docstring).

    Raises:
        ValueError: naming the invalid input (unknown schedule, T < 1, shapes of x, init_params,
            step_size or step_scale, unknown site, z_dim mismatch, settings out of range).
    """
    key = check_key("ais", key)
    settings = resolve_settings("ais", AISSettings, settings, overrides)
    return _anneal(
        model, params, x, None, key, settings, z_dim=z_dim, family=family,
        init_params=init_params, site=site, pilot_key=pilot_key, batch_size=batch_size,
        progress=progress, indices=indices,
    )  # fmt: skip


def reverse_ais(
    model: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    z: np.ndarray | jax.Array | dict[str, jax.Array],
    key: jax.Array,
    settings: AISSettings | None = None,
    *,
    z_dim: int | None = None,
    family: Family | None = None,
    init_params: np.ndarray | jax.Array | None = None,
    site: Site = "z",
    pilot_key: jax.Array | None = None,
    batch_size: int = 100,
    progress: bool | str = False,
    indices: np.ndarray | jax.Array | None = None,
    **overrides: Any,
) -> AISResult:
    """Reverse AIS from exact posterior samples: stochastic upper bounds of log p(x_i).

    Every chain of datapoint i starts at z_i, which must be an exact draw from p(z | x_i) (e.g.
    the latent that generated x_i, see `amortjax.models.simulate`), and anneals from b = 1 to
    b = 0 through the reversed schedule, accumulating log w' += (b_{t-1} - b_t)
    (log p(x, z) - log q0(z)) before each transition. E[w'] = 1 / p(x). From any other start
    the result is no bound.

    The kernels are the forward run's, fixed before the run: the step sizes come from a
    forward pilot from q0 (exactly as in `ais`, with the same key derivation), or from a given
    forward schedule `[N, T]` (e.g. `ais(...).step_size`, as `bdmc` does), and are used per
    temperature in reverse order (`reverse_step_sizes`). Nothing adapts on the reverse chains.

    Args:
        model, params, x, key: as in `ais`.
        z: the exact posterior samples: the dict of local latents that `simulate` returns
            (mapped through the site's layout, e.g. rate -> log rate), or the flat
            unconstrained vector u `[N, z_dim]` itself (`LocalLatents.flatten`; for a plain
            real site "z", z itself). Constrained values passed as u give bounds that are
            no bounds (a warning names non-finite ones).
        settings, z_dim, family, init_params, site, pilot_key, batch_size, progress,
            indices, **overrides: as in `ais`; a `[N, T]` step_size is a forward schedule.

    Returns:
        `AISResult` whose `log_px` is the upper bound -(logsumexp_c(log w'_c) - log C), whose
        `log_weights` are the reverse log-weights log w'_c (estimating -log p(x)), and whose
        `step_size` is the schedule in the reverse run's order.

    Raises:
        ValueError: as `ais`, and for z of the wrong shape.
    """
    key = check_key("reverse_ais", key)
    settings = resolve_settings("reverse_ais", AISSettings, settings, overrides)
    return _anneal(
        model, params, x, z, key, settings, z_dim=z_dim, family=family,
        init_params=init_params, site=site, pilot_key=pilot_key, batch_size=batch_size,
        progress=progress, indices=indices,
    )  # fmt: skip


def bdmc(
    model: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    z: np.ndarray | jax.Array | dict[str, jax.Array],
    key: jax.Array,
    settings: AISSettings | None = None,
    **options: Any,
) -> BDMCResult:
    """Bidirectional Monte Carlo (Grosse et al. 2015): a stochastic bracket of log p(x_i).

    For data simulated from the model, (x_i, z_i) ~ p(x, z) (`amortjax.models.simulate`):
    forward AIS gives a stochastic lower bound and reverse AIS started at z_i a stochastic upper
    bound; the width bounds the error of the forward estimate on such data. The pilot runs
    once, in the forward run; the reverse run uses the same kernels (its step sizes and
    scales) in reverse temperature order.

    Args:
        model, params, x, key: as in `ais`; the forward run uses `split(key)[0]` (so it is
            `ais` with that key), the reverse run `split(key)[1]`.
        z: the latents that generated x: `simulate`'s dict of latents, or the unconstrained
            vector u `[N, z_dim]` (as in `reverse_ais`).
        settings: the AIS settings (`AISSettings`) of both directions.
        **options: any other keyword argument of `ais` (z_dim, family, init_params, site,
            pilot_key, batch_size, progress, indices) or field of `AISSettings`, used by both.

    Returns:
        `BDMCResult` with `[N]` arrays lower, upper and gap, both runs, the fraction of
        ordered brackets and the mean width with its standard error. An `AISWarning` is issued
        (and recorded in its `warnings`) when fewer than 90% of the brackets are ordered and
        the mean width is more than 3 standard errors below 0, or when more brackets invert by
        over 6 nats (or are not finite) than correct bounds can (an inversion that Monte Carlo
        error does not explain; see the module docstring).
    """
    key = check_key("bdmc", key)
    x = _check_x(x)  # z first: it is checked before the forward run
    z = _start_latents(z, options.get("site", "z"))
    _check_z(
        z,
        x.shape[0],
        check_site(model, params, x, options.get("site", "z"), "bdmc", options.get("z_dim")),
    )
    key_forward, key_reverse = jax.random.split(key)
    forward = ais(model, params, x, key_forward, settings, **options)
    kernels = {"step_size": forward.step_size, "step_scale": forward.step_scale}
    reverse = reverse_ais(model, params, x, z, key_reverse, settings, **{**options, **kernels})
    width = reverse.log_px - forward.log_px
    ordered_fraction, width_se = float(np.mean(width >= 0)), _width_se(forward, reverse)
    return BDMCResult(
        lower=forward.log_px,
        upper=reverse.log_px,
        gap=width,
        forward=forward,
        reverse=reverse,
        ordered_fraction=ordered_fraction,
        mean_width=float(np.mean(width)),
        mean_width_se=width_se,
        warnings=_bracket_warnings(width, ordered_fraction, width_se),
    )


def run_hmc(
    model: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    z: np.ndarray | jax.Array,
    key: jax.Array,
    *,
    num_steps: int,
    beta: float = 1.0,
    z_dim: int | None = None,
    family: Family | None = None,
    init_params: np.ndarray | jax.Array | None = None,
    site: Site = "z",
    leapfrog_steps: int = 10,
    step_size: float | np.ndarray | jax.Array = 0.1,
    step_scale: str | np.ndarray | jax.Array | None = None,
    target_accept: float = 0.65,
    adapt_step_size: bool = True,
    batch_size: int = 100,
    progress: bool | str = False,
    indices: np.ndarray | jax.Array | None = None,
) -> HMCResult:
    """The AIS transition kernel at one fixed temperature: HMC chains targeting f_b.

    With beta = 1 (the default) the chains target the posterior p(z | x_i) and q0 plays no
    part; with beta < 1 they target f_b (q0 from family and init_params, as in `ais`). Unlike
    `ais`, the step sizes adapt during the run (after every transition, x1.02 when the mean
    acceptance probability of the datapoint's chains exceeds target_accept, x0.98 otherwise):
    this is a sampler, and a kernel that adapts to the chains' past is only approximately
    invariant; pass `adapt_step_size=False` (e.g. with an adapted run's step sizes) for an
    exactly invariant kernel.

    Args:
        model, params, x, key: as in `ais`.
        z: start positions, `[N, C, z_dim]` (C chains per datapoint).
        num_steps: HMC transitions per chain (>= 1).
        beta: the inverse temperature b in [0, 1].
        step_size: initial step size: a float or per chain `[N, C]` (e.g. an earlier run's).
        step_scale: per-dimension scales of the leapfrog step: None (1 in every dimension),
            "q0", `[D]` or `[N, D]` (see `ais`).
        z_dim, family, init_params, site, leapfrog_steps, target_accept, batch_size,
            progress, indices: as in `ais`.
        adapt_step_size: adapt the step sizes during the run.

    Returns:
        `HMCResult`: final positions `[N, C, z_dim]`, mean acceptance `[N]`, final step sizes
        `[N, C]`.
    """
    if not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"num_steps must be an integer >= 1, got {num_steps!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta!r}")
    z = jnp.asarray(z, jnp.float32)
    if z.ndim != 3:
        raise ValueError(f"z must be [num_datapoints, num_chains, z_dim], got shape {z.shape}")
    num_chains = z.shape[1]
    x, family, lam, z_dim = _prepare(
        model, params, x, z_dim, family, init_params, site, num_chains, leapfrog_steps,
        target_accept, batch_size,
    )  # fmt: skip
    n = x.shape[0]
    if z.shape != (n, num_chains, z_dim):
        raise ValueError(
            f"z must be [num_datapoints={n}, num_chains, z_dim={z_dim}], got shape {z.shape}"
        )
    eps = _start_step_size(step_size, n, num_chains)
    indices = check_indices("run_hmc", indices, n)
    key_run, key_scale = jax.random.split(key)
    if step_scale is None:
        scale = np.ones((n, z_dim), np.float32)
    else:
        scale = _check_step_scale(step_scale, n, z_dim)
        if scale is None:
            scale = _q0_scale(family, lam, key_scale, batch_size, indices)
    _, acceptance, eps, _, z_final = _run(
        model,
        params,
        x,
        key_run,
        family=family,
        site=site,
        lam=lam,
        z0=z,
        betas=np.full(num_steps + 1, float(beta)),
        num_chains=num_chains,
        leapfrog_steps=leapfrog_steps,
        step_size=eps,
        scale=scale,
        target_accept=target_accept,
        mode="adapt" if adapt_step_size else "fixed",
        batch_size=batch_size,
        progress=progress,
        desc=f"HMC b={beta}",
        indices=indices,
    )
    return HMCResult(z=z_final, acceptance=acceptance, step_size=eps)
