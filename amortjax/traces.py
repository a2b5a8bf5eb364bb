"""The one adapter from NumPyro models and guides to per-datapoint densities.

For a model with local latents in the plate `DATA_PLATE`, `log_joint` runs the model on a batch
`x [batch, ...]` with its parameters and latents substituted, and returns log p_theta(x_i, z_i)
for each datapoint `[batch]`: every sample site's log-density, summed over everything but the
plate dimension, without the subsampling scale. `sample_guide` does the same for a guide and
returns z_i ~ q(z_i | x_i) with log q(z_i | x_i). Every evaluator (ELBO, IWAE, AIS, local
optimization) goes through these two functions: there is no second copy of any likelihood.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import traceback
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.primitives import Messenger

from amortjax.checks import check_key, concrete, refuse_missing_params, traced
from amortjax.models import DATA_PLATE

NESTED_PLATE_FIX = (
    "amortjax keeps the data plate as the leftmost batch axis of every local site, so a plate "
    "nested inside it cannot take dim=-1 (nor can a plate around it vectorize a local site): "
    "give each datapoint's own dimensions as event dimensions, e.g. "
    "dist.Normal(0, 1).expand([D]).to_event(1), instead of a plate"
)


class ModelStructureError(ValueError):
    """A model whose structure amortjax cannot handle (e.g. a plate nested in the data plate
    with dim=-1); its message names the fix."""


def _is_plate_collision(err: BaseException) -> bool:
    """NumPyro's bare AssertionError for a plate whose dim another plate holds already."""
    frames = traceback.extract_tb(err.__traceback__)
    return (
        isinstance(err, AssertionError)
        and bool(frames)
        and frames[-1].name == "_subsample"
        and "numpyro" in frames[-1].filename
    )


@contextlib.contextmanager
def explained_model_errors(where: str) -> Iterator[None]:
    """Turns NumPyro's bare errors for model structure amortjax does not support into
    messages that name the problem and the fix."""
    try:
        yield
    except AssertionError as err:
        if _is_plate_collision(err):
            raise ModelStructureError(
                f"{where}: two plates of the model ask for the same batch dimension (a plate "
                f"nested in the data plate with dim=-1?). {NESTED_PLATE_FIX}"
            ) from err
        raise


def _per_datapoint(site: dict, batch: int) -> jax.Array:
    """A site's unscaled log-density summed over all dimensions except the data plate's."""
    log_prob = site["fn"].log_prob(site["value"])
    if site.get("mask") is not None:
        log_prob = jnp.where(site["mask"], log_prob, 0.0)
    frames = [f for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
    if not frames:
        raise ValueError(
            f"sample site {site['name']!r} is outside the plate {DATA_PLATE!r}: only local "
            "latents and observations have a per-datapoint density"
        )
    dim = frames[0].dim
    log_prob = jnp.moveaxis(jnp.atleast_1d(log_prob), dim, 0)
    log_prob = log_prob.reshape(log_prob.shape[0], -1).sum(-1)
    return jnp.broadcast_to(log_prob, (batch,))


def _sum_sites(trace: dict, batch: int, observed: bool | None) -> jax.Array:
    total = jnp.zeros(batch)
    for site in trace.values():
        if site["type"] != "sample":
            continue
        if observed is not None and site["is_observed"] != observed:
            continue
        total = total + _per_datapoint(site, batch)
    return total


def log_joint(
    model: Callable, params: dict, x: jax.Array, latents: dict[str, jax.Array], **model_kwargs
) -> jax.Array:
    """log p_theta(x_i, z_i) for each datapoint of a batch.

    Args:
        model: a NumPyro model `model(x, **model_kwargs)` with its local sites in `DATA_PLATE`.
        params: the model's parameters (e.g. from `SVI.get_params`); extra entries are ignored.
        x: observations, `[batch, ...]`.
        latents: a value for every latent site of the model, e.g. `{"z": [batch, z_dim]}`.
        **model_kwargs: passed to the model (not `n_data`: densities here are unscaled).

    Returns:
        `[batch]` log-densities.
    """
    batch = x.shape[0]
    conditioned = handlers.substitute(model, data={**params, **latents})
    # The seed only serves sites the caller forgot, which are then reported by name.
    trace = handlers.trace(handlers.seed(conditioned, jax.random.key(0))).get_trace(
        x, **model_kwargs
    )
    missing = [
        name
        for name, site in trace.items()
        if site["type"] == "sample" and not site["is_observed"] and name not in latents
    ]
    if missing:
        raise ValueError(f"no value given for the model's latent sites {missing}")
    return _sum_sites(trace, batch, observed=None)


def sample_guide(
    guide: Callable, params: dict, x: jax.Array, key: jax.Array, *guide_args, **guide_kwargs
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Draws z_i ~ q(z_i | x_i) for each datapoint and returns it with log q(z_i | x_i).

    Args:
        guide: a NumPyro guide `guide(x, *guide_args, **guide_kwargs)` with its sites in
            `DATA_PLATE`.
        params: the guide's parameters.
        x: observations, `[batch, ...]`.
        key: PRNG key.
        *guide_args: further per-datapoint inputs of the guide, each `[batch, ...]` (e.g. given
            variational parameters).
        **guide_kwargs: passed to the guide.

    Returns:
        `(latents, log_q)`: a dict of site values `[batch, ...]` and `[batch]` log-densities.
    """
    batch = x.shape[0]
    seeded = handlers.seed(handlers.substitute(guide, data=params), key)
    trace = handlers.trace(seeded).get_trace(x, *guide_args, **guide_kwargs)
    latents = {
        name: site["value"]
        for name, site in trace.items()
        if site["type"] == "sample" and not site["is_observed"]
    }
    return latents, _sum_sites(trace, batch, observed=False)


def log_weights(
    model: Callable, guide: Callable, params: dict, x: jax.Array, key: jax.Array, *guide_args
) -> jax.Array:
    """One importance log-weight per datapoint: log p(x_i, z_i) - log q(z_i | x_i), z_i ~ q.

    Its mean over draws is the ELBO; the log-mean-exp over k draws is the IWAE-k bound.

    Args:
        model: NumPyro model.
        guide: NumPyro guide for the same latent sites.
        params: parameters of both.
        x: observations, `[batch, ...]`.
        key: PRNG key.
        *guide_args: further per-datapoint inputs of the guide, each `[batch, ...]`.

    Returns:
        `[batch]`.

    Raises:
        ValueError: a key that is not one PRNG key; outside jit (called directly, or with x
            closed over by a vmap), data the model cannot score (`check_data`: its shape,
            NaNs, values outside a likelihood's support), naming the rows and the fix, and a
            guide whose parameters are missing from `params` (it would run a freshly
            initialized encoder and return finite numbers) or that draws other latents than
            the model's (`check_guide_draws`); under jit, where the checks' own results are
            traced, only the key is checked.
    """
    key = check_key("log_weights", key)
    x = check_data(model, params, x)
    if not traced(x, params, guide_args):
        check_guide_draws(model, guide, params, x, "log_weights", *guide_args)
    latents, log_q = sample_guide(guide, params, x, key, *guide_args)
    return log_joint(model, params, x, latents) - log_q


def _observed_in_plate(trace: dict):
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        frames = [f for f in site["cond_indep_stack"] if f.name == DATA_PLATE]
        if frames:
            yield name, site, frames[0].dim


def _fits(site: dict) -> tuple[bool, tuple[int, ...]]:
    """Whether an observed site's value has its distribution's shape (the distribution may
    broadcast against its value, not the value against it), and that shape."""
    fn = site["fn"]
    expected = tuple(fn.batch_shape) + tuple(fn.event_shape)
    try:
        return np.broadcast_shapes(site["value"].shape, expected) == site["value"].shape, expected
    except ValueError:
        return False, expected


def _shape_mismatch(name: str, value_shape, expected, x_shape) -> ValueError:
    single = tuple(x_shape) == tuple(expected)[1:]  # x's first axis taken for the datapoints
    return ValueError(
        f"observed site {name!r}: x gives it shape {tuple(value_shape)} but the model's "
        f"distribution has shape {tuple(expected)}: x has shape {tuple(x_shape)}; check it "
        "against the model's (e.g. its x_dim)"
        + (f"; for one datapoint pass x[None], of shape {(1, *x_shape)}" if single else "")
    )


@functools.partial(jax.jit, static_argnums=(0, 3))
def _support_rows(model: Callable, params: dict, part: jax.Array, kwargs: tuple) -> dict:
    """Per observed site in the data plate: `[chunk]` rows inside its support, whether x's
    shape fits its distribution's, and both shapes (compiled once per model and shape)."""
    trace = _trace_with(model, params, part, **dict(kwargs))
    out = {}
    for name, site, dim in _observed_in_plate(trace):
        fn, value = site["fn"], site["value"]
        fits, expected = _fits(site)
        if fits:
            inside = jnp.moveaxis(jnp.atleast_1d(fn.support(value)), dim, 0)
            inside = inside.reshape(inside.shape[0], -1).all(1)
        else:
            inside = jnp.ones(part.shape[0], bool)
        out[name] = (inside, jnp.asarray(fits), jnp.asarray(value.shape), jnp.asarray(expected))
    return out


def _outside_values(model, params, row, name, model_kwargs) -> str:
    """ ", with values [...] (its distribution's support)" for one offending row, traced eagerly
    (only on the error path)."""
    site = _trace_with(model, params, jnp.asarray(row), **model_kwargs)[name]
    base = site["fn"].support
    while hasattr(base, "base_constraint"):  # the elementwise constraint
        base = base.base_constraint
    value = np.asarray(site["value"])
    outside = np.unique(value[~np.broadcast_to(np.asarray(base(value), bool), value.shape)])
    return f", with values {outside[:4].tolist()}; support {site['fn'].support}"


def check_finite_params(params: dict) -> None:
    """Refuses parameters with a NaN or an infinite entry (those of a diverged fit), naming
    the parameter: a likelihood fed them fails deep inside NumPyro ("invalid logits
    parameter") or scores NaN. Traced parameters (inside jit or grad) are not checked."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        if traced(leaf) or not hasattr(leaf, "dtype"):
            continue
        if not jnp.issubdtype(leaf.dtype, jnp.inexact):
            continue
        values = np.asarray(leaf)
        if not np.isfinite(values).all():
            bad = int((~np.isfinite(values)).sum())
            raise ValueError(
                f"params{jax.tree_util.keystr(path)} has {bad} NaN or infinite entries of "
                f"{values.size}: these are the parameters of a fit that diverged; pass those of "
                "a finite checkpoint (e.g. fit(...).params, or lower the learning rate and "
                "train again)"
            )


def check_data(model: Callable, params: dict, x, *, chunk: int = 1000, **model_kwargs) -> jax.Array:
    """Refuses data the model cannot score, before an evaluator spends anything on it.

    Checks that x is an array `[N, ...]` with N >= 1 and only finite values, that the model runs
    on it (its shape fits the model's), and that every observed site inside the data plate lies
    in the support of its distribution (0/1 for a Bernoulli, counts for a Poisson, ...): the
    model is traced with its parameters and latents drawn from the prior, in chunks of `chunk`
    rows, and `site["fn"].support(value)` is checked row by row. This is the one support check
    for every likelihood, including a user's own.

    Args:
        model: a NumPyro model `model(x, **model_kwargs)` with its local sites in `DATA_PLATE`.
        params: the model's parameters.
        x: the observations.
        chunk: rows traced at once.
        **model_kwargs: passed to the model.

    Returns:
        x as a JAX array. Under jit (x traced, or the check's own results traced where x is
        closed over) nothing can be checked, and x is returned as it is.

    Raises:
        ValueError: naming the problem, the offending rows and the fix (also for parameters
            with NaN or infinite entries, `check_finite_params`).
    """
    if concrete(x) is None:
        return jnp.asarray(x)
    arr = check_array(x)
    check_finite_params(params)
    n = arr.shape[0]
    chunk = min(chunk, n)
    kwargs = tuple(sorted(model_kwargs.items()))
    for start in range(0, n, chunk):
        part = arr[start : start + chunk]
        size = part.shape[0]
        if size < chunk:  # pad with copies of the first row: one compiled shape
            part = np.concatenate([part, np.repeat(part[:1], chunk - size, axis=0)])
        try:
            with explained_model_errors("the model cannot run"):
                sites = _support_rows(model, params, jnp.asarray(part), kwargs)
        except ModelStructureError:
            raise
        except Exception as err:
            raise ValueError(
                f"the model cannot run on x of shape {arr.shape} (per datapoint "
                f"{arr.shape[1:]}) with these params: {type(err).__name__}: {err}. Check x's "
                "shape against the model's (e.g. its x_dim), and that params are those of this "
                "model (a parameter of another shape than the model makes means they belong to "
                "a model of another size)"
            ) from err
        if any(concrete(leaf) is None for leaf in jax.tree.leaves(sites)):  # (under jit)
            return jnp.asarray(x)
        for name, (inside, fits, value_shape, expected) in sites.items():
            if not bool(fits):
                raise _shape_mismatch(name, value_shape.tolist(), expected.tolist(), arr.shape)
            bad = ~np.asarray(inside)[:size]
            if bad.any():
                rows = start + np.flatnonzero(bad)
                raise ValueError(
                    f"observed site {name!r}: {len(rows)} rows of x (first: row {rows[0]}"
                    f"{_outside_values(model, params, arr[rows[0]][None], name, model_kwargs)}) "
                    "are outside the support of its likelihood, so the model cannot score them; "
                    "for a Bernoulli likelihood binarize grey levels first "
                    "(amortjax.dynamic_binarize, or x > 0.5)"
                )
    _passed_once(_check_model, model, params, jnp.asarray(arr[:1]), kwargs)
    return jnp.asarray(arr)


def _check_model(model: Callable, params: dict, first: jax.Array, kwargs: tuple) -> None:
    """`check_data`'s checks of the model itself on the first datapoint: its parameters are
    given, and nothing hidden from inference is random."""
    check_params(model, params, "model", first, **dict(kwargs))
    trace = _trace_with(model, params, first, **dict(kwargs))
    _refuse_hidden_randomness(model, trace, first, **dict(kwargs))


_PASSED: collections.OrderedDict = collections.OrderedDict()
_PASSED_MAX = 256


def _passed_once(check: Callable, *args) -> None:
    """Runs `check(*args)` unless it passed before on arguments of the same structure: the same
    functions (model, guide) and other values, and arrays of the same shapes and dtypes
    (remembered for the last `_PASSED_MAX` structures; a failing check is never remembered).

    For the checks that trace a model or guide on one datapoint (`check_params`,
    `check_guide_draws`, `_refuse_hidden_randomness`): what they find is the code's
    structure, not the numbers, and tracing eagerly again on every call cost an evaluator
    about 50 ms (5% of IWAE-5000 on 100 MNIST digits)."""
    leaves, treedef = jax.tree.flatten((check, args))
    try:
        key = (treedef, *(
            ("array", tuple(leaf.shape), str(leaf.dtype)) if hasattr(leaf, "dtype") else leaf
            for leaf in leaves
        ))  # fmt: skip
        hash(key)
    except TypeError:  # an unhashable value: check every time
        check(*args)
        return
    if key in _PASSED:
        _PASSED.move_to_end(key)
        return
    check(*args)
    _PASSED[key] = None
    if len(_PASSED) > _PASSED_MAX:
        _PASSED.popitem(last=False)


def check_params(fn: Callable, params: dict, whose: str, *args, **kwargs) -> None:
    """Refuses `params` without a value for each of fn's parameter sites: an evaluator would
    run fn with freshly initialized ones (a random network) and report finite numbers. fn is
    traced abstractly (`jax.eval_shape`: no computation runs).

    Args:
        fn: the model or guide, called as `fn(*args, **kwargs)` (e.g. on one datapoint).
        params: the parameters an evaluator was given.
        whose: "model" or "guide", for the message.

    Raises:
        ValueError: naming the missing sites, those given, and the fix.
    """
    missing: list[str] = []

    def inspect(params, *args):
        trace = _trace_with(fn, params, *args, **kwargs)
        missing.extend(_missing_in(trace, params))
        return 0

    jax.eval_shape(inspect, params, *args)
    refuse_missing_params(missing, params, whose)


def _trace_with(fn: Callable, data: dict, *args, seed: int = 0, **kwargs) -> dict:
    """fn's trace on `*args`, with `data` (parameters, latents) substituted, seeded, and hidden
    from any handler around it (abstract when run under `jax.eval_shape`)."""
    seeded = handlers.seed(handlers.substitute(fn, data=data), jax.random.key(seed))
    with handlers.block():
        return handlers.trace(seeded).get_trace(*args, **kwargs)


def _missing_in(trace: dict, params: dict) -> list[str]:
    return [n for n, s in trace.items() if s["type"] == "param" and n not in params]


def _latents(trace: dict) -> dict[str, dict]:
    return {
        name: site
        for name, site in trace.items()
        if site["type"] == "sample"
        and not site["is_observed"]
        and not site.get("infer", {}).get("is_auxiliary")
    }


def _check_data_plate(trace: dict, n_data: int, whose: str) -> None:
    plates = [name for name, site in trace.items() if site["type"] == "plate"]
    if DATA_PLATE not in plates:
        raise ValueError(
            f"the {whose} has no plate named {DATA_PLATE!r} (its plates: {plates}); put its "
            f"per-datapoint sites in amortjax.models.data_plate(x, n_data), which is how "
            "amortjax finds the datapoints and scales a minibatch to the whole dataset"
        )
    size = trace[DATA_PLATE]["args"][0]
    if size != n_data:
        raise ValueError(
            f"the {whose}'s data plate has size {size}, but training runs over n_data={n_data} "
            f"datapoints, so each minibatch would count as the whole dataset: pass n_data on, "
            f"`def {whose}(x, n_data=None): with data_plate(x, n_data): ...`"
        )


def _overflow(x: jax.Array, what: str, err: BaseException | None) -> None:
    largest = float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32))))
    raise ValueError(
        f"the guide gave {what} on the first batch. An encoder's output overflows when its "
        f"input is far from unit scale (here |x| up to {largest:g}): give the encoder an input "
        "transform, MLP(..., input_transform='log1p') for counts or "
        "amortjax.nets.Standardize.fit(x_train)"
    ) from err


class _SetInside(Messenger):
    """Wrapped around a model, records the param sites whose value a handler inside it set
    (a user's `substitute`): SVI's own substitute, outside, replaces that value."""

    def __init__(self, fn: Callable) -> None:
        super().__init__(fn)
        self.fixed: list[str] = []

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "param" and msg["value"] is not None:
            self.fixed.append(msg["name"])


FIXED_PARAMS_FIX = (
    "to hold parameters fixed while training the rest, wrap the model in "
    "amortjax.models.with_fixed_params(model, {name: value}), which hides them from SVI"
)


def _refuse_fixed_inside(fixed: list[str]) -> None:
    if fixed:
        raise ValueError(
            f"the model's parameter sites {fixed} are set inside it (by a "
            "numpyro.handlers.substitute), but SVI substitutes every parameter it sees with "
            "its own trained copy, so they would be trained from that value, not held fixed; "
            + FIXED_PARAMS_FIX
        )


def _refuse_hidden_randomness(model: Callable, trace: dict, x: jax.Array, **kwargs) -> None:
    """Refuses a model whose likelihood changes when it runs again with every visible
    parameter and latent of `trace` substituted but another seed: something hidden from
    inference (a param site inside `handlers.block`, initialized afresh on every call) is
    random, so training would fit noise and every evaluator would score a different model."""
    values = {
        name: site["value"]
        for name, site in trace.items()
        if site["type"] == "param" or (site["type"] == "sample" and not site["is_observed"])
    }
    again = _trace_with(model, values, x, seed=12345, **kwargs)
    for name, site in trace.items():
        if site["type"] != "sample" or not site["is_observed"]:
            continue
        first = site["fn"].log_prob(site["value"])
        second = again[name]["fn"].log_prob(again[name]["value"])
        if not np.allclose(np.asarray(first), np.asarray(second), rtol=1e-5, atol=1e-5):
            raise ValueError(
                f"the model's likelihood of {name!r} changes between two runs with the same "
                "parameters and latents: something hidden from inference is drawn afresh on "
                "every call (e.g. a param site inside numpyro.handlers.block, initialized at "
                "random each time), so SVI would train against noise; " + FIXED_PARAMS_FIX
            )


def check_model_and_guide(
    model: Callable, guide: Callable, x: jax.Array, key: jax.Array, n_data: int, **kwargs
) -> None:
    """Refuses a model and guide that would train without error but fit the wrong objective.

    Both are traced once on the batch x with `n_data=n_data` (and `**kwargs`). Each must put
    its per-datapoint sites in the data plate of size n_data (a plate of another name, or one
    of the batch's size because n_data was not passed on, would weigh a minibatch as the whole
    dataset); the guide must sample every latent site of the model, local and global, with the
    model's shape, and no latent site the model lacks (NumPyro only warns, and fits the
    uncovered latents from their prior).

    Raises:
        ValueError: naming the sites or plate and the fix.
    """
    model_key, guide_key = jax.random.split(key)
    probe = _SetInside(model)
    with explained_model_errors("the model cannot run"), handlers.block():
        model_trace = handlers.trace(handlers.seed(probe, model_key)).get_trace(
            x, n_data=n_data, **kwargs
        )
    for name, site, _ in _observed_in_plate(model_trace):
        fits, expected = _fits(site)
        if not fits:
            raise _shape_mismatch(name, site["value"].shape, expected, x.shape)
    _refuse_fixed_inside(probe.fixed)
    _refuse_hidden_randomness(model, model_trace, x, n_data=n_data, **kwargs)
    try:
        with handlers.block():
            guide_trace = handlers.trace(handlers.seed(guide, guide_key)).get_trace(
                x, n_data=n_data, **kwargs
            )
    except ValueError as err:
        if "invalid" not in str(err):
            raise
        _overflow(x, f"invalid variational parameters ({err})", err)
    except Exception as err:  # e.g. Flax's ScopeParamShapeError: an encoder for another x_dim
        raise ValueError(
            f"the guide cannot run on a batch of x of shape {tuple(x.shape)} ({type(err).__name__}"
            f": {str(err)[:300]}); was it built for another x (e.g. amortized_guide(encoder, "
            f"x_dim=...) with x_dim = {x.shape[1:]}, or a preprocess that changes x's shape)?"
        ) from err
    for name, site in _latents(guide_trace).items():
        log_q = site["fn"].log_prob(site["value"])
        if not (jnp.isfinite(site["value"]).all() and jnp.isfinite(log_q).all()):
            _overflow(x, f"non-finite draws or log-densities at site {name!r}", None)
    _check_data_plate(model_trace, n_data, "model")
    wanted, drawn = _latents(model_trace), _latents(guide_trace)
    if drawn:
        _check_data_plate(guide_trace, n_data, "guide")
    missing = [name for name in wanted if name not in drawn]
    extra = [name for name in drawn if name not in wanted]
    if missing or extra:
        local = [
            name
            for name in missing
            if any(f.name == DATA_PLATE for f in wanted[name]["cond_indep_stack"])
        ]
        hints = []
        if local:
            hints.append(
                f"build the guide with site=find_local_latents(model, x) (or model=model) so "
                f"it draws the local latents {local}"
            )
        if len(local) < len(missing):
            hints.append(
                "give it global_guide=global_guide(model) for the latents outside the data plate"
            )
        if extra and not missing:
            hints.append(f"rename the guide's sites {extra} to the model's")
        raise ValueError(
            f"the guide does not draw the model's latent sites {missing}"
            + (f" and draws sites {extra} the model does not have" if extra else "")
            + f" (model latents: {list(wanted)}; guide: {list(drawn)}); "
            + "; ".join(hints)
        )
    _check_shapes(wanted, drawn, "")


def _check_shapes(wanted: dict, drawn: dict, where: str) -> None:
    """Refuses a guide site (of the traces' latents `drawn`) whose shape is not the model's."""
    for name, site in wanted.items():
        if name not in drawn:
            continue  # (a missing site is named by log_joint or check_model_and_guide)
        model_shape, guide_shape = jnp.shape(site["value"]), jnp.shape(drawn[name]["value"])
        if model_shape != guide_shape:
            raise ValueError(
                f"{where}the guide draws site {name!r} with shape {guide_shape}, the model's has "
                f"shape {model_shape}: the guide's latent size must be the model's (an encoder's "
                "output size, or the width of given parameters lambda, is "
                "family.num_params(z_dim) for the model's z_dim)"
            )


def check_guide_draws(
    model: Callable, guide: Callable, params: dict, x: jax.Array, where: str, *guide_args
) -> None:
    """Refuses a guide that an evaluator would run with freshly initialized parameters, or that
    draws a latent of another shape than the model's, before anything is scored (a latent of
    the wrong size used to fail inside the decoder, or score a broadcast z). The guide is
    traced abstractly (`jax.eval_shape`) on the first datapoint, with `params` and the first
    row of each of `guide_args`: no computation runs; once per structure of the arguments
    (`_passed_once`). (`check_data` checks the model's parameters.)

    Raises:
        ValueError: naming the sites, the shapes and the fix.
    """
    _passed_once(_check_guide_draws, model, guide, params, x[:1], where,
                 *(a[:1] for a in guide_args))  # fmt: skip


def _check_guide_draws(model, guide, params, x, where, *guide_args) -> None:
    missing: list[str] = []

    def inspect(params, x, *args):
        try:
            drawn = _trace_with(guide, params, x, *args)
        except (ValueError, TypeError) as err:
            raise ValueError(
                f"{where}: the guide cannot draw for the first datapoint with guide_args of "
                f"shapes {[a.shape[1:] for a in guide_args]} per datapoint ({err}); are they "
                "the parameters of the guide's family for the model's latents?"
            ) from err
        missing.extend(_missing_in(drawn, params))
        if not missing:
            wanted, latents = _latents(_trace_with(model, params, x)), _latents(drawn)
            extra = [name for name in latents if name not in wanted]
            if extra:
                raise ValueError(
                    f"{where}: the guide draws sites {extra} the model does not have (the "
                    f"model's latents: {list(wanted)}): build the guide for the model's sites "
                    "(site=find_local_latents(model, x) lays them out)"
                )
            _check_shapes(wanted, latents, f"{where}: ")
        return 0

    jax.eval_shape(inspect, params, x[:1], *(a[:1] for a in guide_args))
    refuse_missing_params(missing, params, "guide")


def check_array(x) -> np.ndarray:
    """x as a numpy array `[N, ...]` with N >= 1 rows of finite numbers, or a ValueError that
    names the offending rows (the model-free part of `check_data`)."""
    arr = np.asarray(x)
    if arr.ndim < 1 or arr.shape[0] == 0:
        raise ValueError(f"x must be an array [num_datapoints, ...] with at least one row; got "
                         f"shape {arr.shape}")  # fmt: skip
    if not np.issubdtype(arr.dtype, np.number) and arr.dtype != bool:
        raise ValueError(f"x must hold numbers; got dtype {arr.dtype}")
    finite = np.isfinite(arr.reshape(arr.shape[0], -1)).all(1)
    if not finite.all():
        rows = np.flatnonzero(~finite)
        raise ValueError(
            f"x has NaN or infinite values in {len(rows)} of {arr.shape[0]} rows (first: row "
            f"{rows[0]}); drop or impute those rows first"
        )
    return arr
