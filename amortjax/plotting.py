"""Matplotlib figures for inspecting trained VAEs: image grids, reconstructions, prior samples,
training curves, 2-D latent manifolds, latent traversals, the activity of latent units, 2-D
embeddings of the latent means, the inference gaps (bands over training, stacked bars), 2-D
posterior densities and the recovery of simulated latents, plus a helper to save them as PNG.

What this module is for: turning arrays that the rest of amortjax already computed (pixel means,
metric histories) into `matplotlib.figure.Figure` objects that a notebook displays and an
experiment script saves with `save_figure`. Every function builds its own `Figure` through the
object-oriented API (`Figure(...)`, `fig.subplots`), never through `pyplot`, so it selects no
backend, works headless, registers nothing in pyplot's global figure list and leaks no state
between figures.

What it is not for: it computes no model quantities (no sampling, no ELBOs, no decoding except
through the `decode` callable given to `manifold_figure` and `traversals_figure`), and it does
not do publication-style layout or styling beyond sensible defaults. Images are greyscale with
pixel values in [0, 1] (shown with a fixed colour scale, black = 0, white = 1); inputs may be
NumPy or JAX arrays.
"""

from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from statistics import NormalDist

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Patch

__all__ = [
    "activity_figure",
    "density_panels_figure",
    "embedding_figure",
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
    "traversal_latents",
    "traversals_figure",
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


def traversal_latents(base_z, dims: Sequence[int], values: Sequence[float]) -> np.ndarray:
    """The `[len(dims) * len(values), z_dim]` latent points that `traversals_figure` decodes.

    Row `k = r * len(values) + c` is base_z with coordinate `dims[r]` set to `values[c]`: tile
    row r of the figure traverses latent dimension dims[r], left to right through values.

    Raises:
        ValueError: if base_z is not a finite 1-D vector, dims is empty or out of range, or
            values is empty or not finite.
    """
    base = np.asarray(base_z, dtype=np.float64)
    if base.ndim != 1 or base.shape[0] < 1 or not np.isfinite(base).all():
        raise ValueError(f"base_z must be a finite [z_dim] vector, got shape {base.shape}")
    z_dim = base.shape[0]
    dims = [int(d) for d in dims]
    if not dims or any(not 0 <= d < z_dim for d in dims):
        raise ValueError(f"dims must be a non-empty list of indices in [0, {z_dim}), got {dims}")
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    if vals.size == 0 or not np.isfinite(vals).all():
        raise ValueError(f"values must be a non-empty list of finite numbers, got {vals}")
    z = np.tile(base, (len(dims), len(vals), 1))
    for r, d in enumerate(dims):
        z[r, :, d] = vals
    return z.reshape(len(dims) * len(vals), z_dim)


def traversals_figure(
    decode: Callable[[np.ndarray], object],
    base_z,
    dims: Sequence[int],
    *,
    values: Sequence[float] = tuple(np.linspace(-3.0, 3.0, 9)),
    image_shape: tuple[int, int] = (28, 28),
    title: str | None = "Latent traversals",
    ax: Axes | None = None,
) -> Figure:
    """Decode latent traversals: one row per chosen dimension, the others held at base_z.

    Row r shows the decoded images of base_z with z[dims[r]] set to each of `values` in turn
    (left to right), so a row that changes shows what that dimension encodes and a row of
    identical images a dimension the decoder ignores. `decode` is called once, with the
    `[len(dims) * len(values), z_dim]` float32 array `traversal_latents(base_z, dims, values)`.
    The grid is one `AxesImage` (tiles separated by 1-pixel white lines, see `tile_images`);
    rows are labelled "z[u]" (0-based) and columns with the values.

    Args:
        decode: maps latent points `[m, z_dim]` to pixel means `[m, h * w]` (or `[m, h, w]`)
            in [0, 1]; may return a NumPy or JAX array.
        base_z: `[z_dim]` the point traversed around, e.g. the encoder's mean for one
            datapoint, or zeros (the prior's mean).
        dims: the latent dimensions (0-based) to traverse, one row each.
        values: the values each traversed coordinate takes; by default 9 points from -3 to 3
            (+-3 prior standard deviations).
        image_shape: `(h, w)` of one image.
        title: axes title, or None for none.
        ax: axes to draw into; by default a new Figure with one axes is created.

    Returns:
        The Figure holding the grid (ax's top-level figure when ax is given).

    Raises:
        ValueError: if base_z, dims or values are invalid (see `traversal_latents`) or decode
            returns a shape other than `[m, h * w]` or `[m, h, w]`.
    """
    z = traversal_latents(base_z, dims, values).astype(np.float32)
    nrows, ncols = len(dims), z.shape[0] // len(dims)
    out = np.asarray(decode(z))
    h, w = image_shape
    m = z.shape[0]
    if out.shape not in ((m, h * w), (m, h, w)):
        raise ValueError(
            f"decode must map latent points [{m}, {z.shape[1]}] to [{m}, {h * w}] or "
            f"[{m}, {h}, {w}] pixel means (image_shape={tuple(image_shape)}), but returned "
            f"shape {out.shape}"
        )
    if ax is None:
        fig = Figure(
            figsize=(
                max(3.0, ncols * _CELL_INCHES + 0.8),
                max(1.5, nrows * _CELL_INCHES + 0.5) + (0.3 if title else 0.0),
            ),
            layout="constrained",
        )
        ax = fig.subplots()
    else:
        fig = _root_figure(ax)
    _show(ax, tile_images(out.reshape(m, h, w).astype(np.float64), ncols))
    ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(nrows)], [f"z[{int(d)}]" for d in dims])
    vals = np.asarray(values, dtype=np.float64).reshape(-1)
    ax.set_xticks(
        [c * (w + 1) + (w - 1) / 2 for c in range(ncols)], [f"{v:.3g}" for v in vals], fontsize=7
    )
    ax.tick_params(length=0)
    if title is not None:
        ax.set_title(title)
    return fig


def activity_figure(
    variance,
    kl=None,
    *,
    threshold: float = 0.01,
    sort: bool = True,
    title: str | None = "Latent activity",
) -> Figure:
    """Which latent dimensions are used: the KL per dimension and the activity statistic.

    Bottom panel: Burda et al. (2016)'s A_u = Var_x(E_q[z_u | x]) as bars on a log axis, with a
    dashed line at the threshold; top panel (when kl is given): the average over the data of
    KL(q(z_u | x) || p(z_u)) in nats. Active units (A_u > threshold) are drawn in colour,
    inactive ones in grey. Both come from `amortjax.evaluation.activity`.

    Args:
        variance: `[z_dim]` A_u, finite and >= 0.
        kl: `[z_dim]` KL per dimension in nats, or None for the activity panel alone.
        threshold: the activity threshold (> 0; Burda et al.: 0.01).
        sort: order the dimensions by decreasing A_u (in both panels), else in index order.
        title: figure title, or None for none.

    Returns:
        A new Figure with `[kl axes,] variance axes`; each holds one `BarContainer` with a bar
        per dimension in the plotted order, labelled by 0-based dimension index.

    Raises:
        ValueError: if variance is not a finite non-negative vector, kl does not match it or
            is not finite, or threshold <= 0.
    """
    var = np.asarray(variance, dtype=np.float64)
    if var.ndim != 1 or var.size == 0 or not np.isfinite(var).all() or (var < 0).any():
        raise ValueError(
            f"variance must be a non-empty [z_dim] vector of finite values >= 0, got shape "
            f"{var.shape}"
        )
    if kl is not None:
        kl = np.asarray(kl, dtype=np.float64)
        if kl.shape != var.shape or not np.isfinite(kl).all():
            raise ValueError(
                f"kl must be a finite vector of the shape of variance {var.shape}, got {kl.shape}"
            )
    if not (np.isfinite(threshold) and threshold > 0):
        raise ValueError(f"threshold must be finite and > 0 (a log axis), got {threshold}")
    order = np.argsort(-var, kind="stable") if sort else np.arange(var.size)
    active = var[order] > threshold
    colors = np.where(active, "C0", "0.7")
    pos = np.arange(var.size)
    fig = Figure(
        figsize=(max(5.0, 1.2 + 0.18 * var.size), 5.5 if kl is not None else 3.0),
        layout="constrained",
    )
    axes = list(np.atleast_1d(fig.subplots(2 if kl is not None else 1, 1, sharex=True)))
    if kl is not None:
        ax_kl = axes[0]
        ax_kl.bar(pos, kl[order], color=colors)
        ax_kl.set_ylabel("KL(q(z_u|x) || p(z_u))\nnats, mean over data")
        ax_kl.grid(True, axis="y", alpha=0.3)
    ax_var = axes[-1]
    ax_var.bar(pos, var[order], color=colors)
    positive = var[var > 0]
    floor = 10.0 ** np.floor(np.log10(min(threshold, *positive) if positive.size else threshold))
    ax_var.set_yscale("log")
    ax_var.set_ylim(bottom=floor / 10)
    ax_var.axhline(threshold, color="C3", linestyle="--", label=f"threshold {threshold:g}")
    ax_var.set_ylabel("Var_x E_q[z_u|x]")
    ax_var.grid(True, axis="y", alpha=0.3)
    ax_var.set_xticks(pos, [str(int(u)) for u in order], fontsize=7 if var.size > 20 else None)
    ax_var.set_xlabel("latent dimension u" + (" (by decreasing activity)" if sort else ""))
    n_active = int(active.sum())
    ax_var.legend(
        handles=[
            Patch(color="C0", label=f"active ({n_active})"),
            Patch(color="0.7", label=f"inactive ({var.size - n_active})"),
            *ax_var.get_lines(),
        ],
        fontsize=8,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    if title is not None:
        fig.suptitle(f"{title}: {n_active} of {var.size} units active")
    return fig


def _pca_2d(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Project `[n, d]` points on their first two principal axes (SVD of the centred points).

    Each axis's sign is fixed so that its largest-magnitude loading is positive, so the picture
    does not flip between runs. Returns the `[n, 2]` coordinates and the fraction of the total
    variance along each axis `[2]`.
    """
    centred = points - points.mean(axis=0)
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:2]
    signs = np.sign(axes[np.arange(2), np.abs(axes).argmax(axis=1)])
    axes = axes * signs[:, None]
    total = float((s**2).sum())
    explained = s[:2] ** 2 / total if total > 0 else np.zeros(2)
    return centred @ axes.T, explained


def embedding_figure(
    means,
    labels=None,
    *,
    title: str | None = "Latent means",
    point_size: float = 4.0,
    ax: Axes | None = None,
) -> Figure:
    """A 2-D scatter of the encoder's latent means, coloured by label.

    With z_dim = 2 the points are drawn as they are (axes "z[0]", "z[1]"); with z_dim > 2 they
    are projected on their first two principal components (PCA by a NumPy SVD of the centred
    means; the axis labels say so and give each component's share of the variance).

    Integer labels with at most 20 distinct values (classes, e.g. digits) give one scatter per
    class, in increasing label order, and a legend; other labels a single scatter coloured
    on a continuous scale with a colorbar; no labels a single one-colour scatter.

    Args:
        means: `[N, z_dim]` E_q[z | x_i], z_dim >= 2, finite.
        labels: `[N]` labels of the datapoints, or None.
        title: axes title, or None for none.
        point_size: marker area in points^2.
        ax: axes to draw into; by default a new Figure with one axes is created.

    Returns:
        The Figure (ax's top-level figure when ax is given); its scatters are the axes'
        `collections`, their offsets the plotted 2-D coordinates.

    Raises:
        ValueError: if means is not a finite `[N, z_dim]` array with z_dim >= 2 and N >= 1, or
            labels is not `[N]`.
    """
    pts = np.asarray(means, dtype=np.float64)
    if pts.ndim != 2 or pts.shape[0] < 1 or pts.shape[1] < 2 or not np.isfinite(pts).all():
        raise ValueError(
            f"means must be a finite [N, z_dim] array with N >= 1 and z_dim >= 2, got shape "
            f"{pts.shape}"
        )
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (pts.shape[0],):
            raise ValueError(f"labels must have shape [{pts.shape[0]}], got {labels.shape}")
    z_dim = pts.shape[1]
    if z_dim == 2:
        xy, xlabel, ylabel = pts, "z[0]", "z[1]"
    else:
        xy, explained = _pca_2d(pts)
        xlabel, ylabel = (
            f"PC {i + 1} of the {z_dim}-D means ({explained[i]:.0%} of variance)" for i in range(2)
        )
    if ax is None:
        fig = Figure(figsize=(5.5, 4.5), layout="constrained")
        ax = fig.subplots()
    else:
        fig = _root_figure(ax)
    classes = None
    if labels is not None and np.issubdtype(labels.dtype, np.number):
        finite = np.isfinite(labels.astype(np.float64))
        if finite.all() and np.array_equal(labels, np.round(labels)):
            uniq = np.unique(labels)
            classes = uniq if len(uniq) <= 20 else None
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=point_size, alpha=0.6, linewidths=0)
    elif classes is not None:
        cmap = "tab10" if len(classes) <= 10 else "tab20"
        for i, c in enumerate(classes):
            sel = labels == c
            label = str(int(c)) if np.issubdtype(labels.dtype, np.integer) else f"{c:g}"
            ax.scatter(
                xy[sel, 0],
                xy[sel, 1],
                s=point_size,
                alpha=0.6,
                linewidths=0,
                color=matplotlib.colormaps[cmap](i),
                label=label,
            )
        ax.legend(title="label", markerscale=3, fontsize=8, loc="best")
    else:
        sc = ax.scatter(
            xy[:, 0], xy[:, 1], s=point_size, alpha=0.6, linewidths=0, c=labels, cmap="viridis"
        )
        fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
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


def recovery_figure(
    estimates: Mapping[str, np.ndarray],
    truth: np.ndarray,
    *,
    scores: Mapping[str, float] | None = None,
    score_name: str = "R²",
    dim: int = 0,
    xlabel: str = "true value",
    ylabel: str = "estimate",
) -> Figure:
    """Estimates of a simulated latent against its true values, one scatter panel per
    estimator, with the identity line (e.g. each regime's posterior mean of the traits of
    held-out people in an item-response model).

    Args:
        estimates: panel title -> `[N, d]` (or `[N]`) estimates of the same N latents.
        truth: the true latents, `[N, d]` (or `[N]`).
        scores: panel title -> a number shown in its title (e.g. the R^2 of the recovery).
        score_name: what the scores are, shown before them.
        dim: the latent dimension plotted.
        xlabel, ylabel: axis labels.

    Returns:
        A Figure with one row of `len(estimates)` axes.

    Raises:
        ValueError: an empty `estimates`, or an estimate whose shape differs from truth's.
    """
    if not estimates:
        raise ValueError("estimates is empty: give at least one panel")
    truth = np.asarray(truth, dtype=np.float64).reshape(len(truth), -1)
    fig = Figure(figsize=(3.2 * len(estimates), 3.2), layout="constrained")
    axes = np.asarray(fig.subplots(1, len(estimates), squeeze=False))[0]
    lim = float(np.abs(truth[:, dim]).max()) * 1.05
    for ax, (name, est) in zip(axes, estimates.items(), strict=True):
        est = np.asarray(est, dtype=np.float64).reshape(len(est), -1)
        if est.shape != truth.shape:
            raise ValueError(f"estimates[{name!r}] has shape {est.shape}; truth has {truth.shape}")
        ax.scatter(truth[:, dim], est[:, dim], s=4, alpha=0.5)
        ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
        score = "" if scores is None or name not in scores else f": {score_name} {scores[name]:.3f}"
        ax.set_title(f"{name}{score}", fontsize=9)
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel(ylabel)
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
