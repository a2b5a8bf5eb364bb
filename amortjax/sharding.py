"""Data parallelism the JAX way: a device mesh with one axis over datapoints.

Training and the per-datapoint evaluators scale past one device with JAX's own sharding, not a
home-made scheme. Inside `with data_parallel():` (or with `Trainer(..., mesh=...)`) every array
whose leading axis runs over datapoints (a minibatch, a batch of observations and their
per-datapoint guide inputs) is split along the mesh axis `DATA_AXIS`, and everything else
(model and guide parameters, optimizer state, keys) is replicated. `jit` then compiles one SPMD
program; XLA inserts the all-reduce that sums the per-shard gradients. Across hosts the same
code runs after `jax.distributed.initialize()`: `data_mesh()` then spans every process's
devices.

With one device the mesh has one entry and the code path is the same, so a test on one CPU
checks what runs on eight GPUs. This module decides placement only; it computes nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

_ACTIVE: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mesh", default=None)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A one-axis mesh (`DATA_AXIS`) over the given devices (default: every device, on every
    host when `jax.distributed` is initialized)."""
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("data_mesh needs at least one device")
    return Mesh(np.asarray(devices), (DATA_AXIS,))


@contextlib.contextmanager
def data_parallel(mesh: Mesh | None = None) -> Iterator[Mesh]:
    """Within the block, training and every per-datapoint evaluator (`evaluate_bounds`,
    `fit_local`, `ais`, `gap_decomposition`) split their datapoints over the mesh.

    Args:
        mesh: a mesh with a `DATA_AXIS` axis; default `data_mesh()` (every device).

    Yields:
        The mesh in use. Batch sizes must be multiples of its number of devices.
    """
    mesh = data_mesh() if mesh is None else mesh
    if DATA_AXIS not in mesh.shape:
        raise ValueError(f"the mesh needs an axis named {DATA_AXIS!r}; it has {mesh.axis_names}")
    token = _ACTIVE.set(mesh)
    try:
        yield mesh
    finally:
        _ACTIVE.reset(token)


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing `data_parallel` block, or None."""
    return _ACTIVE.get()


def check_divisible(batch: int, mesh: Mesh, what: str = "batch_size") -> None:
    """Raises a ValueError unless `batch` splits evenly over the mesh's data axis."""
    n = mesh.shape[DATA_AXIS]
    if batch % n:
        raise ValueError(
            f"{what}={batch} must be a multiple of the {n} devices of the data axis, so that "
            "every device gets the same number of datapoints"
        )


def rows_sharding(mesh: Mesh) -> NamedSharding:
    """Leading axis split over `DATA_AXIS`, the rest whole."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """The same full array on every device."""
    return NamedSharding(mesh, PartitionSpec())


def shard_rows(mesh: Mesh | None, *arrays: Any) -> tuple[Any, ...]:
    """Places each array (or pytree of arrays) with its leading axis split over the data axis;
    returns them unchanged when mesh is None."""
    if mesh is None:
        return arrays
    sharding = rows_sharding(mesh)
    return tuple(jax.device_put(a, sharding) for a in arrays)


def replicate(mesh: Mesh | None, tree: Any) -> Any:
    """Places every array of a pytree on all devices of the mesh (unchanged when mesh is None)."""
    if mesh is None:
        return tree
    return jax.device_put(tree, replicated(mesh))


def constrain_rows(mesh: Mesh | None, x: jax.Array) -> jax.Array:
    """Inside `jit`: asks for x's leading axis to be split over the data axis (no-op without a
    mesh). Used on the minibatch gathered inside a compiled epoch."""
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, rows_sharding(mesh))
