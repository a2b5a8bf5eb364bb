"""posterior_grid against the exact posterior of a correlated linear-Gaussian model (float64)."""

import jax
import numpy as np
import pytest
from scipy import stats

from amortjax.evaluation.posterior_grid import TRUE_POSTERIOR, covering_square, posterior_grid
from amortjax.families import DiagonalGaussian
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.models.linear_gaussian import make_linear_gaussian


def test_the_grid_posterior_is_the_exact_correlated_posterior():
    """x_dim 1 < z_dim 2: p(z | x_i) is a correlated Gaussian (known in float64). On a 5-sd
    square of 80 x 80 points, the grid density equals its pdf to 1e-3 of the peak, and a
    diagonal q's panel equals its own pdf; every panel sums to 1 over the grid."""
    lg = make_linear_gaussian(jax.random.key(3), x_dim=1, z_dim=2, noise_scale=0.3)
    model, _, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(4), 5)
    x = np.asarray(x)
    mean, cov = lg.posterior(x)
    corr = cov[0, 1] / np.sqrt(cov[0, 0] * cov[1, 1])
    assert abs(corr) > 0.5  # the hard case: a strongly correlated posterior
    half = np.full(5, 5.0 * np.sqrt(np.linalg.eigvalsh(cov).max()))
    lam = np.concatenate([mean + 0.1, np.log(np.sqrt(np.diag(cov)))[None].repeat(5, 0)], 1)
    grid = posterior_grid(
        model, params, x, {"q": (DiagonalGaussian(), lam)}, center=mean, half_width=half,
        points=80,
    )  # fmt: skip
    assert list(grid.densities) == [TRUE_POSTERIOR, "q"]
    assert grid.grids.shape == (5, 80, 80, 2)
    cell = (2 * half / 79) ** 2
    for i in range(5):
        z = grid.grids[i].reshape(-1, 2).astype(np.float64)
        exact = stats.multivariate_normal(mean[i], cov).pdf(z).reshape(80, 80)
        got = grid.densities[TRUE_POSTERIOR][i]
        np.testing.assert_allclose(got, exact, atol=1e-3 * exact.max())
        q = stats.multivariate_normal(lam[i, :2], np.diag(np.exp(2 * lam[i, 2:]))).pdf(z)
        np.testing.assert_allclose(grid.densities["q"][i], q.reshape(80, 80),
                                   atol=1e-3 * q.max())  # fmt: skip
        for panel in grid.densities.values():
            assert panel[i].sum() * cell[i] == pytest.approx(1.0, rel=1e-4)


def test_posterior_grid_names_bad_arguments():
    lg = make_linear_gaussian(jax.random.key(3), x_dim=1, z_dim=2)
    model, _, params = linear_gaussian_vae(lg)
    x = np.zeros((3, 1), np.float32)
    with pytest.raises(ValueError, match=r"center must be \[N=3, 2\]"):
        posterior_grid(model, params, x, {}, center=np.zeros((3, 3)), half_width=np.ones(3))
    with pytest.raises(ValueError, match="half_width must be"):
        posterior_grid(model, params, x, {}, center=np.zeros((3, 2)), half_width=-np.ones(3))
    grid = {"center": np.zeros((3, 2)), "half_width": np.ones(3)}
    with pytest.raises(ValueError, match=r"approximation 'q': lambda must be \[N=3, num_params"):
        posterior_grid(model, params, x, {"q": (DiagonalGaussian(), np.zeros((2, 4)))}, **grid)
    # These failed inside a broadcast, or gave NaN or a random model's densities, silently:
    cases = [
        (
            {"q": (DiagonalGaussian(), np.zeros((3, 6)))},
            {},
            r"lambda outputs 6 values.* needs .* = 4",
        ),
        ({"q": (DiagonalGaussian(), np.full((3, 4), np.nan))}, {}, "lambda has NaN"),
        ({}, {"center": np.full((3, 2), np.nan)}, r"center must be .* finite"),
        ({}, {"x": np.full((3, 1), np.nan, np.float32)}, "NaN"),
        ({}, {"params": {}}, r"no value for the model's parameter sites"),
        ({}, {"site": "w"}, "posterior_grid: the model has no local latent site 'w'"),
    ]
    for approximations, change, match in cases:
        args = {"x": x, "params": params, **grid, **change}
        with pytest.raises(ValueError, match=match):
            posterior_grid(model, args.pop("params"), args.pop("x"), approximations, **args)
    lg3 = make_linear_gaussian(jax.random.key(3), x_dim=1, z_dim=3)
    with pytest.raises(ValueError, match="site 'z' has 3 dimensions per datapoint"):
        posterior_grid(linear_gaussian_vae(lg3)[0], linear_gaussian_vae(lg3)[2], x, {}, **grid)


def test_the_covering_square_holds_every_approximation():
    """Two modes far apart (6 to 9 units, one q narrow, one wide): the square holds at least 98%
    of each q's mass by exact normal cdfs (central 99% per axis, widened a tenth), where a
    square of 4 sds around the narrow q alone holds none of the other's; it is not much wider
    than the two need."""
    rng = np.random.default_rng(0)
    n = 3
    loc_a = rng.normal(size=(n, 2))
    loc_b = loc_a + np.array([[6.0, 0.0], [0.0, -7.0], [5.0, 7.0]])
    a = np.concatenate([loc_a, np.full((n, 2), np.log(0.1))], 1)
    b = np.concatenate([loc_b, np.full((n, 2), np.log(1.0))], 1)
    family = DiagonalGaussian()
    center, half = covering_square({"a": (family, a), "b": (family, b)}, jax.random.key(0))
    assert center.shape == (n, 2) and half.shape == (n,)

    def inside(loc, scale, c, h):  # exact q-mass of the square, float64
        lo, hi = c - h[:, None], c + h[:, None]
        return np.prod(stats.norm.cdf(hi, loc, scale) - stats.norm.cdf(lo, loc, scale), axis=1)

    assert np.all(inside(loc_a, 0.1, center, half) > 0.98)
    assert np.all(inside(loc_b, 1.0, center, half) > 0.98)
    assert np.all(inside(loc_b, 1.0, loc_a, np.full(n, 0.4)) < 1e-6)  # (around a alone)
    span = np.abs(loc_b - loc_a).max(1) + 2.6 + 0.26  # b's 99% half-interval, a's
    assert np.all(2 * half < 1.3 * span), (2 * half, span)
    with pytest.raises(ValueError, match="at least one approximation"):
        covering_square({}, jax.random.key(0))
    with pytest.raises(ValueError, match=r"mass must be in \(0, 1\)"):
        covering_square({"a": (family, a)}, jax.random.key(0), mass=1.0)
    with pytest.raises(ValueError, match="needs a 2-D latent"):
        covering_square({"a": (family, np.zeros((n, 6)))}, jax.random.key(0))
