"""amortization_gap: the inference gap and its parts (Cremer, Li & Duvenaud 2018, Table 2).

For each dataset and variational family (FFG: the diagonal Gaussian; Flow: affine coupling
layers conditioned on the encoder's context), trains a VAE and decomposes, on seeded random
training and held-out test points, its inference gap log p̂(x) - L[q] into the approximation gap
log p̂(x) - L[q*] (the family's fault) and the amortization gap L[q*] - L[q] (the encoder's
fault). q* is the best member of the family fitted to each datapoint alone (started at the
encoder's output and run to convergence: `amortjax.inference.local`); log p̂(x) is a
per-datapoint lower bound, the better of importance sampling from (q + q*)/2 and AIS from q*
(the report names which).

Options beyond the main table:
    encoder_hidden / decoder_hidden: Cremer et al.'s larger-encoder (500-500) and decoder-size
        variants, e.g. `ARGS="encoder_hidden=500,500"`.
    frozen_decoder: retrain only a linear encoder, FFG and Flow, on each trained FFG model's
        frozen decoder, and decompose its gaps (Cremer et al., section 5.2).
    latent_figure: a z=2 FFG VAE and a Flow encoder trained on its frozen decoder; for four test
        points, the true posterior (exact on a grid) beside amortized FFG, optimal FFG,
        amortized Flow and optimal Flow (Cremer et al., figure 2); "optimal" is the best of
        q* from the encoder, from the default start (`QStarSettings.second_start`) and from the
        other family's q* (`fit_local(starts=)`).
    Figures also show the gaps over training on training and validation points (figure 3),
        every `curve_every` epochs on `curve_points` points, log p̂(x) from IWAE and q* capped
        at `curve_qstar_steps` Adam steps, without the Flow's polishing stage and full-rank
        floor (so the quick preset's curves understate the amortization gap a little; the
        tables do not).

Presets:
    quick: MNIST and Fashion-MNIST (dynamically binarized), Cremer's 784-200-200 ELU encoder and
        decoder with z=50, 20 epochs of batch 100, gaps on 100 training and 100 test points with
        IWAE-5000, AIS (8 chains, 200 temperatures, 5 leapfrog steps, from q*, step sizes from
        a 1-chain pilot through 50 of the temperatures) and q* by Adam on the
        sticking-the-landing gradient in blocks of 50 steps (FFG: S=4, rate 3e-3, patience 4,
        two step-size reductions; Flow: S=16, rate 1e-2, patience 6, three reductions). About
        15 minutes on 2 CPU cores (14.3 measured on 2026-12-05).
    paper: Cremer et al.'s protocol: Larochelle's statically binarized MNIST (50k / 10k / 10k)
        and Fashion-MNIST thresholded at 0.5 (`binarization=threshold`, fixed; 50k train / 10k
        valid from the official training set; `datasets=fashion_mnist validation_size=5000`
        gives the companion code's 55k / 5k split), the same architecture, 3280 epochs with
        Burda et al.'s 3^i learning-rate schedule (Adam, eps 1e-4), the KL weight warmed up linearly
        over the first 100 epochs (`kl_warmup_epochs`), batch 100, gaps on 1,000 training
        points and the whole test set with IWAE-5000, AIS (16 chains, 1000 temperatures, 10
        leapfrog steps) and q* by Adam for both families (rate 1e-3, S=10, blocks of 100 steps,
        patience 10, three step-size reductions; `qstar.method=auto` takes Newton steps for the
        FFG instead: on 100 test digits of the quick MNIST FFG model its q* was 0.09 +- 0.07
        nats below Adam's and took 5.6 times as long). Differences, with their reasons:
        the warm-up weights the KL term (log p(z) - log q), where Cremer et al.'s code weights
        only the entropy term (amortjax's warm-up is the library's KL-weight handler, shared by
        every model); batch 100 is the companion code's (most official scripts use 20, about
        five times slower on a CPU); the Flow's coupling networks get the encoder's context
        through their first-layer biases (Cremer et al. used an auxiliary variable); AIS starts
        at q* with step sizes from a pilot pass (Cremer et al. annealed from the prior with
        adapted step sizes, which biases the estimate upward); q* starts at the encoder's output
        and is converged by reduce-on-plateau steps rather than stopped at the first plateau
        from N(0, I) (a stopped q* moves nats from the amortization gap to the approximation
        gap); the evaluation points are seeded random subsets rather than the first ones.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from amortjax import plotting
from amortjax.data import BINARIZATIONS, DATASETS, load_data, resolve_binarization
from amortjax.data.loading import dynamic_binarize
from amortjax.engine import datapoint_keys
from amortjax.evaluation.ais import LOG_WEIGHT_SPREAD, AISSettings
from amortjax.evaluation.bounds import format_estimate
from amortjax.evaluation.gaps import AIS_STARTS, Gaps, gap_decomposition
from amortjax.evaluation.posterior_grid import covering_square, posterior_grid
from amortjax.evaluation.subsets import random_subset
from amortjax.families import DiagonalGaussian, Family
from amortjax.flows import AffineCouplingFlow, FlowEncoder
from amortjax.guides import amortized_guide, encode
from amortjax.inference.local import METHODS as QSTAR_METHODS
from amortjax.inference.local import QStarSettings, fit_local
from amortjax.inference.objectives import SCHEDULES as LR_SCHEDULES
from amortjax.inference.objectives import make_optimizer
from amortjax.inference.training import Trainer, fit, seconds_per_epoch
from amortjax.models import check_observations, vae_model, with_fixed_params
from amortjax.nets import ACTIVATIONS, MLP
from experiments.runner import (
    check_at_most,
    check_batch_fits,
    check_choice,
    check_config,
    check_set_elsewhere,
    code_version,
    config_to_dict,
    load_saved_result,
    write_json,
)

FAMILY_NAMES = ("diagonal", "flow")
_LABEL = {"diagonal": "FFG", "flow": "Flow"}
# the quick preset's q* (the Flow's differs in four fields, below)
_QSTAR = QStarSettings(
    method="adam",
    num_samples=4,
    learning_rate=3e-3,
    block_size=50,
    patience=4,
    max_steps=5000,
    num_decays=2,
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of the experiment; the defaults are the quick preset."""

    datasets: tuple[str, ...] = ("mnist", "fashion_mnist")
    binarization: str = "auto"
    validation_size: int = 10_000
    families: tuple[str, ...] = FAMILY_NAMES
    encoder_hidden: tuple[int, ...] = (200, 200)
    decoder_hidden: tuple[int, ...] = (200, 200)
    activation: str = "elu"
    z_dim: int = 50
    flow_layers: int = 2
    flow_hidden: int = 50
    flow_context: int = 50
    epochs: int = 20
    batch_size: int = 100
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    adam_eps: float = 1e-8
    kl_warmup_epochs: float = 0.0
    train_points: int | None = 100
    test_points: int | None = 100
    iwae_samples: int = 5000
    run_ais: bool = True
    # AIS from q*: a 1-chain pilot through every 4th temperature aiming at acceptance 0.9 (on
    # 300 MNIST digits of the quick FFG model: log p-hat 0.045 +- 0.015 nats higher than with
    # the 4-chain, every-temperature pilot at 0.65, and the pilot 1/32 of the run, not 1/2)
    ais: AISSettings = AISSettings(
        num_chains=8,
        num_temperatures=200,
        leapfrog_steps=5,
        step_size=0.3,
        target_accept=0.9,
        pilot_chains=1,
        pilot_temperatures=50,
    )
    ais_start: str = "qstar"
    # q* of the Gaussian families (with method "auto": Newton steps with their own defaults)
    qstar: QStarSettings = _QSTAR
    # q* of the Flow: its ~7,800 parameters per datapoint need quieter gradients than the FFG's
    # 100 (with 4 draws doubling every budget moved its L[q*] by 0.47 nats; with 16, 0.15) and
    # a longer run: rate 1e-2 with three reductions and patience 6 (first 50 doubling digits:
    # L[q*] +0.028 +- 0.005 over rate 3e-3, two reductions, patience 4; doubling then moves it
    # by 0.093 +- 0.004, against 0.157; 1.3 times the time). Its end is noise-limited
    # (`tools/qstar_continuation.py`), so a polishing stage follows: 1,000 steps of 64 draws at
    # rate 3e-3 (first 50 doubling digits: L[q*] +0.065 +- 0.003 at 1.9 times the time, where
    # 32 draws throughout gained +0.050 at 2.0 times; doubling then moves it by 0.060 +- 0.003
    # instead of 0.092 +- 0.005)
    flow_qstar: QStarSettings = _QSTAR._replace(
        num_samples=16, learning_rate=1e-2, patience=6, num_decays=3, polish_steps=1000,
        polish_samples=64, polish_learning_rate=3e-3,
    )  # fmt: skip
    curve_every: int = 5
    curve_points: int = 50
    curve_iwae_samples: int = 500
    curve_qstar_steps: int = 300
    frozen_decoder: bool = False
    frozen_epochs: int = 10
    latent_figure: bool = True
    latent_epochs: int = 10
    eval_batch_size: int = 100
    checkpoint_every: int = 1
    seed: int = 0

    def check(self) -> None:
        """The names options must take and the couplings between options; called by
        `runner.check_config` after the per-option type and range checks, before any data."""
        check_choice("datasets", self.datasets, DATASETS)
        check_choice("families", self.families, FAMILY_NAMES)
        check_choice("binarization", self.binarization, BINARIZATIONS)
        for dataset in self.datasets:
            try:
                resolve_binarization(dataset, self.binarization)
            except ValueError as err:
                raise ValueError(f"option binarization={self.binarization!r}: {err}") from None
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("ais_start", self.ais_start, AIS_STARTS)
        check_choice("qstar.method", self.qstar.method, QSTAR_METHODS)
        if self.z_dim < 2 and "flow" in self.families:
            raise ValueError(
                f"option z_dim={self.z_dim}: the flow family needs z_dim >= 2 (a coupling "
                "layer splits z in two); raise z_dim or drop flow from families"
            )
        for dataset in self.datasets:
            check_batch_fits(self.batch_size, dataset, validation_size=self.validation_size)
        # the curves' training points are the first curve_points of the train_points subset
        check_at_most("curve_points", self.curve_points, "train_points", self.train_points)
        check_at_most(
            "qstar.block_size", self.qstar.block_size, "qstar.max_steps", self.qstar.max_steps
        )
        check_set_elsewhere(
            "qstar",
            self.qstar,
            {"batch_size": "eval_batch_size", "final_samples": "q* is scored with iwae_samples"},
        )


# Options of results folders made before the settings groups, read under their new names
RENAMED_OPTIONS = {
    "ais": "run_ais",
    "ais_chains": "ais.num_chains",
    "ais_temperatures": "ais.num_temperatures",
    "ais_leapfrog": "ais.leapfrog_steps",
    "qstar_method": "qstar.method",
    "qstar_learning_rate": "qstar.learning_rate",
    "qstar_samples": "qstar.num_samples",
    "qstar_block": "qstar.block_size",
    "qstar_patience": "qstar.patience",
    "qstar_decays": "qstar.num_decays",
    "qstar_max_steps": "qstar.max_steps",
}


# What a resume may change (`runner.check_resumable`): the epochs of each training (it
# continues; an encoder on a frozen decoder is trained afresh for a changed decoder), the
# variants, and the evaluations of the trained models. The q* settings and train_points also
# draw the gap curves recorded during training (curve q*, curve points), so they are fixed
# with it; datasets and families number the models' keys.
RESUMABLE_OPTIONS = (
    "epochs",
    "frozen_decoder",
    "frozen_epochs",
    "latent_figure",
    "latent_epochs",
    "test_points",
    "iwae_samples",
    "run_ais",
    "ais",
    "ais_start",
    "curve_every",
    "eval_batch_size",
    "checkpoint_every",
)
# Options a saved model's gap results (`models/<dataset>_<family>.json`) do not depend on, so
# a resume that changes only these reuses them (`runner.load_saved_result`): the spacing of
# checkpoints (training resumes to identical parameters) and of the gap curves (computed beside
# training, from its states, with keys of their own), and the variants trained after the models
# with keys of their own. The evaluation options (test_points, iwae_samples, ais,
# eval_batch_size, ...) do enter them.
MODEL_RESULT_IGNORES = (
    "checkpoint_every",
    "curve_every",
    "frozen_decoder",
    "frozen_epochs",
    "latent_figure",
    "latent_epochs",
)
# ... and those the results of an encoder on a frozen decoder
# (`models/<dataset>_frozen_<family>.json`) do not depend on (the decoder's training and
# frozen_epochs do enter them)
FROZEN_RESULT_IGNORES = ("checkpoint_every", "curve_every", "latent_figure", "latent_epochs")


def upgrade_saved_config(data: dict) -> dict:
    """An older folder's config read as what it ran, not as today's defaults, so that a
    resumed folder keeps its own settings:

    - saved before the `flow_qstar` group (2026-12-05), the Flow's q* ran the `qstar` group's
      settings with `flow_qstar_samples` draws per step: read as that `flow_qstar`;
    - saved before q* had `monitor_samples` (2026-12-05), its Adam's stopping rule averaged
      the per-step ELBO values of each block: a q* group without the field reads as
      monitor_samples=0 (the default now scores the FFG's blocks with a 32-draw monitor);
    - saved before q*'s polishing stage (2026-12-05), no q* was polished: a group without
      `polish_steps` reads as polish_steps=0 (the Flow's q* polishes by default now);
    - saved before a flow's full-rank floor (2026-12-06), no flow's q* was checked against it
      or went on from it: a group without `flow_floor` reads as flow_floor=False.
    """
    data = dict(data)
    flat = not isinstance(data.get("qstar"), dict)  # saved before the groups: qstar_* options
    if "flow_qstar_samples" in data and "flow_qstar" not in data:
        samples = data.pop("flow_qstar_samples")
        qstar = data.get("qstar")
        if flat:
            qstar = {
                RENAMED_OPTIONS[k].partition(".")[2]: v
                for k, v in data.items()
                if RENAMED_OPTIONS.get(k, "").startswith("qstar.")
            }
        data["flow_qstar"] = {
            **Config().qstar._asdict(),
            "monitor_samples": 0,
            "flow_floor": False,
            **qstar,
            "num_samples": samples,
        }
    if flat:
        data["qstar.monitor_samples"] = 0
    for group in ("qstar", "flow_qstar"):
        if isinstance(data.get(group), dict):
            data[group] = {
                "monitor_samples": 0, "polish_steps": 0, "flow_floor": False, **data[group]
            }  # fmt: skip
    return data


PRESETS: dict[str, dict] = {
    "quick": {},
    "paper": {
        "datasets": ("binarized_mnist", "fashion_mnist"),
        "binarization": "threshold",
        "epochs": 3280,
        "lr_schedule": "iwae",
        "adam_eps": 1e-4,
        "kl_warmup_epochs": 100,
        "train_points": 1000,
        "test_points": None,
        "ais.num_chains": 16,
        "ais.num_temperatures": 1000,
        "ais.leapfrog_steps": 10,
        # the library's default pilot (4 chains through every temperature, acceptance 0.65)
        **{
            f"ais.{k}": getattr(AISSettings(), k)
            for k in ("step_size", "target_accept", "pilot_chains", "pilot_temperatures")
        },
        **{
            f"{group}.{k}": v
            for group in ("qstar", "flow_qstar")
            for k, v in {
                "method": "adam",
                "learning_rate": 1e-3,
                "num_samples": 10,
                "block_size": 100,
                "patience": 10,
                "num_decays": 3,
                "max_steps": 100_000,
                "monitor_samples": 0,  # Cremer's rule: the block's per-step ELBO average
                "polish_steps": 0,  # (and no polishing stage)
            }.items()
        },
        "curve_every": 100,
        "curve_points": 1000,
        "curve_iwae_samples": 5000,
        "curve_qstar_steps": 100_000,
        "frozen_decoder": True,
        "frozen_epochs": 1000,
        "latent_epochs": 1000,
        "checkpoint_every": 10,
    },
}


def _load(config: Config, dataset: str):
    return load_data(
        dataset,
        binarization=config.binarization,
        validation_size=config.validation_size,
        seed=config.seed,
    )


def _flow(config: Config) -> AffineCouplingFlow:
    return AffineCouplingFlow(num_layers=config.flow_layers, hidden=config.flow_hidden)


def make_family_and_encoder(
    config: Config, name: str, hidden: tuple[int, ...], z_dim: int
) -> tuple[Family, Any]:
    """The family and an encoder producing its parameters, for family `name`."""
    if name == "diagonal":
        family = DiagonalGaussian()
        return family, MLP(hidden, family.num_params(z_dim), config.activation)
    family = _flow(config)
    encoder = FlowEncoder(
        z_dim=z_dim,
        family=family,
        hidden_sizes=hidden,
        activation=config.activation,
        context_dim=config.flow_context,
    )
    return family, encoder


def qstar_settings(config: Config, family) -> QStarSettings:
    """q*'s settings as `family` runs them: `config.flow_qstar` for the Flow, `config.qstar`
    otherwise, method "auto" resolved (`QStarSettings.for_family`)."""
    flow = isinstance(family, AffineCouplingFlow)
    return (config.flow_qstar if flow else config.qstar).for_family(family)


def _ais_settings(config: Config) -> AISSettings | None:
    return config.ais if config.run_ais else None


class _Setup:
    """One model to train: its family, encoder, model, guide and trainer."""

    def __init__(self, config: Config, family_name: str, x_dim: int, n_train: int, binarize: bool):
        self.family, self.encoder = make_family_and_encoder(
            config, family_name, config.encoder_hidden, config.z_dim
        )
        self.decoder = MLP(config.decoder_hidden, x_dim, config.activation)
        self.model = vae_model(self.decoder, z_dim=config.z_dim)
        self.guide = amortized_guide(self.encoder, x_dim=x_dim, family=self.family)
        self.trainer = Trainer(
            self.model,
            self.guide,
            make_optimizer(
                config.learning_rate,
                schedule=config.lr_schedule,
                steps_per_epoch=n_train // config.batch_size,
                eps=config.adam_eps,
            ),
            n_data=n_train,
            batch_size=config.batch_size,
            preprocess=dynamic_binarize if binarize else None,
            kl_warmup_epochs=config.kl_warmup_epochs,
        )


def _decompose(
    config, model, encoder, family, params, x, key, *, indices, curve=False, progress=False
):
    """The gap decomposition of x `[N, x_dim]`, rows `indices` `[N]` of their split (which key
    each row's draws: a digit's numbers do not depend on the subset around it)."""
    lam = np.asarray(encode(encoder, params, jnp.asarray(x)))
    qstar = qstar_settings(config, family)
    if curve:  # a cheaper q* for the curves over training (no polishing stage, no floor)
        qstar = qstar._replace(
            max_steps=min(qstar.max_steps, config.curve_qstar_steps),
            polish_steps=0,
            flow_floor=False,
        )
    return gap_decomposition(
        model,
        params,
        x,
        lam,
        key,
        family=family,
        iwae_samples=config.curve_iwae_samples if curve else config.iwae_samples,
        qstar=qstar,
        ais_settings=None if curve else _ais_settings(config),
        ais_start=config.ais_start,
        batch_size=config.eval_batch_size,
        indices=indices,
        progress=progress,
    )


def _summary(gaps: Gaps, split: str, note: str) -> dict:
    return {**gaps.summary(), "split": split, "points": note}


def run(config: Config, workdir: str | Path, *, progress: bool = True) -> dict:
    """Trains every (dataset, family) model, decomposes its gaps, writes metrics, report and
    figures. A finished model's results are saved at once (`models/*.json`) and reused when
    the run is resumed, so a killed run loses at most the model it was working on, and that
    one continues from its last training checkpoint."""
    check_config(config)
    workdir = Path(workdir)
    figures = workdir / "figures"
    key = jax.random.key(config.seed)
    start_all = time.perf_counter()
    results: dict[str, dict] = {}
    saved_figures: list[Path] = []
    curves_by_model: dict[str, dict] = {}
    trained: dict[str, tuple[_Setup, dict, Any]] = {}
    for d_i, dataset in enumerate(config.datasets):
        data = _load(config, dataset)
        x_dim = data.train.shape[1]
        check_observations(
            data.train, x_dim=x_dim, likelihood="bernoulli", grey_ok=data.dynamic_binarization
        )
        for split in (data.valid, data.test):
            check_observations(split, x_dim=x_dim, likelihood="bernoulli")
        # Evaluation points: seeded random subsets (the training images binarized with a
        # fixed seed, each by its index), passed with their indices in their split, which key
        # each point's draws.
        train_idx = random_subset(len(data.train), config.train_points, config.seed + 11)
        x_train_eval = data.train[train_idx]
        if data.dynamic_binarization:
            binarize_keys = datapoint_keys(jax.random.key(config.seed + 12), train_idx)
            x_train_eval = np.asarray(jax.vmap(dynamic_binarize)(binarize_keys, x_train_eval))
        test_idx = random_subset(len(data.test), config.test_points, config.seed + 13)
        x_test = data.test[test_idx]
        valid_idx = random_subset(len(data.valid), config.curve_points, config.seed)
        curve_x = {
            "train": (x_train_eval[: config.curve_points], train_idx[: config.curve_points]),
            "valid": (data.valid[valid_idx], valid_idx),
        }
        for f_i, family_name in enumerate(config.families):
            name = f"{dataset}_{family_name}"
            model_key = jax.random.fold_in(key, 100 * d_i + f_i)
            setup = _Setup(
                config, family_name, x_dim, data.train.shape[0], data.dynamic_binarization
            )
            saved = workdir / "models" / f"{name}.json"
            if progress:
                print(f"[{name}] training {config.epochs} epochs")

            def evaluate(state, setup=setup, model_key=model_key, curve_x=curve_x):
                params = setup.trainer.params(state)
                out = {}
                for s_i, (split, (xs, idx)) in enumerate(curve_x.items()):
                    g = _decompose(
                        config,
                        setup.model,
                        setup.encoder,
                        setup.family,
                        params,
                        xs,
                        jax.random.fold_in(jax.random.fold_in(model_key, int(state.epoch)), s_i),
                        indices=idx,
                        curve=True,
                    )
                    out[f"{split}_log_px"] = float(g.log_px.mean())
                    out[f"{split}_elbo_qstar"] = float(g.elbo_qstar.mean())
                    out[f"{split}_elbo_q"] = float(g.elbo_q.mean())
                return out

            result = fit(
                setup.trainer,
                data.train,
                key=model_key,
                epochs=config.epochs,
                checkpoint_dir=workdir / "checkpoints" / name,
                checkpoint_every=config.checkpoint_every,
                evaluate=evaluate if config.curve_every > 0 else None,
                eval_every=max(config.curve_every, 1),
                progress=progress,
            )
            train_seconds = result.train_seconds  # the whole run, resumes included
            params = result.params
            trained[name] = (setup, params, data)
            curves_by_model[name] = result.history
            reused = load_saved_result(saved, config, ignore=MODEL_RESULT_IGNORES)
            if reused is not None:
                results[name] = reused
                continue
            start = time.perf_counter()
            entry: dict[str, Any] = {
                "config": config_to_dict(config),  # what the saved result was computed under
                "code": code_version(),  # ... and by
                "dataset": dataset,
                "family": family_name,
                "train_seconds": train_seconds,
                "epoch_seconds": list(result.run_epoch_seconds),
                "final_train_loss": result.history["train_loss"][1][-1],
            }
            for split, xs, idx in (("train", x_train_eval, train_idx), ("test", x_test, test_idx)):
                g = _decompose(
                    config,
                    setup.model,
                    setup.encoder,
                    setup.family,
                    params,
                    xs,
                    jax.random.fold_in(model_key, 10_000 + (split == "test")),
                    indices=idx,
                    progress=f"{name} {split}" if progress else False,
                )
                entry[split] = _summary(g, split, f"{len(xs)} seeded random {split} points")
            entry["eval_seconds"] = time.perf_counter() - start
            write_json(saved, entry)
            results[name] = entry
        saved_figures.append(
            plotting.save_figure(
                _curves_figure(dataset, config, curves_by_model),
                figures / f"gaps_over_training_{dataset}.png",
            )
        )

    frozen = (
        _frozen_decoder(config, trained, key, workdir, progress) if config.frozen_decoder else {}
    )
    if config.latent_figure:
        saved_figures.append(_latent_figure(config, key, workdir, figures, progress))
    bars, errors = {}, {}  # the approximation and amortization gaps, and their errors
    for r in results.values():
        for split in ("train", "test"):
            label = f"{r['dataset']} {_LABEL[r['family']]} {split}"
            gaps = (r[split]["approximation_gap"], r[split]["amortization_gap"])
            bars[label] = tuple(g["mean"] for g in gaps)
            errors[label] = tuple(g["se"] for g in gaps)
    saved_figures.insert(
        0,
        plotting.save_figure(
            plotting.gap_bars_figure(bars, errors=errors, title="Inference gap = approx. + amort."),
            figures / "gaps.png",
        ),
    )
    metrics = {
        "models": results,
        "frozen_decoder": frozen,
        "curves": curves_by_model,
        "wall_seconds": time.perf_counter() - start_all,
        "device": str(jax.devices()[0].device_kind),
    }
    write_json(workdir / "metrics.json", metrics)
    report = _report(config, metrics, [str(p.relative_to(workdir)) for p in saved_figures])
    (workdir / "report.md").write_text(report)
    if progress:
        print(report)
    return metrics


def _curves_figure(dataset: str, config: Config, curves_by_model: dict):
    """Gap bands over training for the models of one dataset (one figure, a row per family)."""
    curves = {}
    for family_name in config.families:
        history = curves_by_model.get(f"{dataset}_{family_name}", {})
        for split in ("train", "valid"):
            if f"{split}_log_px" not in history:
                continue
            curves[f"{_LABEL[family_name]}, {split}"] = {
                series: history[f"{split}_{series}"]
                for series in ("log_px", "elbo_qstar", "elbo_q")
            }
    if not curves:  # curve_every=0: nothing recorded; draw the final points instead
        raise ValueError("no gap curves were recorded (curve_every=0)")
    return plotting.gap_bands_figure(
        curves, title=f"{dataset}: gaps over training (log p̂ from IWAE-{config.curve_iwae_samples})"
    )


def _train_encoder(config, setup: _Setup, params: dict, family_name, hidden, data, key, workdir,
                   name, epochs, progress, epochs_option="frozen_epochs"):  # fmt: skip
    """A new encoder (family `family_name`, trunk `hidden`) trained on setup's frozen decoder;
    the latent size is `config.z_dim`, the one setup's model was built with. Its checkpoint is
    kept per decoder (a digest of the frozen parameters): `fit` cannot see what the model holds
    fixed, and a decoder trained further on resume needs an encoder trained afresh on it."""
    x_dim = data.train.shape[1]
    z_dim = config.z_dim
    family, encoder = make_family_and_encoder(config, family_name, hidden, z_dim)
    fixed = {k: v for k, v in params.items() if not k.startswith("encoder")}
    leaves = b"".join(np.asarray(v).tobytes() for v in jax.tree.leaves(fixed))
    decoder = hashlib.sha1(leaves).hexdigest()[:16]
    model = with_fixed_params(setup.model, fixed)
    guide = amortized_guide(encoder, x_dim=x_dim, family=family)
    n_train = data.train.shape[0]
    trainer = Trainer(
        model,
        guide,
        make_optimizer(config.learning_rate, eps=config.adam_eps),
        n_data=n_train,
        batch_size=config.batch_size,
        preprocess=dynamic_binarize if data.dynamic_binarization else None,
    )
    if progress:
        print(f"[{name}] training the encoder on the frozen decoder, {epochs} epochs")
    result = fit(
        trainer,
        data.train,
        key=key,
        epochs=epochs,
        checkpoint_dir=workdir / "checkpoints" / name / f"decoder-{decoder}",
        checkpoint_every=config.checkpoint_every,
        progress=progress,
        epochs_option=epochs_option,
    )
    return family, encoder, {**fixed, **result.params}


def _frozen_decoder(config, trained, key, workdir, progress) -> dict:
    """Linear FFG and Flow encoders retrained on each dataset's trained FFG decoder."""
    out = {}
    for dataset in config.datasets:
        source = f"{dataset}_diagonal" if "diagonal" in config.families else None
        source = source or f"{dataset}_{config.families[0]}"
        setup, params, data = trained[source]
        test_idx = random_subset(len(data.test), config.test_points, config.seed + 13)
        x_test = data.test[test_idx]
        for f_i, family_name in enumerate(FAMILY_NAMES):
            name = f"{dataset}_frozen_{family_name}"
            saved = workdir / "models" / f"{name}.json"
            k = jax.random.fold_in(key, 5000 + 10 * len(out) + f_i)
            family, encoder, all_params = _train_encoder(
                config, setup, params, family_name, (), data, k, workdir, name,
                config.frozen_epochs, progress,
            )  # fmt: skip
            reused = load_saved_result(saved, config, ignore=FROZEN_RESULT_IGNORES)
            if reused is not None:
                out[name] = reused
                continue
            g = _decompose(
                config, setup.model, encoder, family, all_params, x_test,
                jax.random.fold_in(k, 1), indices=test_idx,
                progress=f"{name} test" if progress else False,
            )  # fmt: skip
            entry = {
                "config": config_to_dict(config),
                "code": code_version(),
                "dataset": dataset,
                "family": family_name,
                "decoder_of": source,
                "encoder": "linear",
                "test": _summary(g, "test", f"{len(x_test)} seeded random test points"),
            }
            write_json(saved, entry)
            out[name] = entry
    return out


def _matched_diagonal(family, lam, key, indices, num_samples: int = 4096) -> jax.Array:
    """The diagonal Gaussian with each datapoint's mean and variance under q(z; lam) (Monte
    Carlo, `num_samples` draws from the key of the datapoint's index in `indices`, so a row's
    start does not depend on which others are fitted with it), `[N, 2 z_dim]`: a flow's q* as
    a start for the FFG's."""
    keys = datapoint_keys(jax.random.fold_in(key, 7004), indices)

    def moments(k, lam_i):
        z = family.distribution(lam_i).sample(k, (num_samples,))
        return z.mean(0), z.std(0)

    return DiagonalGaussian().pack(*jax.vmap(moments)(keys, jnp.asarray(lam)))


def _latent_figure(config, key, workdir, figures, progress) -> Path:
    """Cremer et al.'s figure 2 for a z=2 model on the first dataset."""
    dataset = config.datasets[0]
    data = _load(config, dataset)
    x_dim = data.train.shape[1]
    small = dataclasses.replace(config, z_dim=2, epochs=config.latent_epochs)
    setup = _Setup(small, "diagonal", x_dim, data.train.shape[0], data.dynamic_binarization)
    name = f"{dataset}_z2_diagonal"
    if progress:
        print(f"[{name}] training a z=2 VAE for the latent figure")
    result = fit(
        setup.trainer,
        data.train,
        key=jax.random.fold_in(key, 7000),
        epochs=config.latent_epochs,
        checkpoint_dir=workdir / "checkpoints" / name,
        checkpoint_every=config.checkpoint_every,
        progress=progress,
        epochs_option="latent_epochs",
    )
    params = result.params
    flow_family, flow_encoder, flow_params = _train_encoder(
        small, setup, params, "flow", config.encoder_hidden, data, jax.random.fold_in(key, 7001),
        workdir, f"{dataset}_z2_flow_on_frozen", config.latent_epochs, progress,
        epochs_option="latent_epochs",
    )  # fmt: skip
    x_idx = random_subset(len(data.test), 4, config.seed + 14)
    x = data.test[x_idx]
    xj = jnp.asarray(x)

    # "Optimal": the best of q* from the encoder, from the default start and from the other
    # family's q* (the posteriors of a z = 2 model can have several modes, and the encoder can
    # start q* in a minor one: on 200 test digits of this model it did so by more than 1 nat for
    # 5; one digit's FFG q* stayed in a minor mode from both of its own starts while the Flow's
    # found the major one).
    def q_star(family, init, starts=None, second_start=True, salt=0):
        return fit_local(
            setup.model, params, x, jax.random.fold_in(key, 7002 + salt),
            qstar_settings(small, family)._replace(second_start=second_start), family=family,
            init=init, starts=starts, final_samples=10, indices=x_idx,
            progress=f"{name} figure q*" if progress else False,
        ).params  # fmt: skip

    ffg_lam, flow_lam = encode(setup.encoder, params, xj), encode(flow_encoder, flow_params, xj)
    ffg = q_star(setup.family, ffg_lam)
    flow = q_star(flow_family, flow_lam, [flow_family.with_base(*jnp.split(ffg, 2, axis=-1))])
    ffg = q_star(setup.family, ffg, [_matched_diagonal(flow_family, flow, key, x_idx)], False, 1)
    qs = {
        "amortized FFG": (setup.family, ffg_lam),
        "optimal FFG": (setup.family, jnp.asarray(ffg)),
        "amortized Flow": (flow_family, flow_lam),
        "optimal Flow": (flow_family, jnp.asarray(flow)),
    }
    # One square grid per datapoint holding every approximation (not only the optimal FFG's,
    # which left a better mode off the figure: `covering_square`); 150 points per axis keep a
    # narrow q several cells wide in a wide square.
    center, half_width = covering_square(qs, jax.random.fold_in(key, 7003))
    grid = posterior_grid(setup.model, params, x, qs, center=center, half_width=half_width,
                          points=150)  # fmt: skip
    fig = plotting.density_panels_figure(
        grid.grids,
        grid.densities,
        title=f"{dataset}, z=2: true posterior and approximations of four test points",
    )
    return plotting.save_figure(fig, figures / "latent_posteriors.png")


def _table(entries: dict[str, dict], split: str) -> list[str]:
    names = list(entries)
    head = "| quantity | " + " | ".join(
        f"{entries[n]['dataset']} {_LABEL[entries[n]['family']]}" for n in names
    )
    rows = [head + " |", "| --- |" + " --- |" * len(names)]
    quantities = (
        ("log p̂(x)", "log_px"),
        ("L[q*]", "elbo_qstar"),
        ("L[q]", "elbo_q"),
        ("approximation gap", "approximation_gap"),
        ("amortization gap", "amortization_gap"),
        ("inference gap", "inference_gap"),
    )
    for label, key in quantities:
        rows.append(
            f"| {label} | "
            + " | ".join(format_estimate(entries[n][split][key]) for n in names)
            + " |"
        )
    rows.append(
        "| log p̂(x) from | "
        + " | ".join(entries[n][split]["log_px_estimator"] for n in names)
        + " |"
    )
    rows.append(
        "| datapoints | "
        + " | ".join(str(entries[n][split]["num_datapoints"]) for n in names)
        + " |"
    )
    return rows


def _data_text(config: Config) -> str:
    return ", ".join(
        f"{d} ({resolve_binarization(d, config.binarization)} binarization)"
        for d in config.datasets
    )


def _warmup_text(config: Config) -> str:
    if not config.kl_warmup_epochs:
        return ""
    return f"; the KL weight rises linearly from 0 to 1 over {config.kl_warmup_epochs:g} epochs"


def _qstar_text(config: Config) -> str:
    """How q* was fitted for each family of the run, as `fit_local` ran it."""
    parts = []
    for name in config.families:
        family, _ = make_family_and_encoder(config, name, (), config.z_dim)
        s = qstar_settings(config, family)
        rate, block = s.step_and_block(family)
        how = (
            f"Newton steps damped by {rate:g}"
            if s.method == "newton"
            else f"Adam at rate {rate:g}" + (" on the sticking-the-landing gradient" * s.stl)
        )
        parts.append(
            f"{_LABEL[name]}: {how}, S={s.num_samples}, blocks of {block} steps"
            f"{_score_text(s, family)}; after "
            f"{s.patience_for(family)} blocks without improvement the step size is multiplied by "
            f"{s.lr_decay:g}, {s.num_decays} times, then q* has converged"
            + (
                f", and {s.polish_steps:,} polishing steps follow at rate "
                f"{s.polish_learning_rate:g} with S={s.polish_samples}, the average of their "
                "last tenth a further candidate"
            )
            * bool(s.polish_steps)
            + (
                "; where the full-rank Gaussian's q* as a flow beats it by more than "
                f"{s.certify_tol:g} nats, q* goes on from that floor"
            )
            * bool(isinstance(family, AffineCouplingFlow) and s.flow_floor and s.certify_retries)
        )
    return "; ".join(parts)


def _score_text(s: QStarSettings, family) -> str:
    monitor = s.monitor_for(family)
    if not monitor:
        return ", each scored by the average of its steps' ELBO estimates"
    return f", each scored by the ELBO of its averaged iterate with {monitor} draws fixed per point"


def _ais_diagnostics_text(diag: dict | None) -> str:
    """One line on an AIS run's health for the report: acceptance, the chains' log-weight
    spread (see `amortjax.evaluation.ais`), and its warnings, or that it issued none."""
    if not diag:
        return ""
    low, high = diag["acceptance_range"]
    text = f"AIS acceptance {low:.2f}-{high:.2f}"
    if "log_weight_sd_median" in diag:  # folders saved before 2026-12-05 lack it
        text += (
            f", log-weight spread over chains {diag['log_weight_sd_median']:.2f} nats (median; "
            f"warned above {LOG_WEIGHT_SPREAD:g}), ESS {diag['ess_median']:.1f} of "
            f"{diag['num_chains']} chains"
        )
    warned = diag.get("warnings") or []
    if not warned:
        return text + "; no warning."
    return text + "; " + " ".join(f"**Warning:** {w}" for w in warned)


def _report(config: Config, metrics: dict, figures: list[str]) -> str:
    models = metrics["models"]
    ais = (
        f"AIS ({config.ais.num_chains} chains, {config.ais.num_temperatures} temperatures, "
        f"{config.ais.leapfrog_steps} leapfrog steps, started at {config.ais_start}, step sizes "
        f"from a pilot pass of {min(config.ais.pilot_chains, config.ais.num_chains)} chain(s) "
        f"through {config.ais.pilot_temperatures or config.ais.num_temperatures} of the "
        f"temperatures aiming at acceptance {config.ais.target_accept:g}, then frozen)"
        if config.run_ais
        else "no AIS"
    )
    lines = [
        "# amortization_gap: inference suboptimality (Cremer et al. 2018)",
        "",
        f"Encoder {list(config.encoder_hidden)} / decoder {list(config.decoder_hidden)} "
        f"{config.activation}, z={config.z_dim}, {config.epochs} epochs of batch "
        f"{config.batch_size} (schedule `{config.lr_schedule}`). Flow: {config.flow_layers} "
        f"affine coupling layers of {config.flow_hidden} hidden units, context "
        f"{config.flow_context}. Data: {_data_text(config)}{_warmup_text(config)}.",
        "",
        f"Nats per datapoint, mean ± standard error over datapoints. L[q] and L[q*] are ELBOs "
        f"with {config.iwae_samples} draws each, on common random numbers; q is the encoder's, "
        f"q* the same family fitted to each datapoint ({_qstar_text(config)}), started at "
        f"the encoder's output and kept there where its end point is no better. "
        f"log p̂(x) is a lower bound per datapoint: the better (highest mean) of importance "
        f"sampling from (q + q*)/2 with {2 * config.iwae_samples} draws and {ais}.",
        "",
    ]
    for name, model in models.items():
        for split in ("train", "test"):
            conv = model[split].get("qstar_convergence")
            if conv:
                lines.append(f"- {name}, {split}: {conv['text']}.")
            ais_text = _ais_diagnostics_text(model[split].get("info", {}).get("ais_diagnostics"))
            if ais_text:
                lines.append(f"- {name}, {split}: {ais_text}")
    lines.append("")
    for split, what in (("train", "training"), ("test", "held-out test")):
        lines += [f"## Gaps on {what} points", "", *_table(models, split), ""]
    if metrics["frozen_decoder"]:
        lines += [
            "## Frozen decoder: a linear encoder retrained on a trained FFG decoder (test)",
            "",
            *_table(metrics["frozen_decoder"], "test"),
            "",
        ]

    def per_epoch(r: dict) -> str:
        seconds = seconds_per_epoch(r.get("epoch_seconds", []))
        return "" if seconds is None else f" ({seconds:.2f} s per epoch)"

    timing = ", ".join(
        f"{n}: train {r['train_seconds']:.0f} s{per_epoch(r)}, gaps {r['eval_seconds']:.0f} s"
        for n, r in models.items()
    )
    lines += [
        f"Wall time {metrics['wall_seconds'] / 60:.1f} min on {metrics['device']} (this "
        f"invocation; a resumed run's earlier ones not included). Whole run: {timing}.",
        "",
    ]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
