"""amortjax: amortized, per-example and semi-amortized variational inference in JAX / NumPyro.

The public API, bottom up:

- data: `load_data` (MNIST, Fashion-MNIST, statically binarized MNIST from the publishers'
  files), `dynamic_binarize`, and the linear-Gaussian ground truth `make_linear_gaussian`.
- nets and families: `MLP` (Flax), `DiagonalGaussian`, `FullRankGaussian`,
  `AffineCouplingFlow` (a normalizing flow) and its amortized `FlowEncoder`.
- models and guides: `vae_model`, `amortized_guide`, `given_params_guide`, `local_guide`,
  `semi_amortized_guide` (NumPyro model and guide functions), `check_observations`,
  `with_fixed_params` (a frozen decoder).
- the per-datapoint adapter: `log_joint`, `sample_guide`, `log_weights`, `simulate`.
- inference: `Trainer`, `fit`, `make_optimizer`, `make_objective`, `kl_weighted`, `fit_local`
  (per-example q*), `refine` (K differentiable steps).
- evaluation: `evaluate_bounds` (per-datapoint ELBO and IWAE-k), `ais` and `bdmc` (annealed
  importance sampling, bidirectional Monte Carlo), `gap_decomposition` (approximation and
  amortization gaps), `mean_and_stderr`.
- plotting: `amortjax.plotting` (figures returned as matplotlib `Figure`s).
"""

from amortjax import plotting
from amortjax.data import dynamic_binarize, linear_gaussian_vae, load_data, make_linear_gaussian
from amortjax.evaluation.ais import AISResult, BDMCResult, ais, bdmc
from amortjax.evaluation.bounds import Bounds, evaluate_bounds, mean_and_stderr
from amortjax.evaluation.gaps import Gaps, gap_decomposition
from amortjax.evaluation.subsets import random_subset
from amortjax.families import DiagonalGaussian, FullRankGaussian, get_family
from amortjax.flows import AffineCouplingFlow, FlowEncoder
from amortjax.guides import amortized_guide, encode, given_params_guide, local_guide
from amortjax.guides.semi_amortized import semi_amortized_guide
from amortjax.inference.checkpoint import restore_checkpoint, save_checkpoint
from amortjax.inference.local import LocalFit, fit_local
from amortjax.inference.objectives import kl_weighted, make_objective, make_optimizer
from amortjax.inference.refine import refine
from amortjax.inference.training import (
    FitResult,
    Trainer,
    TrainingDivergedError,
    TrainState,
    fit,
)
from amortjax.models import check_observations, decode_mean, vae_model, with_fixed_params
from amortjax.nets import MLP
from amortjax.traces import log_joint, log_weights, sample_guide, simulate

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "AISResult",
    "AffineCouplingFlow",
    "BDMCResult",
    "Bounds",
    "DiagonalGaussian",
    "FitResult",
    "FlowEncoder",
    "FullRankGaussian",
    "Gaps",
    "LocalFit",
    "TrainState",
    "Trainer",
    "TrainingDivergedError",
    "ais",
    "amortized_guide",
    "bdmc",
    "check_observations",
    "decode_mean",
    "dynamic_binarize",
    "encode",
    "evaluate_bounds",
    "fit",
    "fit_local",
    "gap_decomposition",
    "get_family",
    "given_params_guide",
    "kl_weighted",
    "linear_gaussian_vae",
    "load_data",
    "local_guide",
    "log_joint",
    "log_weights",
    "make_linear_gaussian",
    "make_objective",
    "make_optimizer",
    "mean_and_stderr",
    "plotting",
    "random_subset",
    "refine",
    "restore_checkpoint",
    "sample_guide",
    "save_checkpoint",
    "semi_amortized_guide",
    "simulate",
    "vae_model",
    "with_fixed_params",
]
