"""Matplotlib figures for inspecting trained VAEs: image grids, reconstructions, prior samples,
training curves, 2-D latent manifolds, the inference gaps (bands over training, stacked bars)
and 2-D posterior densities, plus a helper to save them as PNG.

What this module is for: turning arrays that the rest of amortjax already computed (pixel means,
metric histories) into `matplotlib.figure.Figure` objects that a notebook displays and an
experiment script saves with `save_figure`. Every function builds its own `Figure` through the
object-oriented API (`Figure(...)`, `fig.subplots`), never through `pyplot`, so it selects no
backend, works headless, registers nothing in pyplot's global figure list and leaks no state
between figures.

What it is not for: it computes no model quantities (no sampling, no ELBOs, no decoding except
through the `decode` callable given to `manifold_figure`), and it does not do publication-style
layout or styling beyond sensible defaults. Images are greyscale with pixel values in [0, 1]
(shown with a fixed colour scale, black = 0, white = 1); inputs may be NumPy or JAX arrays.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

__all__ = [
    "density_panels_figure",
    "gap_bands_figure",
    "gap_bars_figure",
    "image_grid",
    "latent_grid",
    "manifold_figure",
    "prior_samples_figure",
    "reconstructions_figure",
    "save_figure",
    "series_figure",
    "tile_images",
    "training_curves_figure",
]

# Inches per image cell in grid figures.
_CELL_INCHES = 0.6
# Value of the separating lines between tiles and of unused cells (white on the grey colormap).
_PAD_VALUE = 1.0


def _as_images(images, image_shape: tuple[int, int], name: str = "images") -> np.ndarray:
    """Return images as a float array `[n, h, w]`, accepting `[n, h * w]` or `[n, h, w]`."""
    arr = np.asarray(images, dtype=np.float64)
    shape = arr.shape
    h, w = image_shape
    if arr.ndim == 2 and arr.shape[1] == h * w:
        arr = arr.reshape(arr.shape[0], h, w)
    elif not (arr.ndim == 3 and arr.shape[1:] == (h, w)):
        raise ValueError(
            f"{name} must have shape [n, {h * w}] or [n, {h}, {w}] for image_shape="
            f"{tuple(image_shape)}, got shape {shape}"
        )
    if arr.shape[0] == 0:
        raise ValueError(f"{name} is empty (shape {shape}); there is nothing to draw")
    return arr


def tile_images(images: np.ndarray, ncols: int, *, pad: int = 1) -> np.ndarray:
    """Tile images into one big image, row by row, left to right.

    Args:
        images: `[n, h, w]` images.
        ncols: number of tiles per row; the number of rows is `ceil(n / ncols)`.
        pad: width in pixels of the separating lines between tiles (no outer border).
            Separators and cells past the last image are filled with 1.0 (white).

    Returns:
        `[nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad]` array in which image `i`
        occupies the block starting at row `(i // ncols) * (h + pad)`, column
        `(i % ncols) * (w + pad)`.
    """
    images = np.asarray(images)
    if images.ndim != 3:
        raise ValueError(f"images must have shape [n, h, w], got shape {images.shape}")
    if ncols < 1 or pad < 0:
        raise ValueError(f"need ncols >= 1 and pad >= 0, got ncols={ncols}, pad={pad}")
    n, h, w = images.shape
    nrows = max(1, math.ceil(n / ncols))
    out = np.full(
        (nrows * h + (nrows - 1) * pad, ncols * w + (ncols - 1) * pad),
        _PAD_VALUE,
        dtype=np.result_type(images.dtype, np.float32),
    )
    for i in range(n):
        r, c = divmod(i, ncols)
        out[r * (h + pad) : r * (h + pad) + h, c * (w + pad) : c * (w + pad) + w] = images[i]
    return out


def _show(ax: Axes, big_image: np.ndarray) -> None:
    """Draw a greyscale image with the fixed [0, 1] colour scale and no ticks."""
    ax.imshow(big_image, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _root_figure(ax: Axes) -> Figure:
    """The top-level Figure holding ax (also when ax lives in a SubFigure)."""
    try:
        return ax.get_figure(root=True)  # matplotlib >= 3.10
    except TypeError:  # pragma: no cover - older matplotlib
        return ax.figure.figure


def image_grid(
    images,
    *,
    ncols: int = 10,
    image_shape: tuple[int, int] = (28, 28),
    title: str | None = None,
    ax: Axes | None = None,
) -> Figure:
    """Draw images as one tiled greyscale grid (black = 0, white = 1), without ticks.

    The images are tiled row by row (see `tile_images`, with 1-pixel white separators) and drawn
    as a single `AxesImage`, so `ax.images[0].get_array()` is the tiled array.

    Args:
        images: `[n, h * w]` (e.g. `[n, 784]`) or `[n, h, w]` pixel values in [0, 1].
        ncols: tiles per row; capped at n, so a few images make a single short row.
        image_shape: `(h, w)` of one image.
        title: optional axes title.
        ax: axes to draw into; by default a new Figure with one axes is created.

    Returns:
        The Figure holding the grid (ax's top-level figure when ax is given).

    Raises:
        ValueError: if images has another shape, is empty, or ncols < 1.
    """
    imgs = _as_images(images, image_shape)
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")
    ncols = min(ncols, imgs.shape[0])
    nrows = math.ceil(imgs.shape[0] / ncols)
    if ax is None:
        fig = Figure(
            figsize=(
                max(2.0, ncols * _CELL_INCHES),
                max(1.0, nrows * _CELL_INCHES) + (0.4 if title else 0.0),
            ),
            layout="constrained",
        )
        ax = fig.subplots()
    else:
        fig = _root_figure(ax)
    _show(ax, tile_images(imgs, ncols))
    if title is not None:
        ax.set_title(title)
    return fig


def reconstructions_figure(
    x,
    x_recon,
    *,
    n: int = 10,
    image_shape: tuple[int, int] = (28, 28),
    title: str | None = "Data and reconstruction means",
) -> Figure:
    """Show the first n datapoints (top row) above their reconstructions (bottom row).

    The figure has two axes, each holding one image strip of n tiles (see `image_grid`): the top
    one labelled "data", the bottom one "reconstruction". Column j of both strips is datapoint j.

    Args:
        x: `[batch, h * w]` or `[batch, h, w]` data in [0, 1].
        x_recon: reconstruction mean probabilities, same shape as x (e.g. the decoder's Bernoulli
            means at z drawn from or at the mean of q(z | x)).
        n: number of datapoints to show; capped at batch.
        image_shape: `(h, w)` of one image.
        title: figure title, or None for none.

    Returns:
        A new Figure with two axes (data, reconstruction).

    Raises:
        ValueError: if x or x_recon has a wrong shape, their shapes differ, or n < 1.
    """
    data = _as_images(x, image_shape, name="x")
    recon = _as_images(x_recon, image_shape, name="x_recon")
    if data.shape != recon.shape:
        raise ValueError(
            f"x and x_recon must have the same shape, got {np.shape(x)} and {np.shape(x_recon)}"
        )
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n = min(n, data.shape[0])
    fig = Figure(
        figsize=(max(2.5, n * _CELL_INCHES + 0.6), 2 * _CELL_INCHES + (0.9 if title else 0.5)),
        layout="constrained",
    )
    ax_data, ax_recon = fig.subplots(2, 1)
    for ax, imgs, label in ((ax_data, data, "data"), (ax_recon, recon, "reconstruction")):
        _show(ax, tile_images(imgs[:n], n))
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
    if title is not None:
        fig.suptitle(title)
    return fig


def prior_samples_figure(
    images,
    *,
    ncols: int = 10,
    image_shape: tuple[int, int] = (28, 28),
    title: str | None = "Decoded samples from the prior",
) -> Figure:
    """Grid of images decoded from prior samples z ~ p(z) (e.g. Bernoulli means p(x | z)).

    A thin wrapper over `image_grid` with a default title.

    Args:
        images: `[n, h * w]` or `[n, h, w]` pixel means in [0, 1].
        ncols: tiles per row.
        image_shape: `(h, w)` of one image.
        title: axes title, or None for none.

    Returns:
        A new Figure.

    Raises:
        ValueError: as `image_grid`.
    """
    return image_grid(images, ncols=ncols, image_shape=image_shape, title=title)


def series_figure(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    *,
    xlabel: str,
    ylabel: str = "nats per datapoint",
    title: str | None = None,
    logx: bool = False,
    argname: str = "series",
) -> Figure:
    """Plot named series `(x, y)` on one axes, with a legend.

    Each series is one `Line2D` in `fig.axes[0].lines`, in the mapping's order, labelled with its
    name. Non-finite values (NaN, +-inf) are drawn as gaps; a series with no finite point still
    gets an (empty) legend entry marked "(no data)".

    Args:
        series: name -> (x values, y values), equal-length 1-D sequences.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: optional axes title.
        logx: logarithmic x axis (e.g. for costs spanning orders of magnitude).
        argname: what the caller calls `series`, for error messages.

    Returns:
        A new Figure with one axes.

    Raises:
        ValueError: if an entry is not a pair of equal-length 1-D sequences.
    """
    fig = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = fig.subplots()
    for name, entry in series.items():
        try:
            xs, ys = entry
        except (TypeError, ValueError):
            raise ValueError(
                f"{argname}[{name!r}] must be a pair (x, y), got {type(entry).__name__}"
            ) from None
        x = np.asarray(xs, dtype=np.float64).reshape(-1)
        y = np.asarray(ys, dtype=np.float64).reshape(-1)
        if x.shape != y.shape or np.ndim(xs) > 1 or np.ndim(ys) > 1:
            raise ValueError(
                f"{argname}[{name!r}]: x and y must be 1-D and of equal length, got "
                f"shapes {np.shape(xs)} and {np.shape(ys)}"
            )
        y = np.where(np.isfinite(y), y, np.nan)
        label = name if np.isfinite(y).any() else f"{name} (no data)"
        # Markers keep series recorded at a single point (or between gaps) visible.
        ax.plot(x, y, marker="o", markersize=3, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend()
    if title is not None:
        ax.set_title(title)
    return fig


def training_curves_figure(
    history: Mapping[str, tuple[Sequence[int], Sequence[float]]],
    *,
    title: str | None = None,
    ylabel: str = "nats per datapoint",
) -> Figure:
    """Plot each recorded metric against epoch on one axes, with a legend.

    Format of `history`: a mapping from metric name to a pair `(epochs, values)` of equal-length
    sequences, one value per epoch at which the metric was recorded, e.g.::

        {"train_loss": ([1, 2, 3, 4], [190.2, 120.5, 110.1, 105.3]),
         "valid_elbo": ([2, 4], [-118.7, -107.9])}

    Metrics may be recorded at different epochs (e.g. validation only every k epochs). All
    metrics share one y axis, so they should all be in nats per datapoint. Drawn by
    `series_figure` with x label "epoch".

    Args:
        history: metric name -> (epochs, values) as described above.
        title: optional axes title.
        ylabel: y-axis label.

    Returns:
        A new Figure with one axes, x label "epoch" and y label `ylabel`.

    Raises:
        ValueError: if a metric's entry is not a pair of equal-length 1-D sequences.
    """
    return series_figure(history, xlabel="epoch", ylabel=ylabel, title=title, argname="history")


def latent_grid(grid_size: int, extent: tuple[float, float] = (0.05, 0.95)) -> np.ndarray:
    """The `[grid_size**2, 2]` latent points that `manifold_figure` decodes, in tile order.

    With `q = Phi^{-1}(linspace(extent[0], extent[1], grid_size))` (standard-normal quantiles),
    row `k = r * grid_size + c` is the point shown in tile row r (from the top), column c (from
    the left): `(q[c], q[grid_size - 1 - r])`, so z[0] grows to the right and z[1] grows upwards.
    """
    lo, hi = extent
    if not 0.0 < lo < hi < 1.0:
        raise ValueError(f"extent must be probabilities 0 < lo < hi < 1, got {tuple(extent)}")
    if grid_size < 1:
        raise ValueError(f"grid_size must be >= 1, got {grid_size}")
    std_normal = NormalDist()
    q = np.array([std_normal.inv_cdf(p) for p in np.linspace(lo, hi, grid_size)])
    rows, cols = np.divmod(np.arange(grid_size * grid_size), grid_size)
    return np.stack([q[cols], q[grid_size - 1 - rows]], axis=1)


def manifold_figure(
    decode: Callable[[np.ndarray], object],
    *,
    grid_size: int = 20,
    extent: tuple[float, float] = (0.05, 0.95),
    image_shape: tuple[int, int] = (28, 28),
    title: str | None = "Learned data manifold",
) -> Figure:
    """Decode a regular grid over a 2-D latent space and tile the images into one big image.

    As in Kingma & Welling (2014), fig. 4: the coordinates of the grid are standard-normal
    quantiles of `linspace(extent[0], extent[1], grid_size)`, so that under a N(0, I) prior the
    grid covers the prior's mass evenly. `decode` is called once, with the `[grid_size**2, 2]`
    float32 array `latent_grid(grid_size, extent)`; z[0] grows to the right and z[1] upwards.
    Tiles are placed without separators (`tile_images(..., pad=0)`).

    Args:
        decode: maps latent points `[m, 2]` to pixel means `[m, h * w]` (or `[m, h, w]`) in
            [0, 1]; may return a NumPy or JAX array.
        grid_size: number of grid points per latent dimension.
        extent: `(lo, hi)` probabilities, `0 < lo < hi < 1`, of the outermost quantiles.
        image_shape: `(h, w)` of one image.
        title: axes title, or None for none.

    Returns:
        A new Figure with one axes showing the `[grid_size * h, grid_size * w]` image.

    Raises:
        ValueError: if decode returns a shape other than `[grid_size**2, h * w]` or
            `[grid_size**2, h, w]`, or if grid_size or extent is invalid.
    """
    z = latent_grid(grid_size, extent).astype(np.float32)
    m = grid_size * grid_size
    out = np.asarray(decode(z))
    h, w = image_shape
    if out.shape not in ((m, h * w), (m, h, w)):
        raise ValueError(
            f"decode must map latent points [{m}, 2] to [{m}, {h * w}] or [{m}, {h}, {w}] pixel "
            f"means (image_shape={tuple(image_shape)}), but returned shape {out.shape}"
        )
    big = tile_images(out.reshape(m, h, w).astype(np.float64), grid_size, pad=0)
    size = min(8.0, max(3.0, grid_size * 0.4))
    fig = Figure(figsize=(size, size + (0.3 if title else 0.0)), layout="constrained")
    ax = fig.subplots()
    _show(ax, big)
    ax.set_xlabel(r"$z_1 \rightarrow$")
    ax.set_ylabel(r"$z_2 \rightarrow$")
    if title is not None:
        ax.set_title(title)
    return fig


def gap_bands_figure(
    curves: Mapping[str, Mapping[str, tuple[Sequence[float], Sequence[float]]]],
    *,
    xlabel: str = "epoch",
    ylabel: str = "nats per datapoint",
    title: str | None = None,
    ncols: int = 2,
) -> Figure:
    """The gaps over training as stacked bands (Cremer et al. 2018, fig. 3), one panel per split.

    In each panel three curves are drawn, from the top: log p̂(x), L[q*] and L[q]. The band
    between log p̂(x) and L[q*] is the approximation gap, the band between L[q*] and L[q] the
    amortization gap; their sum is the inference gap.

    Args:
        curves: split name (e.g. "train", "valid") -> {"log_px", "elbo_qstar", "elbo_q"} ->
            (epochs, values), the three series on the same epochs.
        xlabel: x-axis label.
        ylabel: y-axis label.
        title: figure title.
        ncols: panels per row.

    Returns:
        A Figure with one axes per split (in `fig.axes`, row-major; unused cells hidden);
        each has the three lines in `ax.lines` (log p̂, L[q*], L[q]) and two filled bands in
        `ax.collections`.

    Raises:
        ValueError: if a split lacks one of the three series or their epochs differ.
    """
    names = ("log_px", "elbo_qstar", "elbo_q")
    labels = (r"$\log \hat p(x)$", r"$\mathcal{L}[q^*]$", r"$\mathcal{L}[q]$")
    if not curves:
        raise ValueError("curves is empty: give at least one split")
    ncols = min(ncols, len(curves))
    nrows = -(-len(curves) // ncols)
    fig = Figure(figsize=(5.0 * ncols, 3.6 * nrows), layout="constrained")
    grid = np.asarray(fig.subplots(nrows, ncols, squeeze=False))
    for ax in grid.flat[len(curves) :]:
        ax.set_axis_off()
    axes = grid.flat[: len(curves)]
    for ax, (split, series) in zip(axes, curves.items(), strict=True):
        missing = [n for n in names if n not in series]
        if missing:
            raise ValueError(f"curves[{split!r}] lacks the series {missing}")
        epochs = np.asarray(series["log_px"][0], dtype=np.float64)
        ys = []
        for n in names:
            e, y = (np.asarray(a, dtype=np.float64) for a in series[n])
            if e.shape != epochs.shape or not np.array_equal(e, epochs) or y.shape != e.shape:
                raise ValueError(f"curves[{split!r}][{n!r}] is not on the epochs of log_px")
            ys.append(y)
        for y, label in zip(ys, labels, strict=True):
            ax.plot(epochs, y, marker="o", markersize=3, label=label)
        ax.fill_between(epochs, ys[1], ys[0], alpha=0.3, label="approximation gap")
        ax.fill_between(epochs, ys[2], ys[1], alpha=0.3, label="amortization gap")
        ax.set_title(split)
        ax.set_xlabel(xlabel)
        ax.grid(True, alpha=0.3)
        ax.set_ylabel(ylabel)
    axes[0].legend(loc="lower right")
    if title is not None:
        fig.suptitle(title)
    return fig


def gap_bars_figure(
    gaps: Mapping[str, tuple[float, float]],
    *,
    errors: Mapping[str, tuple[float, float]] | None = None,
    ylabel: str = "nats per datapoint",
    title: str | None = None,
) -> Figure:
    """The inference gap of each model as a stacked bar: approximation below, amortization on top.

    Args:
        gaps: bar label (e.g. "mnist / FFG / test") -> (approximation gap, amortization gap).
        errors: optional standard errors, label -> (approximation se, amortization se).
        ylabel: y-axis label.
        title: axes title.

    Returns:
        A Figure with one axes holding two `BarContainer`s (approximation, amortization),
        plus error-bar containers when `errors` is given.
    """
    if not gaps:
        raise ValueError("gaps is empty: give at least one bar")
    labels = list(gaps)
    approx = np.array([gaps[k][0] for k in labels], dtype=np.float64)
    amort = np.array([gaps[k][1] for k in labels], dtype=np.float64)
    err_a = err_m = None
    if errors is not None:
        err_a = np.array([errors[k][0] for k in labels], dtype=np.float64)
        err_m = np.array([errors[k][1] for k in labels], dtype=np.float64)
    fig = Figure(figsize=(max(4.0, 1.0 + 0.9 * len(labels)), 4.0), layout="constrained")
    ax = fig.subplots()
    pos = np.arange(len(labels))
    ax.bar(pos, approx, yerr=err_a, label="approximation gap", capsize=3)
    ax.bar(pos, amort, bottom=approx, yerr=err_m, label="amortization gap", capsize=3)
    ax.set_xticks(pos, labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    if title is not None:
        ax.set_title(title)
    return fig


def density_panels_figure(
    grid: np.ndarray,
    densities: Mapping[str, np.ndarray],
    *,
    points: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """Densities over a 2-D latent grid as contour panels: one row per datapoint, one column
    per distribution (Cremer et al. 2018, fig. 2: true posterior beside each q).

    Args:
        grid: the latent points at which the densities were evaluated: `[m, m, 2]` shared by
            all rows, or `[num_points, m, m, 2]`, one grid per datapoint (e.g. centred on its
            posterior); grid[..., i, j, :] = (z1_j, z2_i) as from `np.meshgrid`.
        densities: column name -> `[num_points, m, m]` normalized densities (not logs) on grid.
        points: row names (one per datapoint); default "x1", "x2", ...
        title: figure title.

    Returns:
        A Figure with `num_points x len(densities)` axes, row-major.

    Raises:
        ValueError: on shapes that do not match the grid or each other.
    """
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim not in (3, 4) or grid.shape[-1] != 2 or grid.shape[-3] != grid.shape[-2]:
        raise ValueError(f"grid must be [m, m, 2] or [num_points, m, m, 2]; got {grid.shape}")
    m = grid.shape[-2]
    if not densities:
        raise ValueError("densities is empty: give at least one column")
    cols = list(densities)
    arrays = [np.asarray(densities[c], dtype=np.float64) for c in cols]
    n = arrays[0].shape[0] if arrays[0].ndim == 3 else -1
    for c, a in zip(cols, arrays, strict=True):
        if a.shape != (n, m, m):
            raise ValueError(f"densities[{c!r}] must be [num_points, {m}, {m}]; got {a.shape}")
    if grid.ndim == 3:
        grid = np.broadcast_to(grid, (n, m, m, 2))
    elif grid.shape[0] != n:
        raise ValueError(f"grid has {grid.shape[0]} per-datapoint grids for {n} datapoints")
    points = list(points) if points is not None else [f"x{i + 1}" for i in range(n)]
    if len(points) != n:
        raise ValueError(f"{len(points)} row names for {n} datapoints")
    fig = Figure(figsize=(2.2 * len(cols), 2.2 * n), layout="constrained")
    axes = np.asarray(fig.subplots(n, len(cols), squeeze=False))
    for i in range(n):
        for j, (c, a) in enumerate(zip(cols, arrays, strict=True)):
            ax = axes[i, j]
            ax.contourf(grid[i, ..., 0], grid[i, ..., 1], a[i], levels=12, cmap="Blues")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(c, fontsize=9)
            if j == 0:
                ax.set_ylabel(points[i])
    if title is not None:
        fig.suptitle(title)
    return fig


def save_figure(fig: Figure, path: str | pathlib.Path) -> pathlib.Path:
    """Save fig as a PNG (dpi 120, tight bounding box), creating missing parent folders.

    Args:
        fig: the figure to save.
        path: destination file; must end in ".png".

    Returns:
        The path written, as a `pathlib.Path`.

    Raises:
        ValueError: if path does not end in ".png".
    """
    path = pathlib.Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure writes PNG files; path must end in '.png', got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight", format="png")
    return path
