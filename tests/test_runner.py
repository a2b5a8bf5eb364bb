"""Experiment runner: presets, overrides, results folders, the command line, resume."""

import dataclasses
import errno
import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from amortjax.families import DiagonalGaussian
from amortjax.flows import AffineCouplingFlow
from amortjax.inference.training import CheckpointAheadError
from experiments.runner import (
    apply_overrides,
    available_experiments,
    check_config,
    config_from_dict,
    config_to_dict,
    load_experiment,
    load_saved_result,
    new_workdir,
    option_names,
    read_json,
    resolve_config,
    run_experiment,
    write_json,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class _Config:
    epochs: int = 3
    lr: float = 1e-3
    name: str = "a"
    hidden: tuple[int, ...] = (400,)
    flag: bool = False
    points: int | None = 10


def test_overrides_are_parsed_by_field_type():
    c = apply_overrides(
        _Config(), ["epochs=7", "lr=3e-4", "name=b", "hidden=200,200", "flag=true", "points=none"]
    )
    assert c == _Config(epochs=7, lr=3e-4, name="b", hidden=(200, 200), flag=True, points=None)
    assert apply_overrides(_Config(), ["hidden="]).hidden == ()
    assert apply_overrides(_Config(), ["points=5"]).points == 5


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("epoch=3", "unknown option 'epoch'; options are: epochs, lr"),
        ("epochs=three", r"epochs='three': expected a value of type int"),
        ("flag=maybe", "flag='maybe'"),
        # (said "expected a value of type tuple", naming neither the items nor the form)
        ("hidden=a,b", r"hidden='a,b': expected comma-separated ints, e\.g\. 200,200"),
        ("epochs", "not of the form key=value"),
    ],
)
def test_bad_overrides_are_named(override, match):
    with pytest.raises(ValueError, match=match):
        apply_overrides(_Config(), [override])


def test_config_round_trips_through_json():
    c = _Config(hidden=(1, 2))
    assert config_from_dict(_Config, json.loads(json.dumps(config_to_dict(c)))) == c


def test_experiments_are_discovered_and_unknown_names_listed():
    assert "vae_mnist" in available_experiments()
    with pytest.raises(ValueError, match="unknown experiment 'nope'; available: .*vae_mnist"):
        load_experiment("nope")


def test_presets_resolve():
    module = load_experiment("vae_mnist")
    quick = resolve_config(module, "quick")
    paper = resolve_config(module, "paper", ["epochs=5"])
    assert quick == module.Config()
    assert paper.z_dim == 50 and paper.lr_schedule == "iwae" and paper.epochs == 5
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        resolve_config(module, "huge")


@pytest.mark.parametrize("name", available_experiments())
def test_every_experiment_has_quick_and_paper_presets_that_resolve(name):
    module = load_experiment(name)
    assert {"quick", "paper"} <= set(module.PRESETS)
    quick, paper = resolve_config(module, "quick"), resolve_config(module, "paper")
    assert quick == module.Config()
    assert paper != quick  # the paper preset changes something
    # the resolved config survives the trip through config.json that resume takes
    saved = json.loads(json.dumps(config_to_dict(paper)))
    assert config_from_dict(module.Config, saved) == paper


def test_amortization_gap_paper_preset_follows_cremer():
    paper = resolve_config(load_experiment("amortization_gap"), "paper")
    assert paper.epochs == 3280 and paper.lr_schedule == "iwae"
    assert paper.encoder_hidden == paper.decoder_hidden == (200, 200)
    assert paper.z_dim == 50 and paper.activation == "elu"
    assert paper.test_points is None  # the whole test set
    assert paper.qstar.block_size == 100 and paper.qstar.patience == 10  # Cremer's stopping rule
    module = load_experiment("amortization_gap")
    ffg, flow = DiagonalGaussian(), AffineCouplingFlow()
    for family in (ffg, flow):  # Cremer's Flow q*, for both families
        assert module.qstar_settings(paper, family)[:3] == ("adam", 10, 1e-3)
    quick = module.Config()  # the Flow's own, quieter q* gradients and longer run; STL for both
    assert module.qstar_settings(quick, ffg)[:3] == ("adam", 4, 3e-3)
    assert module.qstar_settings(quick, flow)[:3] == ("adam", 16, 1e-2)
    assert module.qstar_settings(quick, flow).patience == 6
    # the quick Flow's q* ends with a polishing stage; Cremer's rule (paper) has none
    polish = module.qstar_settings(quick, flow)
    assert (polish.polish_steps, polish.polish_samples, polish.polish_learning_rate) == (
        1000, 64, 3e-3,
    )  # fmt: skip
    assert module.qstar_settings(paper, flow).polish_steps == 0 == paper.qstar.polish_steps
    assert "Flow: Adam" in module._qstar_text(quick)
    assert (
        module._qstar_text(quick).count("1,000 polishing steps follow at rate 0.003 with S=64") == 1
    )
    assert "polishing" not in module._qstar_text(paper)
    assert module.qstar_settings(quick, flow).stl and module.qstar_settings(quick, ffg).stl
    # Larochelle's static MNIST and Fashion-MNIST thresholded at 0.5; a 100-epoch warm-up
    assert paper.datasets == ("binarized_mnist", "fashion_mnist")
    assert paper.binarization == "threshold" and paper.kl_warmup_epochs == 100
    assert paper.adam_eps == 1e-4 and paper.batch_size == 100
    # 50k / 10k Fashion split (cc); the companion code's 55k / 5k is an option, which
    # Larochelle's fixed MNIST split refuses
    assert paper.validation_size == 10_000
    from amortjax.data import split_sizes

    module = load_experiment("amortization_gap")
    lx = resolve_config(module, "paper", ["datasets=fashion_mnist", "validation_size=5000"])
    assert split_sizes("fashion_mnist", lx.validation_size)["train"] == 55_000
    with pytest.raises(ValueError, match="not supported for binarized_mnist.*leave validation"):
        resolve_config(module, "paper", ["validation_size=5000"])


def test_vae_mnist_paper_preset_follows_burda():
    """Burda et al. (2016), yburda/iwae: dynamic MNIST on 59,600 training images, 784-200-200-50
    tanh, batch 20, Adam beta1 0.99 eps 1e-4 with the 3^i schedule over 3280 epochs, output bias
    at the logits of the pixel means, active units on the first 500 training images."""
    paper = resolve_config(load_experiment("vae_mnist"), "paper")
    assert (paper.dataset, paper.binarization, paper.validation_size) == ("mnist", "dynamic", 400)
    assert paper.encoder_hidden == paper.decoder_hidden == (200, 200)
    assert (paper.activation, paper.z_dim, paper.batch_size) == ("tanh", 50, 20)
    assert (paper.adam_b1, paper.adam_eps, paper.lr_schedule) == (0.99, 1e-4, "iwae")
    assert paper.epochs == 3280 and paper.iwae_points is None and paper.iwae_samples == 5000
    assert paper.output_bias == "data_mean"
    assert (paper.activity_split, paper.activity_points) == ("train", 500)
    from amortjax.data import split_sizes

    assert split_sizes("mnist", paper.validation_size)["train"] == 59_600


def test_semi_amortized_paper_preset_follows_kim():
    """Kim et al. (2018), harvardnlp/sa-vae train_img.py: K=20, momentum 0.5, clipping at 5 in
    the refinement and on the model's gradient, Adam 1e-3, batch 50, the KL weight from 0.1 to
    1 over 10 epochs, 100 epochs."""
    paper = resolve_config(load_experiment("semi_amortized"), "paper")
    assert (paper.refine.num_steps, paper.refine.momentum, paper.refine.max_grad_norm) == (
        20, 0.5, 5.0
    )  # fmt: skip
    assert (paper.learning_rate, paper.max_grad_norm, paper.batch_size) == (1e-3, 5.0, 50)
    assert (paper.kl_warmup_epochs, paper.kl_warmup_start, paper.epochs) == (10, 0.1, 100)


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "experiments", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_cli_rejects_unknown_names_before_running(tmp_path):
    proc = _cli("nope", "--results", str(tmp_path), cwd=ROOT)
    assert proc.returncode == 2 and "available: " in proc.stderr and "vae_mnist" in proc.stderr
    proc = _cli("vae_mnist", "--results", str(tmp_path), "zdim=2", cwd=ROOT)
    assert proc.returncode == 2 and "unknown option 'zdim'" in proc.stderr
    assert not any(tmp_path.iterdir())  # nothing was started


def test_vae_mnist_runs_end_to_end_and_resumes(tmp_path):
    tiny = [
        "epochs=1",
        "z_dim=2",
        "encoder_hidden=64",
        "decoder_hidden=64",
        "valid_points=200",
        "test_elbo_samples=2",
        "iwae_samples=20",
        "iwae_points=50",
        "eval_every=1",
        "output_bias=data_mean",  # Burda et al.'s decoder start
        "activity_split=train",  # active units counted on the first 100 training images
        "activity_points=100",
    ]
    proc = _cli("vae_mnist", "--results", str(tmp_path), *tiny, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (workdir,) = (tmp_path / "vae_mnist").iterdir()
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["config"]["z_dim"] == 2 and saved["preset"] == "quick"
    metrics = json.loads((workdir / "metrics.json").read_text())
    t = metrics["test"]
    assert t["elbo_points"] == 10_000 and t["iwae_points"] == 50
    # one epoch of a small VAE: far better than chance (784 log 2 = 543 nats), below IWAE
    assert -250 < t["elbo"] < -100
    assert t["elbo_on_iwae_points"] < t["iwae"] < -100
    names = ("reconstructions", "prior_samples", "training_curves", "manifold", "activity")
    for name in (*names, "traversals", "embedding"):
        assert (workdir / "figures" / f"{name}.png").stat().st_size > 1000
    report = (workdir / "report.md").read_text()
    assert "IWAE-20" in report and "| test | 50 |" in report
    # Active units and the KL per dimension on the first 100 training images: the
    # per-dimension KLs add up to the KL term, which is what separates the ELBO from the
    # reconstruction term.
    a = metrics["activity"]
    assert a["points"] == 100 and a["split"] == "train"
    assert len(a["variance"]) == len(a["kl"]) == 2
    assert a["num_active"] == sum(a["active"]) == sum(v > 0.01 for v in a["variance"])
    assert a["kl_total"] == pytest.approx(sum(a["kl"])) and a["kl_total"] > 0
    assert metrics["kl_weight"] is None  # the plain ELBO by default
    assert f"{a['num_active']} of 2 latent units are active" in report

    proc = _cli("vae_mnist", "--resume", str(workdir), "epochs=2", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((workdir / "metrics.json").read_text())
    assert resumed["history"]["train_loss"][0] == [1, 2]
    assert resumed["history"]["train_loss"][1][0] == metrics["history"]["train_loss"][1][0]


def test_vae_mnist_kl_options_map_to_schedules():
    from amortjax.inference.objectives import epoch_kl_schedule

    def schedule(c, steps_per_epoch):  # as vae_mnist.run builds the Trainer's kl_schedule
        return epoch_kl_schedule(
            c.kl_schedule, steps_per_epoch=steps_per_epoch, beta=c.beta,
            warmup_epochs=c.kl_warmup_epochs, cycles=c.kl_cycles, epochs=c.epochs,
        )  # fmt: skip

    module = load_experiment("vae_mnist")
    config = module.Config()
    assert schedule(config, 500) is None  # the plain ELBO: the default is unchanged
    beta = schedule(dataclasses.replace(config, beta=4.0), 500)
    assert float(beta(0)) == float(beta(10**6)) == 4.0
    warm = schedule(dataclasses.replace(config, kl_warmup_epochs=2.0), 500)
    assert float(warm(499)) == pytest.approx(0.5) and float(warm(999)) == 1.0
    cyc = dataclasses.replace(config, kl_schedule="cyclical", kl_cycles=4, epochs=8, beta=0.5)
    cyclical = schedule(cyc, 500)  # 4 cycles of 1000 steps over 8 epochs
    assert [float(cyclical(s)) for s in (0, 250, 500, 999, 1000)] == [0, 0.25, 0.5, 0.5, 0]
    with pytest.raises(ValueError, match="kl_schedule='cosine': unknown 'cosine'"):
        check_config(dataclasses.replace(config, kl_schedule="cosine"))
    with pytest.raises(ValueError, match="kl_warmup_epochs=1.0 is the length"):
        check_config(dataclasses.replace(cyc, kl_warmup_epochs=1.0))
    check_config(dataclasses.replace(config, objective="iwae"))  # IWAE without a KL weight
    for weighted in ({"beta": 0.5}, {"kl_warmup_epochs": 2.0}, {"kl_schedule": "cyclical"}):
        with pytest.raises(ValueError, match="objective=iwae and a KL weight"):
            check_config(dataclasses.replace(config, objective="iwae", **weighted))


@pytest.mark.slow  # ~95 s: the whole experiment (its table, frontier and figures) runs in
# make test-slow; its guide, refinement and training are tested in tests/test_semi_amortized.py
def test_semi_amortized_runs_end_to_end(tmp_path):
    tiny = [
        "epochs=1",
        "methods=vae,svi,sa_vae",
        "encoder_hidden=32",
        "decoder_hidden=32",
        "z_dim=4",
        "refine.num_steps=2",
        "kl_warmup_epochs=1",  # Kim et al.'s warm-up from 0.1, and their gradient clipping
        "kl_warmup_start=0.1",
        "max_grad_norm=5",
        "eval_points=60",
        "eval_samples=4",
        "iwae_samples=16",
        "test_steps=0,3",
        "frontier_steps=1,4",
        "frontier_points=20",
        "qstar.max_steps=200",
    ]
    proc = _cli("semi_amortized", "--results", str(tmp_path), *tiny, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (workdir,) = (tmp_path / "semi_amortized").iterdir()
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"vae", "svi", "sa_vae"}
    assert metrics["methods"]["svi"]["encoder_elbo"] is None  # no encoder
    for r in metrics["methods"].values():
        assert -400 < r["refined_elbo"][0] < -80
        assert r["iwae"][0] > r["refined_elbo"][0]
        assert r["kl"][0] > 0
    series = metrics["frontier"]["series"]
    assert series["per-example q* (Adam to convergence)"]["steps"] == [200.0]
    assert metrics["elbo_vs_test_steps"]["vae"][0] == [0, 3]
    for name in ("elbo_vs_refinement_steps", "frontier"):
        assert (workdir / "figures" / f"{name}.png").stat().st_size > 1000
    assert "| sa_vae |" in (workdir / "report.md").read_text()


TINY_GAP = [
    "datasets=fashion_mnist",
    "epochs=1",
    "encoder_hidden=32",
    "decoder_hidden=32",
    "z_dim=4",
    "flow_hidden=8",
    "flow_context=4",
    "train_points=12",
    "test_points=12",
    "iwae_samples=32",
    "ais.num_chains=2",
    "ais.num_temperatures=4",
    "ais.leapfrog_steps=2",
    "qstar.block_size=10",
    "qstar.patience=2",
    "qstar.max_steps=40",
    "flow_qstar.block_size=10",
    "flow_qstar.patience=2",
    "flow_qstar.max_steps=40",
    "flow_qstar.polish_steps=20",
    "flow_qstar.polish_samples=4",
    "curve_every=1",
    "curve_points=6",
    "curve_iwae_samples=8",
    "curve_qstar_steps=20",
]


def test_amortization_gap_runs_end_to_end_and_resume_reuses_results(tmp_path):
    proc = _cli(
        "amortization_gap", "--results", str(tmp_path), *TINY_GAP, "latent_figure=false", cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (workdir,) = (tmp_path / "amortization_gap").iterdir()
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert set(metrics["models"]) == {"fashion_mnist_diagonal", "fashion_mnist_flow"}
    assert metrics["frozen_decoder"] == {}
    for r in metrics["models"].values():
        for split in ("train", "test"):
            s = r[split]
            assert s["num_datapoints"] == 12
            approx, amort = s["approximation_gap"]["mean"], s["amortization_gap"]["mean"]
            assert s["inference_gap"]["mean"] == pytest.approx(approx + amort, abs=1e-3)
            # q* starts at the encoder and climbs; log p̂ is a bound at least as high as both.
            assert s["elbo_q"]["mean"] <= s["elbo_qstar"]["mean"] + 0.5
            assert s["log_px"]["mean"] >= s["elbo_qstar"]["mean"] - 0.5
            assert -600 < s["elbo_q"]["mean"] < -100
            assert s["log_px_estimator"] in ("mixture", "ais")
    history = metrics["curves"]["fashion_mnist_flow"]
    assert history["valid_log_px"][0] == [1]
    for name in ("gaps", "gaps_over_training_fashion_mnist"):
        assert (workdir / "figures" / f"{name}.png").stat().st_size > 1000
    report = (workdir / "report.md").read_text()
    assert "## Gaps on held-out test points" in report and "fashion_mnist Flow" in report
    # Each AIS run's health is in the report: acceptance, log-weight spread, its warnings.
    for name, r in metrics["models"].items():
        for split in ("train", "test"):
            diag = r[split]["info"]["ais_diagnostics"]
            start = f"- {name}, {split}: AIS"
            line = next(ln for ln in report.splitlines() if ln.startswith(start))
            assert f"spread over chains {diag['log_weight_sd_median']:.2f} nats" in line
            assert ("**Warning:**" in line) == bool(diag["warnings"]), line

    # A resumed run reuses each finished model's saved results instead of recomputing them.
    saved = workdir / "models" / "fashion_mnist_flow.json"
    entry = json.loads(saved.read_text())
    entry["test"]["amortization_gap"]["mean"] = 123.0
    saved.write_text(json.dumps(entry))
    proc = _cli("amortization_gap", "--resume", str(workdir), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads((workdir / "metrics.json").read_text())
    assert resumed["models"]["fashion_mnist_flow"]["test"]["amortization_gap"]["mean"] == 123.0


@pytest.mark.slow
def test_amortization_gap_frozen_decoder_and_latent_figure(tmp_path):
    variant = ["families=diagonal", "frozen_decoder=true", "frozen_epochs=1", "latent_epochs=1"]
    proc = _cli("amortization_gap", "--results", str(tmp_path), *TINY_GAP, *variant, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (workdir,) = (tmp_path / "amortization_gap").iterdir()
    metrics = json.loads((workdir / "metrics.json").read_text())
    frozen = metrics["frozen_decoder"]
    assert set(frozen) == {"fashion_mnist_frozen_diagonal", "fashion_mnist_frozen_flow"}
    for r in frozen.values():
        s = r["test"]
        approx, amort = s["approximation_gap"]["mean"], s["amortization_gap"]["mean"]
        assert s["inference_gap"]["mean"] == pytest.approx(approx + amort, abs=1e-3)
        assert s["log_px"]["mean"] >= s["elbo_qstar"]["mean"] - 0.5
    assert (workdir / "figures" / "latent_posteriors.png").stat().st_size > 1000


def test_amortization_gap_rejects_unknown_families(tmp_path):
    proc = _cli("amortization_gap", "--results", str(tmp_path), "families=diagonal,iaf", cwd=ROOT)
    assert proc.returncode != 0
    assert "option families=('diagonal', 'iaf'): unknown 'iaf'; choose from" in proc.stderr


@pytest.mark.slow  # ~75 s; the regimes on this model are also checked by test_worked_models (and
# by the item_response notebook, in make test-slow)
def test_item_response_compares_the_three_regimes_against_exact_answers(tmp_path):
    from experiments import item_response

    config = apply_overrides(
        item_response.Config(),
        {
            "num_train": 300,
            "num_test": 100,
            "num_questions": 20,
            "epochs": 15,
            "qstar.max_steps": 300,
            "elbo_samples": 200,
            "grid_size": 401,
        },
    )
    metrics = item_response.run(config, tmp_path, progress=False)
    assert metrics["layout"] == {"local": ["trait"], "global": ["discrimination", "difficulty"]}
    reference = metrics["reference"]
    assert set(metrics["regimes"]) == set(item_response.REGIMES)
    for m in metrics["regimes"].values():
        # each q's ELBO is below the exact log p(x) under the questions it was trained with
        assert m["inference_gap_heldout"][0] > -0.02
        assert m["heldout_elbo"][0] <= m["heldout_log_px_learned_questions"][0] + 0.02
        # no estimate of a trait beats the exact posterior mean under the true questions by much
        assert 0.2 < m["trait_r2_heldout"] < reference["trait_r2_exact_posterior"] + 0.05
        assert m["difficulty_corr"] > 0.5
        assert m["inference_ms_per_person"] > 0
    # the per-example q is fitted to each new person: its gap is the smallest
    gaps = {r: m["inference_gap_heldout"][0] for r, m in metrics["regimes"].items()}
    assert min(gaps, key=gaps.get) == "per_example"
    assert (tmp_path / "figures" / "traits.png").stat().st_size > 1000
    assert "| semi_amortized |" in (tmp_path / "report.md").read_text()
    with pytest.raises(ValueError, match="regimes=\\('vae',\\): unknown 'vae'"):
        item_response.run(apply_overrides(config, {"regimes": ("vae",)}), tmp_path)


# --- options checked before anything runs; atomic, race-free and honest results folders -----


@pytest.mark.parametrize(
    "override, match",
    [
        ("epochs=-1", "epochs=-1: must be an integer >= 1"),
        ("z_dim=0", "z_dim=0"),
        ("batch_size=0", "batch_size=0"),
        ("iwae_samples=0", "iwae_samples=0"),
        ("curve_every=0", "curve_every=0"),
        ("learning_rate=nan", "learning_rate=nan: must be a finite number"),
        ("learning_rate=0", "learning_rate=0.0: must be > 0"),
        ("adam_eps=0", "adam_eps=0.0: must be > 0"),
        ("encoder_hidden=200,-3", "encoder_hidden=\\(200, -3\\)"),
        ("datasets=", "datasets=\\(\\): give at least one value"),
    ],
)
def test_out_of_range_options_are_refused_when_the_config_is_resolved(override, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(load_experiment("amortization_gap"), "quick", [override])
    with pytest.raises(ValueError, match="beta=-1.0: must be >= 0"):
        resolve_config(load_experiment("vae_mnist"), "quick", ["beta=-1"])


@pytest.mark.parametrize(
    "name, override, match",
    [
        ("amortization_gap", "datasets=mnist,cifar", "datasets=.*unknown 'cifar'; choose from"),
        ("amortization_gap", "families=diagonal,iaf", "unknown 'iaf'; choose from diagonal, flow"),
        ("amortization_gap", "activation=swish", "unknown 'swish'; choose from relu"),
        ("amortization_gap", "lr_schedule=cosine", "lr_schedule='cosine': unknown"),
        ("amortization_gap", "ais_start=posterior", "ais_start='posterior': unknown"),
        ("amortization_gap", "qstar.method=lbfgs", "qstar.method='lbfgs': unknown"),
        ("amortization_gap", "z_dim=1", "z_dim=1: the flow family needs z_dim >= 2"),
        ("amortization_gap", "batch_size=60000", "exceeds mnist's training rows=50000"),
        ("amortization_gap", "validation_size=60000", "validation_size=60000 out of range"),
        ("amortization_gap", "curve_points=200", "curve_points=200 exceeds train_points=100"),
        ("amortization_gap", "qstar.block_size=9000", "block_size=9000 exceeds qstar.max_steps"),
        ("amortization_gap", "qstar.batch_size=50", "qstar.batch_size=50: this experiment sets"),
        ("amortization_gap", "qstar.learning_rte=1", "unknown option 'qstar.learning_rte'"),
        ("amortization_gap", "qstar=1", "option 'qstar' is a group: set its fields"),
        ("vae_mnist", "dataset=emnist", "dataset='emnist': unknown"),
        ("vae_mnist", "binarization=dynamic", "'dynamic' does not fit dataset 'binarized_mnist'"),
        ("vae_mnist", "likelihood=poisson", "likelihood='poisson': unknown"),
        ("vae_mnist", "objective=vimco", "objective='vimco': unknown"),
        ("vae_mnist", "validation_size=400", "binarized_mnist has Larochelle's fixed"),
        ("vae_mnist", "output_bias=mean", "output_bias='mean': unknown"),
        ("semi_amortized", "methods=vae,savae", "unknown 'savae'"),
        ("semi_amortized", "frontier_points=600", "frontier_points=600 exceeds eval_points=500"),
        ("item_response", "num_traits=3", "num_traits=3: must be 1 or 2"),
        ("item_response", "batch_size=5000", "batch_size=5000 exceeds num_train=2000"),
    ],
)
def test_bad_names_and_couplings_are_refused_before_any_data(name, override, match):
    with pytest.raises(ValueError, match=match):
        resolve_config(load_experiment(name), "quick", [override])


def test_a_bernoulli_likelihood_on_grey_levels_is_refused_before_any_data():
    module = load_experiment("vae_mnist")
    with pytest.raises(ValueError, match="likelihood=bernoulli and binarization=none"):
        resolve_config(module, "quick", ["dataset=mnist", "binarization=none"])
    with pytest.raises(ValueError, match="binarization='static' does not fit dataset 'mnist'"):
        resolve_config(module, "quick", ["dataset=mnist", "binarization=static"])
    resolve_config(module, "quick", ["dataset=mnist", "binarization=none", "likelihood=gaussian"])


def test_every_preset_of_every_experiment_passes_the_checks():
    for name in available_experiments():
        module = load_experiment(name)
        for preset in module.PRESETS:
            check_config(resolve_config(module, preset))


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = write_json(tmp_path / "a.json", {"v": 1})

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("experiments.runner.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}  # the old file, whole
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]  # no temporary left


def test_saved_results_are_reused_only_under_the_same_settings(tmp_path, capsys):
    """A saved result is reused under the config that made it, up to the options the caller
    names as not entering it (any other change used to discard and overwrite it, and the note
    did not say which option changed); a superseded or damaged one is kept beside it, and one
    made by other code is reused with a note naming both versions."""
    from experiments.runner import code_version

    path = tmp_path / "model.json"
    write_json(path, {"config": config_to_dict(_Config()), "code": code_version(), "value": 7})
    assert load_saved_result(path, _Config())["value"] == 7
    assert load_saved_result(path, _Config(flag=True), ignore=("flag",))["value"] == 7
    capsys.readouterr()
    assert load_saved_result(path, _Config(epochs=4, flag=True), ignore=("flag",)) is None
    assert (
        "computed under other settings (epochs: 3 -> 4); recomputing it (the old result is "
        "kept as model.superseded-1.json)"
    ) in capsys.readouterr().err
    assert not path.exists()
    assert json.loads((tmp_path / "model.superseded-1.json").read_text())["value"] == 7
    other = {**code_version(), "commit": "0123abc", "dirty": False}
    write_json(path, {"config": config_to_dict(_Config()), "code": other, "value": 8})
    assert load_saved_result(path, _Config())["value"] == 8  # reused, and said so
    err = capsys.readouterr().err
    assert "NOTE: reusing" in err and "made by commit 0123abc (python" in err
    assert f"this run is commit {code_version()['commit']}" in err
    path.write_text('{"config": {"epo')  # damaged outside amortjax
    assert load_saved_result(path, _Config()) is None
    assert "damaged" in capsys.readouterr().err
    assert (tmp_path / "model.superseded-2.json").read_text() == '{"config": {"epo'
    assert load_saved_result(tmp_path / "missing.json", _Config()) is None
    path.write_text('{"config": {"epo')
    with pytest.raises(ValueError, match="model.json is not valid JSON.*delete it"):
        read_json(path)


def test_results_folders_are_unique_when_runs_start_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        folders = list(pool.map(lambda _: new_workdir(tmp_path, "exp", "quick"), range(16)))
    assert len(set(folders)) == 16 and all(f.is_dir() for f in folders)
    # and from separate processes released at the same moment (the runs of the issue): each
    # imports, says it is ready, waits for the start file, then makes its folder
    start = tmp_path / "go"
    code = (
        "import pathlib, sys, time\n"
        "from experiments.runner import new_workdir\n"
        f"pathlib.Path({str(tmp_path)!r}, 'ready-' + sys.argv[1]).touch()\n"
        f"while not pathlib.Path({str(start)!r}).exists(): time.sleep(0.001)\n"
        f"print(new_workdir({str(tmp_path / 'procs')!r}, 'exp', 'quick'))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(i)], stdout=subprocess.PIPE, text=True)
        for i in range(4)
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    start.touch()
    made = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(made)) == 4 and all(Path(m).is_dir() for m in made)


@pytest.fixture
def fake_experiment(monkeypatch):
    """An experiment module whose run fails on demand, for the runner's bookkeeping."""
    calls = []

    def run(config, workdir):
        calls.append(config)
        if config.name == "fail-early":
            raise FloatingPointError("diverged")
        if config.name == "fail-late":
            (workdir / "checkpoint").mkdir(exist_ok=True)
            raise FloatingPointError("diverged")
        if config.name == "interrupt-early":
            raise KeyboardInterrupt
        if config.name == "interrupt-late":
            (workdir / "checkpoint").mkdir(exist_ok=True)
            (workdir / "checkpoint" / "state.npz").write_text(str(config.epochs))
            (workdir.parent / "zz-another-run").mkdir(exist_ok=True)  # newer, in the same root
            raise KeyboardInterrupt
        if config.name == "fail-after-writing":
            (workdir / "checkpoint").mkdir(exist_ok=True)
            (workdir / "checkpoint" / "state.npz").write_text(str(config.epochs))
            raise FloatingPointError("diverged")
        if config.name == "ahead":
            raise CheckpointAheadError(workdir / "checkpoint", 70, config.epochs, "frozen_epochs")
        if config.name == "disk-full":
            (workdir / "checkpoint").mkdir(exist_ok=True)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(workdir / "metrics.json"))
        (workdir / "metrics.json").write_text("{}")
        return {"epochs": config.epochs}

    module = types.SimpleNamespace(Config=_Config, PRESETS={"quick": {}}, run=run)
    monkeypatch.setattr("experiments.runner.load_experiment", lambda name: module)
    return calls


def test_config_json_records_the_code_that_ran_and_each_resumes(
    tmp_path, fake_experiment, monkeypatch
):
    """config.json names the commit (and whether the checkout differed from it) and the
    package versions of the run, and of each resume; outside git the commit is None, not a
    guess."""
    import importlib.metadata

    from experiments.runner import code_version

    root = Path(__file__).resolve().parent.parent
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True
    ).stdout.strip()
    workdir, _ = run_experiment("fake", results_root=tmp_path)
    run_experiment("fake", overrides=["epochs=5"], resume=workdir)
    record = json.loads((workdir / "config.json").read_text())
    for code in (record["code"], record["history"][0]["code"]):
        assert code["commit"] == (head or None)
        assert code["dirty"] in ((True, False) if head else (None,))
        assert code["packages"]["jax"] == importlib.metadata.version("jax")
        assert code["packages"]["numpyro"] == importlib.metadata.version("numpyro")
        assert code["backend"] == jax.default_backend()
    monkeypatch.setenv("PATH", str(tmp_path))  # no git on the path
    assert code_version()["commit"] is None and code_version()["dirty"] is None


def test_resume_keeps_the_original_options_and_a_history(tmp_path, fake_experiment):
    workdir, _ = run_experiment("fake", overrides=["lr=0.01"], results_root=tmp_path)
    saved = workdir / "config.json"
    run_experiment("fake", overrides=["epochs=5"], resume=workdir)
    record = json.loads(saved.read_text())
    assert record["overrides"] == ["lr=0.01"] and record["preset"] == "quick"
    assert record["config"]["epochs"] == 5 and record["config"]["lr"] == 0.01
    assert [h["overrides"] for h in record["history"]] == [["epochs=5"]]
    # A refused resume (a bad option) and a failed one change nothing on disk.
    before = saved.read_bytes()
    with pytest.raises(ValueError, match="epochs=0"):
        run_experiment("fake", overrides=["epochs=0"], resume=workdir)
    with pytest.raises(FloatingPointError):
        run_experiment("fake", overrides=["name=fail-late"], resume=workdir)
    assert saved.read_bytes() == before
    assert len(fake_experiment) == 3  # the refused resume never ran


def test_a_resume_that_wrote_anything_keeps_its_options_however_it_ends(tmp_path, fake_experiment):
    """A failed or interrupted resume put the old config.json back even after it had trained
    the checkpoint further and written results under the new options: the folder then held
    a checkpoint at epoch 70 beside a config.json saying epochs=1. Now config.json keeps the
    new options once anything was written, its history entry saying how the resume ended."""
    workdir, _ = run_experiment("fake", results_root=tmp_path)
    saved = workdir / "config.json"
    for name, epochs, error, status in (
        ("fail-after-writing", 7, FloatingPointError, "failed: FloatingPointError"),
        ("interrupt-late", 9, KeyboardInterrupt, "interrupted"),
    ):
        with pytest.raises(error):
            run_experiment("fake", overrides=[f"name={name}", f"epochs={epochs}"], resume=workdir)
        record = json.loads(saved.read_text())
        assert record["config"]["epochs"] == epochs and record["config"]["name"] == name
        assert record["history"][-1]["status"] == status
    run_experiment("fake", overrides=["name=a"], resume=workdir)
    record = json.loads(saved.read_text())
    statuses = [h["status"] for h in record["history"]]
    assert statuses == ["failed: FloatingPointError", "interrupted", "completed"]
    # a checkpoint trained further than the epochs asked for: refused in command-line terms,
    # naming the option (fit's epochs_option), and, nothing written, config.json put back
    before = saved.read_bytes()
    with pytest.raises(ValueError, match=(
        r"has trained 70 epochs already.*Resume with frozen_epochs=70 or more \(python -m "
        rf"experiments fake --resume {workdir} frozen_epochs=70\), or start a fresh run"
    )):  # fmt: skip
        run_experiment("fake", overrides=["name=ahead", "epochs=2"], resume=workdir)
    assert saved.read_bytes() == before


def test_resume_refuses_options_that_decide_what_is_trained(tmp_path, monkeypatch, capsys):
    """A resume that changes a training option (the audit's `vae_mnist --resume DIR
    learning_rate=0.5 seed=7 batch_size=50`) used to exit 0 with the old trained model while
    config.json and the report claimed the new options. It is refused before anything runs,
    naming each option and the fix, and config.json is left as it was; an evaluation option
    may change (the run recomputes it)."""
    from experiments.__main__ import main

    changes = {  # training options: new value, the quick preset's; evaluation options
        "vae_mnist": (
            {"learning_rate": ("0.5", 0.001), "seed": ("7", 0), "batch_size": ("50", 100)},
            ["iwae_samples=7", "epochs=200"],
        ),
        "amortization_gap": (
            {"learning_rate": ("0.05", 0.001)},
            ["run_ais=false", "ais.num_chains=2"],
        ),
        "semi_amortized": (
            {"refine.num_steps": ("3", 5)},
            ["qstar.max_steps=50", "eval_samples=3"],
        ),
        "item_response": ({"num_test": ("100", 500)}, ["grid_size=101", "epochs=61"]),
    }
    for name, (training, evaluation) in changes.items():
        module = load_experiment(name)
        ran = []
        monkeypatch.setattr(module, "run", lambda config, workdir, ran=ran: ran.append(config))
        workdir = tmp_path / name
        saved = write_json(
            workdir / "config.json",
            {"experiment": name, "preset": "quick", "overrides": [], "history": [],
             "config": config_to_dict(module.Config())},
        )  # fmt: skip
        before = saved.read_text()
        overrides = [f"{option}={new}" for option, (new, _) in training.items()]
        assert main([name, "--resume", str(workdir), *overrides]) == 2
        err = capsys.readouterr().err
        for option, (new, old) in training.items():
            assert f"{option}={new} (trained with {old})" in err, err
        assert "decide what is trained" in err and f"{name} --results" in err
        assert saved.read_text() == before and not ran
        assert main([name, "--resume", str(workdir), *evaluation]) == 0
        assert len(ran) == 1


def test_every_experiment_says_what_a_resume_may_change():
    for name in available_experiments():
        module = load_experiment(name)
        options = option_names(module.Config)
        groups = {option.partition(".")[0] for option in options}
        assert "epochs" in module.RESUMABLE_OPTIONS, name
        assert set(module.RESUMABLE_OPTIONS) <= set(options) | groups, name
        assert not {"seed", "learning_rate", "batch_size"} & set(module.RESUMABLE_OPTIONS), name


def test_a_run_that_fails_before_writing_leaves_no_folder(tmp_path, fake_experiment):
    with pytest.raises(FloatingPointError):
        run_experiment("fake", overrides=["name=fail-early"], results_root=tmp_path)
    assert list((tmp_path / "fake").iterdir()) == []
    with pytest.raises(FloatingPointError):  # one that wrote a checkpoint keeps its folder
        run_experiment("fake", overrides=["name=fail-late"], results_root=tmp_path)
    assert len(list((tmp_path / "fake").iterdir())) == 1


def test_cli_ends_expected_failures_with_a_message_and_a_status(tmp_path):
    missing = _cli("vae_mnist", "--resume", str(tmp_path / "nope"), cwd=ROOT)
    assert missing.returncode == 3 and "Traceback" not in missing.stderr
    assert "config.json does not exist" in missing.stderr
    bad = _cli("vae_mnist", "--results", str(tmp_path), "z_dim=-3", cwd=ROOT)
    assert bad.returncode == 2 and "z_dim=-3: must be an integer >= 1" in bad.stderr
    assert not (tmp_path / "vae_mnist").exists()  # refused before any folder was made
    preset = _cli("vae_mnist", "--resume", str(tmp_path), "--preset", "paper", cwd=ROOT)
    assert preset.returncode == 2 and "--preset does not apply with --resume" in preset.stderr


def test_cli_ctrl_c_and_unwritable_results_end_with_a_message_and_a_status(
    tmp_path, fake_experiment, capsys
):
    """Ctrl-C gave a raw KeyboardInterrupt traceback with no folder to resume; --results naming
    a file, an unmakeable folder or a full disk gave tracebacks or "missing file". Now the
    folder is printed at the start, Ctrl-C names the resume command of this run's own folder
    (not a newer one beside it) with status 130, and a path that cannot be written is named
    with the operating system's reason and the fix, status 5."""
    from experiments.__main__ import EXIT_INTERRUPTED, EXIT_PERMISSION, main

    root = tmp_path / "results"
    assert main(["fake", "--results", str(root), "name=interrupt-late"]) == EXIT_INTERRUPTED
    out, err = capsys.readouterr()
    (folder,) = [p for p in (root / "fake").iterdir() if p.name != "zz-another-run"]
    assert f"results folder: {folder}" in out
    assert "interrupted: everything saved so far" in err and "Traceback" not in err
    assert f"Resume with: python -m experiments fake --resume {folder}\n" in err
    assert main(["fake", "--results", str(root), "name=interrupt-early"]) == EXIT_INTERRUPTED
    assert "nothing was saved, so nothing was kept" in capsys.readouterr().err
    assert len(list((root / "fake").iterdir())) == 2  # the early one's folder was removed

    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for results, message in (
        (a_file, f"cannot write {a_file / 'fake'} (Not a directory): choose another --results"),
        (Path("/proc/x"), "cannot write /proc/x (No such file or directory): choose another"),
        (root, "metrics.json (No space left on device): choose another --results"),
    ):
        name = "name=disk-full" if results == root else "name=a"
        assert main(["fake", "--results", str(results), name]) == EXIT_PERMISSION
        err = capsys.readouterr().err
        assert "error (cannot write): " in err and message in err, err


def test_a_damaged_config_json_is_refused_without_telling_to_delete_it(tmp_path, fake_experiment):
    """read_json told the user to delete a damaged file and run again; for config.json that
    makes the folder unresumable."""
    workdir, _ = run_experiment("fake", results_root=tmp_path)
    (workdir / "config.json").write_text('{"experiment": "fa')
    with pytest.raises(ValueError, match="config.json is not valid JSON.*do not delete it.*fresh"):
        run_experiment("fake", overrides=["epochs=5"], resume=workdir)


def test_settings_groups_take_dotted_options_and_old_folders_resume():
    """`qstar.max_steps=700` sets one field of a settings group; config.json stores the group
    as a dict; a folder saved before the groups (qstar_max_steps, ais_chains, ais=true) reads
    back as the same config."""
    module = load_experiment("amortization_gap")
    config = resolve_config(module, "quick", ["qstar.max_steps=700", "ais.num_chains=3"])
    assert config.qstar.max_steps == 700 and config.qstar.patience == 4
    assert config.ais.num_chains == 3 and config.ais.num_temperatures == 200
    saved = json.loads(json.dumps(config_to_dict(config)))
    assert saved["qstar"]["max_steps"] == 700 and saved["ais"]["num_chains"] == 3
    assert config_from_dict(module.Config, saved) == config
    legacy = {k: v for k, v in saved.items() if k not in ("qstar", "flow_qstar", "ais", "run_ais")}
    legacy.update(ais=True, ais_chains=3, qstar_max_steps=700, qstar_method="adam")
    assert config_from_dict(module.Config, legacy, module.RENAMED_OPTIONS) == config
    # Saved before q* had monitor_samples, its Adam's stopping rule averaged each block's
    # per-step ELBO values: such a folder resumes with monitor_samples=0.
    assert config.qstar.monitor_samples is None is config.flow_qstar.monitor_samples
    ran = dataclasses.replace(
        config,
        qstar=config.qstar._replace(monitor_samples=0),
        flow_qstar=config.flow_qstar._replace(monitor_samples=0),
    )
    groups = {
        g: {k: v for k, v in saved[g].items() if k != "monitor_samples"}
        for g in ("qstar", "flow_qstar")
    }
    assert config_from_dict(module.Config, module.upgrade_saved_config({**saved, **groups})) == ran
    flat = module.upgrade_saved_config({**legacy, "flow_qstar": groups["flow_qstar"]})
    assert config_from_dict(module.Config, flat, module.RENAMED_OPTIONS) == ran
    assert config_from_dict(module.Config, module.upgrade_saved_config(saved)) == config
    # Saved before q*'s polishing stage: no q* was polished, whatever today's default.
    assert config.flow_qstar.polish_steps > 0
    unpolished = {k: v for k, v in saved["flow_qstar"].items() if not k.startswith("polish")}
    read = config_from_dict(
        module.Config, module.upgrade_saved_config({**saved, "flow_qstar": unpolished})
    )
    assert read.flow_qstar.polish_steps == 0
    assert read == dataclasses.replace(
        config, flow_qstar=config.flow_qstar._replace(polish_steps=0)
    )
    # Saved before a flow's full-rank floor: no q* went on from it, whatever today's default.
    assert config.flow_qstar.flow_floor
    unfloored = {g: {k: v for k, v in saved[g].items() if k != "flow_floor"} for g in groups}
    read = config_from_dict(module.Config, module.upgrade_saved_config({**saved, **unfloored}))
    assert read == dataclasses.replace(
        config,
        qstar=config.qstar._replace(flow_floor=False),
        flow_qstar=config.flow_qstar._replace(flow_floor=False),
    )
    # Saved before the flow_qstar group: the Flow's q* ran the qstar group's settings with its
    # own draws per step, and is read back as such, not as today's flow_qstar.
    older = {**{k: v for k, v in saved.items() if k != "flow_qstar"}, "flow_qstar_samples": 16}
    older = config_from_dict(module.Config, module.upgrade_saved_config(older))
    assert older.flow_qstar == config.qstar._replace(num_samples=16) != config.flow_qstar


def test_an_encoder_on_a_frozen_decoder_is_trained_afresh_for_another_decoder(tmp_path):
    """amortization_gap's frozen-decoder encoders: `fit` cannot see the decoder the model
    holds fixed, so a decoder trained further (a resume with more epochs) used to get the
    encoder trained on the old one back from its checkpoint. Each decoder has its own."""
    from experiments import amortization_gap as gap

    config = dataclasses.replace(
        gap.Config(), z_dim=2, encoder_hidden=(8,), decoder_hidden=(8,), batch_size=16
    )
    x = (np.random.default_rng(0).uniform(size=(32, 6)) < 0.5).astype(np.float32)
    data = types.SimpleNamespace(train=x, dynamic_binarization=False)
    setup = gap._Setup(config, "diagonal", 6, 32, False)
    key = jax.random.key(0)
    first = setup.trainer.params(setup.trainer.init(key, x))
    trained_further = jax.tree.map(lambda v: v + 0.1, first)

    def encoder_on(params, workdir):
        *_, out = gap._train_encoder(config, setup, params, "diagonal", (), data, key, workdir,
                                     "frozen", 1, False)  # fmt: skip
        encoder = {k: v for k, v in out.items() if k.startswith("encoder")}
        return [np.asarray(v) for v in jax.tree.leaves(encoder)]

    on_first = encoder_on(first, tmp_path / "run")
    resumed = encoder_on(trained_further, tmp_path / "run")
    fresh = encoder_on(trained_further, tmp_path / "fresh")
    for a, b in zip(resumed, fresh, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not all(np.array_equal(a, b) for a, b in zip(resumed, on_first, strict=True))


def test_semi_amortized_saves_each_method_at_once_and_a_resume_reuses_it(tmp_path, monkeypatch):
    """A run killed after `vae` was trained and evaluated used to recompute its evaluation on
    resume (the per-method results lived in memory until metrics.json). Each method's results
    are saved with their config as soon as they are computed, and reused under that config
    only. (Tiny random data, and a stand-in for the frontier, which is not per method.)"""
    from experiments import semi_amortized

    x = (np.random.default_rng(0).uniform(size=(120, 16)) < 0.5).astype(np.float32)
    data = types.SimpleNamespace(train=x[:100], test=x[100:], dynamic_binarization=False)
    monkeypatch.setattr(semi_amortized, "load_data", lambda *args, **kwargs: data)
    series = {"steps": [1], "ms_per_datapoint": [1.0], "elbo": [-10.0]}
    monkeypatch.setattr(semi_amortized, "_frontier", lambda *args: ("vae", {"stand-in": series}))
    config = resolve_config(
        semi_amortized,
        "quick",
        ["epochs=1", "methods=vae", "encoder_hidden=8", "decoder_hidden=8", "z_dim=2",
         "batch_size=50", "refine.num_steps=1", "eval_points=10", "eval_samples=2",
         "iwae_samples=4", "test_steps=0", "frontier_points=5"],
    )  # fmt: skip
    semi_amortized.run(config, tmp_path, progress=False)
    saved = tmp_path / "methods" / "vae.json"
    entry = json.loads(saved.read_text())
    assert entry["config"] == json.loads(json.dumps(config_to_dict(config)))
    entry["results"]["iwae"] = [123.0, 0.0]  # what a resume must read back, not recompute
    saved.write_text(json.dumps(entry))
    (tmp_path / "metrics.json").unlink()  # killed before the end
    resumed = semi_amortized.run(config, tmp_path, progress=False)
    assert resumed["methods"]["vae"]["iwae"] == [123.0, 0.0]
    assert resumed["elbo_vs_test_steps"]["vae"][0] == [0]
    assert entry["code"]["packages"]["jax"] == jax.__version__  # the code that made it
    # options the method's results do not depend on (the frontier's, the checkpoints'
    # spacing) used to discard them: reused
    same = dataclasses.replace(config, frontier_steps=(1, 2), frontier_points=4,
                               checkpoint_every=3)  # fmt: skip
    assert semi_amortized.run(same, tmp_path, progress=False)["methods"]["vae"]["iwae"][0] == 123
    other = dataclasses.replace(config, iwae_samples=5)  # another evaluation: recomputed
    assert semi_amortized.run(other, tmp_path, progress=False)["methods"]["vae"]["iwae"][0] < 0
    assert json.loads(saved.read_text())["config"]["iwae_samples"] == 5
    kept = json.loads((saved.parent / "vae.superseded-1.json").read_text())  # nothing is lost
    assert kept["results"]["iwae"] == [123.0, 0.0]


_STUCK = """
import dataclasses, sys, time, types
import experiments.runner

@dataclasses.dataclass(frozen=True)
class Config:
    epochs: int = 1

def run(config, workdir):
    (workdir / "stage.json").write_text("{}")  # a stage saved before the hang
    time.sleep(120)  # what a deadlocked XLA pool looks like from outside: no CPU at all

module = types.SimpleNamespace(Config=Config, PRESETS={"quick": {}}, run=run)
experiments.runner.load_experiment = lambda name: module
from experiments.__main__ import main
sys.exit(main(["stuck", "--results", sys.argv[1]]))
"""


def test_a_hung_run_ends_with_an_error_that_names_the_cause_and_the_resume(tmp_path):
    """A run that uses no CPU for AMORTJAX_STALL_SECONDS (a deadlocked XLA pool) is ended by
    the watchdog with EXIT_HUNG, every Python thread's stack and the folder to resume, its
    saved stage kept; a busy run of the same length is not."""
    from experiments.watchdog import EXIT_HUNG, Watchdog

    env = {**os.environ, "AMORTJAX_STALL_SECONDS": "2", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _STUCK, str(tmp_path)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=100)  # fmt: skip
    assert proc.returncode == EXIT_HUNG and time.perf_counter() - start < 60, proc.stderr
    (folder,) = (tmp_path / "stuck").iterdir()
    assert (folder / "stage.json").exists()
    assert "error (hung)" in proc.stderr and "NPROC" in proc.stderr
    assert f"python -m experiments stuck --resume {folder}" in proc.stderr
    assert "the Python threads at the stall" in proc.stderr and "time.sleep" not in proc.stderr
    assert 'File "<string>", line 11 in run' in proc.stderr  # the stuck main thread's frame

    fired = []
    with Watchdog(0.5, on_stall=fired.append):
        end = time.process_time() + 1.5
        while time.process_time() < end:  # busy: CPU time grows
            pass
    assert fired == []
    with Watchdog(0.5, describe=lambda: "resume X", on_stall=fired.append):
        time.sleep(1.5)
    assert len(fired) == 1 and "resume X" in fired[0] and "error (hung)" in fired[0]
    with Watchdog(0.5, describe=lambda: 1 / 0, on_stall=fired.append):
        time.sleep(1.5)
    assert len(fired) == 2 and "describing the run failed: ZeroDivisionError" in fired[1]
    bad = subprocess.run([sys.executable, "-m", "experiments", "vae_mnist", "--results",
                          str(tmp_path)], cwd=ROOT, env={**env, "AMORTJAX_STALL_SECONDS": "soon"},
                         capture_output=True, text=True, timeout=100)  # fmt: skip
    assert bad.returncode == 2 and "AMORTJAX_STALL_SECONDS='soon'" in bad.stderr


@pytest.mark.parametrize("name", ["semi_amortized", "item_response"])
def test_a_folder_saved_before_the_monitors_blocks_resumes_with_the_blocks_it_ran(name):
    """Adam's default blocks became 400 with patience 1 (the monitor's) on 2026-12-07; these
    experiments pin 50 and 4 now, and a folder saved before (`block_size: null`, as the
    committed quick runs were) is read as the 50 it ran, not as today's default."""
    module = load_experiment(name)
    saved = json.loads((ROOT / "docs" / "results" / f"{name}_quick" / "config.json").read_text())
    assert saved["config"]["qstar"]["block_size"] is None  # (what the older folders hold)
    config = config_from_dict(
        module.Config, module.upgrade_saved_config(saved["config"]), module.RENAMED_OPTIONS
    )
    assert (config.qstar.block_size, config.qstar.patience) == (50, 4)
    assert config.qstar == module.Config().qstar  # the preset's own q*, as the folder ran it
    later = {**saved["config"], "qstar": {**saved["config"]["qstar"], "block_size": 400}}
    assert module.upgrade_saved_config(later)["qstar"]["block_size"] == 400


def test_the_flows_matched_diagonal_draws_by_each_points_index():
    """The figure's third FFG start (a flow q*'s moments) draws per datapoint index: a row's
    start is the same fitted alone or with others."""
    from experiments import amortization_gap as gap

    flow = AffineCouplingFlow(num_layers=2, hidden=4)
    lam = 0.3 * jax.random.normal(jax.random.key(0), (3, flow.num_params(2)))
    key = jax.random.key(1)
    together = np.asarray(gap._matched_diagonal(flow, lam, key, np.array([5, 6, 7])))
    alone = np.asarray(gap._matched_diagonal(flow, lam[1:2], key, np.array([6])))
    np.testing.assert_allclose(alone[0], together[1], rtol=1e-6)
    assert np.abs(together[0] - together[1]).max() > 1e-3
