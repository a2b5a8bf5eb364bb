"""Hamiltonian Monte Carlo on a tempered path between q0(z) and p(x, z), M chains at once.

The target at inverse temperature b is

    f_b(z) = q0(z)^(1 - b) p(x, z)^b,    log f_b = (1 - b) log q0 + b log p,

for each row m of a flat batch of M = datapoints * chains independent chains (b = 1 is the
posterior; AIS moves b from 0 to 1, reverse AIS from 1 to 0, and plain HMC keeps it fixed).
`init(evaluate, z)` makes the state `HMCState` (position, both log-densities and their
gradients), and `step(evaluate, state, b, ...)` is one transition leaving f_b invariant:
fresh momenta, L leapfrog steps with a per-chain, per-dimension step (a diagonal mass matrix),
and a Metropolis test. `evaluate` maps positions `[M, D]` to an `HMCState`; `densities` builds
it from a NumPyro model (its local latents in unconstrained space, `amortjax.latents`) and q0's
family. `amortjax.evaluation.ais` builds AIS, reverse AIS, BDMC and plain HMC on this pair.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from amortjax.families import Family
from amortjax.latents import Site, log_joint_unconstrained


class HMCState(NamedTuple):
    """The state of M independent HMC chains (rows): the position with the log-densities of
    both ends of the annealing path, log p(x, z) and log q0(z), and their gradients in z (so a
    transition at any temperature b reuses them, and the weight increment of AIS is one
    subtraction)."""

    z: jax.Array  # [M, D]
    log_p: jax.Array  # [M] log p(x, z)
    log_q: jax.Array  # [M] log q0(z)
    grad_p: jax.Array  # [M, D]
    grad_q: jax.Array  # [M, D]


def densities(
    model: Callable,
    family: Family,
    site: Site,
    params: dict,
    x: jax.Array,
    lam: jax.Array,
    z: jax.Array,
) -> HMCState:
    """The state at positions z: log p(x_m, z_m), log q0(z_m; lambda_m) and their gradients in
    z_m for every row m (partially applied over all but z, it is the `evaluate` of `init` and
    `step`).

    Args:
        model: NumPyro model (latent `site` is `[M, D]`).
        family: the family of q0.
        site: the model's local latents (a site name or a `LocalLatents`).
        params: model parameters.
        x: observations, one row per chain, `[M, ...]`.
        lam: q0's parameters, one row per chain, `[M, P]`.
        z: positions, `[M, D]`.

    Returns:
        `HMCState` at z.
    """

    def log_p(z):
        values = log_joint_unconstrained(model, params, x, z, site)
        return values.sum(), values  # rows are independent: d(sum)/dz_m = d(row m)/dz_m

    def log_q(z):
        values = family.distribution(lam).log_prob(z)
        return values.sum(), values

    (_, lp), grad_p = jax.value_and_grad(log_p, has_aux=True)(z)
    (_, lq), grad_q = jax.value_and_grad(log_q, has_aux=True)(z)
    return HMCState(z, lp, lq, grad_p, grad_q)


def log_f(chain: HMCState, beta: jax.Array) -> jax.Array:
    """log f_b = (1 - b) log q0 + b log p, `[M]`."""
    return (1.0 - beta) * chain.log_q + beta * chain.log_p


def gradlog_f(chain: HMCState, beta: jax.Array) -> jax.Array:
    """d log f_b / dz, `[M, D]`."""
    return (1.0 - beta) * chain.grad_q + beta * chain.grad_p


def init(evaluate: Callable[[jax.Array], HMCState], z: jax.Array) -> HMCState:
    """The state of chains started at positions z `[M, D]`: `evaluate(z)` (e.g. `densities`
    with everything but z given)."""
    return evaluate(z)


def step(
    evaluate: Callable[[jax.Array], HMCState],
    chain: HMCState,
    beta: jax.Array,
    step: jax.Array,
    momentum: jax.Array,
    log_uniform: jax.Array,
    leapfrog_steps: int,
) -> tuple[HMCState, jax.Array]:
    """One HMC transition leaving f_b invariant, for M independent chains (rows).

    Leapfrog in u = z / s with unit momenta, written in z: z += eps s r, r += eps s grad_z.
    Every operation is per row except `evaluate`, which must be separable over rows.

    Args:
        evaluate: positions `[M, D]` -> `HMCState` (log p, log q0 and their gradients).
        chain: current state.
        beta: inverse temperature b, a scalar.
        step: the leapfrog step per chain and dimension, eps_m s_{m,d}, `[M, D]`.
        momentum: the fresh momenta r ~ N(0, I), `[M, D]`.
        log_uniform: log u, u ~ U(0, 1), for the Metropolis test, `[M]`.
        leapfrog_steps: L >= 1.

    Returns:
        `(chain, accept_prob)`: the new state and each chain's acceptance probability `[M]`.
    """
    r = momentum + 0.5 * step * gradlog_f(chain, beta)

    def leapfrog(carry, _):
        # Only the gradients leave the step: the log-densities of the intermediate positions
        # are never read, so XLA drops the part of their work the gradients do not need
        # (for a Bernoulli likelihood a log1p per logit).
        z, r = carry
        z = z + step * r
        state = evaluate(z)
        return (z, r + step * gradlog_f(state, beta)), None

    z, r = jax.lax.scan(leapfrog, (chain.z, r), None, length=leapfrog_steps - 1)[0]
    proposal = evaluate(z + step * r)  # the last position, whose log-densities the test reads
    r = r + step * gradlog_f(proposal, beta)
    r = r - 0.5 * step * gradlog_f(proposal, beta)  # the last momentum step is a half step
    log_ratio = (log_f(proposal, beta) - 0.5 * jnp.sum(r**2, -1)) - (
        log_f(chain, beta) - 0.5 * jnp.sum(momentum**2, -1)
    )
    finite = jnp.isfinite(log_ratio)
    accept_prob = jnp.where(finite, jnp.exp(jnp.minimum(log_ratio, 0.0)), 0.0)
    accept = finite & (log_uniform < log_ratio)
    new = jax.tree.map(
        lambda a, b: jnp.where(accept.reshape(-1, *([1] * (a.ndim - 1))), a, b), proposal, chain
    )
    return new, accept_prob
