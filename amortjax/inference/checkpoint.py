"""Checkpoints of whole training states, written atomically.

A state is any pytree (the trainer's `TrainState`: parameters, optimizer state, RNG keys,
epoch). Its leaves go to one `.npz` file and a JSON file carries metadata (epoch, history).
Restoring needs a template of the same structure (a freshly initialized state), so nothing is
pickled and a checkpoint outlives code changes that keep the structure. Files are written to a
temporary name and renamed, so a run killed mid-write keeps its previous checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

STATE_FILE = "state.npz"
META_FILE = "meta.json"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _to_numpy(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def save_checkpoint(directory: str | Path, state: Any, metadata: dict | None = None) -> Path:
    """Writes state (a pytree) and JSON-serializable metadata into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    leaves = [_to_numpy(leaf) for leaf in jax.tree.leaves(state)]
    _atomic_write(
        directory / STATE_FILE,
        lambda f: np.savez(f, **{f"leaf_{i}": v for i, v in enumerate(leaves)}),
    )
    # The metadata is written last: its presence marks a complete checkpoint.
    _atomic_write(directory / META_FILE, lambda f: f.write(json.dumps(metadata or {}).encode()))
    return directory


def has_checkpoint(directory: str | Path) -> bool:
    """Whether directory holds a complete checkpoint."""
    directory = Path(directory)
    return (directory / STATE_FILE).exists() and (directory / META_FILE).exists()


def restore_checkpoint(directory: str | Path, template: Any) -> tuple[Any, dict]:
    """Reads a checkpoint into the structure of template.

    Args:
        directory: where `save_checkpoint` wrote.
        template: a pytree with the saved state's structure, shapes and dtypes.

    Returns:
        `(state, metadata)`.

    Raises:
        ValueError: if the checkpoint does not fit the template.
    """
    directory = Path(directory)
    leaves, treedef = jax.tree.flatten(template)
    with np.load(directory / STATE_FILE) as data:
        saved = [data[f"leaf_{i}"] for i in range(len(data.files))]
    if len(saved) != len(leaves):
        raise ValueError(
            f"checkpoint in {directory} has {len(saved)} arrays, the state has {len(leaves)}: "
            "it was written for another model or optimizer"
        )
    restored = []
    for i, (value, like) in enumerate(zip(saved, leaves, strict=True)):
        if isinstance(like, jax.Array) and jax.dtypes.issubdtype(like.dtype, jax.dtypes.prng_key):
            restored.append(jax.random.wrap_key_data(value, impl=jax.random.key_impl(like)))
            continue
        if np.shape(value) != np.shape(like):
            raise ValueError(
                f"checkpoint array {i} has shape {np.shape(value)}, the state expects "
                f"{np.shape(like)}: it was written for another architecture"
            )
        restored.append(jax.numpy.asarray(value, dtype=jax.numpy.result_type(like)))
    metadata = json.loads((directory / META_FILE).read_text())
    return jax.tree.unflatten(treedef, restored), metadata
