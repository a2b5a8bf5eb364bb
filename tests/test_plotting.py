"""Tests for amortjax.plotting: drawn content, layout, error messages and PNG output."""

from __future__ import annotations

import re

import matplotlib.image as mpimg
import numpy as np
import pytest
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from scipy.stats import norm

from amortjax import plotting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def drawn(fig: Figure, i: int = 0) -> np.ndarray:
    """The array of the single image drawn in axes i of fig."""
    ax = fig.axes[i]
    assert len(ax.images) == 1
    return np.asarray(ax.images[0].get_array())


def block(big: np.ndarray, r: int, c: int, h: int, w: int, pad: int) -> np.ndarray:
    return big[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


# --- image_grid ---------------------------------------------------------------------------


def test_image_grid_constant_tiles_and_padding() -> None:
    n, h, w, ncols = 7, 4, 3, 3
    images = np.stack([np.full((h * w,), i / n) for i in range(n)])
    fig = plotting.image_grid(images, ncols=ncols, image_shape=(h, w))
    assert isinstance(fig, Figure)
    big = drawn(fig)
    assert big.shape == (3 * h + 2, 3 * w + 2)
    for i in range(n):
        np.testing.assert_allclose(block(big, i // ncols, i % ncols, h, w, 1), i / n)
    # Separators and the two unused cells of the last row are white (1.0).
    assert np.all(big[h, :] == 1.0) and np.all(big[:, w] == 1.0)
    np.testing.assert_array_equal(block(big, 2, 1, h, w, 1), 1.0)
    np.testing.assert_array_equal(block(big, 2, 2, h, w, 1), 1.0)


def test_image_grid_keeps_pixel_layout_and_style(rng: np.random.Generator) -> None:
    h, w = 5, 4
    images = rng.uniform(size=(6, h * w))
    fig = plotting.image_grid(images, ncols=4, image_shape=(h, w), title="hello")
    big = drawn(fig)
    for i in range(6):
        np.testing.assert_array_equal(block(big, i // 4, i % 4, h, w, 1), images[i].reshape(h, w))
    # [n, h, w] input draws the same thing.
    big3 = drawn(plotting.image_grid(images.reshape(6, h, w), ncols=4, image_shape=(h, w)))
    np.testing.assert_array_equal(big, big3)
    ax = fig.axes[0]
    im = ax.images[0]
    assert im.get_cmap().name == "gray"
    assert im.get_clim() == (0.0, 1.0)
    assert list(ax.get_xticks()) == [] and list(ax.get_yticks()) == []
    assert ax.get_title() == "hello"


def test_image_grid_caps_ncols_at_n() -> None:
    big = drawn(plotting.image_grid(np.zeros((3, 784)), ncols=10))
    assert big.shape == (28, 3 * 28 + 2)


def test_image_grid_draws_into_given_axes() -> None:
    fig = Figure()
    ax_left, ax_right = fig.subplots(1, 2)
    out = plotting.image_grid(np.full((2, 784), 0.5), ax=ax_right)
    assert out is fig
    assert len(ax_left.images) == 0 and len(ax_right.images) == 1


@pytest.mark.parametrize("shape", [(5, 783), (5, 28, 27), (784,), (0, 784)])
def test_image_grid_wrong_shape_names_it(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=re.escape(str(shape))):
        plotting.image_grid(np.zeros(shape))


def test_figures_do_not_touch_pyplot() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plotting.image_grid(np.zeros((2, 784)))
    plotting.training_curves_figure({"a": ([1], [1.0])})
    assert plt.get_fignums() == before


# --- reconstructions / prior samples --------------------------------------------------------


def test_reconstructions_rows(rng: np.random.Generator) -> None:
    h, w = 4, 4
    x = rng.uniform(size=(12, h * w))
    x_recon = rng.uniform(size=(12, h * w))
    fig = plotting.reconstructions_figure(x, x_recon, n=5, image_shape=(h, w))
    assert len(fig.axes) == 2
    top, bottom = drawn(fig, 0), drawn(fig, 1)
    assert top.shape == bottom.shape == (h, 5 * w + 4)
    for j in range(5):
        np.testing.assert_array_equal(block(top, 0, j, h, w, 1), x[j].reshape(h, w))
        np.testing.assert_array_equal(block(bottom, 0, j, h, w, 1), x_recon[j].reshape(h, w))
    assert fig.axes[0].get_ylabel() == "data"
    assert fig.axes[1].get_ylabel() == "reconstruction"


def test_reconstructions_caps_n_and_checks_shapes() -> None:
    fig = plotting.reconstructions_figure(np.zeros((3, 784)), np.ones((3, 28, 28)), n=10)
    assert drawn(fig, 1).shape == (28, 3 * 28 + 2)
    with pytest.raises(ValueError, match="same shape"):
        plotting.reconstructions_figure(np.zeros((3, 784)), np.zeros((4, 784)))
    with pytest.raises(ValueError, match=r"\(3, 100\)"):
        plotting.reconstructions_figure(np.zeros((3, 784)), np.zeros((3, 100)))


def test_prior_samples_figure(rng: np.random.Generator) -> None:
    images = rng.uniform(size=(4, 784))
    fig = plotting.prior_samples_figure(images, ncols=2, title="p(x|z)")
    big = drawn(fig)
    assert big.shape == (2 * 28 + 1, 2 * 28 + 1)
    np.testing.assert_array_equal(block(big, 1, 1, 28, 28, 1), images[3].reshape(28, 28))
    assert fig.axes[0].get_title() == "p(x|z)"


# --- training curves ------------------------------------------------------------------------


def test_training_curves_one_line_per_metric() -> None:
    history = {
        "train_loss": ([1, 2, 3, 4], [190.0, 120.0, 110.0, 105.0]),
        "valid_elbo": ([2, 4], [-118.0, -107.0]),
    }
    fig = plotting.training_curves_figure(history)
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines] == ["train_loss", "valid_elbo"]
    for line, (epochs, values) in zip(ax.lines, history.values(), strict=True):
        np.testing.assert_array_equal(line.get_xdata(), epochs)
        np.testing.assert_array_equal(line.get_ydata(), values)
    assert ax.get_xlabel() == "epoch"
    assert ax.get_ylabel() == "nats per datapoint"
    legend = ax.get_legend()
    assert legend is not None
    assert [t.get_text() for t in legend.get_texts()] == ["train_loss", "valid_elbo"]


def test_training_curves_nan_inf_and_empty(tmp_path) -> None:
    history = {
        "loss": ([1, 2, 3], [np.nan, 5.0, np.inf]),
        "empty": ([], []),
        "all_nan": ([1], [float("nan")]),
    }
    fig = plotting.training_curves_figure(history)
    ax = fig.axes[0]
    assert len(ax.lines) == 3
    y = np.asarray(ax.lines[0].get_ydata(), dtype=float)
    assert np.isnan(y[0]) and y[1] == 5.0 and np.isnan(y[2])
    assert ax.lines[1].get_label() == "empty (no data)"
    assert ax.lines[2].get_label() == "all_nan (no data)"
    # Drawing must not fail either.
    assert plotting.save_figure(fig, tmp_path / "c.png").stat().st_size > 0
    empty_ax = plotting.training_curves_figure({}).axes[0]
    assert len(empty_ax.lines) == 0 and empty_ax.get_legend() is None


def test_training_curves_rejects_bad_entries() -> None:
    with pytest.raises(ValueError, match=r"history\['loss'\].*\(3,\) and \(2,\)"):
        plotting.training_curves_figure({"loss": ([1, 2, 3], [1.0, 2.0])})
    with pytest.raises(ValueError, match="pair"):
        plotting.training_curves_figure({"loss": [1.0, 2.0, 3.0]})


# --- manifold -------------------------------------------------------------------------------


def test_latent_grid_quantiles() -> None:
    g = 4
    z = plotting.latent_grid(g)
    q = norm.ppf(np.linspace(0.05, 0.95, g))
    assert z.shape == (g * g, 2)
    np.testing.assert_allclose(z[0], [q[0], q[-1]])  # top-left: smallest z1, largest z2
    np.testing.assert_allclose(z[g - 1], [q[-1], q[-1]])  # top-right
    np.testing.assert_allclose(z[-1], [q[-1], q[0]])  # bottom-right
    np.testing.assert_allclose(q[-1], 1.6448536269514722)


def test_manifold_decodes_grid_once_and_places_tiles() -> None:
    g, h, w = 5, 2, 4
    p = np.linspace(0.05, 0.95, g)
    q = norm.ppf(p)
    calls = []

    def decode(z):
        calls.append(np.array(z))
        # Left half of each image holds Phi(z1), right half Phi(z2).
        left = np.repeat(norm.cdf(z[:, :1]), h * w // 2, axis=1).reshape(-1, h, w // 2)
        right = np.repeat(norm.cdf(z[:, 1:]), h * w // 2, axis=1).reshape(-1, h, w // 2)
        return np.concatenate([left, right], axis=2).reshape(-1, h * w)

    fig = plotting.manifold_figure(decode, grid_size=g, image_shape=(h, w))
    assert len(calls) == 1
    z = calls[0]
    assert z.shape == (g * g, 2) and z.dtype == np.float32
    expected = np.array([[q[c], q[g - 1 - r]] for r in range(g) for c in range(g)])
    np.testing.assert_allclose(z, expected, rtol=1e-6)
    big = drawn(fig)
    assert big.shape == (g * h, g * w)
    for r in range(g):
        for c in range(g):
            cell = block(big, r, c, h, w, 0)
            np.testing.assert_allclose(cell[:, : w // 2], p[c], atol=1e-6)
            np.testing.assert_allclose(cell[:, w // 2 :], p[g - 1 - r], atol=1e-6)


def test_manifold_accepts_jax_decode() -> None:
    import jax.numpy as jnp

    fig = plotting.manifold_figure(
        lambda z: jnp.tile(jnp.asarray(z)[:, :1] * 0 + 0.25, (1, 9)),
        grid_size=3,
        image_shape=(3, 3),
    )
    np.testing.assert_allclose(drawn(fig), 0.25)


def test_manifold_wrong_decode_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"\[9, 784\].*returned shape \(9, 10\)"):
        plotting.manifold_figure(lambda z: np.zeros((z.shape[0], 10)), grid_size=3)
    with pytest.raises(ValueError, match=r"returned shape \(8, 784\)"):
        plotting.manifold_figure(lambda z: np.zeros((z.shape[0] - 1, 784)), grid_size=3)
    with pytest.raises(ValueError, match="extent"):
        plotting.manifold_figure(lambda z: np.zeros((4, 784)), grid_size=2, extent=(0.0, 1.0))


# --- save_figure ----------------------------------------------------------------------------


def test_save_figure_writes_png_in_new_folders(tmp_path) -> None:
    fig = plotting.image_grid(np.full((4, 784), 0.3), ncols=2)
    target = tmp_path / "a" / "b" / "grid.png"
    out = plotting.save_figure(fig, str(target))
    assert out == target and target.is_file()
    data = target.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 100
    pixels = mpimg.imread(target)
    assert pixels.ndim == 3 and pixels.shape[0] > 10 and pixels.shape[1] > 10


def test_save_figure_rejects_non_png(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"\.png"):
        plotting.save_figure(Figure(), tmp_path / "fig.pdf")
    assert not (tmp_path / "fig.pdf").exists()


# --- gap figures ------------------------------------------------------------------------------


def test_gap_bands_figure_draws_three_curves_and_two_bands() -> None:
    epochs = [1, 5, 10]
    series = {
        "log_px": (epochs, [-100.0, -95.0, -93.0]),
        "elbo_qstar": (epochs, [-102.0, -97.0, -94.5]),
        "elbo_q": (epochs, [-105.0, -99.0, -96.0]),
    }
    fig = plotting.gap_bands_figure({"train": series, "valid": series}, title="t")
    assert len(fig.axes) == 2
    for ax in fig.axes:
        np.testing.assert_allclose(ax.lines[0].get_ydata(), series["log_px"][1])
        np.testing.assert_allclose(ax.lines[2].get_ydata(), series["elbo_q"][1])
        assert len(ax.collections) == 2  # approximation band, amortization band
        # The amortization band spans L[q] .. L[q*] at every epoch.
        verts = ax.collections[1].get_paths()[0].vertices
        assert verts[:, 1].min() == pytest.approx(-105.0)
        assert verts[:, 1].max() == pytest.approx(-94.5)
    with pytest.raises(ValueError, match=r"lacks the series \['elbo_q'\]"):
        plotting.gap_bands_figure({"train": {k: series[k] for k in ("log_px", "elbo_qstar")}})
    bad = {**series, "elbo_q": ([1, 5, 11], [-1.0, -1.0, -1.0])}
    with pytest.raises(ValueError, match="not on the epochs"):
        plotting.gap_bands_figure({"train": bad})


def test_gap_bars_figure_stacks_amortization_on_approximation() -> None:
    fig = plotting.gap_bars_figure(
        {"a": (1.0, 2.0), "b": (3.0, 0.5)}, errors={"a": (0.1, 0.2), "b": (0.3, 0.1)}
    )
    ax = fig.axes[0]
    approx, amort = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [p.get_height() for p in approx] == [1.0, 3.0]
    assert [p.get_height() for p in amort] == [2.0, 0.5]
    assert [p.get_y() for p in amort] == [1.0, 3.0]  # stacked on the approximation gap
    with pytest.raises(ValueError, match="empty"):
        plotting.gap_bars_figure({})


def test_density_panels_figure_per_datapoint_grids() -> None:
    m = 5
    ticks = np.linspace(-1, 1, m)
    g = np.stack(np.meshgrid(ticks, ticks), -1)
    grids = np.stack([g, 10 + g])  # two datapoints, two grids
    dens = {"true": np.ones((2, m, m)), "q": np.ones((2, m, m))}
    fig = plotting.density_panels_figure(grids, dens, points=["a", "b"])
    assert len(fig.axes) == 4
    assert fig.axes[0].get_title() == "true" and fig.axes[2].get_ylabel() == "b"
    assert fig.axes[2].get_xlim()[0] >= 9.0  # row 2 drawn on its own grid
    fig = plotting.density_panels_figure(g, dens)  # one grid shared by the rows
    assert len(fig.axes) == 4
    with pytest.raises(ValueError, match=r"densities\['q'\] must be \[num_points, 5, 5\]"):
        plotting.density_panels_figure(g, {"true": np.ones((2, m, m)), "q": np.ones((2, 4, 4))})
    with pytest.raises(ValueError, match=r"grid must be"):
        plotting.density_panels_figure(np.zeros((5, 4, 2)), dens)


# --- latent traversals, activity, embeddings --------------------------------------------------


def test_traversal_latents_vary_one_dimension_per_row() -> None:
    base = np.array([0.5, -1.0, 2.0])
    z = plotting.traversal_latents(base, [2, 0], [-1.0, 0.0, 1.0])
    assert z.shape == (6, 3)
    np.testing.assert_array_equal(z[0], [0.5, -1.0, -1.0])  # row 0 moves z[2]
    np.testing.assert_array_equal(z[2], [0.5, -1.0, 1.0])
    np.testing.assert_array_equal(z[4], [0.0, -1.0, 2.0])  # row 1 moves z[0]
    with pytest.raises(ValueError, match=r"indices in \[0, 3\)"):
        plotting.traversal_latents(base, [3], [0.0])
    with pytest.raises(ValueError, match="base_z"):
        plotting.traversal_latents(np.zeros((2, 3)), [0], [0.0])


def test_traversals_figure_decodes_once_and_tiles_rows_by_dimension() -> None:
    h, w, z_dim = 2, 3, 4
    values = [-2.0, 0.0, 2.0, 4.0]
    calls = []

    def decode(z):
        calls.append(np.array(z))
        # Every pixel of an image shows sigmoid(sum of z): rows differ only by the moved z.
        return np.repeat(1 / (1 + np.exp(-z.sum(axis=1, keepdims=True))), h * w, axis=1)

    base = np.array([0.1, 0.2, 0.3, 0.4])
    fig = plotting.traversals_figure(decode, base, [1, 3], values=values, image_shape=(h, w))
    assert len(calls) == 1 and calls[0].shape == (8, z_dim) and calls[0].dtype == np.float32
    big = drawn(fig)
    assert big.shape == (2 * h + 1, 4 * w + 3)
    for r, d in enumerate([1, 3]):
        for c, v in enumerate(values):
            expected = 1 / (1 + np.exp(-(base.sum() - base[d] + v)))
            np.testing.assert_allclose(block(big, r, c, h, w, 1), expected, rtol=1e-6)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["z[1]", "z[3]"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["-2", "0", "2", "4"]
    with pytest.raises(ValueError, match=r"returned shape \(8, 5\)"):
        plotting.traversals_figure(
            lambda z: np.zeros((z.shape[0], 5)), base, [1, 3], values=values, image_shape=(h, w)
        )


def test_traversals_figure_draws_into_given_axes() -> None:
    fig = Figure()
    ax = fig.subplots()
    out = plotting.traversals_figure(lambda z: np.zeros((z.shape[0], 784)), np.zeros(2), [0], ax=ax)
    assert out is fig and len(ax.images) == 1


def test_activity_figure_sorts_highlights_and_draws_the_threshold() -> None:
    variance = np.array([1e-4, 2.0, 0.0, 0.05])
    kl = np.array([0.01, 3.0, 0.0, 0.5])
    fig = plotting.activity_figure(variance, kl, threshold=0.01)
    assert len(fig.axes) == 2
    ax_kl, ax_var = fig.axes
    order = [1, 3, 0, 2]  # by decreasing variance
    (kl_bars,) = [c for c in ax_kl.containers if isinstance(c, BarContainer)]
    (var_bars,) = [c for c in ax_var.containers if isinstance(c, BarContainer)]
    assert [p.get_height() for p in kl_bars] == list(kl[order])
    assert [p.get_height() for p in var_bars] == list(variance[order])
    assert [t.get_text() for t in ax_var.get_xticklabels()] == ["1", "3", "0", "2"]
    assert ax_var.get_yscale() == "log"
    (line,) = ax_var.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), [0.01, 0.01])
    # The two active units share one colour, the inactive ones another.
    colours = [tuple(p.get_facecolor()) for p in var_bars]
    assert colours[0] == colours[1] != colours[2] == colours[3]
    assert "2 of 4 units active" in fig.get_suptitle()
    # In index order, and without the KL panel.
    fig = plotting.activity_figure(variance, sort=False)
    assert len(fig.axes) == 1
    (bars,) = fig.axes[0].containers
    assert [p.get_height() for p in bars] == list(variance)


def test_activity_figure_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match=r"variance must be.*\(2, 2\)"):
        plotting.activity_figure(np.ones((2, 2)))
    with pytest.raises(ValueError, match=r"variance must be"):
        plotting.activity_figure(np.array([1.0, -0.1]))
    with pytest.raises(ValueError, match=r"kl must be.*\(3,\)"):
        plotting.activity_figure(np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="threshold"):
        plotting.activity_figure(np.ones(2), threshold=0.0)


def test_embedding_figure_two_dims_one_scatter_per_class(rng: np.random.Generator) -> None:
    means = rng.normal(size=(30, 2))
    labels = np.repeat([2, 0, 1], 10)
    fig = plotting.embedding_figure(means, labels)
    ax = fig.axes[0]
    assert len(ax.collections) == 3  # classes 0, 1, 2 in increasing order
    for k, c in enumerate([0, 1, 2]):
        np.testing.assert_allclose(ax.collections[k].get_offsets(), means[labels == c])
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == ["0", "1", "2"]
    assert ax.get_xlabel() == "z[0]" and ax.get_ylabel() == "z[1]"


def test_embedding_figure_projects_on_principal_components(rng: np.random.Generator) -> None:
    # Points spread mostly along two known orthogonal directions of a 5-D space.
    basis = np.linalg.qr(rng.normal(size=(5, 5)))[0]
    coords = rng.normal(size=(200, 5)) * np.array([5.0, 2.0, 0.1, 0.1, 0.1])
    means = coords @ basis.T + 3.0
    fig = plotting.embedding_figure(means)  # no labels: one scatter
    ax = fig.axes[0]
    (scatter,) = ax.collections
    xy = np.asarray(scatter.get_offsets())
    # Reference: eigenvectors of the covariance, compared up to each axis's sign.
    evals, evecs = np.linalg.eigh(np.cov(means.T, bias=True))
    ref = (means - means.mean(axis=0)) @ evecs[:, ::-1][:, :2]
    for i in range(2):
        sign = np.sign(xy[:, i] @ ref[:, i])
        np.testing.assert_allclose(xy[:, i], sign * ref[:, i], rtol=1e-6, atol=1e-8)
    share = evals[::-1][0] / evals.sum()
    assert ax.get_xlabel() == f"PC 1 of the 5-D means ({share:.0%} of variance)"
    assert ax.get_ylabel().startswith("PC 2 of the 5-D means")
    assert ax.get_legend() is None


def test_embedding_figure_continuous_labels_colorbar_and_errors(rng) -> None:
    means = rng.normal(size=(20, 3))
    fig = plotting.embedding_figure(means, rng.uniform(size=20))
    assert len(fig.axes) == 2  # the scatter's axes and its colorbar
    fig = Figure()
    ax = fig.subplots()
    assert plotting.embedding_figure(means, np.arange(20) % 4, ax=ax) is fig
    assert len(ax.collections) == 4
    with pytest.raises(ValueError, match=r"z_dim >= 2.*\(20, 1\)"):
        plotting.embedding_figure(means[:, :1])
    with pytest.raises(ValueError, match=r"labels must have shape \[20\]"):
        plotting.embedding_figure(means, np.zeros(19))
    with pytest.raises(ValueError, match="finite"):
        plotting.embedding_figure(np.full((3, 2), np.nan))


def test_recovery_figure_scatters_each_estimate_against_the_truth(rng) -> None:
    truth = rng.normal(size=(30, 2))
    estimates = {"a": truth + 0.1, "b": -truth}
    fig = plotting.recovery_figure(estimates, truth, scores={"a": 0.99}, dim=1)
    ax_a, ax_b = fig.axes
    np.testing.assert_allclose(ax_a.collections[0].get_offsets(), truth[:, [1, 1]] + [0, 0.1])
    np.testing.assert_allclose(ax_b.collections[0].get_offsets()[:, 1], -truth[:, 1])
    assert ax_a.get_title() == "a: R² 0.990" and ax_b.get_title() == "b"
    with pytest.raises(ValueError, match=r"estimates\['a'\] has shape \(29, 2\)"):
        plotting.recovery_figure({"a": truth[:29]}, truth)
