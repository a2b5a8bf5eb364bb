"""Flax (Linen) networks: MLP encoders and decoders.

An encoder maps one observation `[x_dim]` (or a batch `[batch, x_dim]`) to the parameters of a
variational family; a decoder maps a latent `[z_dim]` to the parameters of the likelihood.
Both are plain MLPs here; the NumPyro model and guide register them with `flax_module`. This
module knows nothing of distributions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": nn.tanh,
    "elu": nn.elu,
    "softplus": nn.softplus,
    "gelu": nn.gelu,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """Looks up an activation by name, with an error listing the known ones."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}"
        ) from None


class MLP(nn.Module):
    """A fully connected network: `[..., in] -> [..., out_size]`, linear output layer.

    Attributes:
        hidden_sizes: widths of the hidden layers (empty for a linear map).
        out_size: width of the output.
        activation: name of the hidden activation (see `ACTIVATIONS`).
    """

    hidden_sizes: Sequence[int]
    out_size: int
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation_fn(self.activation)
        for width in self.hidden_sizes:
            x = act(nn.Dense(width)(x))
        return nn.Dense(self.out_size)(x)
