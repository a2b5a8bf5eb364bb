"""vae_mnist: the amortized VAE on statically binarized MNIST, with test ELBO and IWAE-5000.

Trains q_phi(z|x) and p_theta(x|z) by SVI on the training split, then reports on the test split
the ELBO of the encoder's q (every test point) and the IWAE-k lower bound of log p(x) (k = 5000;
every test point in the paper preset, a seeded random subset in the quick one), with figures:
reconstructions, prior samples, training curves and, for a 2-D latent space, the manifold. On the
test set it also measures which latent units the encoder uses: Burda et al. (2016)'s active
units (Var_x E_q[z_u|x] > 0.01) and the KL of each dimension, with figures of both, of latent
traversals along the most active units and of the test set's latent means coloured by digit.

The KL term can be weighted (`beta`, the beta-VAE of Higgins et al. 2017) and scheduled
(`kl_schedule`): a linear warm-up over `kl_warmup_epochs`, or Fu et al. (2019)'s cyclical
annealing with `kl_cycles` cycles over the run's epochs. With beta != 1 or a schedule the training
loss is the weighted objective, not -ELBO; the test numbers are always the plain ELBO and IWAE.

Presets:
    quick: 784-400-20-400-784 ReLU MLPs, 100 epochs of batch 100 with Adam 1e-3; IWAE-5000 on
        2,000 seeded random test points. About 4 minutes on 2 CPU cores.
    paper: Burda et al. (2016)'s protocol for the one-stochastic-layer VAE of their Table 1:
        MNIST binarized dynamically (afresh every epoch; the test set once, seeded), trained on
        59,600 of the 60,000 training images (`validation_size=400`), 784-200-200-50 tanh MLPs,
        the decoder's output bias started at the logits of the training pixel means
        (`output_bias=data_mean`), batch 20, Adam (beta1 0.99, eps 1e-4) with their 3^i schedule
        over 3280 epochs, IWAE-5000 on the whole test set, active units on the first 500
        training images (`activity_split=train`). For their IWAE rows: `objective=iwae
        num_particles=5` (or 50); Larochelle's static set (their appendix): `dataset=
        binarized_mnist binarization=static validation_size=10000`. Differences: optax's Adam
        starts its second moments at 0 with bias correction (theirs at 1, without), adds eps
        outside the square root as they do; their test set was binarized with their own seed.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from amortjax import plotting
from amortjax.data import (
    DATASETS,
    labels_of_test_split,
    load_data,
    resolve_binarization,
    split_sizes,
)
from amortjax.data.loading import dynamic_binarize
from amortjax.evaluation.activity import BURDA_THRESHOLD, latent_activity
from amortjax.evaluation.bounds import evaluate_bounds, mean_and_stderr
from amortjax.evaluation.subsets import random_subset
from amortjax.families import DiagonalGaussian
from amortjax.guides import amortized_guide, encode
from amortjax.inference.objectives import (
    KL_SCHEDULES,
    OBJECTIVES,
    epoch_kl_schedule,
    make_optimizer,
)
from amortjax.inference.objectives import SCHEDULES as LR_SCHEDULES
from amortjax.inference.training import Trainer, fit, seconds_per_epoch
from amortjax.models import LIKELIHOODS, check_observations, decode_mean, vae_model
from amortjax.nets import ACTIVATIONS, MLP, mean_logits
from experiments.runner import (
    check_at_most,
    check_batch_fits,
    check_choice,
    check_config,
    write_json,
)


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of the experiment; the defaults are the quick preset.

    KL weight: `beta` is the weight the schedule reaches; `kl_schedule` is "linear" (0 -> beta
    over `kl_warmup_epochs`, beta throughout when that is 0), "constant" (beta) or "cyclical"
    (`kl_cycles` cycles over `epochs`, Fu et al. 2019). Latent activity: `activity_threshold`
    on Var_x E_q[z_u|x] (Burda et al.: 0.01); `traversal_dims` most active units are traversed.
    """

    dataset: str = "binarized_mnist"
    binarization: str = "auto"
    validation_size: int = 10_000
    likelihood: str = "bernoulli"
    encoder_hidden: tuple[int, ...] = (400,)
    decoder_hidden: tuple[int, ...] = (400,)
    activation: str = "relu"
    z_dim: int = 20
    objective: str = "elbo"
    num_particles: int = 1
    epochs: int = 100
    batch_size: int = 100
    learning_rate: float = 1e-3
    lr_schedule: str = "constant"
    adam_eps: float = 1e-8
    adam_b1: float = 0.9
    output_bias: str = "zero"
    beta: float = 1.0
    kl_schedule: str = "linear"
    kl_warmup_epochs: float = 0.0
    kl_cycles: int = 4
    eval_every: int = 5
    valid_points: int = 2000
    valid_samples: int = 10
    test_elbo_samples: int = 100
    iwae_samples: int = 5000
    iwae_points: int | None = 2000
    activity_threshold: float = BURDA_THRESHOLD
    activity_split: str = "test"
    activity_points: int | None = None
    traversal_dims: int = 8
    checkpoint_every: int = 1
    seed: int = 0

    def check(self) -> None:
        """The names options must take and the couplings between options; called by
        `runner.check_config` after the per-option type and range checks, before any data."""
        check_choice("dataset", self.dataset, DATASETS)
        binarization = resolve_binarization(self.dataset, self.binarization)
        check_choice("likelihood", self.likelihood, tuple(LIKELIHOODS))
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_choice("objective", self.objective, OBJECTIVES)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("kl_schedule", self.kl_schedule, KL_SCHEDULES)
        if self.likelihood == "bernoulli" and binarization == "none":
            raise ValueError(
                f"options likelihood=bernoulli and binarization=none: a Bernoulli likelihood "
                f"scores 0/1 pixels but {self.dataset} would keep its grey levels; use "
                "binarization=dynamic (or auto), or likelihood=gaussian"
            )
        if self.kl_warmup_epochs and self.kl_schedule != "linear":
            raise ValueError(
                f"option kl_warmup_epochs={self.kl_warmup_epochs} is the length of the 'linear' "
                f"schedule; with kl_schedule={self.kl_schedule!r} leave it at 0"
            )
        weighted = self.beta != 1.0 or self.kl_warmup_epochs or self.kl_schedule == "cyclical"
        if self.objective == "iwae" and weighted:
            raise ValueError(
                f"options objective=iwae and a KL weight (beta={self.beta}, kl_schedule="
                f"{self.kl_schedule}, kl_warmup_epochs={self.kl_warmup_epochs}): IWAE has no KL "
                "term to weight; use objective=elbo for a KL schedule, or leave beta=1, "
                "kl_schedule=linear and kl_warmup_epochs=0"
            )
        check_choice("output_bias", self.output_bias, OUTPUT_BIASES)
        check_choice("activity_split", self.activity_split, ("train", "test"))
        if not 0 <= self.adam_b1 < 1:
            raise ValueError(f"option adam_b1={self.adam_b1}: must be in [0, 1)")
        if self.dataset == "binarized_mnist" and self.validation_size != 10_000:
            raise ValueError(
                f"option validation_size={self.validation_size}: binarized_mnist has Larochelle's "
                "fixed 10,000-image validation set; leave it at 10000"
            )
        sizes = split_sizes(self.dataset, self.validation_size)
        check_batch_fits(self.batch_size, self.dataset, validation_size=self.validation_size)
        check_at_most("valid_points", self.valid_points, "the validation rows", sizes["valid"],
                      fixed=True)  # fmt: skip


# What a resume may change (`runner.check_resumable`): the epochs (training continues; with
# kl_schedule=cyclical the schedule spans the epochs, so `fit` refuses new ones) and the
# evaluations of the trained model. valid_points and valid_samples draw the validation curve
# recorded during training, so they are fixed with it.
RESUMABLE_OPTIONS = (
    "epochs",
    "eval_every",
    "test_elbo_samples",
    "iwae_samples",
    "iwae_points",
    "activity_threshold",
    "activity_split",
    "activity_points",
    "traversal_dims",
    "checkpoint_every",
)

OUTPUT_BIASES = ("zero", "data_mean")
"""The decoder's initial output bias: zeros, or the logits of the training pixel means."""

PRESETS: dict[str, dict] = {
    "quick": {},
    "paper": {
        "dataset": "mnist",
        "binarization": "dynamic",
        "validation_size": 400,
        "valid_points": 400,
        "adam_b1": 0.99,
        "output_bias": "data_mean",
        "activity_split": "train",
        "activity_points": 500,
        "encoder_hidden": (200, 200),
        "decoder_hidden": (200, 200),
        "activation": "tanh",
        "z_dim": 50,
        "epochs": 3280,
        "batch_size": 20,
        "lr_schedule": "iwae",
        "adam_eps": 1e-4,
        "eval_every": 100,
        "checkpoint_every": 10,
        "iwae_points": None,
    },
}


def _per_epoch(epoch_seconds: list[float]) -> str:
    per_epoch = seconds_per_epoch(epoch_seconds)
    return "" if per_epoch is None else f" ({per_epoch:.2f} s per epoch after the first)"


def _curves(history: dict, weighted: bool = False) -> dict:
    """The history with the training loss turned into a training ELBO, so all curves are bounds
    of log p(x) on one axis (with a KL weight, the weighted objective instead)."""
    curves = {k: v for k, v in history.items() if k != "train_loss"}
    epochs, losses = history["train_loss"]
    name = "train objective (-loss, KL-weighted)" if weighted else "train_elbo (-loss)"
    return {name: (epochs, [-v for v in losses]), **curves}


def _kl_description(config: Config) -> str:
    if config.kl_schedule == "cyclical":
        how = f"in {config.kl_cycles} cycles (0 -> beta over the first half of each, then flat)"
    elif config.kl_warmup_epochs:
        how = f"rising linearly from 0 over {config.kl_warmup_epochs:g} epochs"
    else:
        how = "throughout"
    return (
        f"KL weight beta = {config.beta:g}, `{config.kl_schedule}` schedule, {how}: the training "
        "loss is the KL-weighted objective; the test numbers below are the plain ELBO and IWAE."
    )


def _activity_lines(a: dict) -> list[str]:
    lines = [
        f"## Latent activity ({a['split']} set)",
        "",
        f"**{a['num_active']} of {a['z_dim']} latent units are active** (Burda et al. 2016: "
        f"Var_x E_q[z_u|x] > {a['threshold']:g} over the {a['points']} {a['split']} points). "
        f"The KL term of the ELBO, E_x KL(q(z|x) || p(z)), is {a['kl_total']:.2f} nats, "
        f"{a['kl_active']:.2f} of them in the active units.",
        "",
        r"| unit | Var_x E_q[z_u\|x] | KL(q(z_u\|x) \|\| p(z_u)), nats | active |",
        "| --- | --- | --- | --- |",
    ]
    for u in np.argsort(-np.asarray(a["variance"]), kind="stable"):
        lines.append(
            f"| {u} | {a['variance'][u]:.3g} | {a['kl'][u]:.3f} | "
            f"{'yes' if a['active'][u] else 'no'} |"
        )
    return [*lines, ""]


def _report(config: Config, metrics: dict, figures: list[str]) -> str:
    t = metrics["test"]
    kl_line = [] if metrics["kl_weight"] is None else [_kl_description(config), ""]
    weighted = "" if metrics["kl_weight"] is None else " (KL-weighted)"
    lines = [
        "# vae_mnist: amortized VAE",
        "",
        f"Dataset `{config.dataset}` (binarization: {metrics['binarization']}), latent size "
        f"{config.z_dim}, encoder {list(config.encoder_hidden)} / decoder "
        f"{list(config.decoder_hidden)} {config.activation}, objective `{config.objective}` "
        f"(k={config.num_particles}), {config.epochs} epochs of batch {config.batch_size}.",
        "",
        *kl_line,
        "All numbers in nats per datapoint, mean ± standard error over datapoints; q is the "
        "encoder's (amortized) diagonal Gaussian.",
        "",
        "| quantity | q | bound | samples | split | datapoints | value |",
        "| --- | --- | --- | --- | --- | --- | --- |",
        f"| ELBO | encoder | ELBO | {t['elbo_samples']} | test | {t['elbo_points']} | "
        f"{t['elbo']:.2f} ± {t['elbo_se']:.2f} |",
        f"| log p(x) | encoder | IWAE-{t['iwae_samples']} | {t['iwae_samples']} | test | "
        f"{t['iwae_points']} | {t['iwae']:.2f} ± {t['iwae_se']:.2f} |",
        f"| ELBO (same points as IWAE) | encoder | ELBO | {t['iwae_samples']} | test | "
        f"{t['iwae_points']} | {t['elbo_on_iwae_points']:.2f} |",
        f"| train loss, last epoch | encoder | -{config.objective}{weighted} | "
        f"{config.num_particles} | train | all | {metrics['final_train_loss']:.2f} |",
        "",
        f"Training time {metrics['train_seconds']:.0f} s"
        f"{_per_epoch(metrics.get('epoch_seconds', []))}, evaluation "
        f"{metrics['eval_seconds']:.0f} s, on {metrics['device']}.",
        "",
        *_activity_lines(metrics["activity"]),
    ]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def run(config: Config, workdir: str | Path, *, progress: bool = True) -> dict:
    """Trains and evaluates the VAE; writes metrics.json, report.md and figures/ in workdir."""
    workdir = Path(workdir)
    check_config(config)
    data = load_data(
        config.dataset,
        binarization=config.binarization,
        validation_size=config.validation_size,
        seed=config.seed,
    )
    x_dim = data.train.shape[1]
    check_observations(
        data.train, x_dim=x_dim, likelihood=config.likelihood, grey_ok=data.dynamic_binarization
    )
    for split in (data.valid, data.test):
        check_observations(split, x_dim=x_dim, likelihood=config.likelihood)

    family = DiagonalGaussian()
    encoder = MLP(config.encoder_hidden, family.num_params(config.z_dim), config.activation)
    bias = None if config.output_bias == "zero" else mean_logits(data.train)
    decoder = MLP(config.decoder_hidden, x_dim, config.activation, output_bias=bias)
    model = vae_model(decoder, z_dim=config.z_dim, likelihood=config.likelihood)
    guide = amortized_guide(encoder, x_dim=x_dim, family=family)
    n_train = data.train.shape[0]
    steps_per_epoch = n_train // config.batch_size
    optimizer = make_optimizer(
        config.learning_rate,
        schedule=config.lr_schedule,
        steps_per_epoch=steps_per_epoch,
        eps=config.adam_eps,
        b1=config.adam_b1,
    )
    schedule = epoch_kl_schedule(
        config.kl_schedule,
        steps_per_epoch=steps_per_epoch,
        beta=config.beta,
        warmup_epochs=config.kl_warmup_epochs,
        cycles=config.kl_cycles,
        epochs=config.epochs,
    )
    trainer = Trainer(
        model,
        guide,
        optimizer,
        n_data=n_train,
        batch_size=config.batch_size,
        objective=config.objective,
        num_particles=config.num_particles,
        kl_schedule=schedule,
        preprocess=dynamic_binarize if data.dynamic_binarization else None,
    )
    key = jax.random.key(config.seed)
    train_key, valid_key, test_key, fig_key = jax.random.split(key, 4)
    # seeded random subsets; each image draws by its index in its split (`indices=`), so its
    # numbers do not depend on the subset's size
    valid_idx = random_subset(len(data.valid), config.valid_points, config.seed)
    x_valid = data.valid[valid_idx]

    def evaluate(state):
        b = evaluate_bounds(
            model,
            guide,
            trainer.params(state),
            x_valid,
            valid_key,
            num_samples=config.valid_samples,
            indices=valid_idx,
        )
        return {
            "valid_elbo": float(b.elbo.mean()),
            f"valid_iwae{config.valid_samples}": float(b.iwae.mean()),
        }

    result = fit(
        trainer,
        data.train,
        key=train_key,
        epochs=config.epochs,
        checkpoint_dir=workdir / "checkpoint",
        checkpoint_every=config.checkpoint_every,
        evaluate=evaluate,
        eval_every=config.eval_every,
        progress=progress,
    )
    train_seconds = result.train_seconds  # the whole run, resumes included
    params = result.params

    start = time.perf_counter()
    elbo_key, iwae_key = jax.random.split(test_key)
    test_elbo = evaluate_bounds(
        model,
        guide,
        params,
        data.test,
        elbo_key,
        num_samples=config.test_elbo_samples,
        progress="test ELBO" if progress else False,
    )
    iwae_idx = random_subset(len(data.test), config.iwae_points, config.seed + 1)
    test_iwae = evaluate_bounds(
        model,
        guide,
        params,
        data.test[iwae_idx],
        iwae_key,
        num_samples=config.iwae_samples,
        indices=iwae_idx,
        progress=f"test IWAE-{config.iwae_samples}" if progress else False,
    )
    # the test set's latent means draw the figures; the active units are counted on
    # activity_split: on the training split its first activity_points images (Burda et al.'s
    # protocol: the first 500), on the test split a seeded random sample of them
    test_activity = latent_activity(
        encoder, params, data.test, threshold=config.activity_threshold, family=family
    )
    activity = test_activity
    if config.activity_split == "train" or config.activity_points is not None:
        if config.activity_split == "train":
            counted = np.asarray(data.train)[: config.activity_points]
            if data.dynamic_binarization:
                counted = np.asarray(dynamic_binarize(jax.random.fold_in(fig_key, 1), counted))
        else:
            test = np.asarray(data.test)
            counted = test[random_subset(len(test), config.activity_points, config.seed + 3)]
        activity = latent_activity(
            encoder, params, counted, threshold=config.activity_threshold, family=family
        )
    eval_seconds = time.perf_counter() - start
    elbo, elbo_se = mean_and_stderr(test_elbo.elbo)
    iwae, iwae_se = mean_and_stderr(test_iwae.iwae)
    metrics = {
        "dataset": config.dataset,
        "binarization": data.binarization,
        "test": {
            "elbo": elbo,
            "elbo_se": elbo_se,
            "elbo_samples": config.test_elbo_samples,
            "elbo_points": len(data.test),
            "iwae": iwae,
            "iwae_se": iwae_se,
            "iwae_samples": config.iwae_samples,
            "iwae_points": len(iwae_idx),
            "elbo_on_iwae_points": float(test_iwae.elbo.mean()),
        },
        "activity": {"split": config.activity_split, **activity.summary()},
        "kl_weight": None
        if schedule is None
        else {
            "schedule": config.kl_schedule,
            "beta": config.beta,
            "warmup_epochs": config.kl_warmup_epochs if config.kl_schedule == "linear" else None,
            "cycles": config.kl_cycles if config.kl_schedule == "cyclical" else None,
        },
        "final_train_loss": result.history["train_loss"][1][-1],
        "history": result.history,
        "train_seconds": train_seconds,
        "epoch_seconds": list(result.run_epoch_seconds),
        "eval_seconds": eval_seconds,
        "device": str(jax.devices()[0].device_kind),
    }
    write_json(workdir / "metrics.json", metrics)

    figures = workdir / "figures"
    shown_idx = random_subset(len(data.test), 10, config.seed + 2)
    shown = data.test[shown_idx]
    lam = encode(encoder, params, shown)
    recon = decode_mean(decoder, params, family.mean(lam), likelihood=config.likelihood)

    def decode(z):
        return np.asarray(decode_mean(decoder, params, z, likelihood=config.likelihood))

    by_activity = np.argsort(-activity.variance, kind="stable")
    labels = labels_of_test_split(data)
    saved = [
        plotting.save_figure(
            plotting.reconstructions_figure(shown, np.asarray(recon)),
            figures / "reconstructions.png",
        ),
        plotting.save_figure(
            plotting.prior_samples_figure(
                np.asarray(
                    decode_mean(
                        decoder,
                        params,
                        jax.random.normal(fig_key, (100, config.z_dim)),
                        likelihood=config.likelihood,
                    )
                )
            ),
            figures / "prior_samples.png",
        ),
        plotting.save_figure(
            plotting.training_curves_figure(_curves(result.history, schedule is not None)),
            figures / "training_curves.png",
        ),
        plotting.save_figure(
            plotting.activity_figure(activity.variance, activity.kl, threshold=activity.threshold),
            figures / "activity.png",
        ),
        plotting.save_figure(
            plotting.traversals_figure(
                decode,
                test_activity.means[shown_idx[0]],
                by_activity[: config.traversal_dims],
                title="Traversals of the most active units around a test digit's mean",
            ),
            figures / "traversals.png",
        ),
        plotting.save_figure(
            plotting.embedding_figure(
                test_activity.means,
                labels,
                title="Encoder means of the test set"
                + (" by digit" if labels is not None else " (no labels)"),
                point_size=2.0,
            ),
            figures / "embedding.png",
        ),
    ]
    if config.z_dim == 2:
        saved.append(
            plotting.save_figure(
                plotting.manifold_figure(decode),
                figures / "manifold.png",
            )
        )
    rel = [str(p.relative_to(workdir)) for p in saved]
    (workdir / "report.md").write_text(_report(config, metrics, rel))
    if progress:
        print(_report(config, metrics, []))
    return metrics
