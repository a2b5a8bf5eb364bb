"""Per-datapoint lower bounds of log p(x): the ELBO and the IWAE-k bound.

For one datapoint with log-weights log w_s = log p(x, z_s) - log q(z_s | x), z_s ~ q:

    ELBO-estimate(x)  = (1/k) sum_s log w_s
    IWAE-k(x)         = log (1/k) sum_s w_s  =  logsumexp_s(log w_s) - log k

Both come from the same k draws. The log-sum-exp is taken per datapoint before any average
over data, and over chunks of draws (the log-sum-exp of the chunks' log-sum-exps), so that k
can be 5,000 or more with memory bounded by `sample_chunk * batch_size` decoder evaluations.
Datapoints are processed in fixed-size batches (the last one padded) so the computation
compiles once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from amortjax.sharding import active_mesh, check_divisible, replicate, shard_rows
from amortjax.traces import log_weights


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


def _bounds_batch(
    model: Callable,
    guide: Callable,
    params: dict,
    x: jax.Array,
    guide_args: tuple,
    key: jax.Array,
    num_samples: int,
    sample_chunk: int,
) -> tuple[jax.Array, jax.Array]:
    """ELBO estimate and IWAE-k for a batch x `[batch, ...]`; returns two `[batch]` arrays."""
    num_chunks = -(-num_samples // sample_chunk)
    keys = jax.random.split(key, num_chunks * sample_chunk).reshape(num_chunks, sample_chunk)
    valid = (jnp.arange(num_chunks * sample_chunk) < num_samples).reshape(keys.shape)

    def chunk(carry, inputs):
        chunk_keys, chunk_valid = inputs
        lw = jax.vmap(lambda k: log_weights(model, guide, params, x, k, *guide_args))(chunk_keys)
        lw_sum = jnp.sum(jnp.where(chunk_valid[:, None], lw, 0.0), axis=0)
        lse = jax.nn.logsumexp(jnp.where(chunk_valid[:, None], lw, -jnp.inf), axis=0)
        return carry + lw_sum, lse

    lw_sum, lses = jax.lax.scan(chunk, jnp.zeros(x.shape[0]), (keys, valid))
    return lw_sum / num_samples, jax.nn.logsumexp(lses, axis=0) - jnp.log(num_samples)


_bounds_batch_jit = jax.jit(_bounds_batch, static_argnums=(0, 1, 6, 7))


def evaluate_bounds(
    model: Callable,
    guide: Callable,
    params: dict,
    x: np.ndarray | jax.Array,
    key: jax.Array,
    *,
    num_samples: int = 5000,
    batch_size: int = 100,
    sample_chunk: int = 100,
    guide_args: tuple = (),
    progress: bool | str = False,
) -> Bounds:
    """ELBO and IWAE-k of every datapoint of x under the guide's q.

    Args:
        model: NumPyro model with local latents (see `amortjax.traces`).
        guide: NumPyro guide over the same latent sites.
        params: parameters of model and guide.
        x: observations, `[num_datapoints, ...]`.
        key: PRNG key; datapoint batches use keys folded in from it, so results do not depend on
            what else runs.
        num_samples: k, the draws per datapoint.
        batch_size: datapoints per compiled call.
        sample_chunk: draws evaluated at once (bounds memory; 100 keeps a batch of 100
            datapoints' decoder outputs in cache: `bench/evaluators.py` measured 47% of the
            matmul peak with 100 against 40% with 500 on a 2-core CPU).
        guide_args: per-datapoint inputs of the guide besides x, each `[num_datapoints, ...]`,
            batched with x (e.g. the lambdas of `given_params_guide`).
        progress: show a progress bar (a string gives its description).

    Inside `amortjax.sharding.data_parallel()` each batch of datapoints is split over the
    mesh's devices (batch_size must divide evenly); the numbers do not depend on it.

    Returns:
        `Bounds` with `[num_datapoints]` arrays.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    x = jnp.asarray(x)
    n = x.shape[0]
    guide_args = tuple(jnp.asarray(a) for a in guide_args)
    if any(a.shape[0] != n for a in guide_args):
        raise ValueError(
            f"guide_args must have one row per datapoint ({n}); got shapes "
            f"{[a.shape for a in guide_args]}"
        )
    batch_size = min(batch_size, n)
    mesh = active_mesh()
    if mesh is not None:
        check_divisible(batch_size, mesh)
        params = replicate(mesh, params)
    sample_chunk = min(sample_chunk, num_samples)
    elbos, iwaes = [], []
    starts = range(0, n, batch_size)
    if progress:
        desc = progress if isinstance(progress, str) else f"IWAE-{num_samples}"
        starts = tqdm(starts, desc=desc, unit="batch")
    for i, start in enumerate(starts):
        rows = [a[start : start + batch_size] for a in (x, *guide_args)]
        size = rows[0].shape[0]
        if size < batch_size:  # pad with copies so the batch shape stays compiled once
            rows = [
                jnp.concatenate([r, jnp.repeat(r[:1], batch_size - size, axis=0)]) for r in rows
            ]
        xb, *args_b = shard_rows(mesh, *rows)
        elbo, iwae = _bounds_batch_jit(
            model,
            guide,
            params,
            xb,
            tuple(args_b),
            jax.random.fold_in(key, i),
            num_samples,
            sample_chunk,
        )
        elbos.append(np.asarray(elbo[:size]))
        iwaes.append(np.asarray(iwae[:size]))
    return Bounds(elbo=np.concatenate(elbos), iwae=np.concatenate(iwaes), num_samples=num_samples)


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    """Mean over datapoints and its standard error."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))
