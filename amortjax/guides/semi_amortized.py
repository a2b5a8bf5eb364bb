"""The semi-amortized guide: the encoder's output refined by K gradient steps (Kim et al. 2018).

lambda_0 = f_phi(x_i); lambda_K = refine(lambda_0) by K steps on the local ELBO under the
model's current parameters (`amortjax.inference.refine`); z_i ~ q(z; lambda_K). Three modes:

- "sa" (SA-VAE): the loss is -ELBO(lambda_K) and its gradient flows through all K steps into
  the encoder and the decoder.
- "svi" (VAE+SVI): lambda_K is a constant for the gradient; the decoder learns from
  -ELBO(lambda_K), the encoder from its own -ELBO(lambda_0) (with the decoder held fixed there).
- "svi_kl" (VAE+SVI+KL): as "svi", but the encoder learns to minimize KL(q(lambda_K) ||
  q(lambda_0)), pulling it toward the refined posterior.

The encoder's extra loss enters as a `numpyro.factor` in the guide: a guide factor f adds f to
log q, so the SVI loss -E[log p - log q] gains +f. Use it with `Trace_ELBO`. The model's
parameters are read by running the model with everything but its param sites hidden, so the
guide sees the values SVI is optimizing and adds no sample sites of the model to its trace.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.contrib.module import flax_module

from amortjax.checks import check_float, check_int
from amortjax.engine import datapoint_keys
from amortjax.families import DiagonalGaussian, Family, check_num_params
from amortjax.guides.global_latents import draw_globals
from amortjax.guides.local import local_elbo
from amortjax.latents import Site, latent_size, resolve_site, sample_local
from amortjax.models import data_plate, with_fixed_params

MODES = ("sa", "svi", "svi_kl")


def model_params(model: Callable, x: jax.Array) -> dict:
    """The model's parameters as the enclosing inference sees them (inside a guide: SVI's
    current values), from a run of the model whose other sites are hidden from outer handlers."""
    with handlers.block(expose_types=["param"]):
        trace = handlers.trace(handlers.seed(model, jax.random.key(0))).get_trace(x)
    return {name: site["value"] for name, site in trace.items() if site["type"] == "param"}


def check_refine_settings(
    where: str, num_steps, step_size, momentum, max_grad_norm, num_samples, num_params=None
) -> None:
    """The K steps' settings, each named with its allowed range (static checks, so they run
    under jit too; a concrete step size must be positive and finite: a negative one steps
    downhill on the ELBO)."""
    check_int(where, 0, num_steps=num_steps)
    check_int(where, 1, num_samples=num_samples)
    check_float(where, "momentum", momentum, low=0, high=1, high_open=True)
    if max_grad_norm is not None:
        check_float(where, "max_grad_norm", max_grad_norm, low=0, low_open=True,
                    fix="or None for no clipping")  # fmt: skip
    shapes = ((),) if num_params is None else ((), (num_params,))
    if jnp.ndim(step_size) > 1 or (num_params is not None and jnp.shape(step_size) not in shapes):
        raise ValueError(
            f"{where}: step_size must be a scalar or one per parameter, shape "
            f"[{num_params if num_params is not None else 'num_params'}]; got shape "
            f"{jnp.shape(step_size)}"
        )
    if not isinstance(step_size, jax.core.Tracer):
        sizes = np.asarray(step_size, dtype=float)
        if not (np.isfinite(sizes).all() and (sizes > 0).all()):
            raise ValueError(f"{where}: step_size must be finite and > 0, got {step_size!r}")


def semi_amortized_guide(
    encoder: nn.Module | None,
    model: Callable,
    *,
    x_dim: int,
    num_steps: int,
    z_dim: int | None = None,
    mode: str = "sa",
    family: Family | None = None,
    step_size: float | jax.Array = 0.01,
    momentum: float = 0.5,
    max_grad_norm: float | None = 5.0,
    num_samples: int = 1,
    site: Site | None = None,
    checkpoint: bool = True,
    global_guide: Callable | None = None,
) -> Callable[..., None]:
    """q(z_i | x_i) = q(z_i; refine_K(f_phi(x_i))).

    Args:
        encoder: Flax module x `[..., x_dim]` -> lambda_0 `[..., num_params]`, or None to start
            every datapoint from the standard normal (per-example SVI as in Kim et al.'s
            baseline: K steps from the prior each time, the decoder trained on the result).
        model: the NumPyro model whose local ELBO is refined (the one trained with this guide).
        x_dim: observation size.
        num_steps: K.
        z_dim: latent size; needed when encoder is None and site is a name.
        mode: "sa", "svi" or "svi_kl" (see the module docstring).
        family: variational family (diagonal Gaussian by default).
        step_size, momentum, max_grad_norm, num_samples, checkpoint: see `refine`.
        site: the model's local latents (a site name or a `LocalLatents`); None: found in
            the model by `find_local_latents`.
        global_guide: a guide for the model's global latents (`global_guide(model)`): run
            first; the refinement then works on the model with the drawn global values (and
            in mode "sa" differentiates through them).

    Returns:
        A guide `guide(x, *, n_data=None)` with param site "encoder$params" (if it has an
        encoder).
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {list(MODES)}")
    check_refine_settings(
        "semi_amortized_guide", num_steps, step_size, momentum, max_grad_norm, num_samples
    )

    family = family or DiagonalGaussian()
    settings = dict(
        family=family,
        num_steps=num_steps,
        step_size=step_size,
        momentum=momentum,
        max_grad_norm=max_grad_norm,
        num_samples=num_samples,
        checkpoint=checkpoint,
    )

    def guide(x: jax.Array, *, n_data: int | None = None) -> None:
        local = resolve_site(site, model, x)
        drawn = draw_globals(global_guide, x, n_data)
        if mode != "sa":  # only SA-VAE differentiates the refinement
            drawn = jax.lax.stop_gradient(drawn)
        local_model = with_fixed_params(model, drawn) if drawn else model
        if encoder is None:
            size = latent_size(local, z_dim)
            if size is None:
                raise ValueError("semi_amortized_guide needs z_dim when there is no encoder")
            standard = family.standard_params(size)
            lam0 = jnp.broadcast_to(standard, (x.shape[0], *standard.shape))
        else:
            lam0 = flax_module("encoder", encoder, input_shape=(1, x_dim))(x)
            check_num_params(family, lam0.shape[-1], latent_size(local))
        theta = model_params(local_model, x)
        key = numpyro.prng_key()
        refine_key, encoder_key = jax.random.split(key if key is not None else jax.random.key(0))
        with handlers.block():
            if mode == "sa":
                lam = refine_steps(local_model, theta, x, lam0, refine_key, site=local, **settings)
            else:
                lam = jax.lax.stop_gradient(
                    refine_steps(
                        local_model,
                        jax.lax.stop_gradient(theta),
                        x,
                        jax.lax.stop_gradient(lam0),
                        refine_key,
                        site=local,
                        **settings,
                    )
                )
            if encoder is None:
                encoder_loss = None
            elif mode == "svi":
                fixed = jax.lax.stop_gradient(theta)
                keys = jax.random.split(encoder_key, x.shape[0])
                encoder_loss = -jax.vmap(
                    lambda xi, li, ki: local_elbo(
                        local_model,
                        fixed,
                        xi,
                        li,
                        ki,
                        family=family,
                        num_samples=num_samples,
                        site=local,
                    )
                )(x, lam0, keys)
            elif mode == "svi_kl":
                encoder_loss = dist.kl_divergence(
                    family.distribution(lam), family.distribution(lam0)
                )
        with data_plate(x, n_data):
            sample_local(local, family.distribution(lam))
            if mode != "sa" and encoder_loss is not None:
                numpyro.factor("encoder_loss", encoder_loss)

    return guide


def refine_steps(model, params, x, lam0, key, *, family, num_steps, step_size=0.01,
                     momentum=0.5, max_grad_norm=5.0, num_samples=1, site="z", checkpoint=True,
                     indices=None):  # fmt: skip
    """K steps of SGD with momentum on every datapoint's local ELBO, differentiable in the
    start `lam0` `[B, P]` and in `params`; returns the refined `[B, P]`. `amortjax.refine` is
    the public, checked entry (its docstring gives the update); this is it without the checks,
    for the semi-amortized guide, whose data `Trainer`/`fit` checked once."""
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
