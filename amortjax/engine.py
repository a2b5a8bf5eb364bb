"""The per-datapoint engine: map a batched computation over datapoints.

Every evaluator computes something for ONE datapoint and batches it with `jax.vmap`; this
module runs that batch function over N datapoints in equal chunks of at most `batch_size` (as
few chunks as that allows, the last one padded, so it compiles once and pads little), splits
each chunk over the devices of the active data mesh, shows a progress
bar, and hands every datapoint its own PRNG key,

    key_i = fold_in(key, i),    i = the datapoint's index in x,

so that a datapoint's draws depend on the seed and on its index only: its numbers do not change
with the chunk size, the padding or the number of devices. It is not for training (an epoch is
one `lax.scan` over minibatches, in `amortjax.inference.training`).

Within a datapoint, an importance sampler gives draw s its own key, `fold_in(key_i, s)`, so that
how the draws are chunked never changes a number either; `compact_threefry` makes those many
small draws cheap.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from amortjax.checks import check_indices, check_key
from amortjax.sharding import DATA_AXIS, active_mesh, check_divisible, replicate, shard_rows

MAP_COUNT_SHARE = 0.75
"""Share of the kernel's cap on a process's memory mappings at which `release_compiled_programs`
drops compiled programs."""
KEEP_SHARE = 0.5
"""Share of the cap that a release must get below by dropping amortjax's own programs; above it,
every program JAX caches is dropped as well (so that the next call does not release again)."""


def memory_maps() -> tuple[int, int] | None:
    """`(mappings of this process, the kernel's cap on them: vm.max_map_count)`; None where
    /proc does not tell (not Linux)."""
    try:
        with open("/proc/self/maps", "rb") as f:
            count = f.read().count(b"\n")
        with open("/proc/sys/vm/max_map_count") as f:
            cap = int(f.read())
    except (OSError, ValueError):
        return None
    return count, cap


COMPILED_FACTORY = "holds_compiled_programs"
"""Marks a cached factory (`functools.lru_cache`) of compiled functions: `release_compiled_programs`
empties it, so that the functions it keeps, and their programs, go."""


def library_programs() -> tuple[list[Callable], list[Callable]]:
    """amortjax's own compiled functions: every `jax.jit` function defined in an imported
    amortjax module, and every cached factory of compiled functions marked `COMPILED_FACTORY`
    (found by walking the modules, so none can be forgotten). Returns `(jitted, factories)`.
    Those created per call and not cached (a `Trainer`'s epoch) go with their owners."""
    jitted: dict[int, Callable] = {}
    factories: dict[int, Callable] = {}
    for name, module in list(sys.modules.items()):
        if name != "amortjax" and not name.startswith("amortjax."):
            continue
        for obj in list(vars(module).values()):
            if not str(getattr(obj, "__module__", "")).startswith("amortjax"):
                continue
            if callable(getattr(obj, "clear_cache", None)) and hasattr(obj, "lower"):
                jitted[id(obj)] = obj
            elif getattr(obj, COMPILED_FACTORY, False) and callable(
                getattr(obj, "cache_clear", None)
            ):
                factories[id(obj)] = obj
    return list(jitted.values()), list(factories.values())


def release_compiled_programs() -> bool:
    """Drops compiled programs when this process nears the kernel's cap on its memory mappings;
    returns whether it did.

    XLA keeps each program it compiles for the CPU in memory mappings of its own for as long as
    JAX caches the program, and the library's compiled functions take the model and the
    settings as static arguments, which JAX's cache keeps: so every model a process has fitted
    keeps its programs, and their mappings, until the cache is cleared. Measured (2-core CPU,
    jax 0.10.2, `tools/memory_maps.py`): each `fit_local` on a new model (a new decoder size)
    left about 920 more mappings (765 -> 4,779 after four), given back by `jax.clear_caches()`
    (873). Linux caps a process's mappings (`vm.max_map_count`, 65,530 by default); at the cap
    LLVM cannot place the next program's code and the process aborts ("LLVM ERROR: Unable to
    allocate section memory"), losing everything it held. This ended `make bench`'s ten
    modules in one process after 49 minutes (docs/BENCHMARKS.md), and would end a notebook
    after some 70 such fits.

    Called where computations start (`map_datapoints`, `fit_local`, `training.fit`): past
    `MAP_COUNT_SHARE` of the cap, amortjax's own compiled programs are dropped first
    (`library_programs`; measured by `tools/memory_maps.py`: 4,783 -> 1,910 mappings after the
    four fits above, 72% of what they had added, the rest being JAX's programs for single
    operations on new shapes), so that a notebook's own jitted functions keep theirs; where
    that does not bring the count below `KEEP_SHARE` of the cap, `jax.clear_caches()` drops
    every cached program too. Either way a warning says what was dropped; each program
    compiles again when next used (seconds, not results). Nothing happens where /proc does not
    tell (not Linux).
    """
    maps = memory_maps()
    if maps is None or maps[0] < MAP_COUNT_SHARE * maps[1]:
        return False
    count, cap = maps
    jitted, factories = library_programs()
    for f in jitted:
        f.clear_cache()
    for factory in factories:
        factory.cache_clear()
    after = memory_maps()
    everything = after is None or after[0] >= KEEP_SHARE * cap
    if everything:
        jax.clear_caches()
        after = memory_maps()
        what = (
            "Dropping amortjax's own compiled programs was not enough, so every program JAX "
            "caches was dropped (jax.clear_caches(), your own jitted functions' included)"
        )
    else:
        what = "Dropped amortjax's own compiled programs (yours are kept)"
    now = f"{after[0]:,}" if after else "?"
    warnings.warn(
        f"amortjax: this process held {count:,} memory mappings, near the kernel's cap of "
        f"{cap:,} (vm.max_map_count), most of them cached compiled programs; at the cap the "
        f"next compilation aborts the process. {what}: {now} mappings "
        f"now; they compile again when next used. To keep them, raise the cap (sudo sysctl "
        f"-w vm.max_map_count=262144) or run independent jobs in separate processes.",
        RuntimeWarning,
        stacklevel=2,
    )
    return True


def typed_key(key: jax.Array) -> jax.Array:
    """`key` as a typed PRNG key (`jax.random.key`): a legacy uint32 key (`jax.random.PRNGKey`)
    is wrapped, with the same bits, so that every evaluator takes either kind alike; anything
    else is refused (`checks.check_key`)."""
    return check_key("amortjax", key)


def datapoint_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
    """`fold_in(key, i)` for every index, `[len(indices)]` typed keys."""
    return jax.vmap(jax.random.fold_in, (None, 0))(typed_key(key), jnp.asarray(indices, jnp.uint32))


def compact_threefry(fn: Callable) -> Callable:
    """`fn`, traced with JAX's threefry generator in its original (non-partitionable) mode.

    The mode decides only how a key's bits are laid out: the original one fills a draw of n
    32-bit numbers from n/2 hashes of the key (two words each), the partitionable one (JAX's
    default since 0.5) spends one hash per number so that one big random array can be split over
    devices without communication. amortjax never makes such an array: it vmaps draws of
    a few numbers each (one z per importance sample) over keys, and the keys (`fold_in`) are the
    same in both modes. The default mode's extra hashes were 7% of IWAE-5000 on Cremer et al.'s
    MNIST decoder (one run, 2-core CPU, 100 datapoints, 5 rounds: 2.76 s -> 2.57 s); the
    per-example optimizer draws far fewer numbers per decoder pass (and a gradient besides) and
    gained little: nothing on the bench's decoder (`python -m bench local_optimizer` with
    JAX_THREEFRY_PARTITIONABLE=0: ratios within noise), 2% with the quick preset's MNIST FFG q*
    settings (z_dim 50, 4 draws per step; 200 digits x 1,000 steps: 7.33 -> 7.20 s and 7.51 ->
    7.32 s in alternating runs), so it keeps the default, and its results, unchanged. Wrap the
    function before `jax.jit`: the mode is read when it traces.
    """

    @functools.wraps(fn)
    def traced_compact(*args, **kwargs):
        with jax.threefry_partitionable(False):
            return fn(*args, **kwargs)

    return traced_compact


def draw_keys(key: jax.Array, num_draws: int) -> jax.Array:
    """`fold_in(key, s)` for s = 0..num_draws-1: draw s's key, `[num_draws]` (the first k of
    them do not depend on num_draws, so IWAE-2k's draws extend IWAE-k's)."""
    return datapoint_keys(key, jnp.arange(num_draws))


def chunked_draw_keys(key: jax.Array, num_draws: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """`draw_keys(key, ...)` laid out in chunks of `chunk` draws, the last one padded.

    Returns:
        `(keys [num_chunks, chunk], valid [num_chunks, chunk])`, where valid is False on the
        padding (draws num_draws.. of the last chunk), num_chunks = ceil(num_draws / chunk).
    """
    num_chunks = -(-num_draws // chunk)
    keys = draw_keys(key, num_chunks * chunk).reshape(num_chunks, chunk)
    valid = (jnp.arange(num_chunks * chunk) < num_draws).reshape(num_chunks, chunk)
    return keys, valid


def even_chunk(n: int, most: int, multiple: int = 1) -> int:
    """The chunk size that covers n items in the fewest chunks of at most `most` (a multiple
    of `multiple`, which divides `most`), with the least padding: ceil(n / ceil(n / most)),
    rounded up to a multiple of `multiple`."""
    chunks = -(-n // most)
    size = -(-n // chunks)
    return -(-size // multiple) * multiple


def map_datapoints(
    batch_fn: Callable[..., Any],
    params: Any,
    key: jax.Array,
    rows: Sequence[jax.Array | np.ndarray],
    *,
    batch_size: int,
    progress: bool | str = False,
    desc: str = "",
    indices: jax.Array | np.ndarray | None = None,
) -> Any:
    """Runs `batch_fn(params, keys, *row_chunks)` over all datapoints, chunk by chunk.

    Args:
        batch_fn: a (jitted) function of the replicated `params`, the chunk's per-datapoint keys
            `[B]` and one chunk `[B, ...]` of each array in `rows`; returns a pytree of arrays
            with a leading `[B]` axis (one row per datapoint).
        params: anything the function needs whole on every device (e.g. model parameters).
        key: the base PRNG key; datapoint i gets `fold_in(key, indices[i])`.
        rows: per-datapoint inputs, each `[N, ...]` with the same N.
        batch_size: the most datapoints per call; the N datapoints go in the fewest calls
            that allows, of equal size (N = 500 at 400 per call: two calls of 250, not 400 and
            a padded 100 that computes 300 copies); inside `amortjax.sharding.data_parallel()`
            it must split evenly over the devices (and so does every call).
        progress: show a progress bar (a string gives its description).
        desc: the bar's default description.
        indices: the datapoints' own indices, `[N]` (None: their positions 0..N-1), so that a
            subset of a dataset draws as it does within the whole.

    Returns:
        The outputs of `batch_fn` for all N datapoints, as numpy arrays `[N, ...]`.
    """
    release_compiled_programs()
    rows = [jnp.asarray(r) for r in rows]
    n = rows[0].shape[0]
    if n == 0:
        raise ValueError("no datapoints: x has 0 rows")
    if any(r.shape[0] != n for r in rows):
        raise ValueError(f"every per-datapoint input needs {n} rows; got {[r.shape for r in rows]}")
    if not isinstance(batch_size, int | np.integer) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    indices = check_indices("map_datapoints", indices, n)
    indices = jnp.arange(n) if indices is None else jnp.asarray(indices)
    mesh = active_mesh()
    devices = 1
    if mesh is not None:
        check_divisible(batch_size, mesh)
        params = replicate(mesh, params)
        devices = mesh.shape[DATA_AXIS]
    batch_size = even_chunk(n, batch_size, devices)
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
        own = indices[start : start + batch_size]
        keys = datapoint_keys(key, jnp.concatenate([own, jnp.repeat(own[:1], batch_size - size)]))
        keys, *chunk = shard_rows(mesh, keys, *chunk)
        # block_until_ready waits with the GIL released (np.asarray's buffer protocol may hold
        # it), so a callback the computation needs can always run
        out = jax.block_until_ready(batch_fn(params, keys, *chunk))
        outputs.append(jax.tree.map(lambda o, size=size: np.asarray(o[:size]), out))
    return jax.tree.map(lambda *parts: np.concatenate(parts), *outputs)
