"""Per-datapoint lower bounds of log p(x): the ELBO and the IWAE-k bound.

For one datapoint with log-weights log w_s = log p(x, z_s) - log q(z_s | x), z_s ~ q:

    ELBO-estimate(x)  = (1/k) sum_s log w_s
    IWAE-k(x)         = log (1/k) sum_s w_s  =  logsumexp_s(log w_s) - log k

Both come from the same k draws. The log-sum-exp is taken per datapoint before any average
over data, and over chunks of draws (the log-sum-exp of the chunks' log-sum-exps), so that k
can be 5,000 or more with memory bounded by `sample_chunk * batch_size` decoder evaluations.
The computation is written for one datapoint, vmapped over a chunk and run over the data by
`amortjax.engine.map_datapoints` (fixed-size chunks, per-datapoint keys).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from amortjax.checks import check_finite, check_indices, check_int, check_key
from amortjax.engine import chunked_draw_keys, compact_threefry, map_datapoints
from amortjax.estimators import SAMPLE_CHUNK, bounds_batch
from amortjax.families import Family
from amortjax.latents import Site, check_site, log_joint_unconstrained
from amortjax.traces import check_data, check_guide_draws


class Bounds(NamedTuple):
    """Per-datapoint bounds, each `[num_datapoints]`, in nats.

    Attributes:
        elbo: the mean of the k log-weights (a k-sample estimate of the ELBO).
        iwae: the IWAE-k bound.
        num_samples: k.
    """

    elbo: np.ndarray
    iwae: np.ndarray
    num_samples: int


def evaluate_bounds(
    model: Callable,
    guide: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    key: jax.Array,
    *,
    num_samples: int = 5000,
    batch_size: int = 100,
    sample_chunk: int = SAMPLE_CHUNK,
    guide_args: tuple = (),
    progress: bool | str = False,
    indices: np.ndarray | jax.Array | None = None,
) -> Bounds:
    """ELBO and IWAE-k of every datapoint of x under the guide's q.

    Args:
        model: NumPyro model with local latents (see `amortjax.traces`).
        guide: NumPyro guide over the same latent sites.
        params: parameters of model and guide.
        x: observations, `[num_datapoints, ...]`.
        key: PRNG key; row i draws from `fold_in(key, indices[i])` (`amortjax.engine`), so its
            numbers depend neither on `batch_size`, the number of devices nor the other rows.
        num_samples: k, the draws per datapoint.
        batch_size: datapoints per compiled call.
        sample_chunk: draws evaluated at once per datapoint (bounds memory to
            `sample_chunk * batch_size` decoder evaluations; `estimators.SAMPLE_CHUNK`, 50, was
            the fastest measured). The numbers do not depend on it.
        guide_args: per-datapoint inputs of the guide besides x, each `[num_datapoints, ...]`,
            batched with x (e.g. the lambdas of `given_params_guide`).
        progress: show a progress bar (a string gives its description).
        indices: each row's index in its dataset, `[num_datapoints]` distinct integers (None:
            its position in x): `x[idx]` with `indices=idx` gives the whole dataset's rows.

    Inside `amortjax.sharding.data_parallel()` each batch of datapoints is split over the
    mesh's devices (batch_size must divide evenly); the numbers do not depend on it.

    Returns:
        `Bounds` with `[num_datapoints]` arrays.
    """
    key = check_key("evaluate_bounds", key)
    check_int("evaluate_bounds", num_samples=num_samples, sample_chunk=sample_chunk)
    if not isinstance(guide_args, tuple | list):
        raise ValueError(
            f"evaluate_bounds: guide_args must be a tuple of per-datapoint arrays, e.g. "
            f"guide_args=(lam,); got {type(guide_args).__name__}"
        )
    x = check_data(model, params, x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"x must be [num_datapoints, ...] with num_datapoints >= 1; got {x.shape}")
    n = x.shape[0]
    guide_args = tuple(jnp.asarray(a) for a in guide_args)
    if any(a.ndim < 1 or a.shape[0] != n for a in guide_args):
        raise ValueError(
            f"guide_args must have one row per datapoint ({n}); got shapes "
            f"{[a.shape for a in guide_args]}"
        )
    for i, arg in enumerate(guide_args):
        check_finite("evaluate_bounds", f"guide_args[{i}]", arg)
    check_guide_draws(model, guide, params, x, "evaluate_bounds", *guide_args)
    indices = check_indices("evaluate_bounds", indices, n)
    sample_chunk = min(sample_chunk, num_samples)
    elbo, iwae = map_datapoints(
        functools.partial(bounds_batch, model, guide, int(num_samples), int(sample_chunk)),
        params,
        key,
        [x, *guide_args],
        batch_size=batch_size,
        progress=progress,
        desc=f"IWAE-{num_samples}",
        indices=indices,
    )
    return Bounds(elbo=elbo, iwae=iwae, num_samples=num_samples)


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean over datapoints and its standard error, from one value per datapoint `[N]` (with
    N = 1 the standard error is NaN).

    Raises:
        ValueError: for another shape (a [runs, N] array's standard error would be the spread of
            its first axis', silently wrong: average the runs per datapoint first).
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.shape[0] < 1:
        raise ValueError(
            f"mean_and_stderr takes one value per datapoint, [N] with N >= 1; got shape "
            f"{values.shape} (for several values per datapoint, average them first)"
        )
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def format_estimate(estimate, digits: int = 2) -> str:
    """ "mean ± se" for a report: from `(mean, se)` (as `mean_and_stderr` gives), a dict with
    "mean" and "se", or None (printed as a dash)."""
    if estimate is None:
        return "—"
    mean, se = (estimate["mean"], estimate["se"]) if isinstance(estimate, dict) else estimate
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


class PairBounds(NamedTuple):
    """Two variational distributions q_a and q_b of every datapoint scored on common draws.

    Every array is `[num_datapoints]`, in nats.

    Attributes:
        elbo_a, elbo_b: ELBO estimates (means of k log-weights) of q_a and q_b.
        iwae_a, iwae_b: IWAE-k bounds with q_a and with q_b.
        mixture: log of the importance-sampling estimate of p(x) from the equal mixture
            m = (q_a + q_b) / 2, with the 2k draws (k from each): an unbiased estimate of p(x)
            per datapoint, so a stochastic lower bound of log p(x).
        num_samples: k, the draws from each of q_a and q_b.
    """

    elbo_a: np.ndarray
    elbo_b: np.ndarray
    iwae_a: np.ndarray
    iwae_b: np.ndarray
    mixture: np.ndarray
    num_samples: int


def _pair_one(model, family, site, num_samples, sample_chunk, params, x, lam_a, lam_b, key):
    """`PairBounds`' five numbers for ONE datapoint; draw s of q_a and of q_b share its key."""
    q_a, q_b = family.distribution(lam_a), family.distribution(lam_b)
    keys, valid = chunked_draw_keys(key, num_samples, sample_chunk)
    x2 = jnp.broadcast_to(x, (2, *x.shape))

    def draw(k):
        u = jnp.stack([q_a.sample(k), q_b.sample(k)])  # common random numbers, [2, D]
        log_p = log_joint_unconstrained(model, params, x2, u, site)
        return log_p, q_a.log_prob(u), q_b.log_prob(u)

    def chunk(carry, inputs):
        chunk_keys, ok = inputs
        log_p, log_qa, log_qb = jax.vmap(draw)(chunk_keys)  # [chunk, 2] each
        lw_a, lw_b = log_p[:, 0] - log_qa[:, 0], log_p[:, 1] - log_qb[:, 1]
        lw_mix = log_p - (jnp.logaddexp(log_qa, log_qb) - jnp.log(2.0))
        sums = carry + jnp.stack([jnp.sum(jnp.where(ok, lw, 0.0)) for lw in (lw_a, lw_b)])
        lses = jnp.stack(
            [
                jax.nn.logsumexp(jnp.where(ok, lw_a, -jnp.inf)),
                jax.nn.logsumexp(jnp.where(ok, lw_b, -jnp.inf)),
                jax.nn.logsumexp(jnp.where(ok[:, None], lw_mix, -jnp.inf)),
            ]
        )
        return sums, lses

    sums, lses = jax.lax.scan(chunk, jnp.zeros(2), (keys, valid))
    lse = jax.nn.logsumexp(lses, axis=0)
    log_k = jnp.log(num_samples)
    return (
        sums[0] / num_samples,
        sums[1] / num_samples,
        lse[0] - log_k,
        lse[1] - log_k,
        lse[2] - jnp.log(2.0 * num_samples),
    )


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
@compact_threefry
def _pair_batch(model, family, site, num_samples, sample_chunk, params, keys, x, lam_a, lam_b):
    return jax.vmap(
        lambda xi, ki, a, b: _pair_one(
            model, family, site, num_samples, sample_chunk, params, xi, a, b, ki
        )
    )(x, keys, lam_a, lam_b)


def evaluate_pair(
    model: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    lam_a: np.ndarray | jax.Array,
    lam_b: np.ndarray | jax.Array,
    key: jax.Array,
    *,
    family: Family,
    site: Site = "z",
    num_samples: int = 5000,
    batch_size: int = 100,
    sample_chunk: int = SAMPLE_CHUNK,
    progress: bool | str = False,
    indices: np.ndarray | jax.Array | None = None,
) -> PairBounds:
    """Scores two members of a family per datapoint on common random numbers.

    For datapoint i, draw s of q_a and draw s of q_b come from the same key (the same base
    noise, e.g. the same eps in mu + sigma eps), so the difference of their ELBOs (an
    amortization gap) has far less Monte Carlo noise than with independent draws, and is
    exactly 0 where q_a = q_b. From the same 2k draws, the mixture estimate

        p̂(x) = 1/(2k) sum_{z ~ q_a, q_b} p(x, z) / ((q_a(z) + q_b(z)) / 2)

    is unbiased for p(x) (stratified sampling from the mixture), and so never much worse than
    the better of the two IWAE bounds on any datapoint. Densities are those of the unconstrained
    local latent vector u (`amortjax.latents.log_joint_unconstrained`).

    Args:
        model: NumPyro model with local latents (see `amortjax.traces`).
        params: model parameters.
        x: observations, `[N, ...]`.
        lam_a, lam_b: the two variational parameters of every datapoint, `[N, num_params]`.
        key: PRNG key; row i draws from `fold_in(key, indices[i])`.
        family: the variational family of both.
        site: the model's local latents (a site name or a `LocalLatents`).
        num_samples: k, draws from each distribution.
        batch_size: datapoints per compiled call.
        sample_chunk: draws of each distribution evaluated at once per datapoint, so
            2 * sample_chunk decoder evaluations (at 100, about 1.4 times slower on a 2-core
            CPU than at 50). The numbers do not depend on it.
        progress: show a progress bar (a string gives its description).
        indices: each row's index in its dataset, `[N]` distinct integers (None: positions).

    Returns:
        `PairBounds` with `[N]` arrays.
    """
    key = check_key("evaluate_pair", key)
    if not isinstance(num_samples, int | np.integer) or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    x = check_data(model, params, x)
    check_site(model, params, x, site, "evaluate_pair")
    lam_a, lam_b = jnp.asarray(lam_a), jnp.asarray(lam_b)
    if lam_a.shape != lam_b.shape or lam_a.ndim != 2 or lam_a.shape[0] != x.shape[0]:
        raise ValueError(
            f"lam_a and lam_b must both be [N={x.shape[0]}, num_params]; got {lam_a.shape} and "
            f"{lam_b.shape}"
        )
    indices = check_indices("evaluate_pair", indices, x.shape[0])
    sample_chunk = int(min(sample_chunk, num_samples))
    out = map_datapoints(
        functools.partial(_pair_batch, model, family, site, int(num_samples), sample_chunk),
        params,
        key,
        [x, lam_a, lam_b],
        batch_size=batch_size,
        progress=progress,
        desc=f"q and q*, {num_samples} draws each",
        indices=indices,
    )
    return PairBounds(*out, num_samples=int(num_samples))
