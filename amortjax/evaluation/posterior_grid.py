"""The exact posterior of a two-dimensional latent, and approximations of it, on a grid.

For a model whose local latent z_i has two dimensions, p(z | x_i) can be computed exactly up to
the grid's resolution: evaluate log p(x_i, z) at the m x m points of a square around a centre
c_i of half-width h_i and normalize over the grid,

    p(z_j | x_i) ~= exp(log p(x_i, z_j) - logsumexp_k log p(x_i, z_k)) / a_i,
    a_i = (2 h_i / (m - 1))^2 (the area of one cell),

so that the densities sum to 1 / a_i (a Riemann sum of 1) on every datapoint's grid. Each
approximation q(z; lambda_i) is normalized the same way, which makes the panels comparable even
where part of q's mass lies outside the square. This is Cremer et al.'s (2018) figure 2: the
true posterior beside the amortized and the optimal q of each family.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from amortjax.checks import check_finite
from amortjax.families import Family, check_num_params
from amortjax.latents import check_site
from amortjax.traces import check_data, log_joint

TRUE_POSTERIOR = "true posterior"


class PosteriorGrid(NamedTuple):
    """Densities on one square grid per datapoint.

    Attributes:
        grids: the grid points, `[N, m, m, 2]` (`grids[i, r, c]` is z at row r, column c).
        densities: `{label: [N, m, m]}`, "true posterior" first, then the approximations in
            the order given; each sums to 1 / cell area over a datapoint's grid.
    """

    grids: np.ndarray
    densities: dict[str, np.ndarray]


def covering_square(
    approximations: dict[str, tuple[Family, np.ndarray | jax.Array]],
    key: jax.Array,
    *,
    mass: float = 0.99,
    pad: float = 0.1,
    num_samples: int = 2000,
) -> tuple[np.ndarray, np.ndarray]:
    """Each datapoint's square holding the central `mass` of every approximation: the union of
    their per-axis central intervals (from `num_samples` draws each), widened by `pad` of its
    side, as `posterior_grid`'s `center` `[N, 2]` and `half_width` `[N]`.

    A square around one q alone can leave a better mode another q found off the figure (on a
    z = 2 MNIST model one digit's optimal Flow sat 2.3 away from its optimal FFG, 8.4 nats
    higher in ELBO, and the true-posterior panel then showed the minor mode).
    """
    if not approximations:
        raise ValueError("covering_square needs at least one approximation {label: (family, lam)}")
    if not 0.0 < mass < 1.0:
        raise ValueError(f"covering_square: mass must be in (0, 1), got {mass!r}")
    tail = (1.0 - mass) / 2
    lo, hi = [], []
    for i, (family, lam) in enumerate(approximations.values()):
        q = family.distribution(jnp.asarray(lam))
        z = np.asarray(q.sample(jax.random.fold_in(key, i), (int(num_samples),)))  # [S, N, 2]
        if z.ndim != 3 or z.shape[-1] != 2:
            raise ValueError(f"covering_square: needs a 2-D latent, got draws of shape {z.shape}")
        lo.append(np.quantile(z, tail, axis=0))
        hi.append(np.quantile(z, 1.0 - tail, axis=0))
    lo, hi = np.min(lo, axis=0), np.max(hi, axis=0)  # [N, 2]
    return (lo + hi) / 2, (0.5 + pad) * (hi - lo).max(-1)


def posterior_grid(
    model: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    approximations: dict[str, tuple[Family, np.ndarray | jax.Array]],
    *,
    center: np.ndarray | jax.Array,
    half_width: np.ndarray | jax.Array,
    points: int = 60,
    site: str = "z",
) -> PosteriorGrid:
    """The exact posterior p(z | x_i) of a 2-D latent and each q(z; lambda_i) on a grid.

    Args:
        model: NumPyro model with a local latent site `site` of 2 dimensions per datapoint.
        params: the model's parameters.
        x: datapoints, `[N, ...]`.
        approximations: `{label: (family, lambda [N, num_params])}`.
        center: each datapoint's grid centre c_i, `[N, 2]`.
        half_width: each grid's half-width h_i > 0, `[N]`.
        points: m, grid points per axis (m >= 2).
        site: the latent site's name.

    Returns:
        `PosteriorGrid` (see the module docstring for the normalization).

    Raises:
        ValueError: naming the argument whose shape or value is wrong.
    """
    x = check_data(model, params, x)
    n = x.shape[0]
    z_dim = check_site(model, params, x, site, "posterior_grid")
    if z_dim != 2:
        raise ValueError(
            f"posterior_grid draws a 2-D latent on a grid; the model's site {site!r} has "
            f"{z_dim} dimensions per datapoint (for more, plot 2-D slices yourself with log_joint)"
        )
    center = jnp.asarray(center, jnp.float32)
    half_width = jnp.asarray(half_width, jnp.float32)
    if center.shape != (n, 2) or not bool(jnp.all(jnp.isfinite(center))):
        raise ValueError(
            f"center must be [N={n}, 2] (a 2-D latent) and finite; got shape {center.shape}"
        )
    if half_width.shape != (n,) or not bool(jnp.all((half_width > 0) & jnp.isfinite(half_width))):
        raise ValueError(f"half_width must be [N={n}], positive and finite; got {half_width}")
    if int(points) < 2:
        raise ValueError(f"points must be >= 2 (grid points per axis), got {points}")
    for label, (family, lam) in approximations.items():
        if jnp.ndim(lam) != 2 or jnp.shape(lam)[0] != n:
            raise ValueError(
                f"approximation {label!r}: lambda must be [N={n}, num_params]; got shape "
                f"{jnp.shape(lam)}"
            )
        check_num_params(family, jnp.shape(lam)[1], 2, f"approximation {label!r}'s lambda")
        check_finite("posterior_grid", f"approximation {label!r}'s lambda", lam)
    m = int(points)
    ticks = jnp.linspace(-1.0, 1.0, m)
    g1, g2 = jnp.meshgrid(ticks, ticks)
    unit = jnp.stack([g1, g2], -1)  # [m, m, 2]
    grids = center[:, None, None, :] + half_width[:, None, None, None] * unit  # [N, m, m, 2]
    flat = grids.reshape(n, m * m, 2)
    cell = (2.0 * half_width / (m - 1)) ** 2  # [N]

    def normalize(logd: jax.Array) -> np.ndarray:  # [N, m*m] -> [N, m, m]
        logd = logd - jax.nn.logsumexp(logd, axis=1, keepdims=True)
        return np.asarray(jnp.exp(logd) / cell[:, None]).reshape(n, m, m)

    true_log = jax.vmap(
        lambda xi, zs: log_joint(
            model, params, jnp.broadcast_to(xi, (m * m, *xi.shape)), {site: zs}
        )
    )(x, flat)
    densities = {TRUE_POSTERIOR: normalize(true_log)}
    for label, (family, lam) in approximations.items():
        logq = jax.vmap(lambda li, zs, family=family: family.distribution(li).log_prob(zs))(
            jnp.asarray(lam), flat
        )
        densities[label] = normalize(logq)
    return PosteriorGrid(np.asarray(grids), densities)
