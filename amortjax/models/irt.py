"""An item-response model: N people answer D binary questions; each person has a trait vector.

The multidimensional two-parameter logistic model (2PL), with global question latents and local
person latents:

    a_j ~ LogNormal(0, s_a)^Q      (discrimination of question j, positive: fixes the sign)
    b_j ~ N(0, 1)                  (difficulty of question j)
    theta_i ~ N(0, I_Q)            (trait of person i: the local latent, site "trait")
    x_ij | theta_i ~ Bernoulli(sigmoid(a_j . theta_i - b_j))

a and b live outside the data plate (a global guide covers them: `amortjax.guides.global_guide`);
theta lives inside it (an amortized, per-example or semi-amortized guide covers it). For Q <= 2
and given (a, b), log p(x_i) = log int N(theta; 0, I) prod_j p(x_ij | theta) dtheta is computed
on a grid (`grid_log_marginal`), a ground truth for every estimator of the library, as are the
exact posterior means of the traits.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist

from amortjax.models.core import data_plate, simulate

QUESTIONS_PLATE = "questions"


def irt_model(
    num_questions: int, num_traits: int = 1, *, discrimination_scale: float = 0.5
) -> Callable[..., None]:
    """The 2PL item-response model.

    Args:
        num_questions: D.
        num_traits: Q, the size of each person's trait vector.
        discrimination_scale: s_a, the log-scale of the discriminations' prior.

    Returns:
        A NumPyro model `model(x, *, n_data=None)`, x `[batch, D]` binary answers, with global
        latent sites "discrimination" `[D, Q]` and "difficulty" `[D]`, local latent site
        "trait" `[batch, Q]` and observed site "x".
    """

    def model(x: jax.Array, *, n_data: int | None = None) -> None:
        if x.shape[-1] != num_questions:
            raise ValueError(f"x must be [batch, {num_questions}] answers; got {x.shape}")
        with numpyro.plate(QUESTIONS_PLATE, num_questions):
            disc = numpyro.sample(
                "discrimination",
                dist.LogNormal(0.0, discrimination_scale).expand([num_traits]).to_event(1),
            )
            difficulty = numpyro.sample("difficulty", dist.Normal(0.0, 1.0))
        with data_plate(x, n_data):
            trait = numpyro.sample("trait", dist.Normal(0.0, 1.0).expand([num_traits]).to_event(1))
            logits = trait @ disc.T - difficulty
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    return model


def simulate_irt(
    key: jax.Array, num_people: int, num_questions: int, num_traits: int = 1, **model_kwargs
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Draws questions, traits and answers from `irt_model`'s prior.

    Returns:
        `(x [num_people, D] float32 answers, truth)` with truth holding "discrimination",
        "difficulty" and "trait" `[num_people, Q]`.
    """
    model = irt_model(num_questions, num_traits, **model_kwargs)
    x_like = jnp.zeros((num_people, num_questions), jnp.float32)
    return simulate(model, {}, key, x_like)


def _grid(num_traits: int, grid_size: int, limit: float) -> tuple[jax.Array, jax.Array]:
    """A tensor-product grid over [-limit, limit]^Q: points `[G^Q, Q]` and log cell volume."""
    if num_traits not in (1, 2):
        raise ValueError(f"the grid answers need num_traits in (1, 2), got {num_traits}")
    axis = jnp.linspace(-limit, limit, grid_size)
    mesh = jnp.meshgrid(*([axis] * num_traits), indexing="ij")
    points = jnp.stack([m.reshape(-1) for m in mesh], -1)
    return points, num_traits * jnp.log(axis[1] - axis[0])


def _grid_log_joint(x, discrimination, difficulty, points) -> jax.Array:
    """log N(theta_g; 0, I) + sum_j log p(x_ij | theta_g), `[N, G]`."""
    logits = points @ discrimination.T - difficulty  # [G, D]
    log_lik = x @ jax.nn.log_sigmoid(logits).T + (1 - x) @ jax.nn.log_sigmoid(-logits).T
    log_prior = dist.Normal(0.0, 1.0).log_prob(points).sum(-1)
    return log_lik + log_prior


def grid_log_marginal(
    x: jax.Array,
    discrimination: jax.Array,
    difficulty: jax.Array,
    *,
    grid_size: int = 801,
    limit: float = 7.0,
) -> jax.Array:
    """Exact (to quadrature error) log p(x_i) for each person, by the rectangle rule on a grid.

    Args:
        x: answers `[N, D]`.
        discrimination: `[D, Q]`, Q in (1, 2).
        difficulty: `[D]`.
        grid_size: points per trait axis (Q=2: grid_size^2 points in all).
        limit: the grid covers [-limit, limit]^Q (the prior's mass outside 7 sd is < 1e-11).

    Returns:
        `[N]`.
    """
    points, log_cell = _grid(discrimination.shape[1], grid_size, limit)
    log_joint = _grid_log_joint(jnp.asarray(x), discrimination, difficulty, points)
    return jax.nn.logsumexp(log_joint, axis=-1) + log_cell


def grid_posterior_mean(
    x: jax.Array,
    discrimination: jax.Array,
    difficulty: jax.Array,
    *,
    grid_size: int = 801,
    limit: float = 7.0,
) -> jax.Array:
    """Exact E[theta_i | x_i] by quadrature (see `grid_log_marginal`), `[N, Q]`."""
    points, _ = _grid(discrimination.shape[1], grid_size, limit)
    log_joint = _grid_log_joint(jnp.asarray(x), discrimination, difficulty, points)
    return jax.nn.softmax(log_joint, axis=-1) @ points


def discrimination_recovery(estimate: np.ndarray, truth: np.ndarray) -> float:
    """Correlation of estimated discriminations with the true ones, up to what the data cannot
    identify.

    With one trait (Q = 1) the plain correlation of the a_j (their sign is fixed by the
    positive prior). With Q > 1, theta ~ N(0, I) makes the logits' trait part A theta ~
    N(0, A A^T), so p(x) depends on A `[D, Q]` only through A A^T: any rotation or permutation
    of the trait space fits the data as well (the flattened a_j of a fit whose trait axes came
    out swapped correlate near 0 with the truth, or below it). There the correlation of the
    entries of A A^T on and above the diagonal (D (D + 1) / 2 of them) is returned, 1 for
    discriminations equal to the truth up to an orthogonal map.

    Args:
        estimate: `[D]` or `[D, Q]`.
        truth: the same shape.
    """
    estimate, truth = np.asarray(estimate, np.float64), np.asarray(truth, np.float64)
    if estimate.shape != truth.shape or estimate.ndim not in (1, 2):
        raise ValueError(f"need two [D] or [D, Q] arrays; got {estimate.shape} and {truth.shape}")
    if estimate.ndim == 1 or estimate.shape[1] == 1:
        return float(np.corrcoef(estimate.ravel(), truth.ravel())[0, 1])
    upper = np.triu_indices(estimate.shape[0])
    gram = (estimate @ estimate.T)[upper], (truth @ truth.T)[upper]
    return float(np.corrcoef(*gram)[0, 1])


def trait_recovery(estimate: np.ndarray, truth: np.ndarray) -> float:
    """R^2 of the true traits regressed (least squares, with intercept) on estimated ones.

    Invariant to any invertible affine map of the estimates (a rotation of a Q > 1 trait space
    is not identifiable), 1 for perfect recovery, 0 for estimates unrelated to the truth.

    Args:
        estimate: `[N, Q]` (e.g. the posterior means of q).
        truth: `[N, Q]`.
    """
    estimate, truth = np.asarray(estimate, np.float64), np.asarray(truth, np.float64)
    if estimate.shape != truth.shape or estimate.ndim != 2:
        raise ValueError(f"need two [N, Q] arrays; got {estimate.shape} and {truth.shape}")
    design = np.concatenate([estimate, np.ones((estimate.shape[0], 1))], 1)
    coef, *_ = np.linalg.lstsq(design, truth, rcond=None)
    residual = ((truth - design @ coef) ** 2).sum()
    total = ((truth - truth.mean(0)) ** 2).sum()
    return float(1.0 - residual / total)
