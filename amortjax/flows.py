"""A normalizing-flow variational family (affine coupling, Real NVP) for both regimes.

What this module is for: the flow families q_Flow (amortized) and q*_Flow (per-example) of
Cremer, Li & Duvenaud (2018), "Inference Suboptimality in Variational Autoencoders". A flow is a
richer q than the diagonal Gaussian, so comparing the gaps of both families separates the
approximation gap (the family's fault) from the amortization gap (the encoder's fault).

- `AffineCouplingFlow` is a family in the sense of `amortjax.families.Family`: every parameter
  of q, the base Gaussian's AND the coupling networks' weights, lives in the flat per-datapoint
  vector lambda `[..., P]`. The per-example optimizer (`amortjax.inference.local.fit_local`)
  therefore fits each datapoint's own flow (q*_Flow), and the refinement of the semi-amortized
  regime moves it like any other lambda.
- `FlowEncoder` is the amortized q_Flow: a Flax encoder whose output is that same lambda, with
  the flow conditioned on the datapoint through a context vector, so that
  `amortized_guide(FlowEncoder(...), x_dim=..., family=AffineCouplingFlow(...))` works unchanged
  and its output can start `fit_local` (q*_Flow refined from the encoder).

What it is not for: density estimation of data (the flow is over the latent z of one datapoint,
a few to a few dozen dimensions), flows over z_dim = 1 (a coupling layer needs two non-empty
halves; use the diagonal Gaussian), or a closed-form mean or entropy (q has neither; ELBOs are
Monte Carlo estimates through `log_prob`).

The math. With d = z_dim, h = ceil(d / 2) and the base draw u ~ N(mu, diag(sigma^2)), layer l
(l = 0 .. L-1) splits its input y into a conditioning half y_a and a transformed half y_b:
even layers condition on the first h coordinates and transform the last d - h, odd layers the
other way round. Each layer has its own one-hidden-layer network

    (s_raw, t) = W2^T act(W1^T y_a + b1) + b2,      s = c * tanh(s_raw / c)   (c = max_log_scale)

and maps

    forward:  y'_a = y_a,   y'_b = y_b * exp(s(y_a)) + t(y_a),    log|det dy'/dy| = sum_j s_j
    inverse:  y_a = y'_a,   y_b = (y'_b - t(y'_a)) * exp(-s(y'_a))

(s and t depend only on the untouched half, so the Jacobian is triangular and the inverse is
exact). With f = f_{L-1} o ... o f_0 and z = f(u),

    log q(z) = log N(f^-1(z); mu, diag(sigma^2)) - sum_l log|det df_l/dy| (at the inverse pass).

The bound c * tanh(. / c) keeps every per-coordinate log-scale in (-c, c) (slope 1 at 0), so a
single optimizer step cannot blow a scale up to inf.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from numpyro.distributions import constraints

from amortjax.nets import ACTIVATIONS, MLP, InputTransform, activation_fn


class CouplingLayer(NamedTuple):
    """Weights of one coupling layer's network, with leading batch dims `[...]`.

    Attributes:
        w1: first-layer weights, `[..., a, hidden]` (a = size of the conditioning half).
        b1: first-layer biases, `[..., hidden]`.
        w2: output weights, `[..., hidden, 2 b]` (b = size of the transformed half); the first
            b columns give s_raw, the last b give t.
        b2: output biases, `[..., 2 b]`, split the same way.
    """

    w1: jax.Array
    b1: jax.Array
    w2: jax.Array
    b2: jax.Array


class _LayerSpec(NamedTuple):
    """Static layout of one coupling layer (Python ints, computed once per (family, z_dim))."""

    cond: slice  # the conditioning half of z
    trans: slice  # the transformed half of z
    a: int  # size of the conditioning half
    b: int  # size of the transformed half
    offset: int  # where the layer's block starts in lambda


@dataclasses.dataclass(frozen=True)
class AffineCouplingFlow:
    """q(z; lambda): a diagonal Gaussian pushed through affine coupling layers (Real NVP).

    Layout of lambda `[..., P]` (everything per datapoint), with d = z_dim and H = hidden:

        [mu (d), log sigma (d), layer 0, layer 1, ..., layer L-1]

    where the block of layer l is, each flattened row-major,

        [W1 (a_l x H), b1 (H), W2 (H x 2 b_l), b2 (2 b_l)]

    with (a_l, b_l) = (h, d - h) for even l and (d - h, h) for odd l, h = ceil(d / 2): even
    layers transform z[h:] given z[:h], odd layers z[:h] given z[h:]. The first b_l columns of
    W2 (and entries of b2) give s_raw, the last b_l give t. So

        P(d) = 2 d + sum_l [H (a_l + 1) + 2 b_l (H + 1)],

    e.g. P(d) = 2 d + L (H (d/2 + 1) + d (H + 1)) for even d (d = 2, L = 2, H = 50: P = 408).

    Attributes:
        num_layers: L, the number of coupling layers (>= 1; 2 lets every coordinate move).
        hidden: H, hidden units of each coupling network (>= 1).
        activation: the coupling networks' hidden activation (a name in `nets.ACTIVATIONS`).
        max_log_scale: c, the bound on every per-coordinate log-scale s (> 0).
        init_seed: seed of the fixed first-layer weights of `standard_params`.
    """

    num_layers: int = 2
    hidden: int = 50
    activation: str = "tanh"
    max_log_scale: float = 2.0
    init_seed: int = 0

    name: ClassVar[str] = "flow"

    def __post_init__(self) -> None:
        if not isinstance(self.num_layers, int) or self.num_layers < 1:
            raise ValueError(f"num_layers must be an integer >= 1; got {self.num_layers!r}")
        if not isinstance(self.hidden, int) or self.hidden < 1:
            raise ValueError(f"hidden must be an integer >= 1; got {self.hidden!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        if not (isinstance(self.max_log_scale, int | float) and self.max_log_scale > 0):
            raise ValueError(f"max_log_scale must be a number > 0; got {self.max_log_scale!r}")
        if not math.isfinite(self.max_log_scale):
            raise ValueError(f"max_log_scale must be finite; got {self.max_log_scale!r}")
        if not isinstance(self.init_seed, int) or self.init_seed < 0:
            raise ValueError(f"init_seed must be an integer >= 0; got {self.init_seed!r}")

    # ----------------------------------------------------------------------------- layout

    def _specs(self, z_dim: int) -> tuple[_LayerSpec, ...]:
        return _layout(self.num_layers, self.hidden, z_dim)

    def num_params(self, z_dim: int) -> int:
        """P, the size of lambda for a latent of size z_dim (>= 2)."""
        specs = self._specs(z_dim)
        last = specs[-1]
        return last.offset + _layer_size(last.a, last.b, self.hidden)

    def z_dim(self, num_params: int) -> int:
        """The z_dim with `num_params(z_dim) == num_params`.

        Raises:
            ValueError: if no z_dim >= 2 has that many parameters.
        """
        return _z_dim_of(self, num_params)

    def layer_sizes(self, z_dim: int) -> list[tuple[int, int]]:
        """(a_l, b_l) per layer: sizes of the conditioning and of the transformed half."""
        return [(s.a, s.b) for s in self._specs(z_dim)]

    def first_layer_bias_indices(self, z_dim: int) -> np.ndarray:
        """Positions in lambda of every layer's b1, layer by layer: `[num_layers * hidden]`.

        `FlowEncoder` adds its context's linear map there.
        """
        h = self.hidden
        return np.concatenate([np.arange(h) + s.offset + s.a * h for s in self._specs(z_dim)])

    def split(self, params: jax.Array) -> tuple[jax.Array, jax.Array, tuple[CouplingLayer, ...]]:
        """Unflattens lambda `[..., P]` into `(mu [..., d], log_sigma [..., d], layers)`.

        Views of params, of its array type (NumPy in, NumPy out).

        Raises:
            ValueError: if params is a scalar or its last axis is no valid P.
        """
        if not isinstance(params, jax.Array | np.ndarray):
            params = jnp.asarray(params)
        if params.ndim < 1:
            raise ValueError(f"params must be [..., num_params]; got a scalar {params!r}")
        z_dim = self.z_dim(params.shape[-1])
        batch, h = params.shape[:-1], self.hidden
        shapes: list[tuple[int, ...]] = [(z_dim,), (z_dim,)]
        for s in self._specs(z_dim):
            shapes += [(s.a, h), (h,), (h, 2 * s.b), (2 * s.b,)]
        cuts = np.cumsum([math.prod(shape) for shape in shapes])[:-1].tolist()
        # One split, not a slice per piece: its gradient is one concatenation rather than a
        # padded [..., P] array per piece, which made the backward pass memory-bound.
        split = jnp.split if isinstance(params, jax.Array) else np.split
        pieces = [
            piece.reshape(*batch, *shape)
            for piece, shape in zip(split(params, cuts, axis=-1), shapes, strict=True)
        ]
        layers = tuple(CouplingLayer(*pieces[i : i + 4]) for i in range(2, len(pieces), 4))
        return pieces[0], pieces[1], layers

    def pack(
        self, loc: jax.Array, log_scale: jax.Array, layers: Sequence[CouplingLayer]
    ) -> jax.Array:
        """Inverse of `split`: lambda `[..., P]` (all pieces broadcast to one batch shape)."""
        pieces = [loc, log_scale]
        for layer in layers:
            pieces += [layer.w1, layer.b1, layer.w2, layer.b2]
        batch = jnp.broadcast_shapes(
            loc.shape[:-1],
            log_scale.shape[:-1],
            *(lay.b1.shape[:-1] for lay in layers),
            *(lay.w1.shape[:-2] for lay in layers),
            *(lay.w2.shape[:-2] for lay in layers),
            *(lay.b2.shape[:-1] for lay in layers),
        )
        flat = []
        for p, ndim in zip(pieces, [1, 1, *[2, 1, 2, 1] * len(layers)], strict=True):
            p = jnp.broadcast_to(p, (*batch, *p.shape[p.ndim - ndim :]))
            flat.append(p.reshape(*batch, -1))
        params = jnp.concatenate(flat, axis=-1)
        self.z_dim(params.shape[-1])  # validates the sizes
        return params

    def with_base(self, loc: jax.Array, log_scale: jax.Array) -> jax.Array:
        """lambda `[..., P]` of the identity flow (the coupling layers of `standard_params`)
        over the base N(loc, diag(exp(log_scale))^2): exactly that diagonal Gaussian, e.g. a
        diagonal Gaussian's q* (`[..., z_dim]` each) as a flow's start."""
        loc = jnp.asarray(loc)
        _, _, layers = self.split(self.standard_params(loc.shape[-1]))
        return self.pack(loc, jnp.asarray(log_scale), layers)

    def standard_params(self, z_dim: int) -> jax.Array:
        """lambda of exactly N(0, I), `[P]`, with nonzero first-layer weights.

        mu = 0, log sigma = 0, and every layer's output weights and biases (W2, b2) are zero, so
        s = t = 0 and each layer is the identity whatever W1 is. W1 of layer l is drawn from
        N(0, 1 / a_l) (LeCun normal): the W1 of layers 0, 1, ... are consecutive standard normal
        draws of `numpy.random.default_rng(init_seed).standard_normal`, each scaled by
        1 / sqrt(a_l); b1 = 0. The W1 draw is what lets a local optimizer started here move
        the flow: with W1 = 0 too, the hidden units are act(0), constant in z, so the gradient
        of the ELBO reaches no weight except the biases and t stays constant.
        """
        return jnp.asarray(_standard_params(self, z_dim))

    # ------------------------------------------------------------------------ transforms

    def _shift_and_log_scale(
        self, layer: CouplingLayer, y_a: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        act = activation_fn(self.activation)
        hid = act(jnp.einsum("...i,...ij->...j", y_a, layer.w1) + layer.b1)
        out = jnp.einsum("...i,...ij->...j", hid, layer.w2) + layer.b2
        s_raw, t = jnp.split(out, 2, axis=-1)
        c = self.max_log_scale
        return c * jnp.tanh(s_raw / c), t

    def forward(self, params: jax.Array, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """z = f(u) through every coupling layer, with log|det df/du|.

        Args:
            params: lambda, `[..., P]` (only the coupling weights are used).
            u: points in base space, `[..., z_dim]`, broadcastable against params' batch
                shape (e.g. `[*sample_shape, *batch, z_dim]`).

        Returns:
            `(z [..., z_dim], log_det [...])`, log_det = sum over layers and coordinates of s.
        """
        params, u = jnp.asarray(params), jnp.asarray(u)
        _check_event(u, params, self)
        return _transform_jit(self, False, params, u)

    def inverse(self, params: jax.Array, z: jax.Array) -> tuple[jax.Array, jax.Array]:
        """u = f^-1(z), layers undone last to first, with the FORWARD log|det df/du| at u.

        Args:
            params: lambda, `[..., P]`.
            z: points, `[..., z_dim]`, broadcastable against params' batch shape.

        Returns:
            `(u [..., z_dim], log_det [...])` with log q(z) = log N(u; mu, sigma) - log_det.
        """
        params, z = jnp.asarray(params), jnp.asarray(z)
        _check_event(z, params, self)
        return _transform_jit(self, True, params, z)

    # -------------------------------------------------------------------- Family protocol

    def distribution(self, params: jax.Array) -> AffineCouplingDistribution:
        """q(z; lambda) for params `[..., P]`: batch shape `[...]`, event shape `[z_dim]`."""
        return AffineCouplingDistribution(jnp.asarray(params), self)

    def mean(self, params: jax.Array) -> jax.Array:
        """f(mu), the image of the base mean, `[..., z_dim]`: NOT E_q[z], which has no closed
        form (for an identity flow, e.g. `standard_params`, the two coincide)."""
        return _mean_jit(self, jnp.asarray(params))


def _transform(
    family: AffineCouplingFlow, inverse: bool, params: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The forward map (inverse=False) or its inverse, with the forward log|det| at u."""
    _, _, layers = family.split(params)
    pairs = list(zip(family._specs(y.shape[-1]), layers, strict=True))
    log_det = jnp.zeros(y.shape[:-1])
    for spec, layer in reversed(pairs) if inverse else pairs:
        s, t = family._shift_and_log_scale(layer, y[..., spec.cond])
        y_a = jnp.broadcast_to(y[..., spec.cond], (*s.shape[:-1], spec.a))
        if inverse:
            y_b = (y[..., spec.trans] - t) * jnp.exp(-s)
        else:
            y_b = y[..., spec.trans] * jnp.exp(s) + t
        y = _join(spec, y_a, y_b)
        log_det = log_det + s.sum(-1)
    return y, log_det


# One compiled program per (family, shapes): called eagerly, the many small ops of a coupling
# pass would otherwise each be dispatched (and compiled) on their own. Inside a caller's jit
# these are simply inlined.
_transform_jit = jax.jit(_transform, static_argnums=(0, 1))


def _push(family: AffineCouplingFlow, params: jax.Array, eps: jax.Array) -> jax.Array:
    """z = f(mu + sigma eps) for standard normal noise eps `[..., z_dim]`."""
    loc, log_scale, _ = family.split(params)
    return _transform(family, False, params, loc + jnp.exp(log_scale) * eps)[0]


def _log_prob(family: AffineCouplingFlow, params: jax.Array, value: jax.Array) -> jax.Array:
    loc, log_scale, _ = family.split(params)
    u, log_det = _transform(family, True, params, value)
    base = -0.5 * ((u - loc) * jnp.exp(-log_scale)) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)
    return base.sum(-1) - log_det


def _mean(family: AffineCouplingFlow, params: jax.Array) -> jax.Array:
    return _transform(family, False, params, family.split(params)[0])[0]


_push_jit = jax.jit(_push, static_argnums=0)
_mean_jit = jax.jit(_mean, static_argnums=0)
_log_prob_jit = jax.jit(_log_prob, static_argnums=0)


@functools.cache
def _standard_params(family: AffineCouplingFlow, z_dim: int) -> np.ndarray:
    # NumPy, not jax.random: concrete values even when first called inside a trace (a Flax
    # init under jit), and no compiled sampler per layer shape.
    rng = np.random.default_rng(family.init_seed)
    h = family.hidden
    pieces = [np.zeros(2 * z_dim)]
    for s in family._specs(z_dim):
        pieces += [
            rng.standard_normal(s.a * h) / np.sqrt(s.a),  # W1, [a, H] row-major
            np.zeros(h + h * 2 * s.b + 2 * s.b),  # b1, W2, b2
        ]
    return np.concatenate(pieces).astype(np.float32)


def _join(spec: _LayerSpec, y_a: jax.Array, y_b: jax.Array) -> jax.Array:
    """Puts the two halves (same batch shape) back in coordinate order."""
    first, second = (y_a, y_b) if spec.cond.start == 0 else (y_b, y_a)
    return jnp.concatenate([first, second], axis=-1)


def _check_event(y: jax.Array, params: jax.Array, family: AffineCouplingFlow) -> int:
    """The z_dim of lambda `[..., P]`, after checking that the points y are `[..., z_dim]`."""
    if jnp.ndim(params) < 1:
        raise ValueError(f"params must be [..., num_params]; got shape {jnp.shape(params)}")
    z_dim = family.z_dim(params.shape[-1])
    if jnp.ndim(y) < 1 or y.shape[-1] != z_dim:
        raise ValueError(f"points must be [..., z_dim={z_dim}]; got shape {jnp.shape(y)}")
    return z_dim


def _layer_size(a: int, b: int, hidden: int) -> int:
    return hidden * (a + 1) + 2 * b * (hidden + 1)


@functools.cache
def _z_dim_of(family: AffineCouplingFlow, num_params: int) -> int:
    z_dim = 2
    while (size := family.num_params(z_dim)) < num_params:
        z_dim += 1
    if size != num_params:
        raise ValueError(
            f"{num_params} parameters is not the size of lambda of {family!r} for any z_dim >= 2 "
            f"(P(2) = {family.num_params(2)}; the nearest above is P({z_dim}) = {size})"
        )
    return z_dim


@functools.cache
def _layout(num_layers: int, hidden: int, z_dim: int) -> tuple[_LayerSpec, ...]:
    if isinstance(z_dim, bool) or not isinstance(z_dim, int | np.integer) or z_dim < 2:
        raise ValueError(
            f"AffineCouplingFlow needs an integer z_dim >= 2 (a coupling layer splits z into two "
            f"non-empty halves); got z_dim={z_dim!r}. For z_dim = 1 use the diagonal Gaussian."
        )
    z_dim = int(z_dim)
    h = (z_dim + 1) // 2
    specs, offset = [], 2 * z_dim
    for layer in range(num_layers):
        if layer % 2 == 0:
            spec = _LayerSpec(slice(0, h), slice(h, z_dim), h, z_dim - h, offset)
        else:
            spec = _LayerSpec(slice(h, z_dim), slice(0, h), z_dim - h, h, offset)
        specs.append(spec)
        offset += _layer_size(spec.a, spec.b, hidden)
    return tuple(specs)


class AffineCouplingDistribution(dist.Distribution):
    """The NumPyro distribution of `AffineCouplingFlow`: z = f(u), u ~ N(mu, diag(sigma^2)).

    Reparameterized (`rsample` / `sample` draw eps ~ N(0, I), u = mu + sigma eps, z = f(u)), so
    `Trace_ELBO` differentiates through the draw; `log_prob(z)` is exact, through the inverse
    (see the module docstring). Batch shape `params.shape[:-1]`, event shape `[z_dim]`.

    Args:
        params: lambda, `[..., P]`.
        family: the `AffineCouplingFlow` whose layout params follows.
        validate_args: NumPyro's argument validation.
    """

    arg_constraints: ClassVar[dict] = {"params": constraints.real_vector}
    support = constraints.real_vector
    reparametrized_params: ClassVar[list[str]] = ["params"]
    pytree_data_fields = ("params",)
    pytree_aux_fields = ("family", "z_dim")

    def __init__(
        self, params: jax.Array, family: AffineCouplingFlow, *, validate_args: bool | None = None
    ):
        if jnp.ndim(params) < 1:
            raise ValueError(f"params must be [..., num_params]; got shape {jnp.shape(params)}")
        self.params = params
        self.family = family
        self.z_dim = family.z_dim(params.shape[-1])
        super().__init__(
            batch_shape=params.shape[:-1], event_shape=(self.z_dim,), validate_args=validate_args
        )

    def rsample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        """z `[*sample_shape, *batch_shape, z_dim]`, differentiable in params."""
        # The noise is drawn outside the compiled push: jax caches its own compiled sampler
        # per shape, and the threefry draw would make every compiled push several times
        # slower to compile.
        eps = jax.random.normal(key, (*sample_shape, *self.batch_shape, self.z_dim))
        return _push_jit(self.family, self.params, eps)

    def sample(self, key: jax.Array, sample_shape: tuple[int, ...] = ()) -> jax.Array:
        return self.rsample(key, sample_shape)

    def log_prob(self, value: jax.Array) -> jax.Array:
        """log q(z) = log N(f^-1(z); mu, diag(sigma^2)) - log|det df/du|, shape `[...]`."""
        value = jnp.asarray(value)
        _check_event(value, self.params, self.family)
        return _log_prob_jit(self.family, self.params, value)


class FlowEncoder(nn.Module):
    """The amortized q_Flow: x `[..., x_dim]` -> lambda `[..., P]` of an `AffineCouplingFlow`.

    A trunk MLP maps x to (mu, log sigma, c) with c a context vector `[..., context_dim]`. The
    flow weights are a learned global vector w (param "flow_weights", `[P - 2 z_dim]`,
    initialized at `family.standard_params(z_dim)`'s weights, so that every layer starts as the
    identity) plus a learned linear map of c (the bias-free Dense "context",
    `[context_dim, num_layers * hidden]`) added to the first-layer biases b1 of every coupling
    network. Since W1^T y_a + b1 + V^T c = [W1; V]^T [y_a; c] + b1, this is a conditional
    coupling flow whose networks take the encoder's context as an extra input. The output is
    the full lambda in the family's layout, so `amortized_guide` and `fit_local(init=...)`
    take it as they take any family's parameters.

    Attributes:
        z_dim: latent size (>= 2).
        family: the flow family (its layout and settings).
        hidden_sizes: widths of the trunk's hidden layers.
        activation: the trunk's activation (a name in `nets.ACTIVATIONS`).
        context_dim: size of c (>= 0; 0 gives one flow for all x, only the base is amortized).
        input_transform: the trunk's input transform (see `nets.MLP`).
    """

    z_dim: int
    family: AffineCouplingFlow = AffineCouplingFlow()
    hidden_sizes: Sequence[int] = (200,)
    activation: str = "relu"
    context_dim: int = 16
    input_transform: InputTransform = "identity"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """lambda `[..., P]` for x `[..., x_dim]`."""
        if not isinstance(self.family, AffineCouplingFlow):
            raise ValueError(f"FlowEncoder needs an AffineCouplingFlow family; got {self.family!r}")
        if not isinstance(self.context_dim, int) or self.context_dim < 0:
            raise ValueError(f"context_dim must be an integer >= 0; got {self.context_dim!r}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}; choose one of {sorted(ACTIVATIONS)}"
            )
        d, family = self.z_dim, self.family
        standard = family.standard_params(d)  # also validates z_dim
        out = MLP(
            tuple(self.hidden_sizes), 2 * d + self.context_dim, self.activation,
            self.input_transform,
        )(x)  # fmt: skip
        weights = self.param("flow_weights", lambda _key: standard[2 * d :])
        batch = out.shape[:-1]
        lam = jnp.concatenate(
            [out[..., : 2 * d], jnp.broadcast_to(weights, (*batch, weights.shape[-1]))], axis=-1
        )
        if self.context_dim:
            context = out[..., 2 * d :]
            shift = nn.Dense(family.num_layers * family.hidden, use_bias=False, name="context")(
                context
            )
            lam = lam.at[..., family.first_layer_bias_indices(d)].add(shift)
        return lam
