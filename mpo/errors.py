"""Exceptions raised by :mod:`mpo`.

Every error the library raises for bad input is an :class:`MPOError`, so that
callers can catch ours apart from bugs elsewhere. It subclasses
:class:`ValueError` because each one is a bad value handed in by the caller.
"""

__all__ = ["Interrupted", "MPOError"]


class MPOError(ValueError):
    """A bad argument to an :mod:`mpo` function; the message names it and the fix."""


class Interrupted(Exception):
    """A long job stopped by Ctrl-C after saving what it had finished; rerun it to resume."""
