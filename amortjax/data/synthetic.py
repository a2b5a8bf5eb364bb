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

This module is the ground truth for every estimator and optimizer in the tests. The formulas
are written directly; `linear_gaussian_vae` expresses the same model as the library's NumPyro VAE
(a linear decoder with a Gaussian likelihood, a linear encoder), so that the code path the
library uses on real data is what gets tested against them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.stats import multivariate_normal


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

    def log_marginal(self, x: jax.Array) -> jax.Array:
        """Exact log p(x_i) for x `[n, x_dim]`; returns `[n]`."""
        cov = self.weight @ self.weight.T + jnp.diag(self.noise_scale**2)
        return multivariate_normal.logpdf(x, self.bias, cov)

    def posterior_precision(self) -> jax.Array:
        """S^-1 = I + W^T diag(psi)^-1 W, shared by all datapoints, `[z_dim, z_dim]`."""
        w_scaled = self.weight / self.noise_scale[:, None]
        return jnp.eye(self.z_dim) + w_scaled.T @ w_scaled

    def posterior(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Exact posterior p(z_i | x_i) = N(mean_i, cov).

        Args:
            x: observations, `[n, x_dim]`.

        Returns:
            `(mean [n, z_dim], cov [z_dim, z_dim])`.
        """
        cov = jnp.linalg.inv(self.posterior_precision())
        proj = (self.weight / self.noise_scale[:, None] ** 2).T  # W^T diag(psi)^-1
        mean = (x - self.bias) @ proj.T @ cov.T
        return mean, cov

    def best_diagonal(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The diagonal Gaussian closest in KL(q || p(z|x)): `(mean [n, z_dim], scale [z_dim])`."""
        mean, _ = self.posterior(x)
        scale = 1.0 / jnp.sqrt(jnp.diag(self.posterior_precision()))
        return mean, scale

    def kl_to_posterior(self, x: jax.Array, loc: jax.Array, scale: jax.Array) -> jax.Array:
        """KL(N(loc, diag(scale**2)) || p(z_i | x_i)) per datapoint.

        Args:
            x: `[n, x_dim]`.
            loc: `[n, z_dim]`.
            scale: `[n, z_dim]` or `[z_dim]`.

        Returns:
            `[n]`, in nats.
        """
        mean, cov = self.posterior(x)
        prec = self.posterior_precision()
        scale = jnp.broadcast_to(scale, loc.shape)
        diff = loc - mean
        trace_term = jnp.sum(jnp.diag(prec) * scale**2, axis=-1)
        maha = jnp.einsum("ni,ij,nj->n", diff, prec, diff)
        _, logdet_cov = jnp.linalg.slogdet(cov)
        logdet_q = 2.0 * jnp.sum(jnp.log(scale), axis=-1)
        return 0.5 * (trace_term + maha - self.z_dim + logdet_cov - logdet_q)

    def elbo(self, x: jax.Array, loc: jax.Array, scale: jax.Array) -> jax.Array:
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
        z_dim: latent size (at most x_dim).
        noise_scale: observation noise standard deviation. With `diagonal_posterior` it is shared
            by all dimensions; otherwise each dimension's scale is drawn around it.
        diagonal_posterior: if True, W has orthogonal columns and the noise is isotropic, so
            W^T diag(psi)^-1 W is diagonal and the exact posterior is a diagonal Gaussian: the
            diagonal family then contains it and the ELBO can equal log p(x).

    Returns:
        The model.
    """
    if z_dim > x_dim:
        raise ValueError(f"z_dim={z_dim} must not exceed x_dim={x_dim}")
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


def linear_gaussian_vae(
    lg: LinearGaussian, *, encoder: str = "best_diagonal"
) -> tuple[Callable, Callable, dict]:
    """The linear-Gaussian model as a `vae_model` with a linear decoder and Gaussian likelihood.

    Args:
        lg: the model.
        encoder: what the (linear) amortized encoder outputs for each x_i: "best_diagonal" (mean
            m_i and the best diagonal scales; the exact posterior when it is diagonal), or
            "prior" (N(0, I) whatever x_i is).

    Returns:
        `(model, guide, params)`: a NumPyro model and amortized guide, and the parameters
        (decoder, noise scale, encoder) that make them this model and this q.
    """
    # Imported here: the data package must not depend on the modelling layers at import time.
    from amortjax.families import DiagonalGaussian
    from amortjax.guides import amortized_guide
    from amortjax.models import vae_model
    from amortjax.nets import MLP

    decoder = MLP(hidden_sizes=(), out_size=lg.x_dim)
    enc = MLP(hidden_sizes=(), out_size=2 * lg.z_dim)
    model = vae_model(decoder, z_dim=lg.z_dim, likelihood="gaussian")
    guide = amortized_guide(enc, x_dim=lg.x_dim, family=DiagonalGaussian())

    if encoder == "best_diagonal":
        cov = jnp.linalg.inv(lg.posterior_precision())
        # m_i = (x_i - b) @ A with A = diag(psi)^-1 W S^T, affine in x_i.
        a = (lg.weight / lg.noise_scale[:, None] ** 2) @ cov.T
        loc_kernel, loc_bias = a, -lg.bias @ a
        _, scale = lg.best_diagonal(lg.bias[None])
    elif encoder == "prior":
        loc_kernel, loc_bias = jnp.zeros((lg.x_dim, lg.z_dim)), jnp.zeros(lg.z_dim)
        scale = jnp.ones(lg.z_dim)
    else:
        raise ValueError(f"unknown encoder {encoder!r}; choose 'best_diagonal' or 'prior'")
    params = {
        "decoder$params": {"Dense_0": {"kernel": lg.weight.T, "bias": lg.bias}},
        "log_noise_scale": jnp.log(lg.noise_scale),
        "encoder$params": {
            "Dense_0": {
                "kernel": jnp.concatenate([loc_kernel, jnp.zeros_like(loc_kernel)], axis=1),
                "bias": jnp.concatenate([loc_bias, jnp.log(scale.reshape(-1))]),
            }
        },
    }
    return model, guide, params
