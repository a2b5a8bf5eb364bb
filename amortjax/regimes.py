"""The three regimes of inference as objects: how each datapoint's variational parameters are made.

A regime differs from another only in how it produces lambda_i, the parameters of q(z_i | x_i)
(DESIGN.md, in `../shared/` beside the repository); the model, the family, the ELBO and every
estimator are shared:

    Amortized(encoder)                     lambda_i = f_phi(x_i)
    PerExample(settings)                   lambda_i free per datapoint: trained as parameters
                                           (row-sparse Adam), fitted by q* for new data
    SemiAmortized(encoder, settings, mode) lambda_i = refine_K(f_phi(x_i)), K SGD steps on the
                                           local ELBO; encoder None: K steps from N(0, I)

Each regime gives

- `guide(model, x, global_guide=None)`: the NumPyro guide to train with (`Trainer`, `fit` or
  plain `numpyro.infer.SVI`); it finds the model's local latents itself;
- `optimizer(learning_rate, **kwargs)`: the optax optimizer its parameters need (row-sparse
  Adam for per-datapoint parameters, so rows outside a minibatch stay put; Adam otherwise);
- `infer(model, params, x, key)`: lambda `[N, num_params]` for (new) data x with the trained
  params, and its cost (`Inferred`).

So comparing regimes is one loop:

    for regime in (Amortized(enc), PerExample(), SemiAmortized(enc, RefineSettings(5, 0.01))):
        trainer = Trainer(model, regime.guide(model, x), regime.optimizer(1e-3), ...)
        params = fit(trainer, x, key=key, epochs=20).params
        lam = regime.infer(model, params, x_test, key).params

and a new regime (another refinement, another optimizer) is one new class with these three
methods.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from amortjax.checks import check_has_params, check_indices, check_key
from amortjax.engine import COMPILED_FACTORY
from amortjax.families import DiagonalGaussian, Family, check_num_params, resolve_family
from amortjax.guides.amortized import amortized_guide, encode
from amortjax.guides.local import LOCAL_PARAMS, local_guide
from amortjax.guides.semi_amortized import MODES, check_refine_settings, semi_amortized_guide
from amortjax.inference.local import LocalFit, QStarSettings, fit_local
from amortjax.inference.objectives import make_optimizer
from amortjax.inference.refine import RefineSettings, check_refinement, refine
from amortjax.inference.sparse import make_local_optimizer
from amortjax.latents import Site, find_local_latents, latent_size, resolve_site
from amortjax.traces import check_data


class Inferred(NamedTuple):
    """A regime's variational parameters for a batch of data, and what they cost.

    Attributes:
        params: lambda, `[N, num_params]`.
        start: where an optimizing regime started (the encoder's output, N(0, I) or `init`),
            `[N, num_params]`; for `Amortized` the same as params.
        steps: optimizer steps per datapoint, `[N]` (0 for an encoder alone).
        seconds: wall time of the call (it includes compilation on a first call; a second call
            of the same regime on data of the same shape is compiled already).
        fit: `PerExample`'s `LocalFit` (convergence record, ELBO and IWAE of q*), else None.
    """

    params: np.ndarray
    start: np.ndarray
    steps: np.ndarray
    seconds: float
    fit: LocalFit | None = None


def _x_dim(x) -> int:
    x = np.asarray(x) if not isinstance(x, jax.Array) else x
    if x.ndim != 2:
        raise ValueError(
            f"a regime's guide needs x as [num_datapoints, x_dim] (the encoder's input); got "
            f"shape {x.shape}: flatten each datapoint first"
        )
    return int(x.shape[1])


@dataclasses.dataclass(frozen=True, eq=False)
class Amortized:
    """lambda_i = f_phi(x_i): an encoder (a VAE's).

    Attributes:
        encoder: Flax module x `[..., x_dim]` -> lambda `[..., family.num_params(D)]`.
        family: the variational family (diagonal Gaussian by default).
        site: the model's local latents; None: found in the model.
    """

    encoder: nn.Module
    family: Family = dataclasses.field(default_factory=DiagonalGaussian)
    site: Site | None = None
    name: str = "amortized"

    def __post_init__(self) -> None:
        resolve_family("Amortized", self.family)

    def guide(self, model: Callable, x, global_guide: Callable | None = None) -> Callable:
        """`amortized_guide` for model, sized by the training data x `[N, x_dim]`."""
        return amortized_guide(
            self.encoder,
            x_dim=_x_dim(x),
            family=self.family,
            site=self.site,
            model=model,
            global_guide=global_guide,
        )

    def optimizer(self, learning_rate: float, **kwargs: Any) -> optax.GradientTransformation:
        """Adam (`make_optimizer`, which takes the same keyword arguments)."""
        return make_optimizer(learning_rate, **kwargs)

    def infer(
        self, model: Callable, params: dict, x, key: jax.Array | None = None, *, indices=None
    ) -> Inferred:
        """The encoder's lambda for x `[N, x_dim]` (key and indices unused: encoding draws
        nothing; they are taken so that one call serves the three regimes)."""
        del indices
        x = check_data(model, params, x)
        check_has_params("Amortized.infer", params, "encoder$params")
        start = time.perf_counter()
        lam = np.asarray(jax.block_until_ready(_cached(_encode_jit, self.encoder)(params, x)))
        seconds = time.perf_counter() - start
        # (the model's local latent size; its global latents, if any, a global guide covers)
        check_num_params(self.family, lam.shape[1], find_local_latents(model, x, params).size)
        return Inferred(lam, lam, np.zeros(lam.shape[0], np.int32), seconds)


def _cached(factory: Callable, *args: Any) -> Callable:
    """`factory(*args)` from its cache (so a second call runs compiled), or built afresh when
    an argument cannot be hashed (e.g. a step size given as an array)."""
    try:
        hash(args)
    except TypeError:
        return factory.__wrapped__(*args)
    return factory(*args)


@functools.lru_cache(maxsize=32)
def _encode_jit(encoder: nn.Module) -> Callable:
    return jax.jit(lambda params, x: encode(encoder, params, x))


setattr(_encode_jit, COMPILED_FACTORY, True)  # (emptied by engine.release_compiled_programs)


@dataclasses.dataclass(frozen=True, eq=False)
class PerExample:
    """lambda_i free for each datapoint: q* (Cremer et al.'s per-example optimum).

    In training, every training datapoint has its own row of the param "local$params",
    trained with the model (`local_guide`, row-sparse Adam). For new data (and for the gap
    decomposition), each datapoint's lambda is fitted alone with the model fixed (`fit_local`
    with `settings`).

    Attributes:
        settings: the per-example optimizer's settings for new data.
        family: the variational family (diagonal Gaussian by default).
        site: the model's local latents; None: found in the model.
        z_dim: the latent size, needed only for a site name whose size the model cannot tell.
        init_scale: noise on the training rows' start (see `local_guide`).
    """

    settings: QStarSettings = dataclasses.field(default_factory=QStarSettings)
    family: Family = dataclasses.field(default_factory=DiagonalGaussian)
    site: Site | None = None
    z_dim: int | None = None
    init_scale: float = 0.0
    name: str = "per_example"

    def __post_init__(self) -> None:
        resolve_family("PerExample", self.family)

    def guide(self, model: Callable, x, global_guide: Callable | None = None) -> Callable:
        """`local_guide` with one row per training datapoint of x `[N, ...]`."""
        return local_guide(
            int(np.shape(x)[0]),
            self.z_dim,
            self.family,
            site=self.site,
            init_scale=self.init_scale,
            model=model,
            global_guide=global_guide,
        )

    def optimizer(self, learning_rate: float, **kwargs: Any) -> optax.GradientTransformation:
        """Row-sparse Adam (`make_local_optimizer`): a datapoint's row moves only when it is
        in the minibatch."""
        return make_local_optimizer(learning_rate, **kwargs)

    def training_params(self, params: dict) -> np.ndarray:
        """The trained lambda of every training datapoint, `[N, num_params]`."""
        check_has_params("PerExample.training_params", params, LOCAL_PARAMS)
        return np.asarray(params[LOCAL_PARAMS])

    def infer(
        self,
        model: Callable,
        params: dict,
        x,
        key: jax.Array,
        *,
        init=None,
        progress: bool | str = False,
        indices=None,
    ) -> Inferred:
        """q* for every datapoint of x, started at `init` `[N, num_params]` (default: N(0, I)
        for the Gaussians; for a flow, `fit_local`'s own start, see `QStarSettings.flow_start`,
        while `Inferred.start` holds the identity flow on N(0, I));
        row i draws from `fold_in(key, indices[i])` (None: i; see `fit_local`)."""
        site = self.site if self.site is not None else resolve_site(None, model, jnp.asarray(x))
        start = time.perf_counter()
        fit = fit_local(
            model,
            params,
            x,
            key,
            self.settings,
            family=self.family,
            site=site,
            z_dim=self.z_dim,
            init=init,
            indices=indices,
            progress=progress,
        )
        seconds = time.perf_counter() - start
        lam0 = (
            np.asarray(init)
            if init is not None
            else np.broadcast_to(
                np.asarray(self.family.standard_params(latent_size(site, self.z_dim))),
                fit.params.shape,
            )
        )
        return Inferred(np.asarray(fit.params), lam0, np.asarray(fit.steps), seconds, fit)


@dataclasses.dataclass(frozen=True, eq=False)
class SemiAmortized:
    """lambda_i = refine_K(f_phi(x_i)): the encoder's output refined by K SGD steps on the
    local ELBO (Kim et al. 2018), in training and for new data.

    Attributes:
        encoder: Flax module as for `Amortized`, or None to start every datapoint at N(0, I)
            (Kim et al.'s SVI baseline).
        settings: the K steps (`RefineSettings`: num_steps, step_size, momentum, clipping).
        mode: how training differentiates the steps: "sa" (SA-VAE, through all K steps),
            "svi" (VAE+SVI: not through them), "svi_kl" (VAE+SVI+KL); see
            `amortjax.guides.semi_amortized`.
        family: the variational family (diagonal Gaussian by default).
        site: the model's local latents; None: found in the model.
        z_dim: the latent size, needed only without an encoder for a site name.
    """

    encoder: nn.Module | None
    settings: RefineSettings
    mode: str = "sa"
    family: Family = dataclasses.field(default_factory=DiagonalGaussian)
    site: Site | None = None
    z_dim: int | None = None
    name: str = "semi_amortized"

    def __post_init__(self) -> None:
        resolve_family("SemiAmortized", self.family)
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; choose one of {list(MODES)}")
        if not isinstance(self.settings, RefineSettings):
            raise TypeError(
                f"settings must be a RefineSettings (e.g. RefineSettings(num_steps=5, "
                f"step_size=0.01)); got {type(self.settings).__name__}"
            )
        s = self.settings
        check_refine_settings(
            "SemiAmortized", s.num_steps, s.step_size, s.momentum, s.max_grad_norm, s.num_samples
        )

    def guide(self, model: Callable, x, global_guide: Callable | None = None) -> Callable:
        """`semi_amortized_guide` for model, sized by the training data x `[N, x_dim]`."""
        return semi_amortized_guide(
            self.encoder,
            model,
            x_dim=_x_dim(x),
            z_dim=self.z_dim,
            mode=self.mode,
            family=self.family,
            site=self.site,
            global_guide=global_guide,
            **self.settings._asdict(),
        )

    def optimizer(self, learning_rate: float, **kwargs: Any) -> optax.GradientTransformation:
        """Adam (`make_optimizer`, which takes the same keyword arguments)."""
        return make_optimizer(learning_rate, **kwargs)

    def infer(self, model: Callable, params: dict, x, key: jax.Array, *, indices=None) -> Inferred:
        """The start (encoder or N(0, I)) refined by K steps, for x `[N, ...]`; row i's
        refinement draws from `fold_in(key, indices[i])` (None: i), so a datapoint's result
        depends on its index in its dataset, not on its position in x (pass the indices of a
        subset: `evaluation.subsets.random_subset`)."""
        key = check_key("SemiAmortized.infer", key)  # (before jit, which would trace it)
        x = check_data(model, params, x)
        indices = check_indices("SemiAmortized.infer", indices, x.shape[0])
        indices = jnp.asarray(np.arange(x.shape[0]) if indices is None else indices, jnp.uint32)
        if self.encoder is not None:
            check_has_params("SemiAmortized.infer", params, "encoder$params")
        site = self.site if self.site is not None else resolve_site(None, model, x)
        size = latent_size(site, self.z_dim)
        if self.encoder is None and size is None:
            raise ValueError("SemiAmortized without an encoder needs z_dim for a site name")
        run = _cached(_refine_jit, model, self.encoder, self.family, site, size, self.settings)
        start = time.perf_counter()
        lam0, lam = jax.block_until_ready(run(params, x, key, indices))
        seconds = time.perf_counter() - start
        if self.settings.num_steps:  # (warns where the steps lowered the ELBO)
            check_refinement(model, params, x, lam0, lam, key, self.settings,
                             family=self.family, site=site, indices=indices)  # fmt: skip
        steps = np.full(x.shape[0], self.settings.num_steps, np.int32)
        return Inferred(np.asarray(lam), np.asarray(lam0), steps, seconds)


@functools.lru_cache(maxsize=32)
def _refine_jit(model, encoder, family, site, size, settings) -> Callable:
    """One compiled function of (params, x, key, indices) -> (lambda_0, lambda_K) per
    configuration."""

    def run(params, x, key, indices):
        if encoder is None:
            standard = family.standard_params(size)
            lam0 = jnp.broadcast_to(standard, (x.shape[0], *standard.shape))
        else:
            lam0 = encode(encoder, params, x)
        lam = refine(
            model, params, x, lam0, key, settings, family=family, site=site, indices=indices
        )
        return lam0, lam

    return jax.jit(run)


setattr(_refine_jit, COMPILED_FACTORY, True)

Regime = Amortized | PerExample | SemiAmortized
"""Any of the three; a new regime is a class with `guide`, `optimizer` and `infer`."""
