"""semi_amortized: amortized, per-example and semi-amortized inference compared (Kim et al. 2018).

Trains five models with the same architecture, objective (the ELBO) and number of epochs:

    vae         the amortized VAE: q(z|x) = q(z; f_phi(x))
    svi         per-example SVI: no encoder; every minibatch starts from the prior and takes K
                SGD steps on each datapoint's local ELBO, the decoder learns from the result
    vae_svi     the encoder's output refined by K steps, no gradient through them (VAE+SVI)
    vae_svi_kl  as vae_svi, the encoder trained toward the refined q by KL (VAE+SVI+KL)
    sa_vae      the gradient flows through the K steps into encoder and decoder (SA-VAE)

and reports, on a seeded random subset of the test set: the ELBO of the encoder's q, the ELBO
of the refined q (K steps at test time), IWAE-k of log p(x) with the refined q, KL(q || prior),
training time, and the test-time cost per datapoint. Figures: the test ELBO against the number
of refinement steps at test time for each model, and the quality/cost frontier of amortized,
semi-amortized (several K) and per-example inference for new data.

Presets:
    quick: 784-200-20 ReLU MLPs, K=5, 10 epochs of batch 100 on statically binarized MNIST,
        evaluation on 500 seeded random test points (the frontier on 100 of them).
    paper: Kim et al.'s training protocol (`harvardnlp/sa-vae`, train_img.py): K=20 SGD steps
        with momentum 0.5 and gradient norm clipped at 5, Adam 1e-3 with the model's gradient
        clipped at norm 5 (`max_grad_norm`), batch 50, the KL weight warmed up linearly from 0.1
        to 1 over 10 epochs (`kl_warmup_epochs`, `kl_warmup_start`), 100 epochs; on an MLP VAE
        with 784-500 encoder and decoder and z=32, evaluated on the whole test set.
        Differences, with their reasons: Kim et al.'s image model is a ResNet/PixelCNN VAE on
        OMNIGLOT (not available offline here), so this runs on statically binarized MNIST.
        Their refinement loss is the minibatch mean, so their nominal step size 1 on (mean,
        log-variance) is a step of 1/50 = 0.02 per datapoint on the mean and, since
        log-variance = 2 log-scale, 0.005 on the log-scale; amortjax's refinement steps each
        datapoint's own ELBO with one step size on (loc, log-scale), 0.01 (measured on the quick
        vae_mnist model: 0.01 gains 1.6/3.3/4.4 nats at K=5/20/100 over the encoder, while 0.1
        loses 4 nats and unclipped steps of 0.03 diverge). Their refinement clips each
        variable's gradient over the whole minibatch at norm 5, amortjax each datapoint's at
        norm 5. They keep the best validation epoch, amortjax the last.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from amortjax import plotting
from amortjax.data import DATASETS, load_data
from amortjax.evaluation.bounds import evaluate_bounds, format_estimate, mean_and_stderr
from amortjax.evaluation.subsets import random_subset
from amortjax.families import DiagonalGaussian
from amortjax.guides import given_params_guide
from amortjax.inference.local import QStarSettings
from amortjax.inference.objectives import epoch_kl_schedule
from amortjax.inference.refine import RefineSettings
from amortjax.inference.training import Trainer, fit
from amortjax.models import check_observations, vae_model
from amortjax.nets import ACTIVATIONS, MLP
from amortjax.regimes import Amortized, Inferred, PerExample, Regime, SemiAmortized
from experiments.runner import (
    check_at_most,
    check_batch_fits,
    check_choice,
    check_config,
    check_set_elsewhere,
    code_version,
    config_to_dict,
    load_saved_result,
    upgrade_adam_blocks,
    write_json,
)

METHODS = ("vae", "svi", "vae_svi", "vae_svi_kl", "sa_vae")


def upgrade_saved_config(data: dict) -> dict:
    """An older folder's config read as what it ran (`runner.upgrade_adam_blocks`)."""
    return upgrade_adam_blocks(data)


_MODES = {"svi": "svi", "vae_svi": "svi", "vae_svi_kl": "svi_kl", "sa_vae": "sa"}


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of the experiment; the defaults are the quick preset."""

    dataset: str = "binarized_mnist"
    methods: tuple[str, ...] = METHODS
    encoder_hidden: tuple[int, ...] = (200,)
    decoder_hidden: tuple[int, ...] = (200,)
    activation: str = "relu"
    z_dim: int = 20
    epochs: int = 10
    batch_size: int = 100
    learning_rate: float = 1e-3
    max_grad_norm: float | None = None
    kl_warmup_epochs: float = 0.0
    kl_warmup_start: float = 0.0
    refine: RefineSettings = RefineSettings(
        num_steps=5, step_size=0.01, momentum=0.5, max_grad_norm=5.0
    )
    eval_points: int | None = 500
    eval_samples: int = 100
    iwae_samples: int = 5000
    test_steps: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 50, 100)
    frontier_steps: tuple[int, ...] = (1, 5, 20, 100, 500)
    frontier_points: int | None = 100
    # the frontier's q* (its final ELBO draws are eval_samples)
    # (blocks of 50, patience 4: those its tables were run with, Adam's defaults before its
    # monitor's became blocks of 400 and patience 1)
    qstar: QStarSettings = QStarSettings(
        method="adam",
        num_samples=10,
        learning_rate=1e-2,
        block_size=50,
        patience=4,
        max_steps=100_000,
    )
    checkpoint_every: int = 1
    seed: int = 0

    def check(self) -> None:
        """The names options must take and the couplings between options; called by
        `runner.check_config` after the per-option type and range checks, before any data."""
        check_choice("dataset", self.dataset, DATASETS)
        check_choice("methods", self.methods, METHODS)
        check_choice("activation", self.activation, tuple(ACTIVATIONS))
        check_batch_fits(self.batch_size, self.dataset)
        check_set_elsewhere("qstar", self.qstar, {"final_samples": "eval_samples"})
        if not 0 <= self.kl_warmup_start <= 1:
            raise ValueError(f"option kl_warmup_start={self.kl_warmup_start}: must be in [0, 1]")
        if self.kl_warmup_start and not self.kl_warmup_epochs:
            raise ValueError(
                f"option kl_warmup_start={self.kl_warmup_start} is where the warm-up starts; "
                "give kl_warmup_epochs too"
            )
        # the frontier's points are the first frontier_points of the eval_points subset
        check_at_most("frontier_points", self.frontier_points, "eval_points", self.eval_points)


# Options of results folders made before the settings groups, read under their new names
RENAMED_OPTIONS = {
    "refine_steps": "refine.num_steps",
    "refine_step_size": "refine.step_size",
    "refine_momentum": "refine.momentum",
    "refine_max_grad_norm": "refine.max_grad_norm",
    "qstar_max_steps": "qstar.max_steps",
}

# What a resume may change (`runner.check_resumable`): the epochs (training continues) and the
# evaluations of the trained models; `refine` is also the training regime of four methods.
RESUMABLE_OPTIONS = (
    "epochs",
    "eval_points",
    "eval_samples",
    "iwae_samples",
    "test_steps",
    "frontier_steps",
    "frontier_points",
    "qstar",
    "checkpoint_every",
)
# Options a saved method's results (`methods/<method>.json`) do not depend on, so a resume that
# changes only these reuses them (`runner.load_saved_result`): the frontier's, computed after
# them from the trained models, and the spacing of checkpoints (training resumes to identical
# parameters).
METHOD_RESULT_IGNORES = ("frontier_steps", "frontier_points", "qstar", "checkpoint_every")

PRESETS: dict[str, dict] = {
    "quick": {},
    "paper": {
        "encoder_hidden": (500,),
        "decoder_hidden": (500,),
        "z_dim": 32,
        "epochs": 100,
        "refine.num_steps": 20,
        "batch_size": 50,
        "max_grad_norm": 5.0,
        "kl_warmup_epochs": 10,
        "kl_warmup_start": 0.1,
        "eval_points": None,
        "frontier_points": 1000,
        "checkpoint_every": 5,
    },
}


def _regime(method: str, encoder, settings: RefineSettings, z_dim: int) -> Regime:
    """The regime each method trains with: the VAE's encoder, or K refinement steps (from the
    encoder, or from the prior for svi) with the method's gradient mode."""
    if method == "vae":
        return Amortized(encoder)
    return _test_time(method, encoder, settings, z_dim, mode=_MODES[method])


def _test_time(
    method: str, encoder, settings: RefineSettings, z_dim: int, mode: str = "sa"
) -> SemiAmortized:
    """K steps from the method's start (its encoder, or the prior for svi); the mode only
    matters in training."""
    return SemiAmortized(None if method == "svi" else encoder, settings, mode=mode, z_dim=z_dim)


def _timed(regime: Regime, *args, **kwargs) -> Inferred:
    """`regime.infer(*args, **kwargs)` called twice: the second call's result and seconds
    (compiled)."""
    regime.infer(*args, **kwargs)
    return regime.infer(*args, **kwargs)


def run(config: Config, workdir: str | Path, *, progress: bool = True) -> dict:
    """Trains every method, evaluates it on the test subset, writes metrics, report, figures.

    A method's evaluation is saved as soon as it is computed (`methods/<method>.json`, with the
    config that made it) and reused when the run is resumed under the same config, so a killed
    run loses at most the method it was working on (whose training continues from its last
    checkpoint)."""
    workdir = Path(workdir)
    check_config(config)
    data = load_data(config.dataset, seed=config.seed)
    x_dim = data.train.shape[1]
    check_observations(
        data.train, x_dim=x_dim, likelihood="bernoulli", grey_ok=data.dynamic_binarization
    )
    family = DiagonalGaussian()
    decoder = MLP(config.decoder_hidden, x_dim, config.activation)
    encoder = MLP(config.encoder_hidden, family.num_params(config.z_dim), config.activation)
    model = vae_model(decoder, z_dim=config.z_dim)
    settings = config.refine
    # a seeded random subset; each digit draws by its index in the test set (`indices=`), so its
    # numbers do not depend on eval_points
    eval_idx = random_subset(len(data.test), config.eval_points, config.seed)
    x_eval = jnp.asarray(data.test[eval_idx])
    n_eval = x_eval.shape[0]
    key = jax.random.key(config.seed)
    evaluation_guide = given_params_guide(family)

    def bounds(params, x, lam, k, num_samples):
        return evaluate_bounds(
            model,
            evaluation_guide,
            params,
            x,
            jax.random.fold_in(key, k),
            num_samples=num_samples,
            guide_args=(lam,),
            indices=eval_idx[: x.shape[0]],
        )

    results, curves, trained = {}, {}, {}
    for i, method in enumerate(config.methods):
        regime = _regime(method, encoder, settings, config.z_dim)
        guide = regime.guide(model, data.train)
        n_train = data.train.shape[0]
        steps_per_epoch = n_train // config.batch_size
        trainer = Trainer(
            model,
            guide,
            regime.optimizer(config.learning_rate, clip_norm=config.max_grad_norm),
            n_data=n_train,
            batch_size=config.batch_size,
            kl_schedule=epoch_kl_schedule(
                "linear",
                steps_per_epoch=steps_per_epoch,
                warmup_epochs=config.kl_warmup_epochs,
                start=config.kl_warmup_start,
            ),
        )
        if progress:
            print(f"[{i + 1}/{len(config.methods)}] training {method}")
        result = fit(
            trainer,
            data.train,
            key=jax.random.fold_in(key, 100 + i),
            epochs=config.epochs,
            checkpoint_dir=workdir / "checkpoints" / method,
            checkpoint_every=config.checkpoint_every,
            progress=progress,
        )
        train_seconds = result.train_seconds  # the whole run, resumes included
        params = result.params
        trained[method] = params
        saved = workdir / "methods" / f"{method}.json"
        reused = load_saved_result(saved, config, ignore=METHOD_RESULT_IGNORES)
        if reused is not None:
            results[method] = reused["results"]
            curves[method] = tuple(reused["elbo_vs_test_steps"])
            continue

        # at test time every model's q is refined by K steps, from its encoder (or the prior)
        test_time = _test_time(method, encoder, settings, config.z_dim)
        refined_q = _timed(
            test_time, model, params, x_eval, jax.random.fold_in(key, 7), indices=eval_idx
        )
        lam0, lam_k = refined_q.start, refined_q.params
        encoder_seconds = (
            0.0
            if method == "svi"
            else _timed(Amortized(encoder), model, params, x_eval, None).seconds
        )
        enc_b = bounds(params, x_eval, lam0, 1, config.eval_samples)
        ref_b = bounds(params, x_eval, lam_k, 2, config.eval_samples)
        iwae_b = evaluate_bounds(
            model,
            evaluation_guide,
            params,
            x_eval,
            jax.random.fold_in(key, 3),
            num_samples=config.iwae_samples,
            guide_args=(lam_k,),
            indices=eval_idx,
            progress=f"{method}: IWAE-{config.iwae_samples}" if progress else False,
        )
        prior = dist.Normal(0.0, 1.0).expand([config.z_dim]).to_event(1)
        kl = np.asarray(dist.kl_divergence(family.distribution(lam_k), prior))
        results[method] = {
            "encoder_elbo": mean_and_stderr(enc_b.elbo) if method != "svi" else None,
            "refined_elbo": mean_and_stderr(ref_b.elbo),
            "iwae": mean_and_stderr(iwae_b.iwae),
            "kl": mean_and_stderr(kl),
            "train_loss": result.history["train_loss"][1][-1],
            "train_seconds": train_seconds,
            "epoch_seconds": list(result.run_epoch_seconds),
            "encoder_ms_per_datapoint": 1e3 * encoder_seconds / n_eval,
            "refine_ms_per_datapoint": 1e3 * refined_q.seconds / n_eval,
        }
        if progress:
            print(f"[{method}] test-time refinement: ELBO after {list(config.test_steps)} steps")
        steps_elbo = [
            bounds(
                params,
                x_eval,
                _test_time(method, encoder, settings._replace(num_steps=k), config.z_dim)
                .infer(model, params, x_eval, jax.random.fold_in(key, 7), indices=eval_idx)
                .params,
                4,
                config.eval_samples,
            ).elbo.mean()
            for k in config.test_steps
        ]
        curves[method] = (list(config.test_steps), [float(v) for v in steps_elbo])
        write_json(
            saved,
            {
                "config": config_to_dict(config),  # what the saved results were computed under
                "code": code_version(),  # ... and by
                "results": results[method],
                "elbo_vs_test_steps": curves[method],
            },
        )

    decoder_of, frontier = _frontier(
        config, model, encoder, trained, x_eval, eval_idx, key, settings, bounds, progress
    )
    metrics = {
        "dataset": config.dataset,
        "eval_split": "test",
        "eval_points": n_eval,
        "methods": results,
        "elbo_vs_test_steps": curves,
        "frontier": {"decoder_of": decoder_of, "series": frontier},
        "device": str(jax.devices()[0].device_kind),
    }
    write_json(workdir / "metrics.json", metrics)
    figures = workdir / "figures"
    saved = [
        plotting.save_figure(
            plotting.series_figure(
                curves,
                xlabel="refinement steps at test time",
                ylabel="test ELBO (nats)",
                title="ELBO of the refined q, by trained model",
            ),
            figures / "elbo_vs_refinement_steps.png",
        ),
        plotting.save_figure(
            plotting.series_figure(
                {name: (v["ms_per_datapoint"], v["elbo"]) for name, v in frontier.items()},
                xlabel="test-time inference cost (ms per datapoint)",
                ylabel="test ELBO (nats)",
                title="Inference for new data: quality against cost",
                logx=True,
            ),
            figures / "frontier.png",
        ),
    ]
    report = _report(config, metrics, [str(p.relative_to(workdir)) for p in saved])
    (workdir / "report.md").write_text(report)
    if progress:
        print(report)
    return metrics


def _frontier(
    config, model, encoder, trained, x_eval, eval_idx, key, settings, bounds, progress=False
) -> tuple[str, dict]:
    """Quality and cost of inference for new data with one trained decoder (the VAE's, else the
    first trained), one regime object each: amortized (encoder), semi-amortized (encoder + K
    steps), per-example (K steps from the prior, and Adam to convergence: q*)."""
    method = "vae" if "vae" in trained else next(iter(trained))
    params = trained[method]
    x_eval = x_eval[: config.frontier_points]  # x_eval is already a seeded random subset
    n = x_eval.shape[0]
    idx = eval_idx[:n]  # (`bounds` keys by the same indices)
    starts = {"per-example (SGD from the prior)": None}
    out = {}
    if method != "svi":
        starts = {"semi-amortized (SGD from the encoder)": encoder, **starts}
        amortized = _timed(Amortized(encoder), model, params, x_eval, None)
        out["amortized (encoder)"] = {
            "steps": [0],
            "ms_per_datapoint": [1e3 * amortized.seconds / n],
            "elbo": [
                float(bounds(params, x_eval, amortized.params, 5, config.eval_samples).elbo.mean())
            ],
        }
    for name, start in starts.items():
        if progress:
            print(f"[frontier] {name}: {list(config.frontier_steps)} steps on {n} points")
        series = {"steps": [], "ms_per_datapoint": [], "elbo": []}
        for k in config.frontier_steps:
            regime = SemiAmortized(start, settings._replace(num_steps=k), z_dim=config.z_dim)
            inferred = _timed(
                regime, model, params, x_eval, jax.random.fold_in(key, 8), indices=idx
            )
            series["steps"].append(k)
            series["ms_per_datapoint"].append(1e3 * inferred.seconds / n)
            series["elbo"].append(
                float(bounds(params, x_eval, inferred.params, 6, config.eval_samples).elbo.mean())
            )
        out[name] = series
    if progress:  # (no bar: the call is timed)
        print(f"[frontier] q* by Adam to convergence on {n} points (timed, up to "
              f"{config.qstar.max_steps} steps each)")  # fmt: skip
    q_star = PerExample(
        config.qstar._replace(final_samples=config.eval_samples),
        site="z",
        z_dim=config.z_dim,
    ).infer(model, params, x_eval, jax.random.fold_in(key, 9), indices=idx)
    out["per-example q* (Adam to convergence)"] = {
        "steps": [float(q_star.steps.mean())],
        "ms_per_datapoint": [1e3 * q_star.seconds / n],
        "elbo": [float(q_star.fit.elbo.mean())],
    }
    return method, out


def _report(config: Config, metrics: dict, figures: list[str]) -> str:
    n = metrics["eval_points"]
    lines = [
        "# semi_amortized: amortized, per-example and semi-amortized inference",
        "",
        f"`{config.dataset}`, encoder {list(config.encoder_hidden)} / decoder "
        f"{list(config.decoder_hidden)} {config.activation}, z={config.z_dim}, "
        f"{config.epochs} epochs of batch {config.batch_size}, K={config.refine.num_steps} "
        f"refinement steps (SGD, step {config.refine.step_size}, momentum "
        f"{config.refine.momentum}, clip {config.refine.max_grad_norm}) in training and at test "
        "time.",
        "",
        f"Test split, {n} seeded random datapoints; nats per datapoint, mean ± standard error. "
        f"ELBOs with {config.eval_samples} samples; log p(x) is IWAE-{config.iwae_samples} with the"
        " refined q; KL is KL(refined q || prior). Costs per datapoint at test time exclude "
        "compilation.",
        "",
        "| method | ELBO, encoder q | ELBO, refined q | log p(x) (IWAE) | KL | train loss | "
        "train time (s) | encoder (ms/pt) | encoder + K steps (ms/pt) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, r in metrics["methods"].items():
        lines.append(
            f"| {method} | {format_estimate(r['encoder_elbo'])} | "
            f"{format_estimate(r['refined_elbo'])} | "
            f"{format_estimate(r['iwae'])} | {format_estimate(r['kl'])} | {r['train_loss']:.2f} | "
            f"{r['train_seconds']:.0f} | {r['encoder_ms_per_datapoint']:.3f} | "
            f"{r['refine_ms_per_datapoint']:.3f} |"
        )
    decoder_of = metrics["frontier"]["decoder_of"]
    lines += [
        "",
        f"Inference for new data with the `{decoder_of}` model's decoder:",
        "",
        "| inference | steps | ms per datapoint | test ELBO |",
        "| --- | --- | --- | --- |",
    ]
    for name, s in metrics["frontier"]["series"].items():
        for steps, ms, elbo in zip(s["steps"], s["ms_per_datapoint"], s["elbo"], strict=True):
            lines.append(f"| {name} | {steps:g} | {ms:.3f} | {elbo:.2f} |")
    lines.append("")
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
