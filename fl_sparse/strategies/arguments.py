"""Checks of the strategies' constructor arguments: a wrong value is named when the strategy is built.

Not when a round first uses it (a ``nan`` ratio used to pass the constructor and stop the
ServerApp in round 1), and not in a compressor's words ("TopK: ratio ...") for an argument
the user called ``downlink_ratio``. A bool is not taken for a number, nor anything but a
bool for a flag (``"false"`` would otherwise switch a feature on).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

__all__ = ["is_number", "ratio_argument", "count_argument", "flag_argument", "positive_argument", "names_argument"]


def is_number(value: Any) -> bool:
    """A real number (numpy's too), and not a bool: True would be taken for 1."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def ratio_argument(name: str, value: Any, upper: float = 1.0) -> float:
    """``value`` as a float in (0, upper], or ValueError naming ``name``."""
    if not (is_number(value) and 0.0 < float(value) <= upper):
        raise ValueError(f"{name} must be a number in (0, {upper:g}], got {value!r}")
    return float(value)


def count_argument(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int >= ``minimum`` (an integral float such as 5.0 is refused too), or ValueError naming ``name``."""
    if not (isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum):
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def positive_argument(name: str, value: Any) -> float:
    """``value`` as a finite float > 0, or ValueError naming ``name``."""
    if not (is_number(value) and math.isfinite(float(value)) and float(value) > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def flag_argument(name: str, value: Any) -> bool:
    """``value`` if it is a bool, or ValueError naming ``name``."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def names_argument(name: str, value: Any) -> tuple[str, ...]:
    """One array name or several, as a tuple of str, or ValueError naming ``name``."""
    names = (value,) if isinstance(value, str) else tuple(value) if isinstance(value, Iterable) else None
    if names is None or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{name} must be an array name or a list of them, got {value!r}")
    return names
