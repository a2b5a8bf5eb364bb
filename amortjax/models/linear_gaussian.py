"""A linear-Gaussian model with local latents whose answers are known in closed form.

Factor analysis / probabilistic PCA: for each datapoint

    z_i ~ N(0, I_d),    x_i | z_i ~ N(W z_i + b, diag(psi)),

so that

    log p(x_i)      = log N(x_i; b, W W^T + diag(psi))
    p(z_i | x_i)    = N(m_i, S),   S = (I + W^T diag(psi)^-1 W)^-1,
                                   m_i = S W^T diag(psi)^-1 (x_i - b)

and the best diagonal Gaussian q*(z_i) = argmin KL(q || p(z_i | x_i)) has mean m_i and variances
1 / (S^-1)_jj (reverse KL matches the diagonal of the posterior precision). The ELBO of any
Gaussian q is log p(x_i) - KL(q || p(z_i | x_i)).

This module is the ground truth for every estimator and optimizer in the tests. The closed
forms are computed in float64 with numpy (whatever JAX's precision), so that narrow posteriors
(noise 1e-3) are testable. `amortjax.guides.linear_gaussian.linear_gaussian_vae` expresses the
same model as the library's NumPyro VAE (a linear decoder with a Gaussian likelihood, a linear
encoder), so that the code path the library uses on real data is what gets tested against them.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpy.typing import ArrayLike


class LinearGaussian(NamedTuple):
    """Parameters of x = W z + b + noise, noise ~ N(0, diag(noise_scale**2)).

    Attributes:
        weight: W, `[x_dim, z_dim]`.
        bias: b, `[x_dim]`.
        noise_scale: standard deviation of the observation noise, `[x_dim]`.
    """

    weight: jax.Array
    bias: jax.Array
    noise_scale: jax.Array

    @property
    def x_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def z_dim(self) -> int:
        return self.weight.shape[1]

    def sample(self, key: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
        """Draws n datapoints. Returns `(x [n, x_dim], z [n, z_dim])`."""
        kz, kx = jax.random.split(key)
        z = jax.random.normal(kz, (n, self.z_dim))
        noise = self.noise_scale * jax.random.normal(kx, (n, self.x_dim))
        return z @ self.weight.T + self.bias + noise, z

    def _f64(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """W, b and the noise scales as float64 numpy arrays."""
        return (
            np.asarray(self.weight, np.float64),
            np.asarray(self.bias, np.float64),
            np.asarray(self.noise_scale, np.float64),
        )

    def log_marginal(self, x: ArrayLike) -> np.ndarray:
        """Exact log p(x_i) for x `[n, x_dim]`; returns `[n]` (float64).

        Computed through the Woodbury identity and the matrix-determinant lemma, so that a
        tiny noise (a narrow posterior) costs no precision:
        C^-1 = Psi^-1 - Psi^-1 W S W^T Psi^-1 and log|C| = log|Psi| + log|S^-1|.
        """
        w, b, psi_sd = self._f64()
        r = np.asarray(x, np.float64) - b  # [n, x_dim]
        r_scaled = r / psi_sd**2  # Psi^-1 r
        prec_chol = np.linalg.cholesky(self.posterior_precision())  # S^-1 = L L^T
        proj = np.linalg.solve(prec_chol, (r_scaled @ w).T)  # L^-1 W^T Psi^-1 r, [z_dim, n]
        maha = np.sum(r * r_scaled, axis=1) - np.sum(proj**2, axis=0)
        logdet = 2.0 * np.sum(np.log(psi_sd)) + 2.0 * np.sum(np.log(np.diag(prec_chol)))
        return -0.5 * (self.x_dim * np.log(2.0 * np.pi) + logdet + maha)

    def posterior_precision(self) -> np.ndarray:
        """S^-1 = I + W^T diag(psi)^-1 W, shared by all datapoints, `[z_dim, z_dim]` (float64)."""
        w, _, psi_sd = self._f64()
        w_scaled = w / psi_sd[:, None]
        return np.eye(self.z_dim) + w_scaled.T @ w_scaled

    def posterior(self, x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """Exact posterior p(z_i | x_i) = N(mean_i, cov), in float64.

        Args:
            x: observations, `[n, x_dim]`.

        Returns:
            `(mean [n, z_dim], cov [z_dim, z_dim])`.
        """
        w, b, psi_sd = self._f64()
        prec = self.posterior_precision()
        cov = np.linalg.inv(prec)
        rhs = (np.asarray(x, np.float64) - b) / psi_sd**2 @ w  # W^T Psi^-1 (x_i - b), [n, z]
        mean = np.linalg.solve(prec, rhs.T).T
        return mean, cov

    def best_diagonal(self, x: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """The diagonal Gaussian closest in KL(q || p(z|x)): `(mean [n, z_dim], scale [z_dim])`."""
        mean, _ = self.posterior(x)
        scale = 1.0 / np.sqrt(np.diag(self.posterior_precision()))
        return mean, scale

    def kl_to_posterior(self, x: ArrayLike, loc: ArrayLike, scale: ArrayLike) -> np.ndarray:
        """KL(N(loc, diag(scale**2)) || p(z_i | x_i)) per datapoint, in float64.

        Args:
            x: `[n, x_dim]`.
            loc: `[n, z_dim]`.
            scale: `[n, z_dim]` or `[z_dim]`.

        Returns:
            `[n]`, in nats.
        """
        mean, _ = self.posterior(x)
        prec = self.posterior_precision()
        loc = np.asarray(loc, np.float64)
        scale = np.broadcast_to(np.asarray(scale, np.float64), loc.shape)
        diff = loc - mean
        trace_term = np.sum(np.diag(prec) * scale**2, axis=-1)
        maha = np.einsum("ni,ij,nj->n", diff, prec, diff)
        _, logdet_prec = np.linalg.slogdet(prec)
        logdet_q = 2.0 * np.sum(np.log(scale), axis=-1)
        return 0.5 * (trace_term + maha - self.z_dim - logdet_prec - logdet_q)

    def gaussian_kl_to_posterior(
        self, x: ArrayLike, loc: ArrayLike, scale_tril: ArrayLike
    ) -> np.ndarray:
        """KL(N(loc, L L^T) || p(z_i | x_i)) for a full-rank Gaussian q, in float64.

        Args:
            x: `[n, x_dim]`.
            loc: `[n, z_dim]`.
            scale_tril: L, `[n, z_dim, z_dim]` or `[z_dim, z_dim]`, lower triangular.

        Returns:
            `[n]`, in nats.
        """
        mean, _ = self.posterior(x)
        prec = self.posterior_precision()
        loc = np.asarray(loc, np.float64)
        tril = np.broadcast_to(np.asarray(scale_tril, np.float64), (*loc.shape, self.z_dim))
        diff = loc - mean
        trace_term = np.einsum("ij,nik,njk->n", prec, tril, tril)  # tr(P L L^T)
        maha = np.einsum("ni,ij,nj->n", diff, prec, diff)
        _, logdet_prec = np.linalg.slogdet(prec)
        logdet_q = 2.0 * np.sum(np.log(np.abs(np.diagonal(tril, axis1=1, axis2=2))), axis=-1)
        return 0.5 * (trace_term + maha - self.z_dim - logdet_prec - logdet_q)

    def elbo(self, x: ArrayLike, loc: ArrayLike, scale: ArrayLike) -> np.ndarray:
        """Exact ELBO of q = N(loc, diag(scale**2)): log p(x_i) - KL(q || p(z_i|x_i)), `[n]`."""
        return self.log_marginal(x) - self.kl_to_posterior(x, loc, scale)


def make_linear_gaussian(
    key: jax.Array,
    *,
    x_dim: int,
    z_dim: int,
    noise_scale: float = 0.5,
    diagonal_posterior: bool = False,
) -> LinearGaussian:
    """A random linear-Gaussian model.

    Args:
        key: PRNG key.
        x_dim: observation size.
        z_dim: latent size (larger than x_dim gives a strongly correlated posterior).
        noise_scale: observation noise standard deviation. With `diagonal_posterior` it is shared
            by all dimensions; otherwise each dimension's scale is drawn around it.
        diagonal_posterior: if True, W has orthogonal columns and the noise is isotropic, so
            W^T diag(psi)^-1 W is diagonal and the exact posterior is a diagonal Gaussian: the
            diagonal family then contains it and the ELBO can equal log p(x).

    Returns:
        The model.
    """
    if diagonal_posterior and z_dim > x_dim:
        raise ValueError(
            f"diagonal_posterior needs z_dim <= x_dim (orthogonal loadings); got z_dim={z_dim}, "
            f"x_dim={x_dim}"
        )
    kw, kb, kn = jax.random.split(key, 3)
    bias = jax.random.normal(kb, (x_dim,))
    if diagonal_posterior:
        q, _ = jnp.linalg.qr(jax.random.normal(kw, (x_dim, z_dim)))
        col_scales = jnp.linspace(0.5, 2.0, z_dim)
        weight = q * col_scales
        noise = jnp.full((x_dim,), noise_scale)
    else:
        weight = jax.random.normal(kw, (x_dim, z_dim))
        noise = noise_scale * jnp.exp(0.3 * jax.random.normal(kn, (x_dim,)))
    return LinearGaussian(weight=weight, bias=bias, noise_scale=noise)
