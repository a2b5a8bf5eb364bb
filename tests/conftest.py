"""Shared fixtures: small linear-Gaussian models with exact answers."""

import jax
import pytest

from amortjax.data.synthetic import make_linear_gaussian

jax.config.update("jax_enable_x64", False)


@pytest.fixture(scope="session")
def lg_correlated():
    """A factor-analysis model whose posterior is correlated (the diagonal family misses it)."""
    return make_linear_gaussian(jax.random.key(0), x_dim=8, z_dim=3, noise_scale=0.7)


@pytest.fixture(scope="session")
def lg_diagonal():
    """A PPCA model with orthogonal loadings: its exact posterior is a diagonal Gaussian."""
    return make_linear_gaussian(jax.random.key(1), x_dim=8, z_dim=3, diagonal_posterior=True)
