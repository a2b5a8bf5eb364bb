"""amortjax: amortized, per-example and semi-amortized variational inference in JAX / NumPyro.

The public API, bottom up:

- data: `load_data` (MNIST, Fashion-MNIST, statically binarized MNIST from the publishers'
  files), `dynamic_binarize`, and the linear-Gaussian ground truth `make_linear_gaussian`.
- nets and families: `MLP` (Flax), `DiagonalGaussian`.
- models and guides: `vae_model`, `amortized_guide` (NumPyro model and guide functions),
  `check_observations`.
- the per-datapoint adapter: `log_joint`, `sample_guide`, `log_weights`.
- inference: `Trainer`, `fit`, `make_optimizer`, `make_objective`, `kl_weighted`.
- evaluation: `evaluate_bounds` (per-datapoint ELBO and IWAE-k), `mean_and_stderr`.
- plotting: `amortjax.plotting` (figures returned as matplotlib `Figure`s).
"""

from amortjax import plotting
from amortjax.data import dynamic_binarize, linear_gaussian_vae, load_data, make_linear_gaussian
from amortjax.evaluation.bounds import Bounds, evaluate_bounds, mean_and_stderr
from amortjax.evaluation.subsets import random_subset
from amortjax.families import DiagonalGaussian, get_family
from amortjax.guides import amortized_guide, encode
from amortjax.inference.checkpoint import restore_checkpoint, save_checkpoint
from amortjax.inference.objectives import kl_weighted, make_objective, make_optimizer
from amortjax.inference.training import (
    FitResult,
    Trainer,
    TrainingDivergedError,
    TrainState,
    fit,
)
from amortjax.models import check_observations, decode_mean, vae_model
from amortjax.nets import MLP
from amortjax.traces import log_joint, log_weights, sample_guide

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "Bounds",
    "DiagonalGaussian",
    "FitResult",
    "TrainState",
    "Trainer",
    "TrainingDivergedError",
    "amortized_guide",
    "check_observations",
    "decode_mean",
    "dynamic_binarize",
    "encode",
    "evaluate_bounds",
    "fit",
    "get_family",
    "kl_weighted",
    "linear_gaussian_vae",
    "load_data",
    "log_joint",
    "log_weights",
    "make_linear_gaussian",
    "make_objective",
    "make_optimizer",
    "mean_and_stderr",
    "plotting",
    "random_subset",
    "restore_checkpoint",
    "sample_guide",
    "save_checkpoint",
    "vae_model",
]
