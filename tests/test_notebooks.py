"""Every notebook in notebooks/ runs headless, top to bottom, without an error.

Each `notebooks/*.ipynb` is executed by nbclient in a fresh IPython kernel that runs this
interpreter (the virtualenv's Python, whatever kernelspecs are installed elsewhere), in
notebooks/ as working directory, with ``AMORTJAX_NOTEBOOK_SMALL=1`` so that its settings shrink
to a smoke-test size. A cell that raises fails the test. A cell tagged ``results`` must print a
JSON object as its last line; notebooks listed in `RESULT_CHECKS` get their numbers checked.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import nbclient
import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpec, KernelSpecManager
from jupyter_client.manager import KernelManager

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
CELL_TIMEOUT_S = 300
KERNEL_ENV = {"AMORTJAX_NOTEBOOK_SMALL": "1"}


class _ThisPythonKernelSpecs(KernelSpecManager):
    """Resolves every kernel name to an ipykernel running `sys.executable`, so an installed
    "python3" kernelspec of another interpreter can never be picked up."""

    def get_kernel_spec(self, kernel_name: str) -> KernelSpec:
        return KernelSpec(
            argv=[sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            display_name=f"Python ({sys.executable})",
            language="python",
            env=KERNEL_ENV,
        )


def _execute(path: Path):
    nb = nbformat.read(path, as_version=4)
    km = KernelManager(kernel_name="python3", kernel_spec_manager=_ThisPythonKernelSpecs())
    client = nbclient.NotebookClient(
        nb,
        km=km,
        timeout=CELL_TIMEOUT_S,
        allow_errors=False,
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute()  # raises CellExecutionError on the first cell that raises
    return nb


def _stdout(cell) -> str:
    return "".join(
        o.get("text", "")
        for o in cell.get("outputs", [])
        if o.get("output_type") == "stream" and o.get("name") == "stdout"
    )


def _results(nb) -> dict | None:
    """The JSON object printed last by the cell tagged "results", or None if there is none."""
    cells = [c for c in nb.cells if "results" in c.get("metadata", {}).get("tags", [])]
    if not cells:
        return None
    assert len(cells) == 1, "more than one cell is tagged 'results'"
    lines = _stdout(cells[0]).strip().splitlines()
    assert lines, "the cell tagged 'results' printed nothing"
    results = json.loads(lines[-1])
    assert isinstance(results, dict), results
    return results


def _check_quickstart(nb, results: dict | None) -> None:
    assert results is not None, "quickstart.ipynb must have a cell tagged 'results'"
    keys = (
        "test_elbo",
        "test_iwae",
        "log_px",
        "elbo_qstar",
        "elbo_q",
        "approximation_gap",
        "amortization_gap",
        "inference_gap",
    )
    for key in keys:
        assert math.isfinite(results[key]), (key, results)
    # The small settings must really be in force.
    assert results["eval_points"] <= 50 and results["gap_points"] <= 50, results
    # ELBO and IWAE come from the same draws: IWAE >= ELBO digit by digit, so in the mean.
    assert results["test_elbo"] <= results["test_iwae"], results
    # A trained model, even a tiny one, is far better than chance (784 log 2 = 543 nats).
    assert -400 < results["test_elbo"] < -50, results
    # q* starts at the encoder's output and only climbs; log p̂(x) bounds both ELBOs.
    assert results["elbo_q"] < results["elbo_qstar"] < results["log_px"], results
    assert results["amortization_gap"] > 0 and results["approximation_gap"] > 0, results
    assert results["inference_gap"] == pytest.approx(
        results["approximation_gap"] + results["amortization_gap"], abs=1e-3
    )
    # The figures were displayed as images.
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 4, f"expected the figures as PNG outputs, found {images}"


def _check_item_response(nb, results: dict | None) -> None:
    assert results is not None, "item_response.ipynb must have a cell tagged 'results'"
    # The small settings must really be in force.
    assert results["num_train"] + results["num_test"] <= 300, results
    assert results["num_questions"] <= 15 and results["epochs"] <= 20, results
    reference = results["reference"]
    regimes = results["regimes"]
    assert set(regimes) == {"amortized", "per-example", "semi-amortized"}, regimes
    for name, m in regimes.items():
        for key, value in m.items():
            assert math.isfinite(value), (name, key, value)
        # The ELBO of any q bounds the exact log p(x) (quadrature) of the same model: held-out
        # people, the regime's learned questions. Tolerance: Monte Carlo error of the ELBO.
        assert m["heldout_elbo"] <= m["heldout_log_px"] + 0.05, (name, m)
        assert m["inference_gap"] == pytest.approx(
            m["heldout_log_px"] - m["heldout_elbo"], abs=1e-3
        ), (name, m)
        # IWAE and ELBO come from the same draws; IWAE also bounds log p(x).
        assert m["heldout_elbo"] <= m["heldout_iwae"] <= m["heldout_log_px"] + 0.05, (name, m)
        # The traits are recovered, but no better than by the exact posterior means under the
        # true questions (the best estimate from the same answers), up to sampling noise.
        assert 0.0 < m["trait_r2_heldout"] <= reference["trait_r2_heldout"] + 0.05, (name, m)
        # The difficulties are learned (even in a few epochs they are the easy part).
        assert m["difficulty_corr"] > 0.3, (name, m)
    # Far better than chance (D log 2 nats per person) under the true questions.
    assert reference["heldout_log_px"] > -results["num_questions"] * math.log(2), reference
    # The figures (traits, questions) were displayed as images.
    images = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
    assert images >= 2, f"expected the figures as PNG outputs, found {images}"


RESULT_CHECKS: dict[str, Callable[[object, dict | None], None]] = {
    "quickstart.ipynb": _check_quickstart,
    "item_response.ipynb": _check_item_response,
}


def test_notebooks_exist():
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOK_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_clean(path: Path):
    """Notebooks are committed without outputs, so diffs show code and text only."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, f"cell {i} of {path.name} has stored outputs"
            assert cell.execution_count is None, f"cell {i} of {path.name} has a count"


# item_response.ipynb runs in `make test-slow` (~65 s in a fresh CI run); the default run keeps
# the regimes on that model (test_worked_models) and the quickstart notebook.
SLOW_NOTEBOOKS = {"item_response.ipynb"}


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.name in SLOW_NOTEBOOKS else p for p in NOTEBOOKS],
    ids=[p.name for p in NOTEBOOKS],
)
def test_notebook_runs(path: Path):
    nb = _execute(path)
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and cell.source.strip():
            assert cell.execution_count is not None, f"cell {i} of {path.name} did not run"
    results = _results(nb)
    if results is not None:
        for key, value in results.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, value)
    check = RESULT_CHECKS.get(path.name)
    if check is not None:
        check(nb, results)
