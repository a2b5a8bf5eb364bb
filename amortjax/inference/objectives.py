"""Training objectives and optimizers: NumPyro ELBOs by name, KL weights and their schedules
(beta-VAE, KL warm-up, cyclical annealing), Adam with learning-rate schedules.

A KL weight multiplies the log-density of every *unobserved* sample site, in model and guide
alike, by a weight beta: Trace_ELBO then estimates E_q[log p(x|z)] + beta (E_q[log p(z)] -
E_q[log q(z|x)]), i.e. the reconstruction term minus beta KL, for any NumPyro model. It is a
handler (`kl_weighted`), not a second ELBO. `kl_schedule` makes beta a function of the
optimizer step: constant (the beta-VAE of Higgins et al. 2017), a linear warm-up (Bowman et al.
2016, Sonderby et al. 2016) or cyclical annealing (Fu et al. 2019); `Trainer(kl_schedule=...)`
applies one.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from numpyro.primitives import Messenger

from amortjax.checks import check_float, check_int

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


def epoch_kl_schedule(
    kind: str,
    *,
    steps_per_epoch: int,
    beta: float = 1.0,
    warmup_epochs: float = 0.0,
    start: float = 0.0,
    cycles: int = 1,
    epochs: int | None = None,
) -> Callable[[jax.Array], jax.Array] | None:
    """`kl_schedule` with its lengths in epochs, for `Trainer(kl_schedule=...)`; None (the
    plain ELBO) for a constant weight of 1.

    Args:
        kind: "constant", "linear" (a warm-up over `warmup_epochs`, from `start` beta to beta)
            or "cyclical" (`cycles` cycles over `epochs`).
        steps_per_epoch: optimizer steps per epoch.
        beta, start, cycles: as in `kl_schedule`.
        warmup_epochs: length of the linear warm-up in epochs (0: none).
        epochs: the run's length ("cyclical" only).
    """
    if kind == "cyclical":
        if epochs is None:
            raise ValueError("the 'cyclical' KL schedule needs epochs (the run's length)")
        return kl_schedule(
            "cyclical", beta=beta, cycles=cycles, total_steps=epochs * steps_per_epoch
        )
    warmup_steps = round(warmup_epochs * steps_per_epoch) if kind == "linear" else 0
    if warmup_steps == 0 and beta == 1.0:
        return None
    if kind == "constant":
        return kl_schedule("constant", beta=beta)
    return kl_schedule("linear", beta=beta, warmup_steps=warmup_steps, start=start)


def kl_warmup_weight(step: jax.Array, warmup_steps: int) -> jax.Array:
    """beta rising linearly from 0 to 1 over warmup_steps optimizer steps (1 if no warm-up).

    The "linear" `kl_schedule` with beta = 1: step s (from 0) has weight min(1, (s + 1) / W).
    """
    return kl_schedule("linear", warmup_steps=max(warmup_steps, 0))(step)


KL_SCHEDULES = ("constant", "linear", "cyclical")


def kl_schedule(
    kind: str,
    *,
    beta: float = 1.0,
    warmup_steps: int = 0,
    cycles: int = 1,
    total_steps: int | None = None,
    ratio: float = 0.5,
    start: float = 0.0,
) -> Callable[[jax.Array], jax.Array]:
    """A KL weight as a function of the optimizer step, for `kl_weighted` / `Trainer`.

    With s = 0, 1, ... the global optimizer step:

    - "constant": w(s) = beta. beta > 1 is the beta-VAE (Higgins et al. 2017), beta < 1 weakens
      the KL; beta = 1 is the plain ELBO.
    - "linear": w(s) = beta (start + (1 - start) min(1, (s + 1) / warmup_steps)), the KL
      warm-up (Bowman et al. 2016, Sonderby et al. 2016; Kim et al. 2018 start at 0.1); beta
      from the first step when warmup_steps = 0.
    - "cyclical": Fu et al. (2019)'s cyclical annealing: total_steps split into `cycles` periods
      of P = total_steps / cycles steps; with tau = (s mod P) / P the position in the current
      period, w(s) = beta min(1, tau / ratio): a ramp from 0 to beta over the first `ratio` of
      each period (their R = 0.5), then flat. Steps from total_steps on have weight beta.

    Args:
        kind: one of "constant", "linear", "cyclical".
        beta: the weight reached (and kept) by every schedule, >= 0.
        warmup_steps: steps of the linear ramp ("linear" only).
        cycles: number of periods ("cyclical" only), >= 1.
        total_steps: length of the cyclical schedule in steps ("cyclical" only, required).
        ratio: fraction of each period spent ramping up ("cyclical" only), in (0, 1].
        start: the weight's starting fraction of beta ("linear" only), in [0, 1].

    Returns:
        `weight(step) -> float32 scalar`, traceable by jax (step may be a traced int array).

    Raises:
        ValueError: on an unknown kind, or an option out of range or given to a kind that
            does not use it.
    """
    if kind not in KL_SCHEDULES:
        raise ValueError(f"unknown KL schedule {kind!r}; choose one of {list(KL_SCHEDULES)}")
    check_float("kl_schedule", "beta", beta, low=0)
    if warmup_steps and kind != "linear":
        raise ValueError(f"warmup_steps={warmup_steps} is for the 'linear' schedule, not {kind!r}")
    if start and kind != "linear":
        raise ValueError(f"start={start} is for the 'linear' schedule, not {kind!r}")
    if not 0 <= start <= 1:
        raise ValueError(f"start must be in [0, 1], got {start}")
    if (cycles != 1 or total_steps is not None) and kind != "cyclical":
        raise ValueError(f"cycles and total_steps are for the 'cyclical' schedule, not {kind!r}")
    beta_ = jnp.float32(beta)

    if kind == "constant":
        return lambda step: jnp.full((), beta_)

    if kind == "linear":
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if warmup_steps == 0:
            return lambda step: jnp.full((), beta_)
        start_ = jnp.float32(start)
        return lambda step: (
            beta_
            * (start_ + (1.0 - start_) * jnp.minimum(1.0, (jnp.asarray(step) + 1) / warmup_steps))
        )

    if total_steps is None or total_steps < 1:
        raise ValueError(f"the 'cyclical' schedule needs total_steps >= 1, got {total_steps}")
    if cycles < 1:
        raise ValueError(f"cycles must be >= 1, got {cycles}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")

    if total_steps >= 2**31:
        raise ValueError(f"total_steps must be below 2**31 (steps are int32), got {total_steps}")

    def cyclical(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.int32)
        # tau = (s mod P) / P = ((s * cycles) mod total_steps) / total_steps, in integers so
        # that it stays exact past float32's 2^24 consecutive integers, and without forming
        # s * cycles, which passes 2^31 (int32 wrapped it: weight 0.34 for 0.67 at step 2.5e7
        # of 3e7 with 100 cycles).
        s = jnp.mod(jnp.maximum(step, 0), total_steps).astype(jnp.uint32)
        tau = _mulmod(s, cycles % total_steps, total_steps) / jnp.float32(total_steps)
        ramp = beta_ * jnp.minimum(1.0, tau / jnp.float32(ratio))
        return jnp.where(step >= total_steps, beta_, ramp).astype(jnp.float32)

    return cyclical


def _mulmod(a: jax.Array, c: int, m: int) -> jax.Array:
    """(a * c) mod m for uint32 a < m < 2^31 and a Python int c >= 0, by binary doubling on
    c's bits: every intermediate stays below 2m < 2^32."""
    r = jnp.zeros_like(a)
    for bit in bin(c)[2:]:
        r = (r * 2) % m
        if bit == "1":
            r = (r + a) % m
    return r


SCHEDULES = ("constant", "iwae")


def iwae_schedule(base_lr: float, steps_per_epoch: int, stages: int = 8) -> optax.Schedule:
    """Burda et al.'s schedule: stage i = 0..stages-1 lasts 3^i epochs at base_lr * 10^(-i/7).

    With 8 stages that is 3280 epochs in all; after the last stage the rate stays put.
    """
    epochs_at_end = np.cumsum([3**i for i in range(stages)])
    boundaries = {int(e * steps_per_epoch): 10 ** (-1 / 7) for e in epochs_at_end[:-1]}
    return optax.piecewise_constant_schedule(base_lr, boundaries)


def check_optimizer_numbers(where: str, learning_rate, b1, b2, eps, clip_norm) -> None:
    """Adam's numbers: a step size >= 0 (0 freezes the parameters) or an optax schedule, b1 and
    b2 in [0, 1), eps > 0 and a clipping norm > 0 (or None)."""
    if not callable(learning_rate):
        fix = "a step size such as 1e-3, or an optax schedule (a negative one climbs the loss)"
        check_float(where, "learning_rate", learning_rate, low=0, fix=fix)
    for name, value in (("b1", b1), ("b2", b2)):
        check_float(where, name, value, low=0, high=1, high_open=True)
    check_float(where, "eps", eps, low=0, low_open=True)
    if clip_norm is not None:
        fix = "a positive gradient norm, or None for no clipping"
        check_float(where, "clip_norm", clip_norm, low=0, low_open=True, fix=fix)


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
        learning_rate: the (initial) step size (>= 0), or an optax schedule of the step.
        schedule: "constant" or "iwae" (see `iwae_schedule`).
        steps_per_epoch: optimizer steps per epoch (for epoch-based schedules).
        b1, b2, eps: Adam's constants (Burda et al. use eps=1e-4).
        clip_norm: clip the global gradient norm to this value, if given.

    Returns:
        An optax transformation (wrap with `numpyro.optim.optax_to_numpyro` for SVI).

    Raises:
        ValueError: a step size, clipping norm or Adam constant out of its range (a negative
            step size would climb the loss, silently).
    """
    check_optimizer_numbers("make_optimizer", learning_rate, b1, b2, eps, clip_norm)
    check_int("make_optimizer", steps_per_epoch=steps_per_epoch)
    if schedule == "constant":
        lr: float | optax.Schedule = learning_rate
    elif schedule == "iwae":
        lr = iwae_schedule(learning_rate, steps_per_epoch)
    else:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    adam = optax.adam(lr, b1=b1, b2=b2, eps=eps)
    return optax.chain(optax.clip_by_global_norm(clip_norm), adam) if clip_norm else adam
