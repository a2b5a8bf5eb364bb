"""vae_mnist: the amortized VAE on statically binarized MNIST, with test ELBO and IWAE-5000.

Trains q_phi(z|x) and p_theta(x|z) by SVI on the training split, then reports on the test split
the ELBO of the encoder's q (every test point) and the IWAE-k lower bound of log p(x) (k = 5000;
every test point in the paper preset, a seeded random subset in the quick one), with figures:
reconstructions, prior samples, training curves and, for a 2-D latent space, the manifold.

Presets:
    quick: 784-400-20-400-784 ReLU MLPs, 100 epochs of batch 100 with Adam 1e-3; IWAE-5000 on
        2,000 seeded random test points. About 4 minutes on 2 CPU cores.
    paper: Burda et al. (2016)'s one-stochastic-layer VAE: 784-200-200-50 tanh MLPs, batch 20,
        Adam (eps 1e-4) with their 3^i schedule over 3280 epochs, IWAE-5000 on the whole test
        set. Differences: statically binarized MNIST (Larochelle) where they binarized
        dynamically, and a validation split held out of training (they trained on 60k).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import numpy as np

from amortjax import plotting
from amortjax.data import load_data
from amortjax.data.loading import dynamic_binarize
from amortjax.evaluation.bounds import evaluate_bounds, mean_and_stderr
from amortjax.evaluation.subsets import random_subset
from amortjax.families import DiagonalGaussian
from amortjax.guides import amortized_guide, encode
from amortjax.inference.objectives import make_optimizer
from amortjax.inference.training import Trainer, fit
from amortjax.models import check_observations, decode_mean, vae_model
from amortjax.nets import MLP
from amortjax.runner import write_json


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of the experiment; the defaults are the quick preset."""

    dataset: str = "binarized_mnist"
    binarization: str = "auto"
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
    kl_warmup_epochs: float = 0.0
    eval_every: int = 5
    valid_points: int = 2000
    valid_samples: int = 10
    test_elbo_samples: int = 100
    iwae_samples: int = 5000
    iwae_points: int | None = 2000
    checkpoint_every: int = 1
    seed: int = 0


PRESETS: dict[str, dict] = {
    "quick": {},
    "paper": {
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


def _curves(history: dict) -> dict:
    """The history with the training loss turned into a training ELBO, so all curves are bounds
    of log p(x) on one axis."""
    curves = {k: v for k, v in history.items() if k != "train_loss"}
    epochs, losses = history["train_loss"]
    return {"train_elbo (-loss)": (epochs, [-v for v in losses]), **curves}


def _report(config: Config, metrics: dict, figures: list[str]) -> str:
    t = metrics["test"]
    lines = [
        "# vae_mnist: amortized VAE",
        "",
        f"Dataset `{config.dataset}` (binarization: {metrics['binarization']}), latent size "
        f"{config.z_dim}, encoder {list(config.encoder_hidden)} / decoder "
        f"{list(config.decoder_hidden)} {config.activation}, objective `{config.objective}` "
        f"(k={config.num_particles}), {config.epochs} epochs of batch {config.batch_size}.",
        "",
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
        f"| train loss, last epoch | encoder | -{config.objective} | {config.num_particles} | "
        f"train | all | {metrics['final_train_loss']:.2f} |",
        "",
        f"Training time {metrics['train_seconds']:.0f} s, evaluation {metrics['eval_seconds']:.0f}"
        f" s, on {metrics['device']}.",
        "",
    ]
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def run(config: Config, workdir: str | Path, *, progress: bool = True) -> dict:
    """Trains and evaluates the VAE; writes metrics.json, report.md and figures/ in workdir."""
    workdir = Path(workdir)
    data = load_data(config.dataset, binarization=config.binarization, seed=config.seed)
    x_dim = data.train.shape[1]
    check_observations(
        data.train, x_dim=x_dim, likelihood=config.likelihood, grey_ok=data.dynamic_binarization
    )
    for split in (data.valid, data.test):
        check_observations(split, x_dim=x_dim, likelihood=config.likelihood)

    family = DiagonalGaussian()
    encoder = MLP(config.encoder_hidden, family.num_params(config.z_dim), config.activation)
    decoder = MLP(config.decoder_hidden, x_dim, config.activation)
    model = vae_model(decoder, z_dim=config.z_dim, likelihood=config.likelihood)
    guide = amortized_guide(encoder, x_dim=x_dim, family=family)
    n_train = data.train.shape[0]
    optimizer = make_optimizer(
        config.learning_rate,
        schedule=config.lr_schedule,
        steps_per_epoch=n_train // config.batch_size,
        eps=config.adam_eps,
    )
    trainer = Trainer(
        model,
        guide,
        optimizer,
        n_data=n_train,
        batch_size=config.batch_size,
        objective=config.objective,
        num_particles=config.num_particles,
        kl_warmup_epochs=config.kl_warmup_epochs,
        preprocess=dynamic_binarize if data.dynamic_binarization else None,
    )
    key = jax.random.key(config.seed)
    train_key, valid_key, test_key, fig_key = jax.random.split(key, 4)
    x_valid = data.valid[random_subset(len(data.valid), config.valid_points, config.seed)]

    def evaluate(state):
        b = evaluate_bounds(
            model,
            guide,
            trainer.params(state),
            x_valid,
            valid_key,
            num_samples=config.valid_samples,
        )
        return {
            "valid_elbo": float(b.elbo.mean()),
            f"valid_iwae{config.valid_samples}": float(b.iwae.mean()),
        }

    start = time.perf_counter()
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
    train_seconds = time.perf_counter() - start
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
        progress=f"test IWAE-{config.iwae_samples}" if progress else False,
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
        "final_train_loss": result.history["train_loss"][1][-1],
        "history": result.history,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "device": str(jax.devices()[0].device_kind),
    }
    write_json(workdir / "metrics.json", metrics)

    figures = workdir / "figures"
    shown = data.test[random_subset(len(data.test), 10, config.seed + 2)]
    lam = encode(encoder, params, shown)
    recon = decode_mean(decoder, params, family.mean(lam), likelihood=config.likelihood)
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
            plotting.training_curves_figure(_curves(result.history)),
            figures / "training_curves.png",
        ),
    ]
    if config.z_dim == 2:
        saved.append(
            plotting.save_figure(
                plotting.manifold_figure(
                    lambda z: np.asarray(
                        decode_mean(decoder, params, z, likelihood=config.likelihood)
                    )
                ),
                figures / "manifold.png",
            )
        )
    rel = [str(p.relative_to(workdir)) for p in saved]
    (workdir / "report.md").write_text(_report(config, metrics, rel))
    if progress:
        print(_report(config, metrics, []))
    return metrics
