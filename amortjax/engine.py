"""The per-datapoint engine: map a batched computation over datapoints.

Every evaluator computes something for ONE datapoint and batches it with `jax.vmap`; this
module runs that batch function over N datapoints in fixed-size chunks (the last one padded, so
it compiles once), splits each chunk over the devices of the active data mesh, shows a progress
bar, and hands every datapoint its own PRNG key,

    key_i = fold_in(key, i),    i = the datapoint's index in x,

so that a datapoint's draws depend on the seed and on its index only: its numbers do not change
with the chunk size, the padding or the number of devices. It is not for training (an epoch is
one `lax.scan` over minibatches, in `amortjax.inference.training`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from amortjax.sharding import active_mesh, check_divisible, replicate, shard_rows


def datapoint_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
    """`fold_in(key, i)` for every index, `[len(indices)]` keys."""
    return jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.asarray(indices, jnp.uint32))


def map_datapoints(
    batch_fn: Callable[..., Any],
    params: Any,
    key: jax.Array,
    rows: Sequence[jax.Array | np.ndarray],
    *,
    batch_size: int,
    progress: bool | str = False,
    desc: str = "",
) -> Any:
    """Runs `batch_fn(params, keys, *row_chunks)` over all datapoints, chunk by chunk.

    Args:
        batch_fn: a (jitted) function of the replicated `params`, the chunk's per-datapoint keys
            `[B]` and one chunk `[B, ...]` of each array in `rows`; returns a pytree of arrays
            with a leading `[B]` axis (one row per datapoint).
        params: anything the function needs whole on every device (e.g. model parameters).
        key: the base PRNG key; datapoint i gets `fold_in(key, i)`.
        rows: per-datapoint inputs, each `[N, ...]` with the same N.
        batch_size: datapoints per call (B); inside `amortjax.sharding.data_parallel()` it must
            split evenly over the devices.
        progress: show a progress bar (a string gives its description).
        desc: the bar's default description.

    Returns:
        The outputs of `batch_fn` for all N datapoints, as numpy arrays `[N, ...]`.
    """
    rows = [jnp.asarray(r) for r in rows]
    n = rows[0].shape[0]
    if n == 0:
        raise ValueError("no datapoints: x has 0 rows")
    if any(r.shape[0] != n for r in rows):
        raise ValueError(f"every per-datapoint input needs {n} rows; got {[r.shape for r in rows]}")
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    batch_size = min(batch_size, n)
    mesh = active_mesh()
    if mesh is not None:
        check_divisible(batch_size, mesh)
        params = replicate(mesh, params)
    starts = range(0, n, batch_size)
    if progress:
        starts = tqdm(starts, desc=progress if isinstance(progress, str) else desc, unit="batch")
    outputs = []
    for start in starts:
        chunk = [r[start : start + batch_size] for r in rows]
        size = chunk[0].shape[0]
        if size < batch_size:  # pad with copies so the chunk shape compiles once
            chunk = [
                jnp.concatenate([r, jnp.repeat(r[:1], batch_size - size, axis=0)]) for r in chunk
            ]
        keys = datapoint_keys(key, jnp.arange(start, start + batch_size))
        keys, *chunk = shard_rows(mesh, keys, *chunk)
        # block_until_ready waits with the GIL released (np.asarray's buffer protocol may hold
        # it), so a callback the computation needs can always run
        out = jax.block_until_ready(batch_fn(params, keys, *chunk))
        outputs.append(jax.tree.map(lambda o, size=size: np.asarray(o[:size]), out))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
