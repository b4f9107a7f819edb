"""Exceptions raised by :mod:`mpo`.

Every error the library raises for bad input is an :class:`MPOError`, so that
callers can catch ours apart from bugs elsewhere. It subclasses
:class:`ValueError` because each one is a bad value handed in by the caller.
"""

import math
import numbers
from typing import Any

__all__ = ["Interrupted", "MPOError", "checked_tol", "is_count"]


class MPOError(ValueError):
    """A bad argument to an :mod:`mpo` function; the message names it and the fix."""


class Interrupted(Exception):
    """A long job stopped by Ctrl-C after saving what it had finished; rerun it to resume."""


def is_count(value: Any) -> bool:
    """True for an integer, Python's or numpy's, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def checked_tol(tol: Any) -> float | None:
    """``tol`` (a relative error) as a float, or :class:`MPOError` unless it is a
    non-negative finite number; ``None`` stays ``None``."""
    if tol is None:
        return None
    real = isinstance(tol, numbers.Real) and not isinstance(tol, bool)
    if not (real and math.isfinite(tol) and tol >= 0):
        raise MPOError(f"tol must be a non-negative number (a relative error), got {tol!r}")
    return float(tol)
