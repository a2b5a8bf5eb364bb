"""Argument checks shared by the library's entry points.

Each raises a ValueError that names the function, the argument, the value given and the range it
must lie in, so that a bad setting fails before any compilation or data pass. (Data are checked
by `amortjax.traces.check_data`, against the model.)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np


def check_int(where: str, low: int = 1, **values: Any) -> None:
    """Each value must be an integer (not a bool) >= low."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise ValueError(f"{where}: {name} must be an integer >= {low}, got {value!r}")


def check_float(
    where: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    fix: str = "",
) -> None:
    """A finite number in [low, high] (an end excluded when `low_open`/`high_open`); not a
    string or a bool (which `float` would take: "1e-3" fails later, inside optax or XLA)."""
    try:
        number = math.nan if isinstance(value, str | bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    ok = math.isfinite(number)
    if ok and low is not None:
        ok = number > low if low_open else number >= low
    if ok and high is not None:
        ok = number < high if high_open else number <= high
    if not ok:
        left = "(" if low_open else "["
        right = ")" if high_open or high is None else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        hint = f"; {fix}" if fix else ""
        raise ValueError(f"{where}: {name} must be a finite number in {span}, got {value!r}{hint}")


def resolve_settings(where: str, kind: type, settings: Any, overrides: dict[str, Any]) -> Any:
    """An entry point's settings: `settings` (an instance of the NamedTuple `kind`, a dict of its
    fields, or None for its defaults) with the keyword `overrides` applied, e.g.
    `fit_local(..., learning_rate=1e-3)`, `fit_local(..., QStarSettings(...), max_steps=500)` or
    `gap_decomposition(..., qstar={"max_steps": 500})`.

    Raises:
        TypeError: settings of another type, or an override that is not a field of `kind`
            (the message lists the fields), or a required field left out.
    """
    if isinstance(settings, dict):
        settings, overrides = None, {**settings, **overrides}
    unknown = sorted(set(overrides) - set(kind._fields))
    if unknown:
        raise TypeError(
            f"{where}: unknown setting(s) {unknown}; the settings ({kind.__name__}) are "
            f"{list(kind._fields)}"
        )
    if settings is None:
        try:
            return kind(**overrides)
        except TypeError as err:
            raise TypeError(f"{where}: {kind.__name__} needs {err}") from None
    if not isinstance(settings, kind):
        raise TypeError(
            f"{where}: settings must be a {kind.__name__} or a dict of its fields, got "
            f"{type(settings).__name__} (build one with {kind.__name__}(...), or pass its fields "
            "as keyword arguments)"
        )
    return settings._replace(**overrides)


def refuse_missing_params(missing: list[str], params: dict, whose: str) -> None:
    """Refuses parameters without a value for the `missing` param sites of a model or guide
    (`whose`): an evaluator would run it with freshly initialized ones (a random network)."""
    if missing:
        raise ValueError(
            f"params has no value for the {whose}'s parameter sites {missing} (it has "
            f"{sorted(params)}), so they would be freshly initialized (a random network): pass "
            "the trained parameters (e.g. trainer.params(state), or fit(...).params), or hold "
            "chosen values fixed with amortjax.models.with_fixed_params(model, values)"
        )


def check_has_params(where: str, params: dict, name: str) -> None:
    """Refuses params without the trained parameters `name` that `where` reads directly (a
    bare KeyError otherwise), naming the keys given and where the right ones come from."""
    if name not in params:
        raise ValueError(
            f"{where}: params has no {name!r} (keys: {sorted(params)[:6]}): pass the trained "
            "parameters that hold it, e.g. trainer.params(state) or fit(...).params"
        )


def concrete(values: Any) -> np.ndarray | None:
    """values as a NumPy array, or None when they are traced (inside jit or grad), where no
    check of their values is possible."""
    try:
        return np.asarray(values)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return None


def traced(*trees: Any) -> bool:
    """Whether any leaf of `trees` is traced (inside jit, vmap or grad), where no check of
    values is possible; costs no copy (unlike `concrete`)."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(trees))


def check_finite(where: str, name: str, values: Any) -> None:
    """Refuses values `[N, ...]` (parameters or latents a user gives, one row per datapoint)
    with a NaN or an infinite entry, naming the rows: an evaluator would report NaN for them.
    Traced values (inside jit or grad) are not checked."""
    arr = concrete(values)
    if arr is None:
        return
    bad = ~np.isfinite(arr)
    if bad.any():
        rows = np.flatnonzero(bad.reshape(len(arr), -1).any(1)) if arr.ndim else np.zeros(1, int)
        raise ValueError(
            f"{where}: {name} has NaN or infinite values in {len(rows)} of "
            f"{len(arr) if arr.ndim else 1} rows (first rows {rows[:5].tolist()}); give finite "
            "values (e.g. the output of a fit that did not diverge)"
        )


def check_key(where: str, key: Any) -> jax.Array:
    """`key` as one typed PRNG key (`jax.random.key`): a legacy uint32 key
    (`jax.random.PRNGKey`) is wrapped with the same bits, so every entry point takes either kind
    alike; anything else (a seed, an array of keys) is refused, naming the fix. Works on traced
    keys too."""
    if isinstance(key, jax.Array | np.ndarray):
        if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
            if key.shape == ():
                return key
        elif key.dtype == np.uint32 and key.ndim == 1:
            try:
                return jax.random.wrap_key_data(key)
            except (TypeError, ValueError):
                pass
    shape = getattr(key, "shape", None)
    raise ValueError(
        f"{where}: key must be one JAX PRNG key, jax.random.key(seed) (or a legacy "
        f"jax.random.PRNGKey(seed)); got {type(key).__name__}"
        + (f" of shape {shape}" if shape is not None else f" {key!r:.40}")
        + " (for an array of keys, pass one key: each datapoint's key is folded in from it)"
    )


MAX_INDEX = 2**31  # datapoint indices stay below the keys reserved for other streams (2**32 - k)


def check_indices(where: str, indices: Any, n: int | None) -> Any:
    """`indices`, each row's index in its dataset (which keys its draws), must be `[n]`
    integers; where concrete, also distinct and in [0, 2**31). Works on traced indices too
    (the shape only). Returns them (None stays None: the rows' positions)."""
    if indices is None:
        return None
    shape = getattr(indices, "shape", None)
    kind = getattr(indices, "dtype", None)
    if shape != (n,) or kind is None or not np.issubdtype(kind, np.integer):
        raise ValueError(
            f"{where}: indices must be [{n}] integers, each row's index in its dataset (its "
            f"draws are keyed by it); got {type(indices).__name__}"
            + (f" of shape {shape} and dtype {kind}" if shape is not None else "")
        )
    values = concrete(indices)
    if values is None or not values.size:
        return indices
    if values.min() < 0 or values.max() >= MAX_INDEX:
        raise ValueError(
            f"{where}: indices must lie in [0, 2**31); got {values.min()} .. {values.max()}"
        )
    if np.unique(values).size < values.size:
        raise ValueError(
            f"{where}: indices must be distinct (two rows with one index would share their "
            f"draws); {values.size - np.unique(values).size} repeated"
        )
    return indices
