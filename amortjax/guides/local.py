"""Guides with free variational parameters per datapoint (per-example inference).

`given_params_guide` is q(z_i; lambda_i) for lambdas passed in by the caller (e.g. the output of
the local optimizer, `amortjax.inference.local.fit_local`), so the evaluators that take a guide
(ELBO, IWAE-k) score q* exactly as they score an encoder's q.

`local_guide` holds the lambdas itself, as one NumPyro param `[n_data, num_params]`, for training
them by SVI (with or without the model's parameters) on minibatches: row i is read at the data
plate's index i, so the plate must carry the minibatch's true indices (the `Trainer` does this;
see `amortjax.inference.training.with_data_indices`), and the optimizer must leave the rows of
datapoints outside a minibatch alone (see `amortjax.inference.sparse.make_local_optimizer`).
Neither guide is an encoder: a new datapoint has no lambda until one is fitted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpyro

from amortjax.families import Family, resolve_family
from amortjax.guides.global_latents import draw_globals
from amortjax.latents import (
    Site,
    latent_size,
    log_joint_unconstrained,
    resolve_site,
    sample_local,
)
from amortjax.models import data_plate
from amortjax.traces import log_weights


def given_params_guide(family: Family | None = None, *, site: Site = "z") -> Callable[..., None]:
    """q(z_i; lambda_i) with lambda given for each datapoint of the batch.

    The guide for a (family, site) is built once and reused, so that the evaluators that take
    the guide as a static argument of a compiled function (`evaluate_bounds`) compile once.

    Args:
        family: the variational family; the diagonal Gaussian by default.
        site: the model's local latents (a site name or a `LocalLatents`).

    Returns:
        A guide `guide(x, lam, *, n_data=None)`, x `[batch, ...]`, lam `[batch, num_params]`.
    """
    return _given_params_guide(resolve_family("given_params_guide", family), site)


@functools.cache
def _given_params_guide(family: Family, site: Site) -> Callable[..., None]:
    def guide(x: jax.Array, lam: jax.Array, *, n_data: int | None = None) -> None:
        with data_plate(x, n_data):
            sample_local(site, family.distribution(lam))

    return guide


LOCAL_PARAMS = "local$params"
"""Name of `local_guide`'s param site; `make_local_optimizer` keys on the "local$" prefix."""


def local_guide(
    n_data: int,
    z_dim: int | None = None,
    family: Family | None = None,
    *,
    site: Site | None = None,
    init_scale: float = 0.0,
    model: Callable | None = None,
    global_guide: Callable | None = None,
) -> Callable[..., None]:
    """q(z_i; lambda_i) with lambda_i a free parameter of each of the n_data datapoints.

    Args:
        n_data: number of datapoints (rows of the parameter).
        z_dim: latent size (not needed when the site is a `LocalLatents` or found in `model`).
        family: the variational family; the diagonal Gaussian by default.
        site: the model's local latents (a site name or a `LocalLatents`); None: found in
            `model` if given, else "z".
        init_scale: every row starts at the family's standard parameters (q = N(0, I), the
            prior of a VAE) plus N(0, init_scale^2) noise per entry, drawn from the param's PRNG
            key. The default 0 starts all rows exactly at N(0, I): each row's gradient depends
            on its own x_i, so no noise is needed to break symmetry.
        model: the model the guide is for, to find its local latents by itself.
        global_guide: a guide for the model's global latents (`global_guide(model)`), run
            first, or None.

    Returns:
        A guide `guide(x, *, n_data=None)`, x `[batch, ...]`, with the param site
        `"local$params"` `[n_data, num_params]`. Inside the guide's data plate row `ind` of the
        parameter is q's lambda for the batch's datapoints: with `n_data` given, `ind` are the
        plate's indices (the minibatch's, under `Trainer` or `with_data_indices`); without it,
        the batch is the dataset's first rows and `ind = arange(batch)`. In plain
        `numpyro.infer.SVI` on minibatches, wrap model and guide with
        `amortjax.inference.training.with_data_indices` and pass `data_indices`: NumPyro's own
        subsample indices are random and unrelated to the rows of x. Train it with
        `amortjax.inference.sparse.make_local_optimizer`, so that rows outside a minibatch stay
        put.

    Raises:
        ValueError: (when the guide runs) if the batch or the plate does not fit `n_data` rows.
    """
    family = resolve_family("local_guide", family)
    num_rows = n_data
    if site is None and model is None and z_dim is None:
        raise ValueError("local_guide needs z_dim, a LocalLatents site or the model")

    def init(key: jax.Array | None, size: int) -> jax.Array:
        standard = family.standard_params(size)
        rows = jnp.broadcast_to(standard, (num_rows, standard.shape[0]))
        if init_scale == 0.0:
            return rows
        return rows + init_scale * jax.random.normal(key, rows.shape, rows.dtype)

    def guide(x: jax.Array, *, n_data: int | None = None) -> None:
        if n_data is not None and n_data != num_rows:
            raise ValueError(
                f"the guide holds parameters for {num_rows} datapoints, the plate has "
                f"n_data={n_data}"
            )
        if x.shape[0] > num_rows:
            raise ValueError(
                f"a batch of {x.shape[0]} datapoints, but the guide holds parameters for {num_rows}"
            )
        draw_globals(global_guide, x, n_data)
        local = resolve_site(site, model, x)
        size = latent_size(local, z_dim)
        if size is None:
            raise ValueError(f"local_guide needs z_dim for the site {local!r}")
        lam = numpyro.param(
            LOCAL_PARAMS,
            functools.partial(init, size=size) if init_scale else init(None, size),
        )
        with data_plate(x, n_data) as ind:
            sample_local(local, family.distribution(lam[ind]))

    return guide


def local_elbo(
    model: Callable,
    params: dict,
    x: jax.Array,
    lam: jax.Array,
    key: jax.Array,
    *,
    family: Family,
    num_samples: int,
    site: Site = "z",
    stl: bool = False,
) -> jax.Array:
    """S-sample reparameterized estimate of L(lambda; x) for ONE datapoint,

        L(lambda; x) ~= (1/S) sum_s [log p(x, z_s) - log q(z_s; lambda)],
        z_s = T_lambda(eps_s), eps_s ~ base.

    With `stl=True` ("sticking the landing", Roeder, Wu & Duvenaud 2017) log q is evaluated
    with lambda held fixed, log q(z_s; stop_gradient(lambda)), so the gradient in lambda keeps
    only the path through z_s and drops the score term (1/S) sum_s d/dlambda log q(z; lambda)
    at z = z_s, whose expectation under q is 0: the value is the same estimator, the gradient
    stays unbiased, and its variance vanishes where q equals the posterior (log p(x, z) -
    log q(z) is then constant in z). The per-example optimizer uses it: near q* the gradient
    noise, not the step size, limits how close Adam settles (a flow's thousands of parameters
    per datapoint, especially). z_s are the family's draws in the unconstrained space of the
    local latents (`latents.log_joint_unconstrained`), as in `amortjax.evaluation.bounds`.

    Args:
        model: NumPyro model with local latents in the data plate.
        params: model parameters theta.
        x: one observation, `[x_dim]` (any per-datapoint shape).
        lam: its variational parameters, `[num_params]`.
        key: PRNG key.
        family: the variational family of lam.
        num_samples: S.
        site: the model's local latents (a site name or a `LocalLatents`).
        stl: drop the score term from the gradient in lambda (see above).

    Returns:
        A scalar, differentiable in lam and params.
    """
    xs = jnp.broadcast_to(x, (num_samples, *x.shape))
    if stl:
        u = family.distribution(lam).sample(key, (num_samples,))
        log_q = family.distribution(jax.lax.stop_gradient(lam)).log_prob(u)
        return jnp.mean(log_joint_unconstrained(model, params, xs, u, site) - log_q)
    lams = jnp.broadcast_to(lam, (num_samples, *lam.shape))
    guide = given_params_guide(family, site=site)
    return log_weights(model, guide, params, xs, key, lams).mean()
