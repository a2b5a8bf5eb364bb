"""The README's own-model example (Poisson PCA in three regimes, then its gap decomposition)
runs as written, and its numbers are what the README says they show."""

import contextlib
import io
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- the example below runs in tests/test_readme_example.py -->"


def _example() -> str:
    text = README.read_text()
    assert MARKER in text, "the README lost the tested example's marker"
    block = re.search(r"```python\n(.*?)```", text[text.index(MARKER) :], re.S)
    return block.group(1)


def test_the_readme_poisson_pca_example_runs_as_written():
    scope: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(_example(), str(README), "exec"), scope)
    printed = out.getvalue()
    fits, gaps = scope["fits"], scope["gaps"]
    assert set(fits) == {"amortized", "per_example", "semi_amortized"}
    for fit in fits.values():  # all three train (a raw-count encoder started at an infinite loss)
        losses = np.asarray(fit.history["train_loss"][1])
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
    summary = gaps.summary()
    # q* is fitted per person starting from q, so L[q*] >= L[q], and log p̂ sits above L[q*]
    amort, approx = summary["amortization_gap"], summary["approximation_gap"]
    assert summary["negative_approximation_gaps"] == 0
    # what the README says the example shows: the encoder is far from each person's best
    # Gaussian (a gap several standard errors above 0), per-example fits train far higher
    elbo = {name: float(re.search(rf"{name}: training ELBO (-?[\d.]+)", printed).group(1))
            for name in fits}  # fmt: skip
    assert amort["mean"] > 2 * amort["se"]
    assert elbo["per_example"] > elbo["amortized"] + 20
    # and the numbers it prints are the README's: to the digits it shows with the JAX version
    # it names; with another, within what forty epochs of another rounding moved them (jax
    # 0.12: 0.9 nats of training ELBO, 0.03 and 0.7 nats of the gaps)
    said = re.search(
        r"with jax ([\d.]+),.*?training ELBOs of\s+(-?[\d.]+) \(amortized\), (-?[\d.]+)\s+"
        r"\(per-example\) and (-?[\d.]+) \(semi-amortized\).*?approximation gap of ([\d.]+) "
        r"± [\d.]+ and an amortization gap of ([\d.]+) ± [\d.]+\s+nats",
        README.read_text(),
        re.S,
    )
    assert said, "the README's sentence with the example's numbers changed: update this test"
    version, *numbers = said.groups()
    amortized, per_example, semi, approx_said, amort_said = map(float, numbers)
    same = version == jax.__version__
    assert elbo["amortized"] == pytest.approx(amortized, abs=0.3 if same else 2.0)
    assert elbo["per_example"] == pytest.approx(per_example, abs=0.3 if same else 2.0)
    assert elbo["semi_amortized"] == pytest.approx(semi, abs=0.3 if same else 2.0)
    assert approx["mean"] == pytest.approx(approx_said, abs=0.02 if same else 0.1)
    assert amort["mean"] == pytest.approx(amort_said, abs=0.2 if same else 1.5)


RESULTS = README.parent / "docs" / "results"
MODELS = {
    "MNIST, FFG": "mnist_diagonal",
    "MNIST, Flow": "mnist_flow",
    "Fashion-MNIST, FFG": "fashion_mnist_diagonal",
    "Fashion-MNIST, Flow": "fashion_mnist_flow",
}


def _cell(value: dict) -> str:
    return f"{value['mean']:.2f} ± {value['se']:.2f}"


def test_the_readme_gap_table_is_the_committed_runs_metrics():
    """Every cell of the README's amortization_gap table is the committed run's metrics.json
    (docs/results/amortization_gap_quick/), to the digits shown: a table copied by hand could
    drift from the run it names."""
    metrics = json.loads((RESULTS / "amortization_gap_quick" / "metrics.json").read_text())
    rows = [
        [c.strip() for c in line.strip("|").split("|")]
        for line in README.read_text().splitlines()
        if re.match(r"\| (train|test) \| (MNIST|Fashion-MNIST), (FFG|Flow) \|", line)
    ]
    assert len(rows) == 8, rows
    for split, model, log_px, elbo_qstar, elbo_q, approx, amort, inference, estimator in rows:
        m = metrics["models"][MODELS[model]][split]
        assert [log_px, elbo_qstar, elbo_q, approx, amort, inference, estimator] == [
            _cell(m["log_px"]), f"{m['elbo_qstar']['mean']:.2f}", f"{m['elbo_q']['mean']:.2f}",
            _cell(m["approximation_gap"]), _cell(m["amortization_gap"]),
            _cell(m["inference_gap"]), "AIS" if m["log_px_estimator"] == "ais" else "mixture",
        ], (split, model)  # fmt: skip


def test_the_readme_vae_table_is_the_committed_runs_metrics():
    """The README's vae_mnist table is the committed run's metrics.json
    (docs/results/vae_mnist_quick/), to the digits shown."""
    metrics = json.loads((RESULTS / "vae_mnist_quick" / "metrics.json").read_text())
    test, loss = metrics["test"], metrics["final_train_loss"]
    text = README.read_text()
    expected = [
        f"| ELBO | encoder | ELBO | 100 | test | {test['elbo_points']:,} | "
        f"{test['elbo']:.2f} ± {test['elbo_se']:.2f} |",
        f"| log p(x) | encoder | IWAE-5000 | {test['iwae_samples']} | test | "
        f"{test['iwae_points']:,} (seeded random) | {test['iwae']:.2f} ± {test['iwae_se']:.2f} |",
        f"| ELBO on the same {test['iwae_points']:,} points | encoder | ELBO | 5000 | test | "
        f"{test['iwae_points']:,} | {test['elbo_on_iwae_points']:.2f} |",
        f"| training loss, last epoch | encoder | -ELBO | 1 | train | 50,000 | {loss:.2f} |",
    ]
    for row in expected:
        assert row in text, row


def test_the_readme_item_response_table_is_the_committed_runs_metrics():
    """The README's item_response table is the committed run's metrics.json
    (docs/results/item_response_quick/), every cell to the digits shown."""
    metrics = json.loads((RESULTS / "item_response_quick" / "metrics.json").read_text())
    text = README.read_text()
    names = {
        "amortized": "amortized (encoder)",
        "per_example": "per-example (q* from N(0, I) for new people)",
        "semi_amortized": "semi-amortized (SA, K=5 steps of 10 draws)",
    }
    for regime, name in names.items():
        m = metrics["regimes"][regime]
        keys = ("heldout_log_px_learned_questions", "heldout_elbo", "inference_gap_heldout")
        cells = [f"{m[k][0]:.3f} ± {m[k][1]:.3f}" for k in keys]
        row = (
            f"| {name} | {' | '.join(cells)} | {m['trait_r2_heldout']:.3f} | "
            f"{m['difficulty_corr']:.3f}, {m['discrimination_corr']:.3f} | "
            f"{m['train_seconds']:.1f} | "
        )
        assert row in text, row
    ref = metrics["reference"]
    log_px, se = ref["heldout_log_px_true_questions"]
    assert f"exact posterior means | {log_px:.3f} ± {se:.3f} | | 0 | " in text
    assert f"| {ref['trait_r2_exact_posterior']:.3f} | 1, 1 |" in text


def test_the_readme_semi_amortized_table_is_the_committed_runs_metrics():
    """The README's semi_amortized table is the committed run's metrics.json
    (docs/results/semi_amortized_quick/), every cell to the digits shown."""
    metrics = json.loads((RESULTS / "semi_amortized_quick" / "metrics.json").read_text())
    methods = metrics["methods"]
    names = {
        "vae": "VAE",
        "svi": "per-example SVI (K=5 from the prior)",
        "vae_svi": "VAE+SVI",
        "vae_svi_kl": "VAE+SVI+KL",
        "sa_vae": "SA-VAE",
    }
    text = README.read_text()
    for key, name in names.items():
        m = methods[key]
        cells = [
            "—" if m[k] is None else f"{m[k][0]:.2f} ± {m[k][1]:.2f}"
            for k in ("encoder_elbo", "refined_elbo", "iwae")
        ]
        row = f"| {name} | {' | '.join(cells)} | {m['kl'][0]:.2f} | {m['train_seconds']:.0f} |"
        assert row in text, row
