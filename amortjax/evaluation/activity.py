"""Which latent dimensions a trained VAE uses: active units and the KL per dimension.

Burda, Grosse & Salakhutdinov (2016) call latent dimension u *active* when the encoder's mean
of z_u moves with the data:

    A_u = Cov_x( E_{q(z|x)}[z_u] ),   u active  <=>  A_u > threshold (0.01 in their paper),

the variance over datapoints x of the u-th coordinate of the posterior mean. A collapsed
dimension has q(z_u | x) = p(z_u) for every x, so its mean is constant and A_u = 0.

The KL term of the ELBO splits over dimensions when q is a diagonal Gaussian and the prior is
N(0, I): for q(z_u | x) = N(mu_u, sigma_u^2),

    KL(q(z_u|x) || N(0, 1)) = 0.5 (mu_u^2 + sigma_u^2 - 1) - log sigma_u,

and its average over data says how many nats each dimension costs (a collapsed dimension costs
none). The sum over u is the KL term of the ELBO, E_x KL(q(z|x) || p(z)).

What this module is for: these two statistics from encoder outputs, and a helper that encodes a
dataset in batches to get them. What it is not for: drawing them (`amortjax.plotting.
activity_figure`) or any bound of log p(x) (`amortjax.evaluation.bounds`).
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from amortjax.checks import check_float, check_has_params, check_int
from amortjax.engine import map_datapoints
from amortjax.families import DiagonalGaussian, Family, check_num_params, resolve_family
from amortjax.guides.amortized import encode
from amortjax.traces import check_array

BURDA_THRESHOLD = 0.01
"""Burda et al. (2016)'s threshold on Cov_x(E_q[z_u|x]) above which unit u is active."""


class ActiveUnits(NamedTuple):
    """Burda et al. (2016)'s activity statistic of each latent dimension.

    Attributes:
        variance: `[z_dim]` A_u, the variance over datapoints of E_q[z_u | x].
        active: `[z_dim]` bool, A_u > threshold.
        num_active: the number of active units.
        threshold: the threshold used.
    """

    variance: np.ndarray
    active: np.ndarray
    num_active: int
    threshold: float


class LatentActivity(NamedTuple):
    """What `latent_activity` computes on a dataset.

    Attributes:
        means: `[N, z_dim]` `family.mean` of the encoder's output for each x_i: E_q[z | x_i]
            for the Gaussian families; for a flow the flow applied to its base mean (a point
            of high density, not E_q[z], which has no closed form there).
        variance: `[z_dim]` A_u (see `ActiveUnits`).
        active: `[z_dim]` bool, A_u > threshold.
        num_active: the number of active units.
        threshold: the threshold used.
        kl: `[z_dim]` the average over the datapoints of KL(q(z_u | x) || N(0, 1)), in nats;
            None when the family is not a diagonal Gaussian (the KL does not split over
            dimensions then).
    """

    means: np.ndarray
    variance: np.ndarray
    active: np.ndarray
    num_active: int
    threshold: float
    kl: np.ndarray | None

    def summary(self) -> dict:
        """A JSON-ready record: datapoints, z_dim, threshold, num_active, the per-unit variance,
        KL and activity (lists), and the KL in total and in the active units (None without a
        per-dimension KL)."""
        kl = None if self.kl is None else np.asarray(self.kl)
        return {
            "points": len(self.means),
            "z_dim": len(self.variance),
            "threshold": self.threshold,
            "num_active": self.num_active,
            "variance": np.asarray(self.variance).tolist(),
            "kl": None if kl is None else kl.tolist(),
            "active": np.asarray(self.active).tolist(),
            "kl_total": None if kl is None else float(kl.sum()),
            "kl_active": None if kl is None else float(kl[self.active].sum()),
        }


def _check_matrix(values, name: str) -> np.ndarray:
    """values as a float64 `[N, D]` array with N >= 1, D >= 1 and every entry finite."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must have shape [N, dim] with N, dim >= 1, got {arr.shape}")
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite entries (NaN or inf) in {len(rows)} of "
            f"{arr.shape[0]} rows, the first in row {rows[0]}"
        )
    return arr


def active_units(encoder_means, threshold: float = BURDA_THRESHOLD) -> ActiveUnits:
    """Burda et al. (2016)'s active units from the encoder's means over a dataset.

    A_u = Var_x(mu_u(x)) = (1/N) sum_i (mu_iu - mean_i mu_iu)^2 (the population variance, in
    float64), and unit u is active when A_u > threshold.

    Args:
        encoder_means: `[N, z_dim]` E_q[z | x_i] for N >= 2 datapoints (NumPy or JAX).
        threshold: activity threshold; Burda et al. use 0.01.

    Returns:
        `ActiveUnits(variance [z_dim], active [z_dim] bool, num_active, threshold)`.

    Raises:
        ValueError: if encoder_means is not `[N, z_dim]` with N >= 2, holds NaN or inf, or the
            threshold is negative or not finite.
    """
    mu = _check_matrix(encoder_means, "encoder_means")
    if mu.shape[0] < 2:
        raise ValueError(
            f"encoder_means needs at least 2 datapoints for a variance over data, got {mu.shape}"
        )
    if not (np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"threshold must be finite and >= 0, got {threshold}")
    variance = mu.var(axis=0)
    active = variance > threshold
    return ActiveUnits(variance, active, int(active.sum()), float(threshold))


def kl_per_dimension(params, *, per_datapoint: bool = False) -> np.ndarray:
    """The KL of a diagonal Gaussian q to the N(0, I) prior, dimension by dimension.

    With params = [mu, log sigma] (the layout of `amortjax.families.DiagonalGaussian`),

        KL_iu = 0.5 (mu_iu^2 + sigma_iu^2 - 1) - log sigma_iu     (computed in float64)

    and the result is its mean over the datapoints i (or every KL_iu). Summed over u it is the
    analytic KL term of the ELBO, KL(q(z | x_i) || p(z)).

    Args:
        params: `[N, 2 * z_dim]` variational parameters lambda_i of N datapoints, e.g. from
            `amortjax.guides.encode`.
        per_datapoint: return `[N, z_dim]`, every datapoint's KLs, instead of their mean.

    Returns:
        `[z_dim]` (or `[N, z_dim]`) KLs in nats, each >= 0.

    Raises:
        ValueError: if params is not `[N, 2 * z_dim]` or holds NaN or inf.
    """
    lam = _check_matrix(params, "params")
    if lam.shape[1] % 2:
        raise ValueError(
            f"params must be [N, 2 * z_dim] = [mu, log sigma] of a diagonal Gaussian, got "
            f"{lam.shape} (an odd number of columns)"
        )
    mu, log_sigma = np.split(lam, 2, axis=1)
    kl = 0.5 * (mu**2 + np.exp(2.0 * log_sigma) - 1.0) - log_sigma
    return kl if per_datapoint else kl.mean(axis=0)


def latent_activity(
    encoder: nn.Module,
    params: dict,
    x,
    *,
    batch_size: int = 1000,
    threshold: float = BURDA_THRESHOLD,
    family: Family | None = None,
) -> LatentActivity:
    """Encodes a dataset in batches, then its active units and KL per dimension.

    lambda_i = encoder(x_i) comes from `amortjax.guides.encode` in compiled batches of
    `batch_size` (the last one padded, so it compiles once); the means are
    `family.mean(lambda_i)`. The KL per dimension needs a diagonal Gaussian family.

    Args:
        encoder: the Flax encoder of an `amortjax.guides.amortized_guide`.
        params: trained parameters holding "encoder$params" (e.g. `FitResult.params`).
        x: `[N, x_dim]` datapoints, N >= 2.
        batch_size: datapoints per compiled call.
        threshold: activity threshold (Burda et al.: 0.01).
        family: the guide's variational family; the diagonal Gaussian by default.

    Returns:
        A `LatentActivity` (means, variance, active, num_active, threshold, kl).

    Raises:
        ValueError: if x is not `[N, x_dim]`, batch_size < 1, or the encoder's output holds
            NaN or inf.
    """
    family = resolve_family("latent_activity", family)
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(
            f"latent_activity: x must have shape [N, x_dim] with N >= 2 (activity is a variance "
            f"over datapoints), got {x.shape}"
        )
    x = check_array(x)
    check_int("latent_activity", 1, batch_size=batch_size)
    check_float("latent_activity", "threshold", threshold, low=0, fix="Burda et al. use 0.01")
    check_has_params("latent_activity", params, "encoder$params")
    n = x.shape[0]
    batch_size = min(batch_size, n)
    run = jax.jit(lambda p, xb: encode(encoder, p, xb))
    try:
        out = jax.eval_shape(run, params, jnp.asarray(x[:batch_size]))
    except Exception as err:
        raise ValueError(
            f"latent_activity: the encoder cannot run on x of shape {x.shape} (x_dim "
            f"{x.shape[1]}): {type(err).__name__}: {str(err)[:300]}. Check x_dim against the "
            "encoder's input size, and the encoder's sizes against those of its parameters"
        ) from err
    check_num_params(family, out.shape[-1], source="latent_activity: the encoder")
    # encoding draws nothing: the engine's per-datapoint keys go unused
    lam = map_datapoints(lambda p, _, xb: run(p, xb), params, jax.random.key(0), [x],
                         batch_size=batch_size)  # fmt: skip
    _check_matrix(lam, "the encoder's output")
    means = np.asarray(family.mean(jnp.asarray(lam)))
    units = active_units(means, threshold)
    kl = kl_per_dimension(lam) if isinstance(family, DiagonalGaussian) else None
    return LatentActivity(
        means, units.variance, units.active, units.num_active, units.threshold, kl
    )
