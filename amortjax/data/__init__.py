"""Datasets for the project's experiments: MNIST-family images and their conventions.

`load_data` is the entry point for training (fixed splits, binarization convention);
`load_images` reads one split; the TFDS builders and `raw_data_dir` locate, verify and prepare the
publishers' raw files; `synthetic` holds the linear-Gaussian model whose answers are exact.
Model definitions and training loops do not belong here.
"""

from amortjax.data.builders import (
    BUILDERS,
    BinarizedMnistBuilder,
    DataNotFoundError,
    FashionMnistBuilder,
    MnistBuilder,
    prepared_data_dir,
    raw_data_dir,
)
from amortjax.data.loading import (
    BINARIZATIONS,
    DATASETS,
    SPLITS,
    Data,
    dynamic_binarize,
    load_data,
    load_images,
    resolve_binarization,
    split_sizes,
)
from amortjax.data.synthetic import LinearGaussian, linear_gaussian_vae, make_linear_gaussian

__all__ = [
    "BINARIZATIONS",
    "BUILDERS",
    "DATASETS",
    "SPLITS",
    "BinarizedMnistBuilder",
    "Data",
    "DataNotFoundError",
    "FashionMnistBuilder",
    "LinearGaussian",
    "MnistBuilder",
    "dynamic_binarize",
    "linear_gaussian_vae",
    "load_data",
    "load_images",
    "make_linear_gaussian",
    "prepared_data_dir",
    "raw_data_dir",
    "resolve_binarization",
    "split_sizes",
]
