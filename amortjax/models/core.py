"""What every model with local latents shares: the data plate, likelihoods and input checks.

Every model here is a plain NumPyro model `model(x, *, n_data=None)` for a batch `x` of
`[batch, x_dim]` observations, with its local latents and observations inside one plate named
`DATA_PLATE`. When `n_data` is given, the batch is a minibatch of a dataset of that size and the
plate scales the log-likelihood by n_data / batch, so that the SVI loss estimates the full-data
ELBO. Per-datapoint quantities (log p(x_i, z_i)) come from `amortjax.traces`, never from a
second hand-written likelihood.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro import handlers
from numpyro.primitives import Messenger

from amortjax.checks import check_key, refuse_missing_params, traced

DATA_PLATE = "data"


def data_plate(x: jax.Array, n_data: int | None = None) -> numpyro.plate:
    """The plate over datapoints for a batch x `[batch, ...]` drawn from n_data datapoints.

    Raises:
        ValueError: an n_data that is not an integer at least the batch's size (the dataset
            the batch was drawn from cannot be smaller than the batch).
    """
    batch = x.shape[0]
    if n_data is not None and not traced(n_data):
        value = np.asarray(n_data)
        if (
            isinstance(n_data, bool)
            or value.ndim
            or not np.issubdtype(value.dtype, np.integer)
            or int(value) < batch
        ):
            raise ValueError(
                f"data_plate: n_data must be an integer >= the batch's {batch} rows (the size of "
                f"the dataset the batch was drawn from; None for the batch itself); got {n_data!r}"
            )
    if n_data is None or n_data == batch:
        return numpyro.plate(DATA_PLATE, batch)
    return numpyro.plate(DATA_PLATE, n_data, subsample_size=batch)


class BernoulliLogits(dist.BernoulliLogits):
    """NumPyro's Bernoulli in log-odds l, with the log-mass written for finite logits:

        log p(x | l) = x l - softplus(l),   softplus(l) = max(l, 0) + log1p(exp(-|l|)).

    NumPyro's `log_prob` also gives the limits at l = +-inf, through an `isfinite` test and a
    double `where` that cost three times the formula itself on CPU; on a 784-pixel likelihood
    that is most of the time of an IWAE or AIS evaluation of Cremer et al.'s decoder (see
    `bench/evaluators.py`). A decoder's logits are finite; a diverged one (inf) gives NaN here,
    which training's NaN guard reports. For x in {0, 1} values, shapes and gradients are
    NumPyro's (checked in tests/test_models.py); grey levels get the cross-entropy where NumPyro
    gives -inf, but `amortjax.traces.check_data` turns them away before any evaluator sees them.
    """

    def log_prob(self, value: jax.Array) -> jax.Array:
        # integer or boolean pixels (e.g. uint8) as floats: the JVP below needs a float tangent
        value = jnp.asarray(value, jnp.result_type(self.logits, jnp.float32))
        return _bernoulli_log_mass(self.logits, value)


@jax.custom_jvp
def _bernoulli_log_mass(logits: jax.Array, value: jax.Array) -> jax.Array:
    return value * logits - (jnp.maximum(logits, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(logits))))


@_bernoulli_log_mass.defjvp
def _bernoulli_log_mass_jvp(primals, tangents):
    # d/dl = x - sigmoid(l), d/dx = l. Written out because differentiating the formula through
    # max and |.| gives the wrong slope at l = 0 exactly (a zero-initialized decoder's logit).
    logits, value = primals
    d_logits, d_value = tangents
    out = _bernoulli_log_mass(logits, value)
    return out, (value - jax.nn.sigmoid(logits)) * d_logits + logits * d_value


class Bernoulli:
    """p(x | z) = prod_j Bernoulli(x_j; sigmoid(f(z)_j)) for binary x; the decoder gives logits."""

    name = "bernoulli"

    def distribution(self, out: jax.Array) -> dist.Distribution:
        return BernoulliLogits(logits=out).to_event(1)

    def mean(self, out: jax.Array, params: dict | None = None) -> jax.Array:
        return jax.nn.sigmoid(out)

    def check_support(self, x: np.ndarray, grey_ok: bool) -> None:
        if grey_ok:
            bad = (x < 0) | (x > 1)
            need = "values in [0, 1] (grey levels to be binarized each epoch)"
        else:
            bad = (x != 0) & (x != 1)
            need = "binary values in {0, 1}"
        if bad.any():
            row, col = np.argwhere(bad)[0]
            hint = (
                "; grey levels need binarization first ('static' or 'dynamic') or a"
                " Gaussian likelihood"
                if not grey_ok and ((x >= 0) & (x <= 1)).all()
                else ""
            )
            raise ValueError(
                f"a Bernoulli likelihood needs {need}, but x has {int(bad.sum())} values outside "
                f"(first x[{row}, {col}] = {x[row, col]!r}){hint}"
            )


class Gaussian:
    """p(x | z) = N(x; f(z), diag(sigma^2)), sigma a learned global parameter `[x_dim]`."""

    name = "gaussian"

    def distribution(self, out: jax.Array) -> dist.Distribution:
        log_scale = numpyro.param("log_noise_scale", jnp.zeros(out.shape[-1]))
        return dist.Normal(out, jnp.exp(log_scale)).to_event(1)

    def mean(self, out: jax.Array, params: dict | None = None) -> jax.Array:
        return out

    def check_support(self, x: np.ndarray, grey_ok: bool) -> None:
        return None


LIKELIHOODS = {"bernoulli": Bernoulli(), "gaussian": Gaussian()}


def get_likelihood(name: str) -> Bernoulli | Gaussian:
    """Looks up a likelihood by name, with an error listing the known ones."""
    try:
        return LIKELIHOODS[name]
    except KeyError:
        raise ValueError(
            f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}"
        ) from None


def check_observations(
    x: np.ndarray | jax.Array, *, x_dim: int, likelihood: str, grey_ok: bool = False
) -> None:
    """Rejects data a model cannot score, before any training or evaluation.

    Args:
        x: observations, expected `[num_datapoints, x_dim]`.
        x_dim: the model's observation size.
        likelihood: name of the model's likelihood; its support is checked.
        grey_ok: for a Bernoulli likelihood, accept grey levels in [0, 1] (data that the trainer
            binarizes afresh each epoch).

    Raises:
        ValueError: naming the problem (shape, NaN or infinity, values outside the support).
    """
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != x_dim or x.shape[0] == 0:
        raise ValueError(
            f"x must have shape [num_datapoints, x_dim={x_dim}] with num_datapoints > 0; "
            f"got shape {x.shape}"
        )
    finite = np.isfinite(x)
    if not finite.all():
        row, col = np.argwhere(~finite)[0]
        raise ValueError(
            f"x has {int((~finite).sum())} NaN or infinite values (first x[{row}, {col}] = "
            f"{x[row, col]!r})"
        )
    get_likelihood(likelihood).check_support(x, grey_ok)


def with_fixed_params(fn: Callable, params: dict) -> Callable:
    """A model (or guide) whose param sites named in `params` are fixed to those values and
    hidden from any inference around it, so SVI neither sees nor trains them.

    Used to train a new encoder on a frozen, already trained decoder (Cremer et al. 2018's
    frozen-decoder experiment): `with_fixed_params(model, {"decoder$params": ...})`. The
    substitution happens inside the blocking handler, so an outer `substitute` (SVI's) cannot
    replace the fixed values.

    Args:
        fn: a NumPyro model or guide.
        params: param site name -> value.

    Returns:
        A callable with fn's signature.
    """
    names = set(params)
    return handlers.block(handlers.substitute(fn, data=params), hide=list(names))


class _Unobserve(Messenger):
    """Turns every observed sample site into a latent one, so that running the model draws it.

    Records the names of the sites it released in `released`.
    """

    def __init__(self, fn: Callable | None = None) -> None:
        super().__init__(fn)
        self.released: list[str] = []

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["is_observed"]:
            msg["value"] = None
            msg["is_observed"] = False
            self.released.append(msg["name"])


def simulate(
    model: Callable, params: dict, key: jax.Array, x_like: jax.Array, **model_kwargs
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Draws (x_i, z_i) ~ p_theta(x, z) for each datapoint: the model run with x un-observed.

    Generic over models: every latent site is drawn from its prior and the one observed site
    from its likelihood given them, e.g. to make data with known latents for bidirectional
    Monte Carlo.

    Args:
        model: a NumPyro model `model(x, **model_kwargs)` with one observed site.
        params: the model's parameters.
        key: PRNG key.
        x_like: an array with the shape and dtype of the data to draw, `[n, ...]` (only its shape
            and dtype are used: it sizes the data plate).
        **model_kwargs: passed to the model.

    Returns:
        `(x, latents)`: x `[n, ...]` in the dtype of x_like, and a dict of the latent sites'
        values (e.g. `{"z": [n, z_dim]}`).

    Raises:
        ValueError: if the model does not have exactly one observed site, or if the site it
            draws does not have x_like's shape (a likelihood that only broadcasts against
            observed data).
    """
    key = check_key("simulate", key)
    x_like = jnp.asarray(x_like)
    if x_like.ndim < 1 or x_like.shape[0] < 1:
        raise ValueError(
            f"simulate: x_like must be [n, ...] with n >= 1 (it sizes the data plate); got shape "
            f"{x_like.shape}"
        )
    unobserve = _Unobserve(handlers.substitute(model, data=params))
    trace = handlers.trace(handlers.seed(unobserve, key)).get_trace(x_like, **model_kwargs)
    if len(unobserve.released) != 1:
        raise ValueError(
            f"simulate needs a model with exactly one observed site; found {unobserve.released}"
        )
    refuse_missing_params(
        [n for n, s in trace.items() if s["type"] == "param" and n not in params], params, "model"
    )
    (observed,) = unobserve.released
    x = trace[observed]["value"]
    only_broadcasts = x.ndim == x_like.ndim and all(
        a in (b, 1) for a, b in zip(x.shape, x_like.shape, strict=True)
    )
    if x.shape != x_like.shape and not only_broadcasts:
        raise ValueError(
            f"simulate: the model draws its observed site '{observed}' with shape {x.shape} "
            f"(per datapoint {x.shape[1:]}), but x_like has shape {x_like.shape}: give x_like "
            f"the model's data shape, e.g. jnp.zeros(({x_like.shape[0]}, "
            f"{', '.join(map(str, x.shape[1:]))}))"
        )
    if x.shape != x_like.shape:
        raise ValueError(
            f"simulate: the model drew its observed site '{observed}' with shape {x.shape}, not "
            f"x_like's {x_like.shape}: its likelihood's shape follows the observed data only by "
            f"broadcasting. Give the likelihood the data's shape, e.g. "
            f"`dist.Poisson(rate[..., None]).expand(x.shape).to_event(1)`, so that it draws data "
            f"of that shape when x is not observed."
        )
    latents = {
        name: site["value"]
        for name, site in trace.items()
        if site["type"] == "sample" and name != observed
    }
    return x.astype(x_like.dtype), latents
