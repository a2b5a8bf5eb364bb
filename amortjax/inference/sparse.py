"""Row-sparse ("lazy") Adam for per-datapoint parameters trained on minibatches.

A local guide holds one row of variational parameters per datapoint (`[n_data, P]`) and a
minibatch touches only B rows. Plain Adam treats the whole array as one parameter: a row outside
the minibatch has a zero gradient, yet its first moment m is not zero, so the row keeps moving by
-lr m_hat / (sqrt(v_hat) + eps) while m and v decay, and the bias correction counts steps in
which the row took no part. The row's trajectory then depends on the order of the minibatches
rather than on its own data.

`scale_by_row_sparse_adam` keeps Adam's state per row instead: a row whose gradient is exactly
zero in a step gets a zero update and keeps its m, v and step count; a row with a nonzero
gradient takes the standard Adam step with its own count t_i,

    m_i <- b1 m_i + (1 - b1) g_i,         v_i <- b2 v_i + (1 - b2) g_i^2,      t_i <- t_i + 1,
    update_i = -lr (m_i / (1 - b1^t_i)) / (sqrt(v_i / (1 - b2^t_i)) + eps),

so each row follows exactly the Adam run on its datapoint alone (the steps it took part in).
"Exactly zero" is the test because a gather's gradient is exactly zero on rows it did not read;
a row in the minibatch whose gradient happens to be exactly zero is skipped as well.

`make_local_optimizer` applies it to the params named "local$..." (see
`amortjax.guides.local_guide`) and ordinary Adam (`make_optimizer`) to the rest, e.g. a decoder.
This module is not for dense parameters: on them the row-sparse Adam is plain Adam with one
count per row of the leading axis.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from amortjax.inference.objectives import check_optimizer_numbers, make_optimizer

LOCAL_PREFIX = "local$"


class RowSparseAdamState(NamedTuple):
    """Adam's state kept per row of the leading axis of each leaf.

    Attributes:
        count: steps each row took part in, a pytree of int32 `[rows]` (`[]` for a scalar leaf).
        mu: first moments, like the params.
        nu: second moments, like the params.
    """

    count: Any
    mu: Any
    nu: Any


def _row_mask(g: jax.Array) -> jax.Array:
    """True for the rows (leading axis) of g with a nonzero entry, shaped to broadcast with g."""
    touched = jnp.any(g != 0, axis=tuple(range(1, g.ndim))) if g.ndim else g != 0
    return touched.reshape(touched.shape + (1,) * max(g.ndim - 1, 0))


def scale_by_row_sparse_adam(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0
) -> optax.GradientTransformation:
    """Adam's rescaling with moments and bias correction per row; untouched rows get 0.

    Args:
        b1, b2: decay rates of the first and second moments.
        eps: added to sqrt(v_hat) in the denominator.
        eps_root: added to v_hat inside the square root (as in `optax.scale_by_adam`).

    Returns:
        An optax transformation whose update for row i is m_hat_i / (sqrt(v_hat_i + eps_root)
        + eps) when row i's gradient is nonzero and exactly 0 otherwise (chain with a learning
        rate; see `row_sparse_adam`).
    """

    def init_fn(params: Any) -> RowSparseAdamState:
        count = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p)[:1], jnp.int32), params)
        mu = jax.tree.map(jnp.zeros_like, params)
        nu = jax.tree.map(jnp.zeros_like, params)
        return RowSparseAdamState(count, mu, nu)

    def update_fn(
        updates: Any, state: RowSparseAdamState, params: Any = None
    ) -> tuple[Any, RowSparseAdamState]:
        del params

        def leaf(g, count, mu, nu):
            mask = _row_mask(g)
            count = count + mask.reshape(count.shape).astype(count.dtype)
            # The same expressions as optax.scale_by_adam, so that a row's numbers match a
            # dense Adam run on that row alone.
            mu = jnp.where(mask, (1 - b1) * g + b1 * mu, mu)
            nu = jnp.where(mask, (1 - b2) * (g * g) + b2 * nu, nu)
            # Untouched rows may have count 0; their update is discarded, the max avoids 0/0.
            t = jnp.maximum(count, 1).reshape(mask.shape)
            mu_hat = mu / (1 - b1**t).astype(mu.dtype)
            nu_hat = nu / (1 - b2**t).astype(nu.dtype)
            step = mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)
            return jnp.where(mask, step, jnp.zeros_like(step)), count, mu, nu

        out = jax.tree.map(leaf, updates, state.count, state.mu, state.nu)
        treedef = jax.tree.structure(updates)
        new_updates, count, mu, nu = (
            jax.tree.unflatten(treedef, parts)
            for parts in zip(*treedef.flatten_up_to(out), strict=True)
        )
        return new_updates, RowSparseAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def row_sparse_adam(
    learning_rate: float | optax.Schedule,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
) -> optax.GradientTransformation:
    """Row-sparse Adam: `scale_by_row_sparse_adam` followed by a step of -learning_rate.

    Args:
        learning_rate: step size, or an optax schedule (of the global step count, not of a
            row's count).
        b1, b2, eps, eps_root: Adam's constants.

    Returns:
        An optax transformation for params whose leading axis indexes datapoints.
    """
    return optax.chain(
        scale_by_row_sparse_adam(b1=b1, b2=b2, eps=eps, eps_root=eps_root),
        optax.scale_by_learning_rate(learning_rate),
    )


def local_param_labels(params: dict, prefix: str = LOCAL_PREFIX) -> dict[str, str]:
    """ "local" for the param sites whose name starts with `prefix`, "global" for the others."""
    if not isinstance(params, dict):
        raise ValueError(f"expected a dict of NumPyro param sites, got {type(params).__name__}")
    return {name: "local" if name.startswith(prefix) else "global" for name in params}


def make_local_optimizer(
    learning_rate: float,
    local_learning_rate: float | optax.Schedule | None = None,
    *,
    schedule: str = "constant",
    steps_per_epoch: int = 1,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip_norm: float | None = None,
    prefix: str = LOCAL_PREFIX,
) -> optax.GradientTransformation:
    """Row-sparse Adam for per-datapoint params, ordinary Adam for everything else.

    Args:
        learning_rate: step size of the global params (e.g. a decoder's).
        local_learning_rate: step size of the local params (`learning_rate` if None), or an
            optax schedule of the global step count (so with minibatches a row's rate decays
            also over steps it took no part in).
        schedule: the global params' schedule, as in `make_optimizer`; it does not apply to the
            local params.
        steps_per_epoch: optimizer steps per epoch (for epoch-based schedules).
        b1, b2, eps: Adam's constants, for both parts.
        clip_norm: clip the global norm of the global params' gradient to this value. The local
            rows are not clipped: a joint norm would couple the steps of unrelated datapoints.
        prefix: param sites whose name starts with it are local (`"local$"`, as in
            `local_guide`'s `"local$params"`).

    Returns:
        An optax transformation over the dict of NumPyro param sites (wrap with
        `numpyro.optim.optax_to_numpyro` for SVI; `Trainer` does).

    Raises:
        ValueError: a step size (either), clipping norm or Adam constant out of its range.
    """
    check_optimizer_numbers("make_local_optimizer", learning_rate, b1, b2, eps, clip_norm)
    if local_learning_rate is not None and not callable(local_learning_rate):
        check_optimizer_numbers("make_local_optimizer", local_learning_rate, b1, b2, eps, None)
    global_opt = make_optimizer(
        learning_rate,
        schedule=schedule,
        steps_per_epoch=steps_per_epoch,
        b1=b1,
        b2=b2,
        eps=eps,
        clip_norm=clip_norm,
    )
    local_lr = learning_rate if local_learning_rate is None else local_learning_rate
    local_opt = row_sparse_adam(local_lr, b1=b1, b2=b2, eps=eps)
    return optax.multi_transform(
        {"global": global_opt, "local": local_opt},
        lambda params: local_param_labels(params, prefix),
    )
