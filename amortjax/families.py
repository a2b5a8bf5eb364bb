"""Variational families over the flattened local latent vector of one datapoint.

A family fixes the layout of the variational parameters lambda_i `[..., num_params(z_dim)]` so
that an encoder (amortized), free per-datapoint parameters (per-example) and a refinement
(semi-amortized) all produce the same thing, and turns lambda_i into a NumPyro distribution with
event shape `[z_dim]`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from amortjax.checks import concrete
from amortjax.flows import AffineCouplingFlow


class Family(Protocol):
    """The interface every family implements.

    Families are immutable values (frozen dataclasses): two instances with the same settings
    are equal and hash alike, so the compiled functions that take a family as a static
    argument (the local optimizer, the refinement) compile once per family, not once per
    instance.
    """

    name: str

    def num_params(self, z_dim: int) -> int:
        """Size of lambda for a latent of size z_dim."""
        ...

    def z_dim(self, num_params: int) -> int:
        """The inverse of `num_params`; a ValueError when there is no such z_dim."""
        ...

    def distribution(self, params: jax.Array) -> dist.Distribution:
        """q(z; lambda) for params `[..., num_params]`, event shape `[z_dim]`."""
        ...

    def standard_params(self, z_dim: int) -> jax.Array:
        """lambda of the standard normal N(0, I) (the prior of a VAE), `[num_params]`."""
        ...

    def mean(self, params: jax.Array) -> jax.Array:
        """E_q[z] for params `[..., num_params]`, `[..., z_dim]`."""
        ...


@dataclasses.dataclass(frozen=True)
class DiagonalGaussian:
    """The fully factorized Gaussian (FFG): q(z) = N(z; mu, diag(sigma^2)).

    Layout: lambda = [mu (z_dim), log sigma (z_dim)].
    """

    name = "diagonal"

    def num_params(self, z_dim: int) -> int:
        return 2 * z_dim

    def z_dim(self, num_params: int) -> int:
        """The z_dim with `num_params(z_dim) == num_params` (half of it)."""
        if num_params < 2 or num_params % 2:
            raise ValueError(
                f"the diagonal Gaussian's lambda is [loc, log_scale] of 2 z_dim values; "
                f"{num_params} values is not 2 z_dim for any z_dim >= 1"
            )
        return num_params // 2

    def split(self, params: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns `(loc, log_scale)`, each `[..., z_dim]`."""
        self.z_dim(params.shape[-1])  # an odd width: a ValueError naming it
        loc, log_scale = jnp.split(params, 2, axis=-1)
        return loc, log_scale

    def pack(self, loc: jax.Array, scale: jax.Array) -> jax.Array:
        """lambda `[..., 2 * z_dim]` from a location and a scale sigma > 0 (not log sigma, which
        `split` returns: `pack(loc, jnp.exp(log_scale))` inverts `split`).

        Raises:
            ValueError: if a concrete (not traced) scale has an entry that is not positive and
                finite (under `jit` no check is possible: its log would be NaN or -inf).
        """
        _refuse_non_positive(
            concrete(scale),
            "scale",
            "pack takes the scale sigma, not log sigma (split returns log sigma: pack(loc, "
            "jnp.exp(log_scale)))",
        )
        loc, scale = jnp.broadcast_arrays(loc, scale)
        return jnp.concatenate([loc, jnp.log(scale)], axis=-1)

    def distribution(self, params: jax.Array) -> dist.Distribution:
        loc, log_scale = self.split(params)
        return dist.Normal(loc, jnp.exp(log_scale)).to_event(1)

    def mean(self, params: jax.Array) -> jax.Array:
        return self.split(params)[0]

    def standard_params(self, z_dim: int) -> jax.Array:
        return jnp.zeros(2 * z_dim)


def _refuse_non_positive(values: np.ndarray | None, what: str, fix: str) -> None:
    """Refuses concrete values that are not positive and finite (their log would be NaN or
    -inf in lambda), naming how many, the first, and the fix."""
    if values is None:
        return
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise ValueError(
            f"{what} must be positive and finite (lambda holds its log); {int(bad.sum())} of its "
            f"entries are not, the first at index {where} ({float(values[tuple(where)])!r}). " + fix
        )


@dataclasses.dataclass(frozen=True)
class FullRankGaussian:
    """The full-rank Gaussian: q(z) = N(z; mu, L L^T), L lower triangular with positive diagonal.

    Layout: lambda = [mu (z_dim), the z_dim (z_dim + 1) / 2 entries of L's lower triangle in
    row-major order (`jnp.tril_indices`), with each diagonal entry L_jj stored as log L_jj].
    The log keeps L a valid Cholesky factor for any real lambda, and lambda = 0 is N(0, I).
    log q(z) = -z_dim/2 log(2 pi) - sum_j log L_jj - ||L^-1 (z - mu)||^2 / 2, and z = mu + L eps,
    eps ~ N(0, I), is reparameterized.
    """

    name = "full_rank"

    def num_params(self, z_dim: int) -> int:
        return z_dim + z_dim * (z_dim + 1) // 2

    def z_dim(self, num_params: int) -> int:
        """The z_dim with `num_params(z_dim) == num_params` (the root of z^2 + 3z - 2P = 0)."""
        z_dim = (math.isqrt(9 + 8 * num_params) - 3) // 2
        if z_dim < 1 or self.num_params(z_dim) != num_params:
            raise ValueError(
                f"{num_params} parameters is not z_dim + z_dim (z_dim + 1) / 2 for any z_dim >= 1"
            )
        return z_dim

    def split(self, params: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns `(loc [..., z_dim], scale_tril [..., z_dim, z_dim])` from params `[..., P]`."""
        z_dim = self.z_dim(params.shape[-1])
        rows, cols = np.tril_indices(z_dim)
        diag = np.flatnonzero(rows == cols)
        loc, tril = params[..., :z_dim], params[..., z_dim:]
        # Only the diagonal goes through exp: an exp of every entry masked by a `where` would
        # give NaN gradients where an off-diagonal entry overflows.
        tril = tril.at[..., diag].set(jnp.exp(tril[..., diag]))
        scale_tril = jnp.zeros((*params.shape[:-1], z_dim, z_dim), params.dtype)
        return loc, scale_tril.at[..., rows, cols].set(tril)

    def pack(self, loc: jax.Array, scale_tril: jax.Array) -> jax.Array:
        """Inverse of `split`: loc `[..., z_dim]` and a lower-triangular L with positive diagonal
        `[..., z_dim, z_dim]` (e.g. `jnp.linalg.cholesky(cov)`) to params `[..., P]`.

        Raises:
            ValueError: if the shapes do not match, or if a concrete (not traced) `scale_tril`
                has a diagonal entry that is not positive and finite (its log would be NaN or
                -inf) or a nonzero entry above its diagonal (a covariance, or an upper factor,
                given for L). Under `jit` no check is possible: such entries give NaN / -inf,
                and those above the diagonal are dropped.
        """
        z_dim = loc.shape[-1]
        if scale_tril.shape[-2:] != (z_dim, z_dim):
            raise ValueError(
                f"scale_tril must be [..., {z_dim}, {z_dim}] for loc [..., {z_dim}], "
                f"got {scale_tril.shape}"
            )
        tril = concrete(scale_tril)
        if tril is not None and np.any(np.triu(tril, 1)):
            raise ValueError(
                "scale_tril has nonzero entries above its diagonal (largest "
                f"{float(np.abs(np.triu(tril, 1)).max())!r}), which lambda cannot hold: give the "
                "lower Cholesky factor L of the covariance (jnp.linalg.cholesky(cov), or "
                "scipy.linalg.cholesky(cov, lower=True)), not the covariance or an upper factor"
            )
        _refuse_non_positive(
            None if tril is None else np.diagonal(tril, axis1=-2, axis2=-1),
            "scale_tril's diagonal",
            "A Cholesky factor (jnp.linalg.cholesky of a positive-definite covariance) has one; "
            "a factor with negative diagonal entries gives the same covariance with those "
            "columns negated",
        )
        rows, cols = np.tril_indices(z_dim)
        tril = scale_tril[..., rows, cols]
        tril = jnp.where(rows == cols, jnp.log(jnp.where(rows == cols, tril, 1.0)), tril)
        batch = jnp.broadcast_shapes(loc.shape[:-1], tril.shape[:-1])
        loc = jnp.broadcast_to(loc, (*batch, z_dim))
        tril = jnp.broadcast_to(tril, (*batch, tril.shape[-1]))
        return jnp.concatenate([loc, tril], axis=-1)

    def distribution(self, params: jax.Array) -> dist.Distribution:
        loc, scale_tril = self.split(params)
        return dist.MultivariateNormal(loc, scale_tril=scale_tril)

    def mean(self, params: jax.Array) -> jax.Array:
        return params[..., : self.z_dim(params.shape[-1])]

    def standard_params(self, z_dim: int) -> jax.Array:
        return jnp.zeros(self.num_params(z_dim))


def check_num_params(
    family: Family, num_params: int, z_dim: int | None = None, source: str = "the encoder"
) -> None:
    """Refuses `num_params` values per datapoint that cannot be lambda of `family` (of
    `family.num_params(z_dim)` exactly, when the model's latent size z_dim is known).

    Raises:
        ValueError: naming the sizes and the fix (an output layer of `family.num_params(z_dim)`).
    """
    if z_dim is not None:
        expected = family.num_params(z_dim)
        if num_params != expected:
            raise ValueError(
                f"{source} outputs {num_params} values per datapoint, but the {family.name} "
                f"family over the model's {z_dim} local latent dimensions needs "
                f"family.num_params({z_dim}) = {expected}; give {source} that output size "
                f"(e.g. MLP(hidden, family.num_params({z_dim})))"
            )
        return
    try:
        family.z_dim(num_params)
    except ValueError as err:
        raise ValueError(
            f"{source} outputs {num_params} values per datapoint, which cannot parameterize the "
            f"{family.name} family ({err}); give {source} the output size "
            "family.num_params(z_dim)"
        ) from None


FAMILIES: dict[str, Family] = {
    "diagonal": DiagonalGaussian(),
    "full_rank": FullRankGaussian(),
    "flow": AffineCouplingFlow(),
}


FAMILY_METHODS = ("num_params", "z_dim", "distribution", "standard_params", "mean")


def resolve_family(where: str, family: Family | None) -> Family:
    """An entry point's family: None gives the diagonal Gaussian; anything that is not a
    family instance (a name, a class, another object) is refused, naming the fix."""
    if family is None:
        return DiagonalGaussian()
    if isinstance(family, str):
        raise ValueError(
            f"{where}: family must be a family instance, e.g. FullRankGaussian(); got the name "
            f"{family!r} (get_family({family!r}) gives the instance; names: {sorted(FAMILIES)})"
        )
    if isinstance(family, type):
        raise ValueError(
            f"{where}: family must be a family instance; got the class {family.__name__}: "
            f"call it, {family.__name__}()"
        )
    missing = [m for m in FAMILY_METHODS if not callable(getattr(family, m, None))]
    if missing or not isinstance(getattr(family, "name", None), str):
        raise ValueError(
            f"{where}: family must be a variational family (DiagonalGaussian(), "
            f"FullRankGaussian(), AffineCouplingFlow(...), or an object with a name and "
            f"{', '.join(FAMILY_METHODS)}); got {type(family).__name__}"
            + (f", which lacks {missing}" if missing else "")
        )
    return family


def get_family(name: str) -> Family:
    """Looks up a family by name, with an error listing the known ones."""
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown family {name!r}; choose one of {sorted(FAMILIES)}") from None
