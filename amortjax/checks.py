"""Argument checks shared by the library's entry points.

Each raises a ValueError that names the function, the argument, the value given and the range it
must lie in, so that a bad setting fails before any compilation or data pass. (Data are checked
by `amortjax.traces.check_data`, against the model.)
"""

from __future__ import annotations

import math
from typing import Any

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
    """A finite number in [low, high] (an end excluded when `low_open`/`high_open`)."""
    try:
        number = float(value)
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
