"""NumPyro guides for the inference regimes; here, the amortized one.

NumPyro has no amortized autoguide: `amortized_guide` makes q(z_i | x_i) = q(z_i; f_phi(x_i)),
an encoder network's output read as the parameters of a variational family, usable with plain
`numpyro.infer.SVI` and any NumPyro ELBO (Trace_ELBO, TraceMeanField_ELBO, RenyiELBO).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
from flax.errors import ScopeParamShapeError
from numpyro.contrib.module import flax_module

from amortjax.checks import check_has_params
from amortjax.families import Family, check_num_params, resolve_family
from amortjax.guides.global_latents import draw_globals
from amortjax.latents import Site, latent_size, resolve_site, sample_local
from amortjax.models import data_plate


def amortized_guide(
    encoder: nn.Module,
    *,
    x_dim: int,
    family: Family | None = None,
    site: Site | None = None,
    model: Callable | None = None,
    global_guide: Callable | None = None,
) -> Callable[..., None]:
    """q_phi(z_i | x_i) = q(z_i; lambda_i), lambda_i = encoder(x_i).

    Args:
        encoder: a Flax module mapping x `[..., x_dim]` to lambda `[..., family.num_params]`.
        x_dim: observation size (for the encoder's initialization).
        family: the variational family; the diagonal Gaussian by default.
        site: the model's local latents: a site name (one real vector per datapoint) or the
            `LocalLatents` of `find_local_latents(model, x)` (any sites, shapes and supports;
            lambda then parameterizes q over their flat unconstrained vector). None: found in
            `model` if given, else the VAE's "z".
        model: the model the guide is for, to find its local latents by itself.
        global_guide: a guide for the model's global latents (`global_guide(model)`), run
            first, or None for a model without global latents.

    Returns:
        A NumPyro guide `guide(x, *, n_data=None)` with the param site "encoder$params".
    """
    family = resolve_family("amortized_guide", family)

    def guide(x: jax.Array, *, n_data: int | None = None) -> None:
        draw_globals(global_guide, x, n_data)
        net = flax_module("encoder", encoder, input_shape=(1, x_dim))
        local = resolve_site(site, model, x)
        lam = net(x)
        check_num_params(family, lam.shape[-1], latent_size(local))
        with data_plate(x, n_data):
            sample_local(local, family.distribution(lam))

    return guide


def encode(encoder: nn.Module, params: dict, x: jax.Array) -> jax.Array:
    """The encoder's variational parameters lambda `[..., num_params]` for x `[..., x_dim]`.

    Raises:
        ValueError: params without "encoder$params", or parameters of another architecture
            (Flax's shape error, with the fix).
    """
    check_has_params("encode", params, "encoder$params")
    try:
        return encoder.apply({"params": params["encoder$params"]}, x)
    except ScopeParamShapeError as err:
        raise ValueError(
            f"encode: the encoder's parameters do not fit this encoder on x of width "
            f"{x.shape[-1]} ({str(err).splitlines()[0][:200]}): pass the parameters this "
            "encoder was trained with, or build the encoder with the input and output sizes "
            "they have"
        ) from err
