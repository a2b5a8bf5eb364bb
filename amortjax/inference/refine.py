"""Differentiable refinement: K gradient-ascent steps on each datapoint's local ELBO.

Semi-amortized inference (Kim et al. 2018) starts from the encoder's lambda_0 = f_phi(x_i) and
takes K steps of SGD with momentum on L(lambda; x_i) (see `amortjax.inference.local`):

    g_k      = clip(grad_lambda L(lambda_k; x_i), max_grad_norm)
    v_{k+1}  = momentum * v_k + g_k
    lambda_{k+1} = lambda_k + step_size * v_{k+1}      (step_size: a scalar or one per parameter)

written for one datapoint and batched with `vmap`. The steps are a `lax.scan` that `jax.grad`
goes through exactly (reverse mode over the inner gradients: Hessian-vector products, no finite
differences), each step under `jax.checkpoint` so that memory grows with K only by the carried
state.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from amortjax.engine import datapoint_keys
from amortjax.families import Family
from amortjax.inference.local import local_elbo
from amortjax.latents import Site


def refine(
    model: Callable,
    params: dict,
    x: jax.Array,
    lam0: jax.Array,
    key: jax.Array,
    *,
    family: Family,
    num_steps: int,
    step_size: float | jax.Array = 1.0,
    momentum: float = 0.5,
    max_grad_norm: float | None = 5.0,
    num_samples: int = 1,
    site: Site = "z",
    checkpoint: bool = True,
    indices: jax.Array | None = None,
) -> jax.Array:
    """Refines a batch of variational parameters by K steps on their local ELBOs.

    Args:
        model: NumPyro model with local latents in the data plate.
        params: model parameters theta (the refinement is differentiable in them).
        x: observations, `[batch, ...]`.
        lam0: starting parameters, `[batch, num_params]` (differentiable).
        key: PRNG key; datapoint i draws from `fold_in(key, indices[i])`, its own key, so
            its refinement does not depend on the batch it is in.
        family: variational family of lambda.
        num_steps: K (0 returns lam0).
        step_size: scalar or `[num_params]` per-parameter step sizes.
        momentum: SGD momentum.
        max_grad_norm: clip each datapoint's gradient to this Euclidean norm (None: no clip).
        num_samples: S, draws per step per datapoint.
        site: the model's local latents (a site name or a `LocalLatents`).
        checkpoint: recompute each step in the backward pass instead of storing it.
        indices: the datapoints' indices in their dataset, `[batch]` (default: their positions
            in x).

    Returns:
        lambda_K, `[batch, num_params]`.
    """
    if num_steps == 0:
        return lam0
    step_size = jnp.asarray(step_size)

    def one(xi: jax.Array, lam: jax.Array, ki: jax.Array) -> jax.Array:
        def step(carry, k):
            lam, velocity = carry
            grad = jax.grad(
                lambda lam: local_elbo(
                    model, params, xi, lam, k, family=family, num_samples=num_samples, site=site
                )
            )(lam)
            if max_grad_norm is not None:
                norm = jnp.sqrt(jnp.sum(grad**2))
                grad = grad * jnp.minimum(1.0, max_grad_norm / (norm + 1e-12))
            velocity = momentum * velocity + grad
            return (lam + step_size * velocity, velocity), None

        body = jax.checkpoint(step) if checkpoint else step
        (lam, _), _ = jax.lax.scan(
            body, (lam, jnp.zeros_like(lam)), jax.random.split(ki, num_steps)
        )
        return lam

    if indices is None:
        indices = jnp.arange(x.shape[0])
    keys = datapoint_keys(key, indices)
    return jax.vmap(one)(x, lam0, keys)
