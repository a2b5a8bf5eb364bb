"""Training objectives and optimizers: NumPyro ELBOs by name, KL warm-up, Adam with schedules.

KL warm-up multiplies the log-density of every *unobserved* sample site, in model and guide
alike, by a weight beta: Trace_ELBO then estimates E_q[log p(x|z)] + beta (E_q[log p(z)] -
E_q[log q(z|x)]), i.e. the reconstruction term minus beta KL, for any NumPyro model. It is a
handler, not a second ELBO.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from numpyro.primitives import Messenger

OBJECTIVES = ("elbo", "meanfield_elbo", "iwae")


def make_objective(name: str, num_particles: int = 1) -> ELBO:
    """A NumPyro ELBO by name.

    Args:
        name: "elbo" (Trace_ELBO), "meanfield_elbo" (TraceMeanField_ELBO: analytic KL where
            NumPyro has one) or "iwae" (RenyiELBO with alpha=0: the IWAE-k bound with
            k=num_particles, log-sum-exp per datapoint).
        num_particles: samples per datapoint (k for "iwae").

    Returns:
        The ELBO object for `numpyro.infer.SVI`.
    """
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    if name == "elbo":
        return Trace_ELBO(num_particles=num_particles)
    if name == "meanfield_elbo":
        return TraceMeanField_ELBO(num_particles=num_particles)
    if name == "iwae":
        return RenyiELBO(alpha=0.0, num_particles=num_particles)
    raise ValueError(f"unknown objective {name!r}; choose one of {list(OBJECTIVES)}")


class _ScaleLatents(Messenger):
    def __init__(self, fn: Callable, scale: jax.Array):
        self.scale = scale
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and not msg["is_observed"]:
            msg["scale"] = self.scale if msg.get("scale") is None else self.scale * msg["scale"]


def kl_weighted(fn: Callable) -> Callable:
    """Wraps a model or guide to take a `kl_weight` keyword that scales its latent sites.

    Args:
        fn: a NumPyro model or guide.

    Returns:
        `wrapped(*args, kl_weight=1.0, **kwargs)`.
    """

    def wrapped(*args, kl_weight: jax.Array | float = 1.0, **kwargs):
        return _ScaleLatents(fn, jnp.asarray(kl_weight))(*args, **kwargs)

    return wrapped


def kl_warmup_weight(step: jax.Array, warmup_steps: int) -> jax.Array:
    """beta rising linearly from 0 to 1 over warmup_steps optimizer steps (1 if no warm-up)."""
    if warmup_steps <= 0:
        return jnp.ones(())
    return jnp.minimum(1.0, (step + 1) / warmup_steps)


SCHEDULES = ("constant", "iwae")


def iwae_schedule(base_lr: float, steps_per_epoch: int, stages: int = 8) -> optax.Schedule:
    """Burda et al.'s schedule: stage i = 0..stages-1 lasts 3^i epochs at base_lr * 10^(-i/7).

    With 8 stages that is 3280 epochs in all; after the last stage the rate stays put.
    """
    epochs_at_end = np.cumsum([3**i for i in range(stages)])
    boundaries = {int(e * steps_per_epoch): 10 ** (-1 / 7) for e in epochs_at_end[:-1]}
    return optax.piecewise_constant_schedule(base_lr, boundaries)


def make_optimizer(
    learning_rate: float,
    *,
    schedule: str = "constant",
    steps_per_epoch: int = 1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = None,
) -> optax.GradientTransformation:
    """Adam with an optional learning-rate schedule and gradient clipping.

    Args:
        learning_rate: the (initial) step size.
        schedule: "constant" or "iwae" (see `iwae_schedule`).
        steps_per_epoch: optimizer steps per epoch (for epoch-based schedules).
        b1, b2, eps: Adam's constants (Burda et al. use eps=1e-4).
        clip_norm: clip the global gradient norm to this value, if given.

    Returns:
        An optax transformation (wrap with `numpyro.optim.optax_to_numpyro` for SVI).
    """
    if schedule == "constant":
        lr: float | optax.Schedule = learning_rate
    elif schedule == "iwae":
        lr = iwae_schedule(learning_rate, steps_per_epoch)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    adam = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adam) if clip_norm else adam
