"""The README's own-model example (Poisson PCA in three regimes, then its gap decomposition)
runs as written, and its numbers are what the README says they show."""

import contextlib
import io
import re
from pathlib import Path

import numpy as np

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
    # q* is fitted per person starting from q, so L[q*] >= L[q]: the amortization gap is >= 0
    # within its standard error, and log p̂ sits above L[q*]
    amort = summary["amortization_gap"]
    assert amort["mean"] > -3 * amort["se"]
    assert summary["approximation_gap"]["mean"] > -0.05
    assert summary["negative_approximation_gaps"] == 0
    assert "amortization_gap:" in printed and "training ELBO" in printed
