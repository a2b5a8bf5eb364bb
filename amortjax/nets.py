"""Flax (Linen) networks: MLP encoders and decoders.

An encoder maps one observation `[x_dim]` (or a batch `[batch, x_dim]`) to the parameters of a
variational family; a decoder maps a latent `[z_dim]` to the parameters of the likelihood.
Both are plain MLPs here; the NumPyro model and guide register them with `flax_module`. This
module knows nothing of distributions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


INPUT_TRANSFORMS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "log1p": jnp.log1p,  # counts: log(1 + x) keeps a first layer's pre-activations O(1)
}


@dataclasses.dataclass(frozen=True)
class Standardize:
    """x -> (t(x) - mean) / scale per input feature, t = log1p or the identity: an encoder's
    input transform for data on scales far from 1. `Standardize.fit(x_train)` takes mean and
    scale from the training data.

    Attributes:
        mean: per-feature means of t(x), a tuple (hashable, so the encoder stays a static value).
        scale: per-feature standard deviations of t(x) (floored at 1e-6).
        log1p: t = log1p (for counts) rather than the identity.
    """

    mean: tuple[float, ...]
    scale: tuple[float, ...]
    log1p: bool = False

    @classmethod
    def fit(cls, x: np.ndarray | jax.Array, *, log1p: bool = False) -> Standardize:
        """From training data `[N, x_dim]` (after log1p when `log1p`, e.g. for counts)."""
        x = np.asarray(x, np.float64)
        x = np.log1p(x) if log1p else x
        scale = np.maximum(x.std(axis=0), 1e-6)
        return cls(tuple(x.mean(axis=0).tolist()), tuple(scale.tolist()), log1p)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.log1p(x) if self.log1p else x
        return (x - jnp.asarray(self.mean, x.dtype)) / jnp.asarray(self.scale, x.dtype)


InputTransform = str | Callable[[jax.Array], jax.Array]
"""A name in `INPUT_TRANSFORMS` or a function `[..., x_dim] -> [..., x_dim]`."""


def input_transform_fn(transform: InputTransform) -> Callable[[jax.Array], jax.Array]:
    """The function behind an encoder's `input_transform`, with an error listing the names."""
    if callable(transform):
        return transform
    try:
        return INPUT_TRANSFORMS[transform]
    except KeyError:
        raise ValueError(
            f"unknown input_transform {transform!r}; choose one of {sorted(INPUT_TRANSFORMS)} "
            "or pass a function (e.g. Standardize.fit(x_train))"
        ) from None


class MLP(nn.Module):
    """A fully connected network: `[..., in] -> [..., out_size]`, linear output layer.

    Attributes:
        hidden_sizes: widths of the hidden layers (empty for a linear map).
        out_size: width of the output.
        activation: name of the hidden activation (see `ACTIVATIONS`).
        input_transform: applied to the input first (see `INPUT_TRANSFORMS`, `Standardize`):
            an encoder of raw counts (values in the hundreds) starts with an infinite loss
            unless its input is brought near unit scale, e.g. by "log1p". Part of the network,
            so every use of the encoder (training, `encode`, new data) applies it.
        output_bias: the output layer's initial bias, `out_size` numbers (a tuple, so the
            module stays hashable), or None for zeros; e.g. a Bernoulli decoder started at the
            logits of the training pixel means, `mean_logits(x_train)` (Burda et al. 2016).
    """

    hidden_sizes: Sequence[int]
    out_size: int
    activation: str = "relu"
    input_transform: InputTransform = "identity"
    output_bias: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        sizes = self.hidden_sizes
        ok = isinstance(sizes, tuple | list) and all(
            isinstance(w, int | np.integer) and not isinstance(w, bool) and w >= 1 for w in sizes
        )
        if not ok:
            raise ValueError(
                f"MLP: hidden_sizes must be a tuple of positive widths, e.g. (400,) or () for a "
                f"linear map; got {sizes!r}"
            )
        out = self.out_size
        if isinstance(out, bool) or not isinstance(out, int | np.integer) or out < 1:
            raise ValueError(f"MLP: out_size must be a positive integer; got {out!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = activation_fn(self.activation)
        x = input_transform_fn(self.input_transform)(x)
        for width in self.hidden_sizes:
            x = act(nn.Dense(width)(x))
        if self.output_bias is None:
            return nn.Dense(self.out_size)(x)
        if len(self.output_bias) != self.out_size:
            raise ValueError(
                f"MLP: output_bias has {len(self.output_bias)} values for out_size {self.out_size}"
            )
        bias = jnp.asarray(self.output_bias, jnp.float32)
        return nn.Dense(self.out_size, bias_init=lambda *_: bias)(x)


def mean_logits(x: np.ndarray, clip: float = 1e-3) -> tuple[float, ...]:
    """Burda et al.'s (2016) initial output bias of a Bernoulli decoder: the logit of each
    feature's mean over the training data, b_d = log m_d - log(1 - m_d) with
    m_d = clip(mean_i x_id, clip, 1 - clip), so that the untrained decoder predicts every pixel's
    mean (computed in float64).

    Args:
        x: training data in [0, 1] (binary, or grey levels that are binarized later),
            `[N, D]`.
        clip: keeps the logits finite for features that are always 0 or always 1.

    Returns:
        D floats (a tuple: `MLP(..., output_bias=mean_logits(x))`).
    """
    arr = np.asarray(x, np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1:
        raise ValueError(f"mean_logits: x must be [N, D] with N >= 1, got shape {arr.shape}")
    if not 0.0 < clip < 0.5:
        raise ValueError(f"mean_logits: clip must be in (0, 0.5), got {clip}")
    mean = np.clip(arr.mean(0), clip, 1 - clip)
    return tuple(float(v) for v in np.log(mean) - np.log1p(-mean))
