"""Checkpoints of whole training states, written atomically.

A state is any pytree (the trainer's `TrainState`: parameters, optimizer state, RNG keys,
epoch). Its leaves go to one `.npz` file and a JSON file carries metadata (epoch, history).
Restoring needs a template of the same structure (a freshly initialized state), so nothing is
pickled and a checkpoint outlives code changes that keep the structure.

Both files are written whole to temporary names, then renamed, state first. Each save draws an
id stored in both, so that a run killed between the two renames (a new state beside the old
metadata) is recognized on restore: the new metadata's temporary file completes the pair, and
a pair that cannot be completed is refused rather than restored with a history that does not
match its parameters. A damaged file is refused with a message naming it and the fix.

The metadata carries the settings the state was trained under (`amortjax.inference.training`'s
fingerprint); `check_settings` refuses to continue a checkpoint under other ones, so that a
run never returns, or adds epochs to, parameters trained under settings it did not ask for.
"""

from __future__ import annotations

import json
import math
import os
import uuid
import zipfile
from pathlib import Path
from typing import Any

import jax
import numpy as np

STATE_FILE = "state.npz"
META_FILE = "meta.json"
ID_KEY = "checkpoint_id"  # in the .npz beside the leaves, and in the metadata


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _write_tmp(path: Path, write) -> Path:
    """Writes path's temporary file whole (flushed to disk); the caller renames it."""
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _damaged(directory: Path, name: str, err: Exception) -> ValueError:
    return ValueError(
        f"the checkpoint in {directory} is damaged: {directory / name} cannot be read "
        f"({type(err).__name__}: {err}). amortjax writes it atomically, so it was damaged "
        f"outside amortjax (a full disk, a copy cut short). Move {directory} away (or delete "
        "it) to train that model afresh, or start a fresh run"
    )


def _to_numpy(leaf: Any) -> np.ndarray:
    if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        return np.asarray(jax.random.key_data(leaf))
    return np.asarray(leaf)


def save_checkpoint(directory: str | Path, state: Any, metadata: dict | None = None) -> Path:
    """Writes state (a pytree) and JSON-serializable metadata into directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    leaves = [_to_numpy(leaf) for leaf in jax.tree.leaves(state)]
    save_id = uuid.uuid4().hex
    arrays = {f"leaf_{i}": v for i, v in enumerate(leaves)}
    state_tmp = _write_tmp(
        directory / STATE_FILE, lambda f: np.savez(f, **arrays, **{ID_KEY: np.array(save_id)})
    )
    meta = {**(metadata or {}), ID_KEY: save_id}
    meta_tmp = _write_tmp(directory / META_FILE, lambda f: f.write(json.dumps(meta).encode()))
    # Both are whole on disk before either is renamed: a kill between the renames leaves the
    # new metadata in its temporary file, which `restore_checkpoint` pairs with the new state.
    os.replace(state_tmp, directory / STATE_FILE)
    os.replace(meta_tmp, directory / META_FILE)
    return directory


def has_checkpoint(directory: str | Path) -> bool:
    """Whether directory holds a complete checkpoint."""
    directory = Path(directory)
    meta = directory / META_FILE
    return (directory / STATE_FILE).exists() and (meta.exists() or _tmp(meta).exists())


def _read_meta(directory: Path, path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(directory, path.name, err) from err


def _matching_meta(directory: Path, save_id: str | None) -> dict:
    """The metadata written with the state of id `save_id`, completing a save that was killed
    between its two renames; refuses a state whose metadata is lost."""
    path = directory / META_FILE
    meta = _read_meta(directory, path) if path.exists() else None
    if save_id is None or (meta is not None and meta.get(ID_KEY) == save_id):
        if meta is None:
            raise _damaged(directory, META_FILE, FileNotFoundError("missing"))
        return meta  # a checkpoint written before the ids holds no pair to check here
    pending = _tmp(path)
    if pending.exists():
        candidate = _read_meta(directory, pending)
        if candidate.get(ID_KEY) == save_id:
            os.replace(pending, path)  # the rename the killed save did not reach
            return candidate
    found = "no metadata" if meta is None else f"metadata of save {meta.get(ID_KEY)}"
    raise ValueError(
        f"the checkpoint in {directory} is torn: {STATE_FILE} is from save {save_id}, "
        f"{META_FILE} holds {found}, and the metadata of that save is lost (the writing "
        "process was killed between the two files and the temporary file was removed). "
        "Restoring it would pair the parameters with another epoch's history: move "
        f"{directory} away (or delete it) to train that model afresh, or start a fresh run"
    )


def restore_checkpoint(directory: str | Path, template: Any) -> tuple[Any, dict]:
    """Reads a checkpoint into the structure of template.

    Args:
        directory: where `save_checkpoint` wrote.
        template: a pytree with the saved state's structure, shapes and dtypes.

    Returns:
        `(state, metadata)`.

    Raises:
        ValueError: if the checkpoint does not fit the template; if a file is damaged, or
            the state's metadata is lost (each naming the file and the fix).
    """
    directory = Path(directory)
    leaves, treedef = jax.tree.flatten(template)
    try:
        with np.load(directory / STATE_FILE) as data:
            count = sum(name.startswith("leaf_") for name in data.files)
            saved = [data[f"leaf_{i}"] for i in range(count)]
            save_id = str(data[ID_KEY]) if ID_KEY in data.files else None
    except (OSError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        raise _damaged(directory, STATE_FILE, err) from err
    metadata = _matching_meta(directory, save_id)
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
    return jax.tree.unflatten(treedef, restored), metadata


APPROXIMATE = {  # settings compared to a relative tolerance: (tolerance, what a change means)
    "model_loss": (
        1e-4,
        "the loss of the model and guide at the initial parameters: another "
        "model, guide, likelihood or activation",
    ),
}


def _same(name: str, saved: dict, settings: dict) -> bool:
    """Whether setting `name` agrees; an `APPROXIMATE` one to its tolerance, and not compared
    where the checkpoint predates it (it only adds a check)."""
    old, new = saved.get(name), settings.get(name)
    if name in APPROXIMATE:
        if name not in saved:
            return True
        if isinstance(old, int | float) and isinstance(new, int | float):
            return math.isclose(old, new, rel_tol=APPROXIMATE[name][0])
    return old == new


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
            "folder away), or continue it with the amortjax version that wrote it (from "
            "`python -m experiments`: start a fresh run, or move that folder away to retrain "
            "that model in the resumed run)"
        )
    settings = json.loads(json.dumps(settings))  # tuples as lists, as the saved ones read
    differ = [
        f"{name}: {saved.get(name)!r} in the checkpoint, {settings.get(name)!r} now"
        + (f" ({APPROXIMATE[name][1]})" if name in APPROXIMATE else "")
        for name in sorted(saved.keys() | settings.keys())
        if not _same(name, saved, settings)
    ]
    if differ:
        raise ValueError(
            f"the checkpoint in {directory} was trained under other settings; "
            + "; ".join(differ)
            + ". Continuing it would return or extend parameters those settings did not train: "
            "train in a new checkpoint_dir, or resume with the checkpoint's settings (only the "
            "number of epochs may grow on resume; from `python -m experiments`: resume with the "
            "options in the run's config.json, or start a fresh run with the new ones)"
        )
