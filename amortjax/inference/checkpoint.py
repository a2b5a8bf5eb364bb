"""Checkpoints of whole training states, written atomically.

A state is any pytree (the trainer's `TrainState`: parameters, optimizer state, RNG keys,
epoch). Its leaves go to one `.npz` file and a JSON file carries metadata (epoch, history).
Restoring needs a template of the same structure (a freshly initialized state), so nothing is
pickled and a checkpoint outlives code changes that keep the structure. Files are written to a
temporary name and renamed, so a run killed mid-write keeps its previous checkpoint.

The metadata carries the settings the state was trained under (`amortjax.inference.training`'s
fingerprint); `check_settings` refuses to continue a checkpoint under other ones, so that a
run never returns, or adds epochs to, parameters trained under settings it did not ask for.
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


def check_settings(directory: str | Path, saved: dict | None, settings: dict) -> None:
    """Refuses a checkpoint whose recorded training settings are not `settings`.

    Args:
        directory: the checkpoint's folder (named in the message).
        saved: the settings in its metadata (`metadata.get("settings")`); None for a
            checkpoint written before amortjax recorded them.
        settings: JSON-ready settings of the run that would continue it.

    Raises:
        ValueError: naming each setting that differs, its recorded and its new value, and
            the fix; or, for a checkpoint without settings, saying why it cannot be checked.
    """
    if saved is None:
        raise ValueError(
            f"the checkpoint in {directory} records no training settings (it was written "
            "before amortjax recorded them), so whether it was trained under this run's "
            "settings cannot be checked; train afresh in a new checkpoint_dir (or move that "
            "folder away), or continue it with the amortjax version that wrote it"
        )
    settings = json.loads(json.dumps(settings))  # tuples as lists, as the saved ones read
    differ = [
        f"{name}: {saved.get(name)!r} in the checkpoint, {settings.get(name)!r} now"
        for name in sorted(saved.keys() | settings.keys())
        if saved.get(name) != settings.get(name)
    ]
    if differ:
        raise ValueError(
            f"the checkpoint in {directory} was trained under other settings; "
            + "; ".join(differ)
            + ". Continuing it would return or extend parameters those settings did not train: "
            "train in a new checkpoint_dir, or resume with the checkpoint's settings (only the "
            "number of epochs may grow on resume)"
        )
