"""Argument checks shared by the public functions: every bad argument raises a TypeError
or ValueError that names it and says what is allowed, when the object is built."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence


def check_int(value: object, name: str, minimum: int = 1) -> int:
    """``value`` if it is an integer >= ``minimum`` (bools are not integers here)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value}")
    return int(value)


def check_number(value: object, name: str) -> float:
    """``value`` as a float if it is a real number (not a bool); range checks are the
    caller's."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def check_positive(value: object, name: str, allow_zero: bool = False) -> float:
    """``value`` as a float if it is a finite number > 0 (>= 0 with ``allow_zero``)."""
    x = check_number(value, name)
    if not (math.isfinite(x) and (x >= 0 if allow_zero else x > 0)):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value}")
    return x


def check_flag(value: object, name: str) -> None:
    """A keyword that must be a real bool (1, "true" or a 0-d tensor is refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def check_choice(value: object, name: str, allowed: Sequence[object]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")


def check_optional_bool(value: object, name: str) -> None:
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"{name} must be True, False or None, got {value!r}")


def check_has_values(tensor: object, what: str) -> None:
    """Refuse a tensor on the ``meta`` device (a shape without values, as a model built
    under ``torch.device("meta")`` outputs): there is nothing to regularize or measure."""
    if getattr(getattr(tensor, "device", None), "type", None) == "meta":
        raise ValueError(f"{what} are on the meta device, which holds shapes but no values: "
                         "materialise the model first (model.to_empty(device=...) and load or "
                         "initialise its weights)")
