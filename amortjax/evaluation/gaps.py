"""The inference gap and its two parts (Cremer, Li & Duvenaud 2018), per datapoint.

For one datapoint x with the encoder's q (amortized), the best member q* of the same family
fitted to x alone (the local optimizer, started at the encoder's output), and log p(x):

    inference gap      = log p(x) - L[q]
    approximation gap  = log p(x) - L[q*]      (the family's fault)
    amortization gap   = L[q*]    - L[q]       (the encoder's fault)

so that inference = approximation + amortization. log p(x) of a deep model is unknown: it is
replaced by log p̂(x), the best available lower bound of it, chosen among IWAE-k with q,
IWAE-k with q* and annealed importance sampling (the estimator with the highest mean over the
datapoints; using one estimator for all datapoints avoids the upward bias of a per-datapoint
maximum of noisy bounds). A lower bound in place of log p(x) makes the approximation and
inference gaps lower bounds of the true ones; the amortization gap does not involve log p(x).
Every number is per datapoint, so means come with standard errors over datapoints.

This module combines the evaluators (`bounds`, `ais`, the local optimizer); it computes no
density of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from amortjax.evaluation.ais import ais
from amortjax.evaluation.bounds import evaluate_bounds, mean_and_stderr
from amortjax.families import DiagonalGaussian, Family
from amortjax.guides.local import given_params_guide
from amortjax.inference.local import fit_local
from amortjax.latents import Site

LOWER_BOUNDS = ("iwae_q", "iwae_qstar", "ais")
"""The estimators of log p(x) that log p̂(x) is chosen from (those that were computed)."""


class Gaps(NamedTuple):
    """The gap decomposition of a set of datapoints; every array is `[N]`, in nats.

    Attributes:
        elbo_q: L[q], the ELBO of the encoder's q (`elbo_samples` draws).
        elbo_qstar: L[q*], the ELBO of the locally optimized q* (`elbo_samples` draws).
        iwae_q: IWAE-`iwae_samples` with q.
        iwae_qstar: IWAE-`iwae_samples` with q*.
        ais: the AIS estimate of log p(x), or None when AIS was not run.
        log_px: log p̂(x), the values of the estimator named by `log_px_estimator`.
        log_px_estimator: which of `LOWER_BOUNDS` gives log p̂(x).
        qstar_steps: Adam steps the local optimizer took for each datapoint.
        info: the settings behind the numbers (samples, AIS settings, family).
    """

    elbo_q: np.ndarray
    elbo_qstar: np.ndarray
    iwae_q: np.ndarray
    iwae_qstar: np.ndarray
    ais: np.ndarray | None
    log_px: np.ndarray
    log_px_estimator: str
    qstar_steps: np.ndarray
    info: dict[str, Any]

    @property
    def approximation(self) -> np.ndarray:
        """log p̂(x) - L[q*], `[N]`."""
        return self.log_px - self.elbo_qstar

    @property
    def amortization(self) -> np.ndarray:
        """L[q*] - L[q], `[N]`."""
        return self.elbo_qstar - self.elbo_q

    @property
    def inference(self) -> np.ndarray:
        """log p̂(x) - L[q], `[N]`."""
        return self.log_px - self.elbo_q

    def summary(self) -> dict[str, Any]:
        """Means and standard errors over datapoints of every quantity, with the settings.

        Returns:
            `{name: {"mean": m, "se": s}}` for log_px, elbo_q, elbo_qstar, iwae_q, iwae_qstar,
            ais (if run) and the three gaps, plus "num_datapoints", "log_px_estimator",
            "qstar_steps_mean" and "info".
        """
        values = {
            "log_px": self.log_px,
            "elbo_qstar": self.elbo_qstar,
            "elbo_q": self.elbo_q,
            "iwae_q": self.iwae_q,
            "iwae_qstar": self.iwae_qstar,
            "approximation_gap": self.approximation,
            "amortization_gap": self.amortization,
            "inference_gap": self.inference,
        }
        if self.ais is not None:
            values["ais"] = self.ais
        out: dict[str, Any] = {}
        for name, v in values.items():
            mean, se = mean_and_stderr(v)
            out[name] = {"mean": mean, "se": se}
        out["num_datapoints"] = int(self.log_px.shape[0])
        out["log_px_estimator"] = self.log_px_estimator
        out["qstar_steps_mean"] = float(np.mean(self.qstar_steps))
        out["info"] = self.info
        return out


def best_lower_bound(estimates: dict[str, np.ndarray]) -> tuple[str, np.ndarray]:
    """The estimator with the highest mean over datapoints, and its values.

    Args:
        estimates: estimator name -> `[N]` lower bounds of log p(x) on the same datapoints.

    Returns:
        `(name, values [N])`.
    """
    if not estimates:
        raise ValueError("no estimate of log p(x) to choose from")
    name = max(estimates, key=lambda k: float(np.mean(estimates[k])))
    return name, np.asarray(estimates[name])


def gap_decomposition(
    model: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    encoder_params: np.ndarray | jax.Array,
    key: jax.Array,
    *,
    family: Family | None = None,
    site: Site = "z",
    elbo_samples: int = 1000,
    iwae_samples: int = 5000,
    qstar: dict[str, Any] | None = None,
    ais_settings: dict[str, Any] | None = None,
    batch_size: int = 100,
    progress: bool | str = False,
) -> Gaps:
    """The gap decomposition of a trained model with its encoder, on datapoints x.

    Args:
        model: NumPyro model with local latents (its parameters stay fixed).
        params: the trained model's parameters theta.
        x: observations, `[N, ...]` (training or held-out points: the caller says which).
        encoder_params: the encoder's variational parameters lambda_i = f_phi(x_i),
            `[N, num_params]` (e.g. `amortjax.guides.encode(encoder, params, x)`).
        key: PRNG key.
        family: the variational family of q and q* (diagonal Gaussian by default).
        site: the model's local latents (a site name or a `LocalLatents`).
        elbo_samples: draws behind L[q] and L[q*].
        iwae_samples: k of the IWAE bounds with q and with q*.
        qstar: keyword arguments of `amortjax.inference.local.fit_local` (learning_rate,
            num_samples, block_size, patience, max_steps, ...); q* starts at the encoder's
            output, so that L[q*] >= L[q] up to the optimizer's noise.
        ais_settings: keyword arguments of `amortjax.evaluation.ais.ais` (num_chains,
            num_temperatures, leapfrog_steps, ...), or None to skip AIS. AIS starts from the
            prior (its default).
        batch_size: datapoints per compiled call of every evaluator.
        progress: show progress bars (a string prefixes their descriptions).

    Returns:
        `Gaps` with per-datapoint arrays.
    """
    family = family or DiagonalGaussian()
    x = np.asarray(x)
    lam_q = np.asarray(encoder_params)
    if lam_q.ndim != 2 or lam_q.shape[0] != x.shape[0]:
        raise ValueError(
            f"encoder_params must be [N={x.shape[0]}, num_params]; got shape {lam_q.shape}"
        )
    prefix = f"{progress}: " if isinstance(progress, str) else ""
    show = bool(progress)
    k_q, k_fit, k_ais = jax.random.split(key, 3)
    guide = given_params_guide(family, site=site)

    def bounds(lam, k, samples, what):
        return evaluate_bounds(
            model,
            guide,
            params,
            x,
            k,
            num_samples=samples,
            batch_size=batch_size,
            guide_args=(lam,),
            progress=f"{prefix}{what}" if show else False,
        )

    k_elbo, k_iwae = jax.random.split(k_q)
    elbo_q = bounds(lam_q, k_elbo, elbo_samples, f"L[q] ({elbo_samples})").elbo
    iwae_q = bounds(lam_q, k_iwae, iwae_samples, f"IWAE-{iwae_samples} q").iwae

    qstar = dict(qstar or {})
    fit = fit_local(
        model,
        params,
        x,
        k_fit,
        family=family,
        site=site,
        init=lam_q,
        final_samples=elbo_samples,
        batch_size=batch_size,
        progress=f"{prefix}q*" if show else False,
        **qstar,
    )
    k_elbo_star, k_iwae_star = jax.random.split(jax.random.fold_in(k_q, 1))
    elbo_qstar = bounds(fit.params, k_elbo_star, elbo_samples, f"L[q*] ({elbo_samples})").elbo
    iwae_qstar = bounds(fit.params, k_iwae_star, iwae_samples, f"IWAE-{iwae_samples} q*").iwae

    estimates = {"iwae_q": iwae_q, "iwae_qstar": iwae_qstar}
    ais_px = None
    if ais_settings is not None:
        result = ais(
            model,
            params,
            x,
            k_ais,
            site=site,
            batch_size=batch_size,
            progress=f"{prefix}AIS" if show else False,
            **ais_settings,
        )
        ais_px = result.log_px
        estimates["ais"] = ais_px
    name, log_px = best_lower_bound(estimates)
    info = {
        "family": family.name,
        "elbo_samples": elbo_samples,
        "iwae_samples": iwae_samples,
        "qstar": {**qstar, "init": "encoder"},
        "ais": ais_settings,
        "estimates_mean": {k: float(np.mean(v)) for k, v in estimates.items()},
    }
    return Gaps(
        elbo_q=elbo_q,
        elbo_qstar=elbo_qstar,
        iwae_q=iwae_q,
        iwae_qstar=iwae_qstar,
        ais=ais_px,
        log_px=log_px,
        log_px_estimator=name,
        qstar_steps=fit.steps,
        info=info,
    )
