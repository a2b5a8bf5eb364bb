"""The inference gap and its two parts (Cremer, Li & Duvenaud 2018), per datapoint.

For one datapoint x with the encoder's q (amortized), the best member q* of the same family
fitted to x alone (the local optimizer, started at the encoder's output), and log p(x):

    inference gap      = log p(x) - L[q]
    approximation gap  = log p(x) - L[q*]      (the family's fault)
    amortization gap   = L[q*]    - L[q]       (the encoder's fault)

so that inference = approximation + amortization.

How each term is estimated:

- q* comes from `fit_local` started at the encoder's output; it keeps the start where its end
  point is no better (a comparison on common random numbers), so L[q*] >= L[q] up to that
  comparison's noise, and it reports per datapoint whether it converged.
- L[q], L[q*] and the IWAE-k bounds with q and with q* come from ONE pass of k draws from each,
  on common random numbers (`evaluate_pair`): draw s of q and of q* share their base noise, so
  the amortization gap, a difference, carries little Monte Carlo noise (exactly 0 where q* = q).
  q* is scored on draws independent of those that fitted and selected it.
- log p̂(x) is a stochastic lower bound of log p(x) PER DATAPOINT: the log of an unbiased
  estimator of p(x). The candidates are importance sampling from the mixture (q + q*) / 2 with
  the same 2k draws ("mixture", never much below the better of the two IWAE bounds on any
  datapoint, since half its draws come from q*) and annealed importance sampling ("ais",
  started by default at q*, with step sizes tuned in a pilot pass). The one with the highest
  mean over the datapoints is used for all of them: choosing per datapoint the largest of
  several noisy bounds would bias log p̂ upward and it would no longer be a bound.
  A lower bound in place of log p(x) makes the approximation and inference gaps lower bounds of
  the true ones (up to noise); the amortization gap does not involve log p(x).

Every number is per datapoint, so means come with standard errors over datapoints. This module
combines the evaluators (`bounds`, `ais`, the local optimizer); it computes no density of its
own.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from amortjax.checks import check_finite, check_indices, check_int, check_key, resolve_settings
from amortjax.evaluation.ais import AISSettings, ais, check_ais_settings, log_weight_spread
from amortjax.evaluation.bounds import evaluate_pair, mean_and_stderr
from amortjax.families import Family, check_num_params, resolve_family
from amortjax.inference.local import LocalFit, QStarSettings
from amortjax.latents import Site, check_site
from amortjax.regimes import PerExample
from amortjax.traces import check_data

LOWER_BOUNDS = ("mixture", "ais")
"""The per-datapoint estimators of log p(x) that log p̂(x) is chosen from (those computed)."""
AIS_STARTS = ("qstar", "encoder", "prior")

AIS_CHAINS_PER_CALL = 3200
"""The chains (datapoints x C) that `gap_decomposition`'s AIS runs per compiled call by
default. AIS holds C rows per datapoint where the bounds hold a chunk of 50 draws, so at the
bounds' batch size its matmuls are small: on the project's 2-core CPU (Cremer's 50-200-200-784
decoder, 8 chains, 50 temperatures x 5 leapfrog steps, 800 datapoints, one interleaved run)
100, 200, 400 and 800 datapoints per call ran at 1.00, 1.05, 1.08 and 1.05 times the speed of
100."""


class Gaps(NamedTuple):
    """The gap decomposition of a set of datapoints; every array is `[N]`, in nats.

    Attributes:
        elbo_q: L[q], the ELBO of the encoder's q (`iwae_samples` draws).
        elbo_qstar: L[q*], the ELBO of the locally optimized q* (`iwae_samples` draws, common
            random numbers with elbo_q).
        iwae_q: IWAE-`iwae_samples` with q.
        iwae_qstar: IWAE-`iwae_samples` with q*.
        mixture: the importance-sampling estimate of log p(x) from (q + q*) / 2 with
            2 * `iwae_samples` draws (a per-datapoint stochastic lower bound).
        ais: the AIS estimate of log p(x), or None when AIS was not run.
        log_px: log p̂(x), the values of the estimator named by `log_px_estimator`.
        log_px_estimator: which of `LOWER_BOUNDS` gives log p̂(x).
        qstar: the local optimizer's result (parameters and convergence record).
        info: the settings behind the numbers (samples, q* and AIS settings, family), the
            wall seconds of each stage ("seconds": qstar, bounds, ais) and the share of q*'s
            compute spent on empty slots ("qstar_stopped_fraction").
    """

    elbo_q: np.ndarray
    elbo_qstar: np.ndarray
    iwae_q: np.ndarray
    iwae_qstar: np.ndarray
    mixture: np.ndarray
    ais: np.ndarray | None
    log_px: np.ndarray
    log_px_estimator: str
    qstar: LocalFit
    info: dict[str, Any]

    @property
    def qstar_steps(self) -> np.ndarray:
        """Steps the local optimizer took for each datapoint, `[N]`."""
        return self.qstar.steps

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
            mixture, ais (if run) and the three gaps, plus "num_datapoints",
            "log_px_estimator", "qstar_steps_mean", "qstar_convergence" (see
            `LocalFit.convergence`), "negative_approximation_gaps" (datapoints whose
            approximation gap is below -0.05 nats) and "info".
        """
        values = {
            "log_px": self.log_px,
            "elbo_qstar": self.elbo_qstar,
            "elbo_q": self.elbo_q,
            "iwae_q": self.iwae_q,
            "iwae_qstar": self.iwae_qstar,
            "mixture": self.mixture,
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
        out["qstar_convergence"] = self.qstar.convergence()
        out["negative_approximation_gaps"] = int(np.sum(self.approximation < -0.05))
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
    iwae_samples: int = 5000,
    qstar: QStarSettings | dict[str, Any] | None = None,
    ais_settings: AISSettings | dict[str, Any] | None = None,
    ais_start: str = "qstar",
    batch_size: int = 100,
    ais_batch_size: int | None = None,
    progress: bool | str = False,
    indices: np.ndarray | jax.Array | None = None,
) -> Gaps:
    """The gap decomposition of a trained model with its encoder, on datapoints x.

    Args:
        model: NumPyro model with local latents (its parameters stay fixed).
        params: the trained model's parameters theta.
        x: observations, `[N, ...]` (training or held-out points: the caller says which).
        encoder_params: the encoder's variational parameters lambda_i = f_phi(x_i),
            `[N, num_params]` (e.g. `amortjax.guides.encode(encoder, params, x)`).
        key: PRNG key; every evaluator draws per datapoint from it and the datapoint's index
            (`indices[i]`), so a datapoint's numbers depend on no other row.
        family: the variational family of q and q* (diagonal Gaussian by default).
        site: the model's local latents (a site name or a `LocalLatents`).
        iwae_samples: k, the draws from each of q and q* behind L[q], L[q*], the IWAE-k bounds
            and the mixture estimate (2k draws).
        qstar: the per-example optimizer's settings, a `QStarSettings` or a dict of its fields
            (method, learning_rate, num_samples, block_size, patience, max_steps, ...); q* is
            `PerExample(qstar).infer(...)` started at the encoder's output.
        ais_settings: AIS's settings, an `AISSettings` or a dict of its fields (num_chains,
            num_temperatures, leapfrog_steps, ...), or None to skip AIS.
        ais_start: AIS's initial distribution: "qstar" (default: each datapoint's q*, the
            closest to its posterior), "encoder" or "prior".
        batch_size: datapoints per compiled call of every evaluator (AIS: see
            `ais_batch_size`).
        ais_batch_size: datapoints per compiled call of AIS; None: the largest multiple of
            batch_size with at most `AIS_CHAINS_PER_CALL` chains (at least batch_size), e.g.
            400 for 8 chains and a batch_size of 100. No number depends on it.
        progress: show progress bars (a string prefixes their descriptions).
        indices: each row's index in its dataset, `[N]` distinct integers (None: its position
            in x): the decomposition of `x[idx]` with `indices=idx` is the whole dataset's
            rows.

    Returns:
        `Gaps` with per-datapoint arrays.
    """
    key = check_key("gap_decomposition", key)
    family = resolve_family("gap_decomposition", family)
    x = np.asarray(check_data(model, params, x))  # (before encoder_params, sized by it)
    lam_q = np.asarray(encoder_params, np.float32)
    if lam_q.ndim != 2 or lam_q.shape[0] != x.shape[0]:
        raise ValueError(
            f"encoder_params must be [N={x.shape[0]}, num_params]; got shape {lam_q.shape}"
        )
    check_int("gap_decomposition", 1, batch_size=batch_size, iwae_samples=iwae_samples)
    if ais_batch_size is not None:
        check_int("gap_decomposition", 1, ais_batch_size=ais_batch_size)
    if ais_start not in AIS_STARTS:
        raise ValueError(f"unknown ais_start {ais_start!r}; choose one of {list(AIS_STARTS)}")
    check_finite("gap_decomposition", "encoder_params", lam_q)
    size = check_site(model, params, jnp.asarray(x), site, "gap_decomposition")
    check_num_params(family, lam_q.shape[1], size, "encoder_params (the encoder)")
    indices = check_indices("gap_decomposition", indices, x.shape[0])
    prefix = f"{progress}: " if isinstance(progress, str) else ""
    show = bool(progress)
    k_pair, k_fit, k_ais = jax.random.split(key, 3)

    settings = resolve_settings("gap_decomposition (qstar)", QStarSettings, qstar, {})
    settings = settings._replace(final_samples=0, batch_size=batch_size)
    if ais_settings is not None:
        ais_settings = resolve_settings(
            "gap_decomposition (ais_settings)", AISSettings, ais_settings, {}
        )
        check_ais_settings("gap_decomposition", ais_settings)  # before q* and the bounds run
        if ais_batch_size is None:
            multiple = max(1, AIS_CHAINS_PER_CALL // ais_settings.num_chains // batch_size)
            ais_batch_size = multiple * batch_size
    seconds = {}
    start = time.perf_counter()
    # q* started at the encoder's output; final_samples=0: scored below, with q, on common
    # random numbers
    per_example = PerExample(settings, family=family, site=site)
    bar = f"{prefix}q*" if show else False
    fit = per_example.infer(model, params, x, k_fit, init=lam_q, indices=indices, progress=bar).fit
    seconds["qstar"] = time.perf_counter() - start
    start = time.perf_counter()
    pair = evaluate_pair(
        model,
        params,
        x,
        lam_q,
        fit.params,
        k_pair,
        family=family,
        site=site,
        num_samples=iwae_samples,
        batch_size=batch_size,
        progress=f"{prefix}L and IWAE-{iwae_samples}, q and q*" if show else False,
        indices=indices,
    )
    seconds["bounds"] = time.perf_counter() - start
    estimates = {"mixture": pair.mixture}
    ais_px, ais_diagnostics = None, None
    if ais_settings is not None:
        start = time.perf_counter()
        init_params = {"qstar": fit.params, "encoder": lam_q, "prior": None}[ais_start]
        result = ais(
            model,
            params,
            x,
            k_ais,
            ais_settings,
            family=family,
            init_params=init_params,
            site=site,
            batch_size=ais_batch_size,
            progress=f"{prefix}AIS" if show else False,
            indices=indices,
        )
        ais_px = result.log_px
        estimates["ais"] = ais_px
        ais_diagnostics = {
            "acceptance_mean": float(np.mean(result.acceptance)),
            "acceptance_range": [
                float(np.min(result.acceptance)),
                float(np.max(result.acceptance)),
            ],
            "log_weight_sd_median": float(np.median(log_weight_spread(result.log_weights))),
            "ess_median": float(np.median(result.ess)),
            "num_chains": result.num_chains,
            "warnings": list(result.warnings),
        }
        seconds["ais"] = time.perf_counter() - start
    name, log_px = best_lower_bound(estimates)
    # as fit_local ran them: "auto" resolved for the family, the fields as given (not
    # for_family's Newton defaults, which apply only where the caller asks for them)
    rate, block = settings.step_and_block(family)
    ran = {"method": settings.for_family(family).method, "learning_rate": rate,
           "block_size": block, "patience": settings.patience_for(family)}  # fmt: skip
    info = {
        "family": family.name,
        "iwae_samples": iwae_samples,
        "qstar": {**settings._asdict(), **ran, "init": "encoder"},  # as q* ran (defaults resolved)
        "ais": None if ais_settings is None else {**ais_settings._asdict(), "start": ais_start},
        "estimates_mean": {k: float(np.mean(v)) for k, v in estimates.items()},
        "ais_diagnostics": ais_diagnostics,
        "seconds": seconds,
        "qstar_stopped_fraction": fit.stopped_fraction,
    }
    return Gaps(
        elbo_q=pair.elbo_a,
        elbo_qstar=pair.elbo_b,
        iwae_q=pair.iwae_a,
        iwae_qstar=pair.iwae_b,
        mixture=pair.mixture,
        ais=ais_px,
        log_px=log_px,
        log_px_estimator=name,
        qstar=fit,
        info=info,
    )
