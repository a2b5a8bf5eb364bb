"""amortjax: amortized, per-example and semi-amortized variational inference in JAX / NumPyro.

The public API, bottom up:

- data: `load_data` (MNIST, Fashion-MNIST, statically binarized MNIST from the publishers'
  files), `dynamic_binarize`, and the linear-Gaussian ground truth `make_linear_gaussian`.
- nets and families: `MLP` (Flax), `DiagonalGaussian`, `FullRankGaussian`,
  `AffineCouplingFlow` (a normalizing flow) and its amortized `FlowEncoder`.
- models: `vae_model`, `conditional_vae_model` (+ `pack_condition`), `factor_analysis_model`
  (factor analysis / PPCA, with `ppca_mle` and `as_linear_gaussian`), `irt_model` (item
  response, with global question latents), `check_observations`, `with_fixed_params`.
- local latents of any NumPyro model: `find_local_latents` lays out the sites inside the data
  plate (names, shapes, supports) as one unconstrained vector per datapoint (`LocalLatents`);
  every guide and evaluator takes it as `site=`.
- guides: `amortized_guide`, `given_params_guide`, `local_guide`, `semi_amortized_guide`, and
  `global_guide` (an autoguide for the latents outside the data plate, run beside any of them;
  `fix_globals` fixes them for evaluation).
- the per-datapoint adapter: `log_joint`, `sample_guide`, `log_weights`, `simulate`.
- inference: `Trainer`, `fit`, `make_optimizer`, `make_objective`, `kl_weighted`, `fit_local`
  (per-example q*), `refine` (K differentiable steps), `kl_schedule` (beta-VAE, KL warm-up,
  cyclical annealing for any NumPyro ELBO).
- evaluation: `evaluate_bounds` (per-datapoint ELBO and IWAE-k), `evaluate_pair` (two q's on
  common random numbers, with their mixture's estimate of p(x)), `ais` and `bdmc` (annealed
  importance sampling, bidirectional Monte Carlo), `gap_decomposition` (approximation and
  amortization gaps), `mean_and_stderr`, `latent_activity` / `active_units` /
  `kl_per_dimension` (Burda et al.'s active units, KL per latent dimension).
- plotting: `amortjax.plotting` (figures returned as matplotlib `Figure`s).
"""

from amortjax import plotting
from amortjax.data import dynamic_binarize, linear_gaussian_vae, load_data, make_linear_gaussian
from amortjax.evaluation.activity import (
    ActiveUnits,
    LatentActivity,
    active_units,
    kl_per_dimension,
    latent_activity,
)
from amortjax.evaluation.ais import AISResult, AISWarning, BDMCResult, ais, bdmc
from amortjax.evaluation.bounds import (
    Bounds,
    PairBounds,
    evaluate_bounds,
    evaluate_pair,
    mean_and_stderr,
)
from amortjax.evaluation.gaps import Gaps, gap_decomposition
from amortjax.evaluation.subsets import random_subset
from amortjax.families import DiagonalGaussian, FullRankGaussian, get_family
from amortjax.flows import AffineCouplingFlow, FlowEncoder
from amortjax.guides import (
    amortized_guide,
    encode,
    fix_globals,
    given_params_guide,
    global_guide,
    local_guide,
)
from amortjax.guides.semi_amortized import semi_amortized_guide
from amortjax.inference.checkpoint import restore_checkpoint, save_checkpoint
from amortjax.inference.local import LocalFit, fit_local
from amortjax.inference.objectives import (
    kl_schedule,
    kl_weighted,
    make_objective,
    make_optimizer,
)
from amortjax.inference.refine import refine
from amortjax.inference.training import (
    FitResult,
    Trainer,
    TrainingDivergedError,
    TrainState,
    fit,
)
from amortjax.latents import LocalLatents, find_local_latents, log_joint_unconstrained
from amortjax.models import (
    check_observations,
    conditional_vae_model,
    decode_mean,
    pack_condition,
    vae_model,
    with_fixed_params,
)
from amortjax.models.factor_analysis import as_linear_gaussian, factor_analysis_model, ppca_mle
from amortjax.models.irt import irt_model, simulate_irt, trait_recovery
from amortjax.nets import MLP
from amortjax.traces import log_joint, log_weights, sample_guide, simulate

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "AISResult",
    "AISWarning",
    "ActiveUnits",
    "AffineCouplingFlow",
    "BDMCResult",
    "Bounds",
    "DiagonalGaussian",
    "FitResult",
    "FlowEncoder",
    "FullRankGaussian",
    "Gaps",
    "LatentActivity",
    "LocalFit",
    "LocalLatents",
    "PairBounds",
    "TrainState",
    "Trainer",
    "TrainingDivergedError",
    "active_units",
    "ais",
    "amortized_guide",
    "as_linear_gaussian",
    "bdmc",
    "check_observations",
    "conditional_vae_model",
    "decode_mean",
    "dynamic_binarize",
    "encode",
    "evaluate_bounds",
    "evaluate_pair",
    "factor_analysis_model",
    "find_local_latents",
    "fit",
    "fit_local",
    "fix_globals",
    "gap_decomposition",
    "get_family",
    "given_params_guide",
    "global_guide",
    "irt_model",
    "kl_per_dimension",
    "kl_schedule",
    "kl_weighted",
    "latent_activity",
    "linear_gaussian_vae",
    "load_data",
    "local_guide",
    "log_joint",
    "log_joint_unconstrained",
    "log_weights",
    "make_linear_gaussian",
    "make_objective",
    "make_optimizer",
    "mean_and_stderr",
    "pack_condition",
    "plotting",
    "ppca_mle",
    "random_subset",
    "refine",
    "restore_checkpoint",
    "sample_guide",
    "save_checkpoint",
    "semi_amortized_guide",
    "simulate",
    "simulate_irt",
    "trait_recovery",
    "vae_model",
    "with_fixed_params",
]
