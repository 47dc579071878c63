"""Checks of the operators' scalar arguments and shapes: TypeError for a wrong kind, ValueError for a
wrong value, each naming the argument and the value it got. Integers may be Python's or numpy's
(numbers.Integral), never bools; they come back as Python ints."""

from __future__ import annotations

import math
from numbers import Integral, Real


class ShapeError(ValueError, RuntimeError):
    """A tensor shape or a size argument that does not fit. A ValueError, and a RuntimeError too:
    torchvision raises RuntimeError for the same mistakes, and code written for it catches that."""


def _is_int(value) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def pair(value, name: str, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= minimum, as a pair of Python ints."""
    pair = (value, value) if _is_int(value) else tuple(value) if isinstance(value, (tuple, list)) else ()
    if len(pair) != 2 or not all(_is_int(v) for v in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(pair) < minimum:
        raise ShapeError(f"{name} must be >= {minimum}, got {value!r}")
    return int(pair[0]), int(pair[1])


def positive_int(name: str, value) -> int:
    if not _is_int(value):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def finite(name: str, value, positive: bool = False) -> float:
    """A real number (not a bool) that is finite, and > 0 with `positive`, as a float."""
    if not isinstance(value, Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be {'positive and ' if positive else ''}finite, got {value!r}")
    return float(value)


def expect_shape(name: str, shape: tuple | None, expected: tuple[int, ...], layout: str) -> None:
    """`shape` (None for an absent optional tensor) must be `expected`, laid out as `layout`."""
    if shape is not None and tuple(shape) != expected:
        raise ShapeError(f"{name} must have shape {expected} ({layout}), got {tuple(shape)}")
