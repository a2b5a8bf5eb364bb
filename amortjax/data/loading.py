"""Load the image datasets as flat float arrays with fixed train / valid / test splits.

This module is what models and trainers call: it prepares the TFDS datasets of
`amortjax.data.builders` on first use (once per data directory), reads them in bulk, and returns
numpy arrays ``[N, 784]`` in [0, 1], with the validation split and the binarization convention
fixed by seeds so that every run sees the same evaluation data. `dynamic_binarize` is the
per-epoch Bernoulli draw a trainer applies to grey-level training data inside its jitted step.

It is not for batching, shuffling or device placement (the trainer's job), nor for locating or
verifying raw files (`amortjax.data.builders`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from amortjax.checks import check_int, check_key, concrete
from amortjax.data.builders import (
    BUILDERS,
    DATA_DIR_ENV,
    DataNotFoundError,
    prepared_data_dir,
    raw_data_dir,
)

DATASETS = ("mnist", "fashion_mnist", "binarized_mnist")
"""Names accepted by `load_data` and `load_images`."""

SPLITS = ("train", "valid", "test")
"""Splits accepted by `load_images`."""

BINARIZATIONS = ("auto", "static", "dynamic", "threshold", "none")
"""Options for `load_data`'s ``binarization``."""

_ALLOWED_BINARIZATIONS = {
    "mnist": ("auto", "dynamic", "threshold", "none"),
    "fashion_mnist": ("auto", "dynamic", "threshold", "none"),
    "binarized_mnist": ("auto", "static", "threshold"),
}
_AUTO_BINARIZATION = {"mnist": "dynamic", "fashion_mnist": "dynamic", "binarized_mnist": "static"}

DEFAULT_VALIDATION_SIZE = 10_000
_OFFICIAL_SIZES = {  # (train, valid, test) as published; only binarized_mnist has a valid split
    "mnist": (60_000, 0, 10_000),
    "fashion_mnist": (60_000, 0, 10_000),
    "binarized_mnist": (50_000, 10_000, 10_000),
}


def split_sizes(name: str, validation_size: int = DEFAULT_VALIDATION_SIZE) -> dict[str, int]:
    """Rows of each split `load_data(name, validation_size=...)` returns, without loading it
    (a validation_size that `load_data` would refuse is refused here, with the same message)."""
    _check_name(name)
    train, valid, test = _OFFICIAL_SIZES[name]
    _check_validation_size(name, validation_size, train)
    if not valid:
        train, valid = train - validation_size, validation_size
    return {"train": train, "valid": valid, "test": test}


# The test set is the same for every seed, so its fixed binarization is too: test numbers of runs
# with different seeds are then computed on identical data.
_TEST_BINARIZATION_SEED = 20_110_411


@dataclasses.dataclass(frozen=True, eq=False)
class Data:
    """A dataset's three splits as flat float32 arrays, plus how training should binarize.

    Attributes:
        name: Dataset name, one of `DATASETS`.
        binarization: The resolved option: ``"static"``, ``"dynamic"``, ``"threshold"`` or
            ``"none"``.
        train: ``[N_train, 784]`` float32 in [0, 1]; grey levels when ``binarization`` is
            ``"dynamic"`` (the trainer binarizes afresh each epoch) or ``"none"``, 0/1 when
            ``"static"``.
        valid: ``[N_valid, 784]`` float32; 0/1 unless ``binarization`` is ``"none"``.
        test: ``[N_test, 784]`` float32; 0/1 unless ``binarization`` is ``"none"``.
        train_labels: ``[N_train]`` int32 class labels, or None (binarized MNIST has none).
        valid_labels: ``[N_valid]`` int32, or None.
        test_labels: ``[N_test]`` int32, or None.
    """

    name: str
    binarization: str
    train: np.ndarray
    valid: np.ndarray
    test: np.ndarray
    train_labels: np.ndarray | None = None
    valid_labels: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    @property
    def dynamic_binarization(self) -> bool:
        """Whether the trainer must apply `dynamic_binarize` to ``train`` every epoch."""
        return self.binarization == "dynamic"

    @property
    def num_features(self) -> int:
        """Dimension of one flattened example (784)."""
        return int(self.train.shape[1])


def resolve_binarization(name: str, binarization: str) -> str:
    """The binarization `load_data(name, binarization=...)` applies ("auto" resolved).

    Raises:
        ValueError: an unknown dataset or binarization, or one that does not fit the dataset
            (the static set is binarized already; the grey-level sets have no static version).
    """
    _check_name(name)
    if binarization not in BINARIZATIONS:
        raise ValueError(
            f"Unknown binarization {binarization!r}; valid options: {', '.join(BINARIZATIONS)}."
        )
    allowed = _ALLOWED_BINARIZATIONS[name]
    if binarization not in allowed:
        raise ValueError(
            f"binarization={binarization!r} does not fit dataset {name!r}; "
            f"valid for it: {', '.join(allowed)}."
        )
    if binarization == "auto" or (name == "binarized_mnist" and binarization == "threshold"):
        # Larochelle's pixels are 0/1 already: thresholding them changes nothing
        return _AUTO_BINARIZATION[name]
    return binarization


def _check_name(name: str) -> None:
    if name not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}; available: {', '.join(DATASETS)}.")


def _check_validation_size(name: str, validation_size: int, num_official_train: int) -> None:
    if isinstance(validation_size, bool) or not isinstance(validation_size, int | np.integer):
        raise ValueError(f"validation_size must be an int, got {validation_size!r}.")
    if name == "binarized_mnist":
        # Its validation set is Larochelle's fixed one; a different size cannot be honoured.
        if validation_size != DEFAULT_VALIDATION_SIZE:
            raise ValueError(
                f"validation_size={validation_size} is not supported for binarized_mnist, whose "
                f"validation split is the published one of {DEFAULT_VALIDATION_SIZE} examples; "
                f"leave validation_size at {DEFAULT_VALIDATION_SIZE} for it."
            )
        return
    if not 0 < validation_size < num_official_train:
        raise ValueError(
            f"validation_size={validation_size} out of range for {name}: it must be between 1 and "
            f"{num_official_train - 1} (the official training set has {num_official_train})."
        )


class DamagedDataError(RuntimeError):
    """Prepared data that cannot be read; the message names the folder to delete."""


def _check_writable(data_dir: str) -> None:
    """The prepared-data folder exists (created if need be) and can be written."""
    path = pathlib.Path(data_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        writable = os.access(path, os.W_OK)
    except OSError:
        writable = False
    if not writable:
        raise PermissionError(
            f"cannot write the prepared-data folder {path}: set {DATA_DIR_ENV} to a folder you "
            f"can write (it is {os.environ.get(DATA_DIR_ENV, 'unset, so the user cache is used')})"
        )


@functools.cache
def _read_official(
    name: str, tfds_split: str, data_dir: str, raw_dir: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Prepares (once) and reads one official split in bulk, in the publisher's order.

    The cache key holds the data and raw directories, so changing the environment variables
    reaches a different cache entry instead of silently reusing data from elsewhere.

    Returns:
        ``[N, 28, 28]`` uint8 images and ``[N]`` int32 labels (None for binarized MNIST); both
        read-only, since the cached arrays are shared between callers.
    """
    _check_writable(data_dir)
    # One preparation at a time per data folder: a second process waits, then finds it done.
    with open(pathlib.Path(data_dir) / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            builder = BUILDERS[name](data_dir=data_dir, raw_dir=raw_dir)
            builder.download_and_prepare()
            source = builder.as_data_source(split=tfds_split)
            # One bulk read: per-item indexing is several times slower for 60k records.
            records = source.__getitems__(range(len(source)))
        except (DataNotFoundError, ValueError, PermissionError):
            raise  # missing or corrupted raw files: their messages name them
        except Exception as err:
            folder = pathlib.Path(data_dir) / BUILDERS[name].name
            raise DamagedDataError(
                f"the prepared {name} data in {folder} cannot be read ({type(err).__name__}: "
                f"{err}); it is damaged (e.g. its dataset_info.json or a record file): delete "
                f"{folder} and run again to prepare it afresh from the raw files"
            ) from err
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    images = np.stack([r["image"] for r in records]).astype(np.uint8, copy=False)
    images.flags.writeable = False
    labels = None
    if "label" in records[0]:
        labels = np.fromiter((r["label"] for r in records), dtype=np.int32, count=len(records))
        labels.flags.writeable = False
    return images, labels


def _official(name: str, tfds_split: str) -> tuple[np.ndarray, np.ndarray | None]:
    raw_dir = raw_data_dir(name)
    return _read_official(
        name, tfds_split, str(prepared_data_dir()), None if raw_dir is None else str(raw_dir)
    )


def _train_valid_indices(n: int, validation_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Splits ``range(n)`` by a seeded permutation; each part is sorted (official order)."""
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[validation_size:]), np.sort(perm[:validation_size])


def _to_float(name: str, images: np.ndarray) -> np.ndarray:
    flat = images.reshape(images.shape[0], -1)
    if name == "binarized_mnist":
        return flat.astype(np.float32)
    return flat.astype(np.float32) / np.float32(255.0)


def load_images(
    name: str,
    split: str,
    *,
    validation_size: int = DEFAULT_VALIDATION_SIZE,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Loads one split as flat float32 images, without any binarization.

    For mnist and fashion_mnist, ``"train"`` and ``"valid"`` partition the official 60k training
    set by a permutation seeded with ``seed`` (the last ``60k - validation_size`` and first
    ``validation_size`` entries, each kept in official order); ``"test"`` is the official 10k.
    For binarized_mnist the three splits are Larochelle's published files.

    Args:
        name: One of `DATASETS`.
        split: One of `SPLITS`.
        validation_size: Examples held out from the official training set for ``"valid"``.
        seed: Seed of the train/valid permutation.

    Returns:
        ``images`` ``[N, 784]`` float32 in [0, 1] (exactly 0.0/1.0 for binarized_mnist) and
        ``labels`` ``[N]`` int32 in 0..9, or None for binarized_mnist.

    Raises:
        ValueError: Unknown name or split, or validation_size out of range.
        DataNotFoundError: Raw files are missing and cannot be downloaded.
    """
    _check_name(name)
    check_int("load_images", 0, seed=seed)
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; available: {', '.join(SPLITS)}.")
    if name == "binarized_mnist":
        _check_validation_size(name, validation_size, 0)
        images, _ = _official(name, {"valid": "validation"}.get(split, split))
        return _to_float(name, images), None
    if split == "test":
        images, labels = _official(name, "test")
        return _to_float(name, images), np.array(labels)
    images, labels = _official(name, "train")
    _check_validation_size(name, validation_size, images.shape[0])
    train_idx, valid_idx = _train_valid_indices(images.shape[0], validation_size, seed)
    idx = train_idx if split == "train" else valid_idx
    return _to_float(name, images[idx]), labels[idx]


def _bernoulli_numpy(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return (rng.random(x.shape, dtype=np.float32) < x).astype(np.float32)


def load_data(
    name: str,
    *,
    binarization: str = "auto",
    validation_size: int = DEFAULT_VALIDATION_SIZE,
    seed: int = 0,
) -> Data:
    """Loads a dataset's train / valid / test splits under a binarization convention.

    Args:
        name: One of `DATASETS`.
        binarization: ``"static"`` (binarized_mnist only: Larochelle's fixed binarization),
            ``"dynamic"`` (mnist / fashion_mnist: train stays grey levels, to be binarized afresh
            each epoch with `dynamic_binarize`; valid and test are binarized once by a seeded
            Bernoulli draw so evaluation is fixed), ``"threshold"`` (every split binarized once
            by `threshold_binarize`, pixel > 0.5: Cremer et al.'s Fashion-MNIST protocol; for
            binarized_mnist the same as static), ``"none"`` (mnist / fashion_mnist: grey
            levels in [0, 1] everywhere), or ``"auto"`` (static for binarized_mnist, dynamic
            otherwise).
        validation_size: Examples of the official training set held out as ``valid``
            (mnist / fashion_mnist; binarized_mnist has a fixed validation set of 10,000).
        seed: Seed of the train/valid permutation and of the valid split's binarization. The
            test split's binarization does not depend on it, so test results of different seeds
            are computed on the same data.

    Returns:
        A `Data` with float32 ``[N, 784]`` splits.

    Raises:
        ValueError: Unknown name or binarization, a binarization that does not fit the
            dataset, or validation_size out of range.
        DataNotFoundError: Raw files are missing and cannot be downloaded.
    """
    check_int("load_data", 0, seed=seed)
    resolved = resolve_binarization(name, binarization)
    kwargs = {"validation_size": validation_size, "seed": seed}
    train, train_labels = load_images(name, "train", **kwargs)
    valid, valid_labels = load_images(name, "valid", **kwargs)
    test, test_labels = load_images(name, "test", **kwargs)
    if resolved == "dynamic":
        valid = _bernoulli_numpy(valid, np.random.default_rng((seed, 1)))
        test = _bernoulli_numpy(test, np.random.default_rng(_TEST_BINARIZATION_SEED))
    elif resolved == "threshold":
        train, valid, test = (threshold_binarize(split) for split in (train, valid, test))
    return Data(
        name=name,
        binarization=resolved,
        train=train,
        valid=valid,
        test=test,
        train_labels=train_labels,
        valid_labels=valid_labels,
        test_labels=test_labels,
    )


def labels_of_test_split(data: Data) -> np.ndarray | None:
    """Digit labels of the test split (to colour the embedding), or None if there are none."""
    if data.test_labels is not None:
        return data.test_labels
    if data.name != "binarized_mnist":
        return None
    # Larochelle's binarized test split is MNIST's test split sorted by digit: matching each of
    # its 10,000 images to the most likely MNIST test image (Bernoulli likelihood of the grey
    # levels) gave labels equal to the sorted MNIST labels at all 10,000 positions.
    try:
        _, labels = load_images("mnist", "test")
    except DataNotFoundError:
        return None
    labels = np.sort(labels)
    return labels if len(labels) == len(data.test) else None


def _check_grey(where: str, x: np.ndarray | jax.Array) -> None:
    """Refuses concrete data that are not grey levels in [0, 1] (raw 0-255 pixels came out 95%
    ones, NaN as 0, silently); traced data (inside jit) are not checked."""
    arr = concrete(x)
    if arr is None:
        return
    if arr.size and not (np.all(np.isfinite(arr)) and arr.min() >= 0 and arr.max() <= 1):
        finite = arr[np.isfinite(arr)]
        span = f"from {finite.min():g} to {finite.max():g}" if finite.size else "none finite"
        nan = ", and NaN or infinite ones" if finite.size < arr.size else ""
        raise ValueError(
            f"{where}: x must be grey levels in [0, 1]; got values {span}{nan}. Raw pixels "
            "of 0..255 are divided by 255 first (load_data does it)"
        )


def threshold_binarize(x: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A fixed binarization of grey levels: 1 where a pixel exceeds `threshold`, else 0
    (Cremer et al. 2018's Fashion-MNIST: grey levels / 255, thresholded at 0.5).

    Args:
        x: ``[..., D]`` grey levels in [0, 1].
        threshold: the cut; a pixel equal to it becomes 0.

    Returns:
        float32 array of ``x``'s shape, values in {0, 1}.

    Raises:
        ValueError: if x has values outside [0, 1] (e.g. raw 0-255 pixels) or NaN.
    """
    _check_grey("threshold_binarize", x)
    return (np.asarray(x) > threshold).astype(np.float32)


def dynamic_binarize(key: jax.Array, x: jax.Array) -> jax.Array:
    """Draws a fresh binarization of grey-level data: each pixel is 1 with probability ``x``.

    Pure and jit-able; a trainer calls it on each batch (or on the whole training set) with a
    new key every epoch.

    Args:
        key: A JAX PRNG key.
        x: ``[..., D]`` grey levels in [0, 1].

    Returns:
        Array of ``x``'s shape, float32, values in {0, 1}.

    Raises:
        ValueError: if a concrete x has values outside [0, 1] (e.g. raw 0-255 pixels) or NaN
            (under jit no check is possible).
    """
    key = check_key("dynamic_binarize", key)
    _check_grey("dynamic_binarize", x)
    x = jnp.asarray(x)
    return (jax.random.uniform(key, x.shape, dtype=jnp.float32) < x).astype(jnp.float32)
