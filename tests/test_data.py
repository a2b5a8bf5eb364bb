"""Tests of the data layer: splits, values, conventions, errors, and offline failure modes.

The real-data tests read the offline raw files (see `raw_data_dir`) and prepare the TFDS data
once in the default data directory; the failure-mode tests point both directories at temporary
folders and never touch the network.
"""

from __future__ import annotations

import collections
import re
import shutil
import socket
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from amortjax.data import (
    BUILDERS,
    DataNotFoundError,
    dynamic_binarize,
    load_data,
    load_images,
    raw_data_dir,
    resolve_binarization,
    threshold_binarize,
)
from amortjax.data import builders as builders_module
from amortjax.data.builders import _read_idx, host_reachable
from amortjax.data.loading import _official

MNIST_LIKE = ("mnist", "fashion_mnist")

# Where the real raw files are, resolved before any test changes the environment.
_REAL_RAW = {name: raw_data_dir(name) for name in BUILDERS}


def _raw_available() -> bool:
    return all(
        _REAL_RAW[name] is not None and all((_REAL_RAW[name] / f).is_file() for f in cls.FILES)
        for name, cls in BUILDERS.items()
    )


needs_raw = pytest.mark.skipif(not _raw_available(), reason="offline raw dataset files not found")


def _row_keys(images: np.ndarray, labels: np.ndarray) -> collections.Counter:
    grey = np.rint(images * 255).astype(np.uint8)
    return collections.Counter(
        (row.tobytes(), int(label)) for row, label in zip(grey, labels, strict=True)
    )


@needs_raw
def test_binarized_mnist_is_the_static_larochelle_split():
    data = load_data("binarized_mnist")
    assert data.binarization == "static" and not data.dynamic_binarization
    assert data.train.shape == (50_000, 784)
    assert data.valid.shape == (10_000, 784)
    assert data.test.shape == (10_000, 784)
    for split in (data.train, data.valid, data.test):
        assert split.dtype == np.float32
        assert set(np.unique(split).tolist()) == {0.0, 1.0}
    assert data.train_labels is None and data.valid_labels is None and data.test_labels is None
    # Digits cover roughly 13% of the pixels; a reading or parsing error would not.
    assert 0.10 < data.test.mean() < 0.16


@needs_raw
@pytest.mark.parametrize("name", MNIST_LIKE)
def test_grey_level_splits_shapes_values_and_labels(name):
    data = load_data(name, binarization="none")
    assert data.binarization == "none" and not data.dynamic_binarization
    assert data.train.shape == (50_000, 784)
    assert data.valid.shape == (10_000, 784)
    assert data.test.shape == (10_000, 784)
    for images, labels in (
        (data.train, data.train_labels),
        (data.valid, data.valid_labels),
        (data.test, data.test_labels),
    ):
        assert images.dtype == np.float32
        assert images.min() == 0.0 and images.max() == 1.0
        assert np.any((images > 0) & (images < 1))
        assert labels.dtype == np.int32 and labels.shape == (images.shape[0],)
        counts = np.bincount(labels, minlength=10)
        assert counts.size == 10
        assert np.all(counts > 0.07 * labels.size) and np.all(counts < 0.13 * labels.size)


@needs_raw
@pytest.mark.parametrize("name", MNIST_LIKE)
def test_validation_split_partitions_the_official_training_set(name):
    train, train_labels = load_images(name, "train")
    valid, valid_labels = load_images(name, "valid")
    raw = raw_data_dir(name)
    official = _read_idx(raw / "train-images-idx3-ubyte.gz", 2051).reshape(60_000, -1) / 255.0
    official_labels = _read_idx(raw / "train-labels-idx1-ubyte.gz", 2049)
    train_keys = _row_keys(train, train_labels)
    valid_keys = _row_keys(valid, valid_labels)
    # The official sets have no duplicate images, so disjointness is exact.
    assert not set(train_keys) & set(valid_keys)
    assert train_keys + valid_keys == _row_keys(official, official_labels)


@needs_raw
def test_validation_split_is_seeded_and_sized():
    first, _ = load_images("mnist", "valid", seed=0)
    again, _ = load_images("mnist", "valid", seed=0)
    other, _ = load_images("mnist", "valid", seed=1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    data = load_data("mnist", validation_size=5_000, binarization="none")
    assert data.train.shape == (55_000, 784) and data.valid.shape == (5_000, 784)


@needs_raw
@pytest.mark.parametrize(
    ("name", "first_train_labels", "first_test_labels"),
    [
        ("mnist", [5, 0, 4, 1, 9], [7, 2, 1, 0, 4]),
        ("fashion_mnist", [9, 0, 0, 3, 0], [9, 2, 1, 1, 6]),
    ],
)
def test_prepared_data_keeps_the_official_order_and_values(
    name, first_train_labels, first_test_labels
):
    _, train_labels = _official(name, "train")
    assert train_labels[:5].tolist() == first_train_labels
    test, test_labels = load_images(name, "test")
    assert test_labels[:5].tolist() == first_test_labels
    raw = _read_idx(raw_data_dir(name) / "t10k-images-idx3-ubyte.gz", 2051)
    np.testing.assert_array_equal(np.rint(test * 255).astype(np.uint8), raw.reshape(10_000, -1))


@needs_raw
def test_dynamic_convention_binarizes_evaluation_once_and_keeps_train_grey():
    data = load_data("mnist")
    assert data.binarization == "dynamic" and data.dynamic_binarization
    assert np.any((data.train > 0) & (data.train < 1))
    for split in (data.valid, data.test):
        assert set(np.unique(split).tolist()) == {0.0, 1.0}
    again = load_data("mnist")
    np.testing.assert_array_equal(data.valid, again.valid)
    np.testing.assert_array_equal(data.test, again.test)
    grey = load_data("mnist", binarization="none")
    assert abs(data.test.mean() - grey.test.mean()) < 0.002
    # Pixels that are 0 or 1 in grey level must stay so after the Bernoulli draw.
    assert np.all(data.test[grey.test == 0.0] == 0.0)
    assert np.all(data.test[grey.test == 1.0] == 1.0)


def test_threshold_binarize_against_a_hand_computed_example():
    """Pixel > 0.5 becomes 1: grey levels k/255 split between k = 127 and k = 128."""
    x = np.array([[0.0, 0.5, 127 / 255, 128 / 255, 0.9, 1.0]])
    np.testing.assert_array_equal(threshold_binarize(x), [[0, 0, 0, 1, 1, 1]])
    assert threshold_binarize(x).dtype == np.float32


def test_a_seed_that_is_not_a_non_negative_integer_is_named():
    """None, 1.5 and '0' failed inside NumPy's SeedSequence without naming the argument."""
    from amortjax.evaluation.subsets import random_subset

    for seed in (-1, None, 1.5, "0"):
        with pytest.raises(ValueError, match=r"load_data: seed must be an integer >= 0"):
            load_data("mnist", seed=seed)
        with pytest.raises(ValueError, match=r"random_subset: seed must be an integer >= 0"):
            random_subset(100, 10, seed)
    # a negative split size returned an empty subset; a float one failed in NumPy
    for n in (-5, 10.0):
        with pytest.raises(ValueError, match=r"random_subset: num_datapoints must be an integer"):
            random_subset(n, 3, 0)
    for size in (0, -1, 2.5):
        with pytest.raises(ValueError, match=r"random_subset: size must be an integer >= 1"):
            random_subset(100, size, 0)
    subset = random_subset(100, 10, 0)  # sorted, distinct, in range; None or more: all of it
    assert len(set(subset)) == 10 and np.all(np.diff(subset) > 0) and subset.max() < 100
    np.testing.assert_array_equal(random_subset(7, None, 0), np.arange(7))
    np.testing.assert_array_equal(random_subset(7, 9, 0), np.arange(7))


def test_binarizers_refuse_raw_pixels_and_nan():
    """Raw 0..255 pixels came out 95% ones and NaN as 0, silently."""
    raw = np.array([[0.0, 3.0, 128.0, 255.0]], np.float32)
    key = jax.random.key(0)
    for name, call in (("threshold_binarize", threshold_binarize),
                       ("dynamic_binarize", lambda x: dynamic_binarize(key, x))):  # fmt: skip
        with pytest.raises(ValueError, match=rf"{name}: x must be grey levels in \[0, 1\]; got "
                           r"values from 0 to 255. .* divided by 255"):  # fmt: skip
            call(raw)
        with pytest.raises(ValueError, match=r"and NaN or infinite ones"):
            call(np.array([[0.2, np.nan]], np.float32))
        call(raw / 255)
    jitted = jax.jit(dynamic_binarize)(key, raw / 255)  # (traced: not checked, still works)
    assert set(np.unique(jitted)) <= {0.0, 1.0}


@needs_raw
def test_threshold_convention_binarizes_every_split_once():
    """Cremer et al.'s Fashion-MNIST: every split is the grey levels thresholded at 0.5."""
    data = load_data("fashion_mnist", binarization="threshold")
    grey = load_data("fashion_mnist", binarization="none")
    assert data.binarization == "threshold" and not data.dynamic_binarization
    for split in ("train", "valid", "test"):
        np.testing.assert_array_equal(getattr(data, split), getattr(grey, split) > 0.5)
    assert resolve_binarization("binarized_mnist", "threshold") == "static"  # 0/1 already


def test_dynamic_binarize_is_seeded_jittable_and_unbiased():
    x = jnp.concatenate([jnp.full((50_000,), 0.3), jnp.zeros((100,)), jnp.ones((100,))])
    key = jax.random.key(0)
    a = dynamic_binarize(key, x)
    assert a.dtype == jnp.float32 and a.shape == x.shape
    np.testing.assert_array_equal(a, dynamic_binarize(key, x))
    np.testing.assert_array_equal(a, jax.jit(dynamic_binarize)(key, x))
    assert not np.array_equal(a, dynamic_binarize(jax.random.key(1), x))
    assert set(np.unique(np.asarray(a)).tolist()) == {0.0, 1.0}
    assert abs(float(a[:50_000].mean()) - 0.3) < 0.01
    assert float(a[50_000:50_100].max()) == 0.0 and float(a[50_100:].min()) == 1.0


@pytest.mark.parametrize(
    ("call", "offending"),
    [
        (lambda: load_data("cifar10"), "cifar10"),
        (lambda: load_images("omniglot", "train"), "omniglot"),
        (lambda: load_images("mnist", "validation"), "validation"),
        (lambda: load_data("mnist", binarization="stochastic"), "stochastic"),
        (lambda: load_data("binarized_mnist", binarization="dynamic"), "dynamic"),
        (lambda: load_data("binarized_mnist", binarization="none"), "none"),
        (lambda: load_data("mnist", binarization="static"), "static"),
        (lambda: load_data("binarized_mnist", validation_size=5_000), "5000"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(call, offending):
    with pytest.raises(ValueError, match=offending):
        call()


def test_error_messages_list_the_valid_choices():
    with pytest.raises(ValueError, match="binarized_mnist") as unknown:
        load_data("cifar10")
    assert "fashion_mnist" in str(unknown.value)
    with pytest.raises(ValueError, match="dynamic") as bad_option:
        load_data("mnist", binarization="stochastic")
    assert "static" in str(bad_option.value) and "none" in str(bad_option.value)


@needs_raw
@pytest.mark.parametrize("size", [0, -1, 60_000, 70_000])
def test_validation_size_out_of_range(size):
    with pytest.raises(ValueError, match=f"validation_size={size}"):
        load_data("mnist", validation_size=size)


@pytest.fixture
def empty_dirs(tmp_path, monkeypatch):
    raw, prepared = tmp_path / "raw", tmp_path / "prepared"
    raw.mkdir()
    monkeypatch.setenv("AMORTJAX_RAW_DATA", str(raw))
    monkeypatch.setenv("AMORTJAX_DATA_DIR", str(prepared))
    # Behave as an offline machine even where there is internet: tests never download.
    monkeypatch.setattr(builders_module, "host_reachable", lambda url, timeout=3.0: False)
    return raw


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_missing_raw_files_fail_fast_naming_files_folder_and_variable(empty_dirs, name):
    start = time.monotonic()
    with pytest.raises(DataNotFoundError) as err:
        load_images(name, "test")
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    for filename in BUILDERS[name].FILES:
        assert filename in message
    assert str(empty_dirs / name) in message
    assert "AMORTJAX_RAW_DATA" in message


@needs_raw
def test_partially_present_raw_files_report_only_the_missing_ones(empty_dirs):
    (empty_dirs / "mnist").mkdir()
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
        shutil.copy(_REAL_RAW["mnist"] / name, empty_dirs / "mnist" / name)
    with pytest.raises(DataNotFoundError) as err:
        load_images("mnist", "test")
    missing_line = next(line for line in str(err.value).splitlines() if line.startswith("Missing"))
    assert "t10k-images-idx3-ubyte.gz" in missing_line
    assert "t10k-labels-idx1-ubyte.gz" in missing_line
    assert "train-images-idx3-ubyte.gz" not in missing_line


@needs_raw
def test_corrupted_raw_file_fails_checksum(empty_dirs):
    folder = empty_dirs / "mnist"
    folder.mkdir()
    for name in BUILDERS["mnist"].FILES:
        shutil.copy(_REAL_RAW["mnist"] / name, folder / name)
    target = folder / "t10k-labels-idx1-ubyte.gz"
    target.chmod(0o644)
    content = bytearray(target.read_bytes())
    content[100] ^= 0xFF
    target.write_bytes(bytes(content))
    expected = BUILDERS["mnist"].FILES["t10k-labels-idx1-ubyte.gz"]
    with pytest.raises(ValueError, match=re.escape("t10k-labels-idx1-ubyte.gz")) as err:
        load_images("mnist", "test")
    assert expected in str(err.value)
    assert builders_module.sha256_of(target) in str(err.value)


def test_host_reachable_is_bounded_and_offline():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert host_reachable(f"http://127.0.0.1:{port}/")
    # The port is closed now: refused at once.
    assert not host_reachable(f"http://127.0.0.1:{port}/")


def test_host_reachable_gives_up_after_its_timeout(monkeypatch):
    def hang(*args, **kwargs):
        time.sleep(10)
        raise TimeoutError("a resolver that hangs, then gives up")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.monotonic()
    assert not host_reachable("http://example.org/", timeout=0.5)
    assert time.monotonic() - start < 2.0


# --- the prepared-data folder: unwritable, damaged, prepared by two processes at once ---------


def test_an_unwritable_data_folder_names_the_variable(tmp_path, monkeypatch):
    from amortjax.data.loading import _read_official

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("AMORTJAX_DATA_DIR", str(blocker / "prepared"))
    _read_official.cache_clear()
    with pytest.raises(PermissionError, match="set AMORTJAX_DATA_DIR to a folder you can write"):
        _official("mnist", "test")


def _prepare_mnist_test_split(prepared) -> str:
    import os
    import subprocess
    import sys

    env = {**os.environ, "AMORTJAX_DATA_DIR": str(prepared)}
    code = "from amortjax.data.loading import _official; print(_official('mnist', 'test')[0].shape)"
    return subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


@needs_raw
@pytest.mark.slow
def test_two_processes_prepare_one_folder_at_once_and_a_damaged_one_is_named(tmp_path, monkeypatch):
    from amortjax.data.loading import DamagedDataError, _read_official

    prepared = tmp_path / "prepared"
    runs = [_prepare_mnist_test_split(prepared) for _ in range(2)]
    for run in runs:
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-2000:]
        assert "(10000, 28, 28)" in out
    # A damaged dataset_info.json: the error names the folder to delete.
    (info,) = prepared.glob("amortjax_mnist/*/dataset_info.json")
    info.write_text('{"name": "amortjax_mn')
    monkeypatch.setenv("AMORTJAX_DATA_DIR", str(prepared))
    _read_official.cache_clear()
    with pytest.raises(DamagedDataError, match=f"delete {prepared / 'amortjax_mnist'}"):
        _official("mnist", "test")
    _read_official.cache_clear()
