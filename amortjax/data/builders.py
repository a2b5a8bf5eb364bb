"""TFDS builders for the image datasets the project trains on, fed from local raw files first.

This module turns the publishers' raw files (IDX ``.gz`` files for MNIST and Fashion-MNIST, the
``.amat`` text files of Larochelle & Murray's statically binarized MNIST) into prepared
TFDS datasets in the ``array_record`` format, which can be read without TensorFlow. It also
decides where raw files are looked for (`raw_data_dir`) and where prepared data is written
(`prepared_data_dir`).

Raw files are taken from a local folder when present (after checking their sha256 against the
publishers' checksums, which are also the ones TFDS records); only a missing file is
downloaded, and only if the publisher's host answers within a few seconds, so that an offline
machine fails at once with `DataNotFoundError` instead of hanging.

It is not for turning examples into training arrays (scaling, validation splits, binarization):
that is `amortjax.data.loading`. The builders are declared with ``skip_registration=True`` so that
they never shadow or clash with TFDS's stock ``mnist`` / ``fashion_mnist`` / ``binarized_mnist``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pathlib
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

RAW_DATA_ENV = "AMORTJAX_RAW_DATA"
"""Environment variable: a folder with subfolders ``mnist/``, ``fashion_mnist/``, ...."""

DATA_DIR_ENV = "AMORTJAX_DATA_DIR"
"""Environment variable: where prepared TFDS datasets are written and read."""

DEFAULT_DATA_DIR = pathlib.Path("~/.cache/amortjax/tensorflow_datasets")

REACHABILITY_TIMEOUT_S = 3.0

_IMAGE_SHAPE = (28, 28)
_NUM_PIXELS = _IMAGE_SHAPE[0] * _IMAGE_SHAPE[1]


class DataNotFoundError(RuntimeError):
    """Raised when raw files are neither available locally nor downloadable."""


def _repo_root() -> pathlib.Path:
    # The repository root is the parent of the `amortjax` package directory.
    return pathlib.Path(__file__).resolve().parents[2]


def raw_data_root() -> pathlib.Path | None:
    """Returns the folder that holds one subfolder of raw files per dataset, if any.

    Looked up in this order: the ``AMORTJAX_RAW_DATA`` environment variable (used as given,
    even if it does not exist, so that a wrong setting is reported rather than silently
    bypassed); ``<repo root>/../shared/datasets``; ``./shared/datasets`` and
    ``../shared/datasets`` relative to the working directory.

    Returns:
        The folder, or None when no candidate exists.
    """
    env = os.environ.get(RAW_DATA_ENV)
    if env:
        return pathlib.Path(env).expanduser()
    candidates = (
        _repo_root().parent / "shared" / "datasets",
        pathlib.Path.cwd() / "shared" / "datasets",
        pathlib.Path.cwd().parent / "shared" / "datasets",
    )
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None


def raw_data_dir(name: str) -> pathlib.Path | None:
    """Returns the folder where the raw files of dataset ``name`` are looked for.

    Args:
        name: Dataset name, e.g. ``"mnist"``; also the subfolder name under the raw-data root.

    Returns:
        ``raw_data_root() / name``, or None when there is no raw-data root at all. The folder
        itself may not exist; the builders then report which files belong in it.
    """
    root = raw_data_root()
    return None if root is None else root / name


def prepared_data_dir() -> pathlib.Path:
    """Returns where prepared TFDS data lives: ``$AMORTJAX_DATA_DIR`` or the user cache."""
    env = os.environ.get(DATA_DIR_ENV)
    return pathlib.Path(env).expanduser() if env else DEFAULT_DATA_DIR.expanduser()


def sha256_of(path: os.PathLike[str] | str) -> str:
    """Returns the hex sha256 of a file, read in chunks so large files need little memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: os.PathLike[str] | str, expected: str) -> None:
    """Raises ValueError naming the file and both hashes when ``path`` does not hash to expected."""
    actual = sha256_of(path)
    if actual != expected:
        raise ValueError(
            f"Checksum mismatch for raw file {path}: expected sha256 {expected}, got {actual}. "
            "The file is corrupt or not the publisher's original; replace it."
        )


def host_reachable(url: str, timeout: float = REACHABILITY_TIMEOUT_S) -> bool:
    """Returns whether a TCP connection to ``url``'s host can be opened within ``timeout``.

    Name resolution is not covered by socket timeouts, so the whole attempt runs in a daemon
    thread and is abandoned after ``timeout`` seconds; a hanging resolver cannot block the caller.
    """
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname
    if not host:
        return False
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _read_idx(path: pathlib.Path, expected_magic: int) -> np.ndarray:
    """Reads a gzipped IDX file (the MNIST / Fashion-MNIST format) into a uint8 array.

    Returns:
        ``[N]`` labels (magic 2049) or ``[N, 28, 28]`` images (magic 2051), uint8.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise ValueError(f"{path} is not an IDX file of the expected kind (magic {magic}).")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    array = np.frombuffer(data, dtype=np.uint8, offset=offset)
    if array.size != int(np.prod(dims)):
        raise ValueError(f"{path} holds {array.size} values; its header says {dims}.")
    return array.reshape(dims)


def _read_amat(path: pathlib.Path) -> np.ndarray:
    """Reads a Larochelle ``.amat`` file of 784 0/1 values per line.

    Returns:
        ``[N, 28, 28]`` uint8 array of 0s and 1s.
    """
    data = pathlib.Path(path).read_bytes()
    line_len = 2 * _NUM_PIXELS  # one digit and one separator per value
    raw = np.frombuffer(data, dtype=np.uint8)
    # The published files are exactly "d d ... d\n" per line; parse that layout with a strided
    # view (≈100x faster than text parsing) and fall back to generic parsing otherwise.
    if raw.size % line_len == 0:
        rows = raw.reshape(-1, line_len)
        digits, seps = rows[:, 0::2], rows[:, 1::2]
        if (
            np.all(seps[:, :-1] == ord(" "))
            and np.all(seps[:, -1] == ord("\n"))
            and np.all((digits == ord("0")) | (digits == ord("1")))
        ):
            return (digits - ord("0")).reshape(-1, *_IMAGE_SHAPE)
    values = np.array(data.split(), dtype=np.float64)
    if values.size % _NUM_PIXELS or not np.all((values == 0) | (values == 1)):
        raise ValueError(f"{path} is not a binarized-MNIST .amat file (784 values 0/1 per line).")
    return values.astype(np.uint8).reshape(-1, *_IMAGE_SHAPE)


class _RawFileBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared logic: locate, verify or download the raw files, then hand them to subclasses.

    Subclasses set ``NAME`` (the raw-data subfolder), ``URL`` (the publisher's folder URL,
    ending in ``/``) and ``FILES`` (file name -> sha256).
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    NAME: ClassVar[str]
    URL: ClassVar[str]
    FILES: ClassVar[Mapping[str, str]]
    HOMEPAGE: ClassVar[str]
    CITATION: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = ""
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Put the publisher's raw files in a folder named after the dataset (mnist/, "
        f"fashion_mnist/, binarized_mnist/) under ${RAW_DATA_ENV}."
    )

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's own lookup of this path needs the `importlib_resources` backport (not installed)
        # for builders outside its package; the answer is simply this file.
        return epath.Path(__file__)

    def __init__(self, *, raw_dir: os.PathLike[str] | str | None = None, **kwargs: Any):
        """Creates the builder.

        Args:
            raw_dir: Folder holding this dataset's raw files. Defaults to
                ``raw_data_dir(NAME)``.
            **kwargs: Passed to `tfds.core.GeneratorBasedBuilder`. ``data_dir`` defaults to
                `prepared_data_dir()`; ``file_format`` to ``array_record``, which needs no
                TensorFlow.
        """
        kwargs.setdefault("data_dir", str(prepared_data_dir()))
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        self._raw_dir = pathlib.Path(raw_dir) if raw_dir is not None else raw_data_dir(self.NAME)

    @classmethod
    def missing_files_message(cls, raw_dir: pathlib.Path | None, missing: Sequence[str]) -> str:
        """Returns the instructions shown when raw files can be neither found nor downloaded."""
        where = (
            f"folder {raw_dir}"
            if raw_dir is not None
            else f"a folder named '{cls.NAME}/' inside a directory of your choice"
        )
        return (
            f"Raw files for dataset '{cls.NAME}' not found and {cls.URL} is unreachable.\n"
            f"Missing: {', '.join(missing)}.\n"
            f"Put these files ({', '.join(cls.FILES)}) in {where}, and set the environment "
            f"variable {RAW_DATA_ENV} to the directory that contains the '{cls.NAME}/' folder "
            f"(currently {os.environ.get(RAW_DATA_ENV, 'unset')})."
        )

    def _manual_dirs(self, dl_manager: tfds.download.DownloadManager) -> list[pathlib.Path]:
        dirs = [self._raw_dir] if self._raw_dir is not None else []
        # Also honour TFDS's own manual dir (DownloadConfig(manual_dir=...)), the place a TFDS
        # user would put the files.
        try:
            dirs.append(pathlib.Path(dl_manager.manual_dir))
        except (AssertionError, ValueError):
            pass
        return dirs

    def _raw_paths(self, dl_manager: tfds.download.DownloadManager) -> dict[str, pathlib.Path]:
        """Returns a verified local path for every raw file, downloading only the missing ones."""
        manual_dirs = self._manual_dirs(dl_manager)
        paths: dict[str, pathlib.Path] = {}
        missing: list[str] = []
        for filename, sha in self.FILES.items():
            found = next((d / filename for d in manual_dirs if (d / filename).is_file()), None)
            if found is None:
                missing.append(filename)
                continue
            verify_sha256(found, sha)
            paths[filename] = found
        if missing:
            # Check once, quickly, before TFDS's downloader, which retries for minutes offline.
            if not host_reachable(self.URL):
                raise DataNotFoundError(self.missing_files_message(self._raw_dir, missing))
            downloaded = dl_manager.download({f: self.URL + f for f in missing})
            for filename, path in downloaded.items():
                verify_sha256(path, self.FILES[filename])
                paths[filename] = pathlib.Path(path)
        return paths


class _IdxImageBuilder(_RawFileBuilder, skip_registration=True):
    """Builder for datasets shipped as four IDX files (MNIST and Fashion-MNIST)."""

    LABEL_NAMES: ClassVar[Sequence[str]] = tuple(str(i) for i in range(10))

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=_IMAGE_SHAPE, dtype=np.uint8),
                    "label": tfds.features.ClassLabel(names=list(self.LABEL_NAMES)),
                }
            ),
            supervised_keys=("image", "label"),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            # Keep the official order (TFDS would otherwise shuffle by key hash), so that index i
            # of a prepared split is example i of the publisher's file.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        paths = self._raw_paths(dl_manager)
        return {
            "train": self._generate_examples(
                paths["train-images-idx3-ubyte.gz"], paths["train-labels-idx1-ubyte.gz"]
            ),
            "test": self._generate_examples(
                paths["t10k-images-idx3-ubyte.gz"], paths["t10k-labels-idx1-ubyte.gz"]
            ),
        }

    def _generate_examples(
        self, images_path: pathlib.Path, labels_path: pathlib.Path
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        images = _read_idx(images_path, expected_magic=2051)
        labels = _read_idx(labels_path, expected_magic=2049)
        if images.shape[0] != labels.shape[0] or images.shape[1:] != _IMAGE_SHAPE:
            raise ValueError(
                f"{images_path} ({images.shape}) and {labels_path} ({labels.shape}) do not match."
            )
        # The key is the index in the official file, so the prepared order is the official one.
        for i in range(images.shape[0]):
            yield i, {"image": images[i], "label": int(labels[i])}


_IDX_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class MnistBuilder(_IdxImageBuilder, skip_registration=True):
    """MNIST (LeCun, Cortes & Burges): 60k train / 10k test 28x28 grey-level digits."""

    name = "amortjax_mnist"
    NAME = "mnist"
    URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"
    HOMEPAGE = "http://yann.lecun.com/exdb/mnist/"
    DESCRIPTION = "MNIST handwritten digits, 28x28 uint8, from the official IDX files."
    CITATION = "LeCun, Cortes & Burges. The MNIST database of handwritten digits. 1998."
    FILES: ClassVar[Mapping[str, str]] = dict(
        zip(
            _IDX_FILES,
            (
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
            ),
            strict=True,
        )
    )


class FashionMnistBuilder(_IdxImageBuilder, skip_registration=True):
    """Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): 60k train / 10k test 28x28 clothing images."""

    name = "amortjax_fashion_mnist"
    NAME = "fashion_mnist"
    URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
    HOMEPAGE = "https://github.com/zalandoresearch/fashion-mnist"
    DESCRIPTION = "Fashion-MNIST, 28x28 uint8, from the official IDX files."
    CITATION = (
        "Xiao, Rasul & Vollgraf. Fashion-MNIST: a novel image dataset for benchmarking machine "
        "learning algorithms. arXiv:1708.07747, 2017."
    )
    LABEL_NAMES = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )
    FILES: ClassVar[Mapping[str, str]] = dict(
        zip(
            _IDX_FILES,
            (
                "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
            ),
            strict=True,
        )
    )


class BinarizedMnistBuilder(_RawFileBuilder, skip_registration=True):
    """Statically binarized MNIST (Larochelle & Murray 2011): 50k train / 10k valid / 10k test."""

    name = "amortjax_binarized_mnist"
    NAME = "binarized_mnist"
    URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
    HOMEPAGE = "http://www.dmi.usherb.ca/~larocheh/mlpython/_modules/datasets/binarized_mnist.html"
    DESCRIPTION = "The fixed binarization of MNIST by Larochelle & Murray, 28x28 values in {0,1}."
    CITATION = (
        "Larochelle & Murray. The neural autoregressive distribution estimator. AISTATS 2011."
    )
    FILES: ClassVar[Mapping[str, str]] = {
        "binarized_mnist_train.amat": (
            "ad693b29f94c14277b095f5238ddefbbdaaae0939789dd2f4f0205278cee3e4d"
        ),
        "binarized_mnist_valid.amat": (
            "1de3d397c40fe8eeb33dafd4099a1f665ec01e96d9be234aaeeac8a34930e2e2"
        ),
        "binarized_mnist_test.amat": (
            "e6687bfea3f820c174f33b7865140b2a2dd2930ef786f35d45795fc193b5ab2c"
        ),
    }

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict(
                {"image": tfds.features.Tensor(shape=_IMAGE_SHAPE, dtype=np.uint8)}
            ),
            homepage=self.HOMEPAGE,
            citation=self.CITATION,
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        paths = self._raw_paths(dl_manager)
        return {
            split: self._generate_examples(paths[f"binarized_mnist_{part}.amat"])
            for split, part in (("train", "train"), ("validation", "valid"), ("test", "test"))
        }

    def _generate_examples(self, path: pathlib.Path) -> Iterator[tuple[int, dict[str, Any]]]:
        images = _read_amat(path)
        for i in range(images.shape[0]):
            yield i, {"image": images[i]}


BUILDERS: dict[str, type[_RawFileBuilder]] = {
    cls.NAME: cls for cls in (MnistBuilder, FashionMnistBuilder, BinarizedMnistBuilder)
}
"""Dataset name -> builder class."""
