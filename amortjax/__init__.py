"""amortjax: amortized, per-example and semi-amortized variational inference in JAX / NumPyro.

For a model with one local latent z_i per observation x_i (inside the data plate), a regime
produces each datapoint's variational parameters lambda_i of q(z_i; lambda_i); the ELBO

    L(lambda_i; x_i) = E_q[log p(x_i, z_i) - log q(z_i; lambda_i)]  <=  log p(x_i)

and every estimator below are shared. The public API (40 names), bottom up; everything else
(worked models, result types, internals) stays in its module:

- data: `load_data(name)` -> train/valid/test `[N, 784]` (MNIST, Fashion-MNIST, statically
  binarized MNIST from the publishers' files); `dynamic_binarize(key, x)`: x_b ~ Bernoulli(x).
- networks and families: `MLP` (Flax; `input_transform` for counts), `DiagonalGaussian`
  (lambda = [mu, log sigma], `[2D]`), `FullRankGaussian` (lambda = [mu, L], `[D + D(D+1)/2]`),
  `AffineCouplingFlow` (a flow over z, every weight per datapoint), `FlowEncoder`.
- models: `data_plate(x, n_data)` (the plate every model puts its local sites in),
  `vae_model(decoder, z_dim)`, `simulate(model, params, key, x_like)` -> (x, latents) ~ p.
- local latents: `find_local_latents(model, x)` -> `LocalLatents`, the model's local sites as
  one unconstrained vector u_i `[D]` per datapoint (bijections and log-Jacobians included).
- guides: `amortized_guide` (lambda_i = f_phi(x_i)), `local_guide` (lambda_i free, `[N, P]`),
  `semi_amortized_guide` (lambda_i = refine_K(f_phi(x_i))), `given_params_guide` (lambda as an
  input), `global_guide` / `fix_globals` (latents outside the plate), `encode`.
- regimes: `Amortized`, `PerExample`, `SemiAmortized`, each giving its guide, its optimizer
  and lambda `[N, P]` for new data; their settings `QStarSettings`, `RefineSettings`.
- the per-datapoint adapter: `log_weights(model, guide, params, x, key)`:
  log p(x_i, z_i) - log q(z_i | x_i), z_i ~ q, `[N]`.
- inference: `Trainer` / `fit` (jitted SVI epochs, checkpoints), `make_optimizer` (Adam and
  schedules), `make_local_optimizer` (row-sparse Adam for per-datapoint parameters),
  `kl_schedule` (beta-VAE, warm-up, cyclical), `fit_local` (q*_i = argmax L(lambda; x_i), with a
  convergence record), `refine` (lambda_K by K differentiable SGD steps).
- evaluation: `evaluate_bounds` (ELBO and IWAE-k = log (1/k) sum_s w_s per datapoint), `ais`
  and `bdmc` (annealed importance sampling: a stochastic lower bound of log p(x_i); BDMC's
  reverse run an upper bound on simulated data), `gap_decomposition` (log p̂(x) - L[q] =
  (log p̂(x) - L[q*]) + (L[q*] - L[q])), `latent_activity` (Burda et al.'s active units, KL
  per dimension), `mean_and_stderr`, `random_subset` (seeded evaluation subsets).
- `plotting`: matplotlib `Figure`s.
"""

import os

# XLA's CPU thread pool holds as many threads as the machine has cores unless NPROC says
# otherwise (read once, when the CPU backend starts). jaxlib 0.10's batched LAPACK kernels
# (Cholesky, triangular solves, eigh: the full-rank family, Newton's q*) split their batch into
# tasks on that pool and block one of its threads until the tasks finish; two such kernels
# running at once on a 2-core machine block both threads, and the process waits forever (seen
# in the test suite: both pool threads in lapack_strsm_ffi's BlockingCounter::Wait). A pool of
# at least 4 threads leaves threads to run the tasks; measured cost on 2 cores: q*'s Adam on
# 100 MNIST digits 8.1 s -> 8.4-8.8 s. Machines with 4 or more cores, and an NPROC already set,
# are left as they are.
if "NPROC" not in os.environ and (os.cpu_count() or 1) < 4:
    os.environ["NPROC"] = "4"

from amortjax import plotting
from amortjax.data import dynamic_binarize, load_data
from amortjax.evaluation.activity import latent_activity
from amortjax.evaluation.ais import ais, bdmc
from amortjax.evaluation.bounds import evaluate_bounds, mean_and_stderr
from amortjax.evaluation.gaps import gap_decomposition
from amortjax.evaluation.subsets import random_subset
from amortjax.families import DiagonalGaussian, FullRankGaussian
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
from amortjax.inference.local import QStarSettings, fit_local
from amortjax.inference.objectives import kl_schedule, make_optimizer
from amortjax.inference.refine import RefineSettings, refine
from amortjax.inference.sparse import make_local_optimizer
from amortjax.inference.training import Trainer, fit
from amortjax.latents import LocalLatents, find_local_latents
from amortjax.models import data_plate, simulate, vae_model
from amortjax.nets import MLP
from amortjax.regimes import Amortized, PerExample, SemiAmortized
from amortjax.traces import log_weights

__version__ = "0.1.0"

__all__ = [
    "MLP",
    "AffineCouplingFlow",
    "Amortized",
    "DiagonalGaussian",
    "FlowEncoder",
    "FullRankGaussian",
    "LocalLatents",
    "PerExample",
    "QStarSettings",
    "RefineSettings",
    "SemiAmortized",
    "Trainer",
    "ais",
    "amortized_guide",
    "bdmc",
    "data_plate",
    "dynamic_binarize",
    "encode",
    "evaluate_bounds",
    "find_local_latents",
    "fit",
    "fit_local",
    "fix_globals",
    "gap_decomposition",
    "given_params_guide",
    "global_guide",
    "kl_schedule",
    "latent_activity",
    "load_data",
    "local_guide",
    "log_weights",
    "make_local_optimizer",
    "make_optimizer",
    "mean_and_stderr",
    "plotting",
    "random_subset",
    "refine",
    "semi_amortized_guide",
    "simulate",
    "vae_model",
]
