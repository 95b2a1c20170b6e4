"""Checks of the losses' constructor arguments, so a bad value from a bundle config fails at construction with
one line naming the argument, instead of turning every loss into NaN (or silently reversing a term) later.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

__all__ = ["check_weight", "check_positive", "check_layer_paths"]


def _real(name: str, value: Any, requirement: str) -> float:
    """``value`` as a float; bools, strings and other non-numbers (and NaN or infinity) are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be {requirement}, got {value!r}.")
    return float(value)


def check_weight(name: str, value: Any) -> float:
    """A weight or factor of a loss: a finite real number >= 0 (a negative weight would maximize its term).

    Args:
        name: the argument's name, used in the error message.
        value: the value to check (an int or float; a 0-d tensor holding a number is accepted).

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: not a number (bools and strings included), NaN, infinite or negative.
    """
    value = _real(name, _item(value), "a finite number >= 0")
    if value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
    return value


def check_positive(name: str, value: Any) -> float:
    """A scale of a loss (temperature, exponent, ``eps``, sharpness): a finite real number > 0.

    Args:
        name: the argument's name, used in the error message.
        value: the value to check.

    Returns:
        ``value`` as a float.

    Raises:
        ValueError: not a number (bools and strings included), NaN, infinite, zero or negative.
    """
    value = _real(name, _item(value), "a finite number > 0")
    if value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
    return value


def check_layer_paths(name: str, paths: Any) -> tuple[str, ...]:
    """A list of module paths, each a non-empty string.

    A single string is refused rather than read as a sequence of one-character paths (``"blocks.2"`` would
    become ``("b", "l", "o", ...)``): write ``[blocks.2]`` in YAML.

    Args:
        name: the argument's name, used in the error message.
        paths: the sequence to check.

    Returns:
        The paths as a tuple.

    Raises:
        ValueError: a string, not a sequence, or an entry that is not a non-empty string.
    """
    if isinstance(paths, str) or not isinstance(paths, Sequence):
        raise ValueError(f"{name} must be a list of module paths (e.g. ['blocks.2']), got {paths!r}.")
    for path in paths:
        if not isinstance(path, str) or not path:
            raise ValueError(f"{name} must hold module paths (non-empty strings), got {path!r} in {list(paths)!r}.")
    return tuple(paths)


def _item(value: Any) -> Any:
    """The Python number of a 0-d tensor or numpy scalar, anything else unchanged."""
    item = getattr(value, "item", None)
    if callable(item) and getattr(value, "ndim", None) == 0:
        return item()
    return value
