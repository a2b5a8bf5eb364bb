"""Per-example inference: fit each datapoint's own variational parameters (the q* of Cremer et
al. 2018), all datapoints at once.

For one datapoint x_i and fixed model parameters theta, the local ELBO of lambda_i is

    L(lambda_i; x_i) = E_{z ~ q(z; lambda_i)} [log p_theta(x_i, z) - log q(z; lambda_i)],

estimated with S reparameterized draws through the library's one adapter (`traces.log_weights`
with `given_params_guide`), so the model's own log joint is what gets maximized. `fit_local`
maximizes it with Adam for a batch of datapoints in one compiled loop (`vmap` over datapoints,
`lax.scan` over the steps of a block, `lax.while_loop` over blocks). Adam is elementwise, so one
Adam over the `[batch, P]` array is an independent Adam per datapoint.

Stopping follows Cremer et al.: the local ELBO is averaged over blocks of `block_size` steps; a
datapoint whose block average has not improved on its best for `patience` blocks stops moving
(its parameters and its Adam moments are frozen) while the others go on. Datapoints are processed
in chunks of `batch_size`, so 10,000 datapoints fit in bounded memory.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from amortjax.evaluation.bounds import evaluate_bounds
from amortjax.families import DiagonalGaussian, Family
from amortjax.guides.local import given_params_guide
from amortjax.latents import Site, latent_size
from amortjax.sharding import active_mesh, check_divisible, replicate, shard_rows
from amortjax.traces import log_weights


class LocalFit(NamedTuple):
    """Result of `fit_local`, one row per datapoint.

    Attributes:
        params: the fitted lambda_i, `[N, num_params]`.
        elbo: L(lambda_i; x_i) estimated with `final_samples` draws, `[N]`.
        iwae: the IWAE-`final_samples` bound of log p(x_i) with q(z; lambda_i), `[N]`.
        steps: Adam steps each datapoint took before it stopped, `[N]`.
        num_samples: draws behind `elbo` and `iwae`.
    """

    params: np.ndarray
    elbo: np.ndarray
    iwae: np.ndarray
    steps: np.ndarray
    num_samples: int


def local_elbo(
    model: Callable,
    params: dict,
    x: jax.Array,
    lam: jax.Array,
    key: jax.Array,
    *,
    family: Family,
    num_samples: int,
    site: Site = "z",
) -> jax.Array:
    """S-sample reparameterized estimate of L(lambda; x) for ONE datapoint.

    Args:
        model: NumPyro model with local latents in the data plate.
        params: model parameters theta.
        x: one observation, `[x_dim]` (any per-datapoint shape).
        lam: its variational parameters, `[num_params]`.
        key: PRNG key.
        family: the variational family of lam.
        num_samples: S.
        site: the model's local latents (a site name or a `LocalLatents`).

    Returns:
        A scalar, differentiable in lam and params.
    """
    xs = jnp.broadcast_to(x, (num_samples, *x.shape))
    lams = jnp.broadcast_to(lam, (num_samples, *lam.shape))
    guide = given_params_guide(family, site=site)
    return log_weights(model, guide, params, xs, key, lams).mean()


class _State(NamedTuple):
    lam: jax.Array  # [B, P]
    opt_state: optax.OptState
    best: jax.Array  # [B] best block-average ELBO
    stale: jax.Array  # [B] blocks since the best improved
    active: jax.Array  # [B] still moving
    steps: jax.Array  # [B] steps taken
    key: jax.Array


def _fit_chunk(
    model: Callable,
    family: Family,
    site: Site,
    num_samples: int,
    learning_rate: float,
    block_size: int,
    patience: int,
    max_steps: int,
    min_improvement: float,
    params: dict,
    x: jax.Array,
    lam0: jax.Array,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    batch = x.shape[0]
    tx = optax.adam(learning_rate)

    def elbos(lam, keys):
        return jax.vmap(
            lambda xi, li, ki: local_elbo(
                model, params, xi, li, ki, family=family, num_samples=num_samples, site=site
            )
        )(x, lam, keys)

    def block(state: _State) -> _State:
        def step(carry, k):
            lam, opt_state = carry
            keys = jax.random.split(k, batch)
            # The datapoints' ELBOs are separable, so the gradient of their sum is each
            # datapoint's own gradient.
            per_point, vjp = jax.vjp(lambda lam: elbos(lam, keys), lam)
            (grad,) = vjp(jnp.ones_like(per_point))
            updates, new_opt = tx.update(-grad, opt_state, lam)
            moving = state.active[:, None]
            new_lam = jnp.where(moving, lam + updates, lam)
            # Frozen datapoints keep their Adam moments too: they have stopped for good.
            new_opt = jax.tree.map(
                lambda new, old: jnp.where(moving, new, old) if new.shape == lam.shape else new,
                new_opt,
                opt_state,
            )
            return (new_lam, new_opt), per_point

        key, sub = jax.random.split(state.key)
        (lam, opt_state), per_step = jax.lax.scan(
            step, (state.lam, state.opt_state), jax.random.split(sub, block_size)
        )
        average = per_step.mean(0)
        improved = average > state.best + min_improvement
        best = jnp.where(state.active & improved, average, state.best)
        stale = jnp.where(improved, 0, state.stale + 1)
        steps = state.steps + block_size * state.active
        active = state.active & (stale < patience) & (steps < max_steps)
        return _State(lam, opt_state, best, stale, active, steps, key)

    init = _State(
        lam=lam0,
        opt_state=tx.init(lam0),
        best=jnp.full(batch, -jnp.inf),
        stale=jnp.zeros(batch, jnp.int32),
        active=jnp.ones(batch, bool),
        steps=jnp.zeros(batch, jnp.int32),
        key=key,
    )
    final = jax.lax.while_loop(lambda s: s.active.any(), block, init)
    return final.lam, final.steps


_fit_chunk_jit = jax.jit(_fit_chunk, static_argnums=tuple(range(9)))


def fit_local(
    model: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    key: jax.Array,
    *,
    family: Family | None = None,
    site: Site = "z",
    z_dim: int | None = None,
    init: np.ndarray | jax.Array | None = None,
    num_samples: int = 1,
    learning_rate: float = 1e-3,
    block_size: int = 100,
    patience: int = 10,
    max_steps: int = 100_000,
    min_improvement: float = 0.0,
    final_samples: int = 1000,
    batch_size: int = 100,
    progress: bool | str = False,
) -> LocalFit:
    """Fits q(z_i; lambda_i) to each datapoint by maximizing its local ELBO with Adam.

    Args:
        model: NumPyro model with local latents in the data plate; its parameters stay fixed.
        params: model parameters theta (e.g. a trained decoder).
        x: observations, `[N, ...]`.
        key: PRNG key.
        family: the variational family (diagonal Gaussian by default).
        site: the model's local latents (a site name or a `LocalLatents`).
        z_dim: latent size; needed when init is None (start from the standard normal) and
            site is a name (a `LocalLatents` knows its size).
        init: starting lambda `[N, num_params]` (e.g. an encoder's output, to refine it), or
            None for N(0, I).
        num_samples: S, draws per datapoint per step.
        learning_rate: Adam's step size.
        block_size: steps per block of the stopping rule.
        patience: blocks without improvement of the block average before a datapoint stops.
        max_steps: cap on the steps of any datapoint.
        min_improvement: nats a block average must gain over the best to count as improvement.
        final_samples: draws for the reported ELBO and IWAE of the fitted q.
        batch_size: datapoints optimized at once (bounds memory).
        progress: show a progress bar over chunks (a string gives its description).

    Returns:
        `LocalFit` with the parameters, final ELBO and IWAE, and steps per datapoint.
    """
    family = family or DiagonalGaussian()
    x = jnp.asarray(x)
    n = x.shape[0]
    if init is None:
        z_dim = latent_size(site, z_dim)
        if z_dim is None:
            raise ValueError("fit_local needs z_dim when init is None")
        init = jnp.broadcast_to(family.standard_params(z_dim), (n, family.num_params(z_dim)))
    init = jnp.asarray(init)
    if init.ndim != 2 or init.shape[0] != n:
        raise ValueError(f"init must have shape [{n}, num_params]; got {init.shape}")
    if block_size < 1 or patience < 1 or max_steps < 1:
        raise ValueError(
            f"block_size, patience and max_steps must be >= 1; got {block_size}, {patience}, "
            f"{max_steps}"
        )
    fit_key, eval_key = jax.random.split(key)
    batch_size = min(batch_size, n)
    mesh = active_mesh()
    if mesh is not None:
        check_divisible(batch_size, mesh)
        params = replicate(mesh, params)
    lams, steps = [], []
    starts = range(0, n, batch_size)
    if progress:
        starts = tqdm(starts, desc=progress if isinstance(progress, str) else "q*", unit="chunk")
    for i, start in enumerate(starts):
        xb, lb = x[start : start + batch_size], init[start : start + batch_size]
        size = xb.shape[0]
        if size < batch_size:  # pad so the chunk compiles once
            pad = batch_size - size
            xb = jnp.concatenate([xb, jnp.repeat(xb[:1], pad, axis=0)])
            lb = jnp.concatenate([lb, jnp.repeat(lb[:1], pad, axis=0)])
        xb, lb = shard_rows(mesh, xb, lb)
        lam, st = _fit_chunk_jit(
            model,
            family,
            site,
            num_samples,
            learning_rate,
            block_size,
            patience,
            max_steps,
            min_improvement,
            params,
            xb,
            lb,
            jax.random.fold_in(fit_key, i),
        )
        lams.append(np.asarray(lam[:size]))
        steps.append(np.asarray(st[:size]))
    lam = np.concatenate(lams)
    bounds = evaluate_bounds(
        model,
        given_params_guide(family, site=site),
        params,
        x,
        eval_key,
        num_samples=final_samples,
        batch_size=batch_size,
        guide_args=(lam,),
    )
    return LocalFit(lam, bounds.elbo, bounds.iwae, np.concatenate(steps), final_samples)
