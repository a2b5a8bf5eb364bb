"""Variational families: layouts, densities against SciPy-style closed forms, expressiveness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.scipy.stats import multivariate_normal

from amortjax.families import FAMILIES, DiagonalGaussian, FullRankGaussian, get_family
from amortjax.guides import given_params_guide
from amortjax.guides.linear_gaussian import linear_gaussian_vae
from amortjax.traces import log_weights


def _random_tril(key, z_dim, batch=()):
    k1, k2 = jax.random.split(key)
    tril = jnp.tril(jax.random.normal(k1, (*batch, z_dim, z_dim)), -1)
    diag = jnp.exp(0.5 * jax.random.normal(k2, (*batch, z_dim)))
    return tril + diag[..., None] * jnp.eye(z_dim)


def test_registry_knows_both_gaussians():
    assert isinstance(get_family("full_rank"), FullRankGaussian)
    assert isinstance(get_family("diagonal"), DiagonalGaussian)
    assert FAMILIES["full_rank"].name == "full_rank"
    with pytest.raises(ValueError, match="full_rank"):
        get_family("fullrank")


@pytest.mark.parametrize("z_dim", [1, 3, 5])
def test_diagonal_layout_sizes_and_standard_params(z_dim):
    family = DiagonalGaussian()
    assert family.num_params(z_dim) == 2 * z_dim
    lam = family.standard_params(z_dim)
    assert lam.shape == (2 * z_dim,)
    z = jax.random.normal(jax.random.key(0), (7, z_dim))
    np.testing.assert_allclose(
        family.distribution(lam).log_prob(z),
        multivariate_normal.logpdf(z, jnp.zeros(z_dim), jnp.eye(z_dim)),
        rtol=1e-5,
    )


@pytest.mark.parametrize("z_dim", [1, 3, 5])
def test_full_rank_sizes(z_dim):
    family = FullRankGaussian()
    assert family.num_params(z_dim) == z_dim + z_dim * (z_dim + 1) // 2
    assert family.z_dim(family.num_params(z_dim)) == z_dim
    assert family.standard_params(z_dim).shape == (family.num_params(z_dim),)


def test_full_rank_rejects_a_size_of_no_layout():
    with pytest.raises(ValueError, match="7 parameters"):
        FullRankGaussian().z_dim(7)


def test_full_rank_pack_split_round_trip_with_batch_dims():
    family = FullRankGaussian()
    z_dim, batch = 4, (3, 2)
    loc = jax.random.normal(jax.random.key(0), (*batch, z_dim))
    tril = _random_tril(jax.random.key(1), z_dim, batch)
    lam = family.pack(loc, tril)
    assert lam.shape == (*batch, family.num_params(z_dim))
    loc2, tril2 = family.split(lam)
    np.testing.assert_allclose(loc2, loc, rtol=1e-6)
    np.testing.assert_allclose(tril2, tril, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(family.mean(lam), loc)
    # And the other way: any real lambda is a valid layout.
    lam = jax.random.normal(jax.random.key(2), (*batch, family.num_params(z_dim)))
    np.testing.assert_allclose(family.pack(*family.split(lam)), lam, rtol=1e-5, atol=1e-6)


def test_full_rank_pack_refuses_a_factor_without_a_positive_diagonal():
    """Its log would be NaN (negative) or -inf (zero) in lambda, silently, as it was."""
    family = FullRankGaussian()
    tril = _random_tril(jax.random.key(1), 3, (2,))
    for value, at in ((-0.5, r"\[1, 2\] \(-0.5\)"), (0.0, r"\[1, 2\] \(0.0\)")):
        bad = tril.at[1, 2, 2].set(value)
        with pytest.raises(ValueError, match=r"diagonal must be positive and finite.*" + at):
            family.pack(jnp.zeros(3), bad)
        traced = jax.jit(family.pack)(jnp.zeros(3), bad)  # (traced: no check, as documented)
        assert not np.isfinite(traced[1, -1])
    # Negating the column of a negative diagonal entry (the fix it names) keeps L L^T.
    flipped = tril.at[1, :, 2].multiply(-1.0)
    lam = family.pack(jnp.zeros(3), tril.at[1].set(flipped[1] * jnp.sign(jnp.diagonal(flipped[1]))))
    cov = jnp.einsum("...ij,...kj->...ik", *(family.split(lam)[1],) * 2)
    np.testing.assert_allclose(cov, jnp.einsum("...ij,...kj->...ik", tril, tril), rtol=1e-5)


def test_pack_refuses_log_scales_covariances_and_upper_factors():
    """Each of these gave lambda silently: DiagonalGaussian.pack(*split(lam)) (split returns
    log sigma, pack takes sigma) gave NaN; a covariance or scipy's upper Cholesky factor given
    to FullRankGaussian.pack lost its upper triangle (another q)."""
    diag = DiagonalGaussian()
    lam = jnp.array([0.5, -1.0, -0.7, 0.3])
    with pytest.raises(ValueError, match=r"scale must be positive.*not log sigma.*jnp.exp"):
        diag.pack(*diag.split(lam))
    loc, log_scale = diag.split(lam)
    np.testing.assert_allclose(diag.pack(loc, jnp.exp(log_scale)), lam, rtol=1e-6)
    cov = jnp.array([[2.0, 0.6], [0.6, 1.0]])
    full = FullRankGaussian()
    for wrong in (cov, jnp.linalg.cholesky(cov).T):
        with pytest.raises(ValueError, match=r"nonzero entries above its diagonal.*lower=True"):
            full.pack(jnp.zeros(2), wrong)
    q = full.distribution(full.pack(jnp.zeros(2), jnp.linalg.cholesky(cov)))
    np.testing.assert_allclose(q.covariance_matrix, cov, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[loc, log_scale\] of 2 z_dim values; 5 values"):
        diag.split(jnp.zeros(5))  # JAX's "array split does not result in an equal division"


def test_full_rank_standard_params_is_the_standard_normal():
    family = FullRankGaussian()
    z_dim = 3
    loc, tril = family.split(family.standard_params(z_dim))
    np.testing.assert_array_equal(loc, jnp.zeros(z_dim))
    np.testing.assert_array_equal(tril, jnp.eye(z_dim))
    z = jax.random.normal(jax.random.key(0), (11, z_dim))
    np.testing.assert_allclose(
        family.distribution(family.standard_params(z_dim)).log_prob(z),
        multivariate_normal.logpdf(z, jnp.zeros(z_dim), jnp.eye(z_dim)),
        rtol=1e-5,
    )


@pytest.mark.parametrize("jit", [False, True])
def test_full_rank_log_prob_is_the_multivariate_normal_density(jit):
    family = FullRankGaussian()
    z_dim, batch = 3, (5,)
    loc = jax.random.normal(jax.random.key(0), (*batch, z_dim))
    tril = _random_tril(jax.random.key(1), z_dim, batch)
    z = jax.random.normal(jax.random.key(2), (*batch, z_dim))

    def log_prob(lam, z):
        return family.distribution(lam).log_prob(z)

    fn = jax.jit(log_prob) if jit else log_prob
    got = fn(family.pack(loc, tril), z)
    cov = tril @ jnp.swapaxes(tril, -1, -2)
    want = jax.vmap(multivariate_normal.logpdf)(z, loc, cov)
    assert got.shape == batch
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_full_rank_samples_have_the_covariance_l_lt():
    family = FullRankGaussian()
    z_dim, n = 3, 200_000
    loc = jnp.array([1.0, -2.0, 0.5])
    tril = _random_tril(jax.random.key(3), z_dim)
    q = family.distribution(family.pack(loc, tril))
    assert q.has_rsample
    z = q.rsample(jax.random.key(4), (n,))
    cov = tril @ tril.T
    # Monte Carlo error of a covariance entry is about sqrt((S_ii S_jj + S_ij^2) / n).
    tol = 5 * np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
    np.testing.assert_array_less(np.abs(np.cov(np.asarray(z).T) - cov), tol)
    np.testing.assert_array_less(np.abs(z.mean(0) - loc), 5 * np.sqrt(np.diag(cov) / n))


def test_reparameterized_gradient_flows_through_every_entry():
    """The reparameterized gradient of E_q[mean_j z_j^2] through every packed entry (the mean,
    the Cholesky factor's off-diagonal and its diagonal's transform) against the exact one of
    (|loc|^2 + ||L||_F^2) / 3 (a dropped factor of the diagonal's transform or a permuted
    entry would be off by tenths; measured with 200,000 draws: at most 0.0054)."""
    family = FullRankGaussian()
    lam = jax.random.normal(jax.random.key(0), (family.num_params(3),))

    def mean_square(lam):
        return jnp.mean(family.distribution(lam).rsample(jax.random.key(1), (200_000,)) ** 2)

    def exact(lam):
        q = family.distribution(lam)
        return (jnp.sum(q.loc**2) + jnp.sum(q.scale_tril**2)) / 3

    grad = jax.grad(mean_square)(lam)
    assert np.all(np.abs(jax.grad(exact)(lam)) > 0.05)  # every entry matters here
    np.testing.assert_allclose(grad, jax.grad(exact)(lam), atol=0.02)
    assert float(mean_square(lam)) == pytest.approx(float(exact(lam)), rel=0.01)


def test_full_rank_family_expresses_the_correlated_posterior(lg_correlated):
    # With q = p(z | x) exactly, log p(x, z) - log q(z) = log p(x) for every z: the log-weights
    # are constant, through the library's own trace adapter.
    lg = lg_correlated
    family = FullRankGaussian()
    model, _, params = linear_gaussian_vae(lg)
    x, _ = lg.sample(jax.random.key(5), 16)
    mean, cov = lg.posterior(x)
    lam = family.pack(mean, jnp.linalg.cholesky(cov))
    guide = given_params_guide(family)
    keys = jax.random.split(jax.random.key(6), 8)
    lw = jax.jit(jax.vmap(lambda k: log_weights(model, guide, params, x, k, lam)))(keys)
    assert lw.shape == (8, 16)
    exact = lg.log_marginal(x)
    np.testing.assert_allclose(lw, jnp.broadcast_to(exact, lw.shape), atol=2e-3, rtol=1e-5)
    # The diagonal family cannot: its log-weights vary with z (the posterior is correlated).
    diag = DiagonalGaussian()
    loc, scale = lg.best_diagonal(x)
    diag_guide = given_params_guide(diag)
    lw_diag = jax.jit(
        jax.vmap(lambda k: log_weights(model, diag_guide, params, x, k, diag.pack(loc, scale)))
    )(keys)
    assert float(lw_diag.std(0).min()) > 0.01
