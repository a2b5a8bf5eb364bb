"""Item response: the three inference regimes on a NumPyro model with global and local latents.

N people answer D binary questions (`amortjax.models.irt`, the 2PL model): each person has a
Q-dimensional trait theta_i (local), each question a discrimination a_j and a difficulty b_j
(global). The data are simulated, so the true traits and questions are known, and for Q <= 2
log p(x_i) and E[theta_i | x_i] are computed exactly by quadrature.

Each regime trains the same model with the same global guide (`global_guide`: AutoNormal over
a and b), the same family and the same budget, and handles NEW people its own way:

| regime | training guide for theta | new people |
| --- | --- | --- |
| amortized | encoder f_phi(x_i) | one encoder pass |
| per-example | free parameters per person (row-sparse Adam) | `fit_local` from N(0, I) |
| semi-amortized | encoder + K differentiable steps (SA-VAE) | encoder + the same K steps |

Reported on held-out people: the exact held-out log-likelihood under each regime's learned
questions (how good is the learned question model) next to that under the true questions, each
regime's held-out ELBO with its own q, trait recovery (R^2 of the true traits on the posterior
means of q, next to the exact posterior means' R^2), question recovery (correlation with the
true a and b), training time and the cost of inference per new person.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from amortjax import plotting
from amortjax.evaluation.bounds import evaluate_bounds, format_estimate, mean_and_stderr
from amortjax.families import DiagonalGaussian
from amortjax.guides import fix_globals, given_params_guide, global_guide
from amortjax.inference.local import QStarSettings
from amortjax.inference.refine import RefineSettings
from amortjax.inference.training import Trainer, fit
from amortjax.latents import find_local_latents
from amortjax.models.irt import (
    discrimination_recovery,
    grid_log_marginal,
    grid_posterior_mean,
    irt_model,
    simulate_irt,
    trait_recovery,
)
from amortjax.nets import MLP
from amortjax.regimes import Amortized, PerExample, Regime, SemiAmortized
from experiments.runner import (
    check_at_most,
    check_choice,
    check_config,
    upgrade_adam_blocks,
    write_json,
)

REGIMES = ("amortized", "per_example", "semi_amortized")


@dataclasses.dataclass(frozen=True)
class Config:
    """Options of the experiment; the defaults are the quick preset.

    `refine.step_size` is small because a trait's gradient sums over all D questions (Kim et
    al.'s step size 1 is for a VAE's standardized latents and diverges here); `refine.num_samples`
    draws per refinement step (with one, the steps' noise costs more than they gain on this
    easy posterior).
    """

    num_train: int = 2000
    num_test: int = 500
    num_questions: int = 40
    num_traits: int = 1
    regimes: tuple[str, ...] = REGIMES
    encoder_hidden: tuple[int, ...] = (64,)
    epochs: int = 60
    batch_size: int = 100
    learning_rate: float = 3e-2
    refine: RefineSettings = RefineSettings(num_steps=5, step_size=0.05, num_samples=10)
    # (blocks of 50, patience 4: its 2,000 steps are five of the monitor's default blocks)
    qstar: QStarSettings = QStarSettings(
        method="adam",
        learning_rate=0.02,
        num_samples=10,
        block_size=50,
        patience=4,
        max_steps=2000,
        final_samples=10,
    )
    elbo_samples: int = 1000
    grid_size: int = 801
    checkpoint_every: int = 10
    seed: int = 0

    def check(self) -> None:
        """The names options must take and the couplings between options; called by
        `runner.check_config` after the per-option type and range checks."""
        check_choice("regimes", self.regimes, REGIMES)
        if self.num_traits not in (1, 2):
            raise ValueError(
                f"option num_traits={self.num_traits}: must be 1 or 2 (the exact answers are "
                "computed by quadrature on a grid of that many dimensions)"
            )
        check_at_most("batch_size", self.batch_size, "num_train", self.num_train)
        check_at_most("num_traits", self.num_traits, "num_questions", self.num_questions)


# Options of results folders made before the settings groups, read under their new names
RENAMED_OPTIONS = {
    "semi_steps": "refine.num_steps",
    "semi_step_size": "refine.step_size",
    "semi_samples": "refine.num_samples",
    "qstar_learning_rate": "qstar.learning_rate",
    "qstar_samples": "qstar.num_samples",
    "qstar_max_steps": "qstar.max_steps",
}


def upgrade_saved_config(data: dict) -> dict:
    """An older folder's config read as what it ran (`runner.upgrade_adam_blocks`)."""
    return upgrade_adam_blocks(data)


# What a resume may change (`runner.check_resumable`): the epochs (training continues) and the
# evaluations of the trained regimes; `refine` and `qstar` also set how the semi-amortized and
# per-example regimes train, and num_test the simulated data.
RESUMABLE_OPTIONS = ("epochs", "elbo_samples", "grid_size", "checkpoint_every")

PRESETS: dict[str, dict] = {
    "quick": {},
    # No paper defines this benchmark; the larger preset is sized for a GPU: 20k people, 100
    # questions, a 2-D trait (quadrature on a 401^2 grid). Learning rate 1e-2: the quick
    # preset's 3e-2 made the amortized regime's loss NaN in its second step here (256-256
    # encoder, 2-D traits); 1e-2 trained all three regimes stably (20-epoch check: held-out
    # log p(x) -50.39 amortized, -49.75 semi-amortized, -49.63 with the true questions).
    "paper": {
        "num_train": 20000,
        "num_test": 5000,
        "num_questions": 100,
        "num_traits": 2,
        "encoder_hidden": (256, 256),
        "epochs": 500,
        "batch_size": 500,
        "learning_rate": 1e-2,
        "grid_size": 401,
        "qstar.max_steps": 10000,
    },
}


def _regime(name: str, config: Config, layout, encoder) -> Regime:
    """The regime object behind each name: how a person's variational parameters are made in
    training (its guide and optimizer) and for new people (its `infer`)."""
    if name == "amortized":
        return Amortized(encoder, site=layout)
    if name == "per_example":
        return PerExample(config.qstar, site=layout)
    return SemiAmortized(encoder, config.refine, site=layout)


def _corr(a, b) -> float:
    return float(np.corrcoef(np.ravel(a), np.ravel(b))[0, 1])


def run(config: Config, workdir: str | Path, *, progress: bool = True) -> dict:
    """Trains the three regimes and compares them; writes metrics.json, report.md, figures."""
    check_config(config)
    workdir = Path(workdir)
    key = jax.random.key(config.seed)
    data_key, train_key, eval_key = jax.random.split(key, 3)
    n, q_dim = config.num_train, config.num_traits
    x, truth = simulate_irt(data_key, n + config.num_test, config.num_questions, q_dim)
    x_train, x_test = x[:n], x[n:]
    true_traits = np.asarray(truth["trait"])
    test_traits = true_traits[n:]
    model = irt_model(config.num_questions, q_dim)
    layout = find_local_latents(model, x_train)
    family = DiagonalGaussian()
    grid = {"grid_size": config.grid_size}

    a_true, b_true = truth["discrimination"], truth["difficulty"]
    exact_true = np.asarray(grid_log_marginal(x_test, a_true, b_true, **grid))
    reference_means = np.asarray(grid_posterior_mean(x_test, a_true, b_true, **grid))
    metrics: dict = {
        "data": {
            "num_train": n,
            "num_test": config.num_test,
            "num_questions": config.num_questions,
            "num_traits": q_dim,
        },
        "layout": {"local": list(layout.names), "global": list(layout.global_sites)},
        "reference": {
            "heldout_log_px_true_questions": mean_and_stderr(exact_true),
            "trait_r2_exact_posterior": trait_recovery(reference_means, test_traits),
        },
        "regimes": {},
    }
    estimates = {}
    for i, regime in enumerate(config.regimes):
        encoder = MLP(config.encoder_hidden, family.num_params(layout.size))
        globals_guide = global_guide(model)
        regime_ = _regime(regime, config, layout, encoder)
        guide = regime_.guide(model, x_train, global_guide=globals_guide)
        trainer = Trainer(
            model, guide, regime_.optimizer(config.learning_rate), n_data=n,
            batch_size=config.batch_size,
        )  # fmt: skip
        result = fit(
            trainer,
            x_train,
            key=jax.random.fold_in(train_key, i),
            epochs=config.epochs,
            checkpoint_dir=workdir / "checkpoint" / regime,
            checkpoint_every=config.checkpoint_every,
            progress=progress,
        )
        train_seconds = result.train_seconds  # the whole run, resumes included
        params = result.params
        questions = globals_guide.median(params)
        fixed = fix_globals(model, globals_guide, params)

        # new people, each regime its own way (timed on a second, compiled call)
        k_fit, k_refine, k_elbo = jax.random.split(jax.random.fold_in(eval_key, i), 3)
        k_infer = k_fit if regime == "per_example" else k_refine
        if isinstance(regime_, PerExample):  # (a bar on the first call; the second is timed)
            bar = f"{regime} q*" if progress else False
            regime_.infer(fixed, params, x_test, k_infer, progress=bar)
        else:
            regime_.infer(fixed, params, x_test, k_infer)
        inferred = regime_.infer(fixed, params, x_test, k_infer)
        lam, infer_seconds = inferred.params, inferred.seconds
        train_lam = (
            regime_.training_params(params)
            if isinstance(regime_, PerExample)
            else regime_.infer(fixed, params, x_train, k_infer).params
        )

        def heldout_bounds(lam, fixed=fixed, params=params, k_elbo=k_elbo):
            return evaluate_bounds(
                fixed,
                given_params_guide(family, site=layout),
                params,
                x_test,
                k_elbo,
                num_samples=config.elbo_samples,
                guide_args=(lam,),
            )

        bounds = heldout_bounds(lam)
        # the semi-amortized encoder's own q, before its K steps
        encoder_elbo = (
            mean_and_stderr(heldout_bounds(inferred.start).elbo)
            if regime == "semi_amortized"
            else None
        )
        exact = np.asarray(
            grid_log_marginal(x_test, questions["discrimination"], questions["difficulty"], **grid)
        )
        means = np.asarray(layout.unflatten(family.mean(lam))[0]["trait"])
        train_means = np.asarray(layout.unflatten(family.mean(jnp.asarray(train_lam)))[0]["trait"])
        estimates[regime] = means
        metrics["regimes"][regime] = {
            "train_seconds": train_seconds,
            "epoch_seconds": list(result.run_epoch_seconds),
            "final_train_loss": result.history["train_loss"][1][-1],
            "heldout_log_px_learned_questions": mean_and_stderr(exact),
            "heldout_elbo": mean_and_stderr(bounds.elbo),
            "heldout_elbo_before_refinement": encoder_elbo,
            "heldout_iwae": mean_and_stderr(bounds.iwae),
            "inference_gap_heldout": mean_and_stderr(exact - bounds.elbo),
            "trait_r2_heldout": trait_recovery(means, test_traits),
            "trait_r2_train": trait_recovery(train_means, true_traits[:n]),
            "difficulty_corr": _corr(questions["difficulty"], b_true),
            "discrimination_corr": discrimination_recovery(questions["discrimination"], a_true),
            "inference_ms_per_person": 1e3 * infer_seconds / config.num_test,
        }
    write_json(workdir / "metrics.json", metrics)
    panels = {**{k.replace("_", "-"): v for k, v in estimates.items()},
              "exact posterior": reference_means}  # fmt: skip
    figure = plotting.recovery_figure(
        panels,
        test_traits,
        scores={k: trait_recovery(v, test_traits) for k, v in panels.items()},
        xlabel="true trait",
        ylabel="posterior mean of q",
    )
    saved = [plotting.save_figure(figure, workdir / "figures" / "traits.png")]
    report = _report(config, metrics, [str(p.relative_to(workdir)) for p in saved])
    (workdir / "report.md").write_text(report)
    if progress:
        print(report)
    return metrics


def _report(config: Config, metrics: dict, figures: list[str]) -> str:
    d, ref = metrics["data"], metrics["reference"]
    lines = [
        "# Item response: amortized vs per-example vs semi-amortized",
        "",
        f"{d['num_train']} training and {d['num_test']} held-out people, "
        f"{d['num_questions']} questions, {d['num_traits']}-D traits (simulated 2PL model). "
        f"Local latents found: {metrics['layout']['local']}; global: "
        f"{metrics['layout']['global']} (AutoNormal). {config.epochs} epochs for every regime; "
        f"semi-amortized K={config.refine.num_steps} steps of {config.refine.num_samples} draws. "
        f"Log-likelihoods are nats per person, exact by quadrature on a {config.grid_size}-point "
        "grid per trait axis; ELBOs use "
        f"{config.elbo_samples} draws.",
        "",
        "| regime | held-out log p(x), learned questions | held-out ELBO of q | inference gap "
        "| trait R² held-out | trait R² train | corr(b) | corr(a) | train s | ms / new person |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for regime, m in metrics["regimes"].items():
        lines.append(
            f"| {regime} | {format_estimate(m['heldout_log_px_learned_questions'], 3)} | "
            f"{format_estimate(m['heldout_elbo'], 3)} | "
            f"{format_estimate(m['inference_gap_heldout'], 3)} | "
            f"{m['trait_r2_heldout']:.3f} | {m['trait_r2_train']:.3f} | "
            f"{m['difficulty_corr']:.3f} | {m['discrimination_corr']:.3f} | "
            f"{m['train_seconds']:.1f} | {m['inference_ms_per_person']:.3f} |"
        )
    lines += [
        "| true questions, exact posterior | "
        f"{format_estimate(ref['heldout_log_px_true_questions'], 3)} | "
        f"— | 0 | {ref['trait_r2_exact_posterior']:.3f} | — | 1 | 1 | — | — |",
        "",
        "New people: amortized = one encoder pass; per-example = `fit_local` from N(0, I) "
        f"(Adam, lr {config.qstar.learning_rate}, S={config.qstar.num_samples}, at most "
        f"{config.qstar.max_steps} steps); semi-amortized = encoder + {config.refine.num_steps} "
        "steps.",
        "",
    ]
    if config.num_traits > 1:
        lines += [
            f"corr(a): with {config.num_traits} traits, the correlation of the entries of A A^T "
            "with the true ones (p(x) depends on the discriminations A only through A A^T: a "
            "rotation or permutation of the trait space fits as well, so the a_j themselves are "
            "not identified; `amortjax.models.irt.discrimination_recovery`).",
            "",
        ]
    semi = metrics["regimes"].get("semi_amortized")
    if semi is not None:
        lines.append(
            "Semi-amortized held-out ELBO of the encoder's q before the K steps: "
            f"{format_estimate(semi['heldout_elbo_before_refinement'], 3)} "
            f"(after: {format_estimate(semi['heldout_elbo'], 3)})."
        )
        lines.append("")
    lines += [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
