"""Datasets for the project's experiments: MNIST-family images and their conventions.

`load_data` is the entry point for training (fixed splits, binarization convention);
`load_images` reads one split; the TFDS builders and `raw_data_dir` locate, verify and prepare the
publishers' raw files. Model definitions (the linear-Gaussian ground truth included, in
`amortjax.models.linear_gaussian`) and training loops do not belong here.
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
    labels_of_test_split,
    load_data,
    load_images,
    resolve_binarization,
    split_sizes,
    threshold_binarize,
)

__all__ = [
    "BINARIZATIONS",
    "BUILDERS",
    "DATASETS",
    "SPLITS",
    "BinarizedMnistBuilder",
    "Data",
    "DataNotFoundError",
    "FashionMnistBuilder",
    "MnistBuilder",
    "dynamic_binarize",
    "labels_of_test_split",
    "load_data",
    "load_images",
    "prepared_data_dir",
    "raw_data_dir",
    "resolve_binarization",
    "split_sizes",
    "threshold_binarize",
]
