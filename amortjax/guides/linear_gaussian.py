"""The linear-Gaussian model (`amortjax.models.linear_gaussian`) as the library's NumPyro VAE
and amortized guide, with the encoder at a known point (the exact best diagonal Gaussian of each
datapoint's posterior, or the prior), so that estimators and optimizers run on the library's
own code path are tested against closed forms.
"""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from amortjax.families import DiagonalGaussian
from amortjax.guides.amortized import amortized_guide
from amortjax.models import vae_model
from amortjax.models.linear_gaussian import LinearGaussian
from amortjax.nets import MLP


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
    decoder = MLP(hidden_sizes=(), out_size=lg.x_dim)
    enc = MLP(hidden_sizes=(), out_size=2 * lg.z_dim)
    model = vae_model(decoder, z_dim=lg.z_dim, likelihood="gaussian")
    guide = amortized_guide(enc, x_dim=lg.x_dim, family=DiagonalGaussian())

    if encoder == "best_diagonal":
        # m_i = (x_i - b) @ A with A = diag(psi)^-1 W S^T, affine in x_i (float64, then cast).
        w, b, psi_sd = lg._f64()
        a = np.linalg.solve(lg.posterior_precision(), (w / psi_sd[:, None] ** 2).T).T
        loc_kernel, loc_bias = jnp.asarray(a, jnp.float32), jnp.asarray(-b @ a, jnp.float32)
        _, scale = lg.best_diagonal(b[None])
        scale = jnp.asarray(scale, jnp.float32)
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
