"""Factor analysis and probabilistic PCA as a NumPyro model, with its exact answers.

    z_i ~ N(0, I_d),    x_i | z_i ~ N(W z_i + b, diag(psi)),

psi free per dimension (factor analysis) or one shared sigma^2 (probabilistic PCA, Tipping &
Bishop 1999). W, b and log sqrt(psi) are NumPyro params, so the model trains by SVI with any
guide of the library; `as_linear_gaussian` reads trained params back as the closed-form
`LinearGaussian` (exact log p(x_i), posterior, best diagonal Gaussian) and `ppca_mle` is the
maximum-likelihood PPCA fit in closed form:

    W_ML = U_d (Lambda_d - sigma^2 I)^{1/2},    sigma^2_ML = mean of the x_dim - d smallest
    eigenvalues of the sample covariance,        b_ML = sample mean,

with U_d, Lambda_d the top d eigenvectors and eigenvalues. For PPCA the ELBO with a diagonal
Gaussian q is maximized at a W_ML whose columns are orthogonal, where the exact posterior is
diagonal: the optimum of the ELBO is the maximum likelihood (Lucas et al. 2019), a ground truth
for amortized and per-example training alike.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from amortjax.models.core import data_plate
from amortjax.models.linear_gaussian import LinearGaussian

NOISE = ("diagonal", "isotropic")


def factor_analysis_model(
    x_dim: int, z_dim: int, *, noise: str = "diagonal", init_scale: float = 0.1
) -> Callable[..., None]:
    """Factor analysis (noise="diagonal") or probabilistic PCA (noise="isotropic").

    Args:
        x_dim: observation size.
        z_dim: number of factors d.
        noise: "diagonal" (psi_j per dimension) or "isotropic" (one sigma^2).
        init_scale: W starts at N(0, init_scale^2) entries (from the param's PRNG key).

    Returns:
        A NumPyro model `model(x, *, n_data=None)`, x `[batch, x_dim]`, with params
        "fa_weight" `[x_dim, z_dim]`, "fa_bias" `[x_dim]`, "fa_log_noise_scale" (`[x_dim]` or
        `[]`), local latent site "z" `[batch, z_dim]` and observed site "x".
    """
    if noise not in NOISE:
        raise ValueError(f"unknown noise {noise!r}; choose one of {list(NOISE)}")
    noise_shape = (x_dim,) if noise == "diagonal" else ()

    def model(x: jax.Array, *, n_data: int | None = None) -> None:
        weight = numpyro.param(
            "fa_weight", lambda key: init_scale * jax.random.normal(key, (x_dim, z_dim))
        )
        bias = numpyro.param("fa_bias", jnp.zeros(x_dim))
        log_scale = numpyro.param("fa_log_noise_scale", jnp.zeros(noise_shape))
        with data_plate(x, n_data):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([z_dim]).to_event(1))
            scale = jnp.broadcast_to(jnp.exp(log_scale), (x_dim,))
            numpyro.sample("x", dist.Normal(z @ weight.T + bias, scale).to_event(1), obs=x)

    return model


def as_linear_gaussian(params: dict) -> LinearGaussian:
    """The closed-form model of trained `factor_analysis_model` params."""
    weight = jnp.asarray(params["fa_weight"])
    scale = jnp.broadcast_to(jnp.exp(params["fa_log_noise_scale"]), (weight.shape[0],))
    return LinearGaussian(weight=weight, bias=jnp.asarray(params["fa_bias"]), noise_scale=scale)


def ppca_mle(x: np.ndarray | jax.Array, z_dim: int) -> LinearGaussian:
    """The maximum-likelihood probabilistic PCA of data x `[N, x_dim]` with z_dim factors
    (Tipping & Bishop 1999), with W's columns along the principal axes."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or not 0 < z_dim < x.shape[1]:
        raise ValueError(f"need x [N, x_dim] and 0 < z_dim < x_dim; got {x.shape}, {z_dim}")
    mean = x.mean(0)
    cov = np.cov(x - mean, rowvar=False, bias=True)
    eigvals, eigvecs = np.linalg.eigh(cov)
    eigvals, eigvecs = eigvals[::-1], eigvecs[:, ::-1]
    sigma2 = eigvals[z_dim:].mean()
    weight = eigvecs[:, :z_dim] * np.sqrt(np.maximum(eigvals[:z_dim] - sigma2, 0.0))
    return LinearGaussian(
        weight=jnp.asarray(weight, jnp.float32),
        bias=jnp.asarray(mean, jnp.float32),
        noise_scale=jnp.full(x.shape[1], np.sqrt(sigma2), jnp.float32),
    )


def linear_gaussian_params(lg: LinearGaussian, *, noise: str = "diagonal") -> dict:
    """`factor_analysis_model` params that make it the given closed-form model.

    Raises:
        ValueError: noise="isotropic" for a model whose noise scales differ (probabilistic PCA
            has one; their geometric mean would make another model, off by a nat or more).
    """
    if noise not in NOISE:
        raise ValueError(f"noise must be one of {NOISE}, got {noise!r}")
    log_scale = jnp.log(lg.noise_scale)
    if noise == "isotropic":
        scales = np.asarray(lg.noise_scale, np.float64)
        if not np.allclose(scales, scales.flat[0], rtol=1e-5, atol=0):
            raise ValueError(
                f"linear_gaussian_params: noise='isotropic' needs one noise scale, but this "
                f"model's range from {scales.min():.4g} to {scales.max():.4g}; use "
                "noise='diagonal' (factor analysis) for it."
            )
        log_scale = log_scale.mean()
    return {"fa_weight": lg.weight, "fa_bias": lg.bias, "fa_log_noise_scale": log_scale}
