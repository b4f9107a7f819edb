"""The :class:`MPO`: a matrix stored as a chain of small cores (a tensor-train matrix).

An MPO with cores ``T_k`` of shape ``(R_{k-1}, I_k, J_k, R_k)``, ``R_0 = R_N = 1``,
represents the ``I x J`` matrix (``I = prod I_k``, ``J = prod J_k``)

  W[(i_1..i_N), (j_1..j_N)] = T_1[:, i_1, j_1, :] @ T_2[:, i_2, j_2, :] @ ... @ T_N[:, i_N, j_N, :],

with row and column multi-indices read in C order (see :mod:`mpo.tensorize`).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from math import prod
from typing import Any

from mpo.backend import Backend, backend_of
from mpo.contract import ContractionPlan, apply_plan, core_shapes, dense_plan
from mpo.errors import MPOError, checked_tol
from mpo.rounding import round_cores

__all__ = ["MPO"]


class MPO:
    """A matrix product operator: an ``I x J`` matrix as N cores ``(R_{k-1}, I_k, J_k, R_k)``.

    Build one with :func:`mpo.decompose`, or from cores you already have.
    Cores are numpy arrays or torch tensors (all of one kind, dtype and
    device); every operation returns the same kind, and torch autograd flows
    through all of them. An ``MPO`` is immutable: operations return new ones.

    * ``x @ mpo`` is ``x @ W`` for ``x`` of shape ``(..., I)``, and ``mpo @ y`` is
      ``W @ y`` for ``y`` of shape ``(J,)`` or ``(J, B)``; neither forms ``W``.
    * ``a + b``, ``a - b`` (bond ranks add), ``c * a``, ``-a``, ``a.T``.
    * :meth:`truncate` rounds the bond ranks down with a guaranteed error bound.

    >>> import numpy as np
    >>> import mpo
    >>> W = np.random.default_rng(0).standard_normal((16, 16))
    >>> m = mpo.decompose(W, ((2, 2, 4), (4, 2, 2)))
    >>> m.ranks, m.num_params
    ((8, 8), 384)
    >>> bool(np.allclose(m.to_dense(), W))
    True
    >>> x = np.ones((3, 16))
    >>> bool(np.allclose(x @ m, x @ W))
    True
    """

    # Makes numpy hand `ndarray @ MPO` to MPO.__rmatmul__ instead of converting the MPO.
    __array_ufunc__ = None

    __slots__ = ("_backend", "_cores")

    def __init__(self, cores: Sequence[Any]) -> None:
        cores = tuple(cores)
        if not cores:
            raise MPOError("an MPO needs at least one core")
        backend = backend_of(cores[0])
        for k, core in enumerate(cores):
            if backend_of(core) is not backend or core.dtype != cores[0].dtype:
                raise MPOError(
                    f"core {k} is a {type(core).__name__} of dtype {core.dtype}, core 0 a "
                    f"{type(cores[0]).__name__} of dtype {cores[0].dtype}; all cores must match"
                )
            if getattr(core, "device", None) != getattr(cores[0], "device", None):
                raise MPOError(
                    f"core {k} is on {core.device}, core 0 on {cores[0].device}; move the cores "
                    "to one device first"
                )
            if len(core.shape) != 4:
                raise MPOError(
                    f"core {k} has shape {tuple(core.shape)}; "
                    "cores are 4-D (R_prev, I_k, J_k, R_next)"
                )
        edges = [cores[0].shape[0], *(core.shape[3] for core in cores)]
        expected = [1, *(core.shape[0] for core in cores[1:]), 1]
        if edges != expected:
            raise MPOError(
                f"bond dimensions do not chain: cores have shapes "
                f"{[tuple(core.shape) for core in cores]}; each core's last axis must equal the "
                "next core's first, and the outer two must be 1"
            )
        self._cores = cores
        self._backend = backend

    # -- structure -------------------------------------------------------------

    @property
    def cores(self) -> tuple[Any, ...]:
        """The cores ``T_1..T_N``, each of shape ``(R_{k-1}, I_k, J_k, R_k)``."""
        return self._cores

    @property
    def num_cores(self) -> int:
        return len(self._cores)

    @property
    def row_factors(self) -> tuple[int, ...]:
        """``(I_1, ..., I_N)``, the factors of the row dimension."""
        return tuple(int(core.shape[1]) for core in self._cores)

    @property
    def col_factors(self) -> tuple[int, ...]:
        """``(J_1, ..., J_N)``, the factors of the column dimension."""
        return tuple(int(core.shape[2]) for core in self._cores)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The ``N - 1`` bond ranks ``(R_1, ..., R_{N-1})`` (the outer ranks are always 1)."""
        return tuple(int(core.shape[3]) for core in self._cores[:-1])

    @property
    def shape(self) -> tuple[int, int]:
        """``(I, J)``, the shape of the dense matrix."""
        return prod(self.row_factors), prod(self.col_factors)

    @property
    def num_params(self) -> int:
        """Entries stored in the cores: ``sum_k R_{k-1} I_k J_k R_k``."""
        return sum(prod(core.shape) for core in self._cores)

    @property
    def dtype(self) -> Any:
        return self._cores[0].dtype

    @property
    def backend(self) -> str:
        """``'numpy'`` or ``'torch'``: the array library of the cores."""
        return self._backend.name

    def __repr__(self) -> str:
        return (
            f"MPO(shape={self.shape}, row_factors={self.row_factors}, "
            f"col_factors={self.col_factors}, ranks={self.ranks}, dtype={self.dtype}, "
            f"backend={self.backend})"
        )

    # -- dense form and application --------------------------------------------

    def to_dense(self) -> Any:
        """Contract the cores into the ``I x J`` matrix."""
        plan = dense_plan(core_shapes(self._cores))
        return plan(*self._cores).reshape(self.shape)

    def plan(self, batch: int, *, transpose: bool = False) -> ContractionPlan:
        """The contraction plan of ``x @ mpo`` for ``batch`` rows (``x @ mpo.T`` if ``transpose``).

        ``print(mpo.plan(16))`` shows opt_einsum's report: the pairwise steps,
        their flops and the largest intermediate.
        """
        return apply_plan(batch, core_shapes(self._cores), transpose=transpose)

    def _apply(self, x: Any, *, transpose: bool) -> Any:
        source = self.col_factors if transpose else self.row_factors
        target = self.row_factors if transpose else self.col_factors
        size = prod(source)
        shape = tuple(getattr(x, "shape", ()))
        if backend_of(x) is not self._backend:
            raise MPOError(
                f"cannot apply a {self.backend} MPO to a {type(x).__name__}; convert one of them"
            )
        if not shape or shape[-1] != size:
            raise MPOError(
                f"shape mismatch: the operand has shape {shape} but this {self.shape[0]} x "
                f"{self.shape[1]} MPO needs a last axis of {size}"
            )
        lead = shape[:-1]
        rows = x.reshape((prod(lead), *source))
        cores = self._cores
        common = self._backend.promote(x.dtype, cores[0].dtype)  # as numpy's @ would
        if common != x.dtype:
            rows = self._backend.cast(rows, common)
        if common != cores[0].dtype:
            cores = tuple(self._backend.cast(core, common) for core in cores)
        plan = apply_plan(rows.shape[0], core_shapes(cores), transpose=transpose)
        return plan(rows, *cores).reshape((*lead, prod(target)))

    def __rmatmul__(self, x: Any) -> Any:
        """``x @ mpo`` for ``x`` of shape ``(..., I)``: the rows of ``x`` times ``W``."""
        return self._apply(x, transpose=False)

    def __matmul__(self, y: Any) -> Any:
        """``mpo @ y`` for ``y`` of shape ``(J,)`` or ``(J, B)``: ``W`` times ``y``."""
        if isinstance(y, MPO):
            return NotImplemented
        if len(getattr(y, "shape", ())) == 1:
            return self._apply(y, transpose=True)
        if len(getattr(y, "shape", ())) != 2:
            raise MPOError(
                f"mpo @ y needs y of shape (J,) or (J, B), got {tuple(getattr(y, 'shape', ()))}; "
                "for batches with more axes use x @ mpo.T"
            )
        return self._apply(y.T, transpose=True).T

    @property
    def T(self) -> MPO:
        """The transposed operator (``J x I``): each core's two physical axes swapped."""
        return MPO([self._backend.permute(core, (0, 2, 1, 3)) for core in self._cores])

    # -- linear algebra -----------------------------------------------------------

    def _check_compatible(self, other: MPO) -> None:
        if (self.row_factors, self.col_factors) != (other.row_factors, other.col_factors):
            raise MPOError(
                f"cannot combine MPOs with factors {self.row_factors} x {self.col_factors} and "
                f"{other.row_factors} x {other.col_factors}; both need the same factor shapes"
            )
        if other._backend is not self._backend or other.dtype != self.dtype:
            raise MPOError(
                f"cannot combine a {self.backend} {self.dtype} MPO with a {other.backend} "
                f"{other.dtype} one; cast one with .astype()"
            )

    def __add__(self, other: Any) -> MPO:
        """Direct sum: bond ranks add, and ``(a + b).to_dense() == a.to_dense() + b.to_dense()``."""
        if not isinstance(other, MPO):
            return NotImplemented
        self._check_compatible(other)
        return MPO(_direct_sum(self._cores, other._cores, self._backend))

    def __neg__(self) -> MPO:
        return self * -1

    def __sub__(self, other: Any) -> MPO:
        if not isinstance(other, MPO):
            return NotImplemented
        return self + (-other)

    def __mul__(self, scalar: Any) -> MPO:
        """Scale by a number; only the last core changes, so left-orthonormal cores stay so."""
        if not isinstance(scalar, numbers.Number):
            return NotImplemented
        if not isinstance(scalar, numbers.Real):
            raise MPOError(f"an MPO is scaled by a real number, got {scalar!r}")
        try:  # a Python float keeps the cores' dtype, where a numpy float64 scalar would not
            factor = float(scalar)
        except OverflowError:
            factor = math.inf
        shown = repr(scalar) if len(repr(scalar)) <= 24 else f"{repr(scalar)[:20]}..."
        if not math.isfinite(factor):
            raise MPOError(f"cannot scale an MPO by {shown}: cores must stay finite")
        with warnings.catch_warnings():  # numpy's overflow warning: reported below instead
            warnings.simplefilter("ignore", RuntimeWarning)
            last = self._cores[-1] * factor
        overflowed = (
            abs(factor) > 1
            and not self._backend.all_finite(last)
            and self._backend.all_finite(self._cores[-1])  # finite before: an overflow
        )
        if overflowed:
            narrow = self._backend.eps(self.dtype) > 2.3e-16  # narrower than float64
            wider = "; cast the MPO to a wider dtype first (.astype('float64'))" if narrow else ""
            raise MPOError(f"scaling by {shown} overflows the {self.dtype} last core{wider}")
        return MPO([*self._cores[:-1], last])

    __rmul__ = __mul__

    def astype(self, dtype: Any) -> MPO:
        """The same operator with cores cast to ``dtype`` (``'bfloat16'``, or a native dtype)."""
        target = self._backend.dtype(dtype)
        if not self._backend.is_floating(target):
            raise MPOError(f"cores are floating point; astype({dtype!r}) would truncate them")
        return MPO([self._backend.cast(core, target) for core in self._cores])

    def truncate(self, rank: int | Sequence[int] | None = None, *, tol: float | None = None) -> MPO:
        """Round the bond ranks down (TT rounding) with the error bound of TT-SVD.

        The cores are first made right-orthonormal by QR from the right, then a
        left-to-right sweep of truncated SVDs keeps on each bond at most ``rank``
        directions and, with ``tol``, the fewest directions whose discarded energy
        is at most ``(tol' / sqrt(N - 1))^2 ||W||_F^2`` (``tol'``: ``tol`` less a
        reserve for rounding, as in :func:`mpo.decompose`); so

            ||W - W_rounded||_F <= tol ||W||_F,

        and in general ``||W - W_rounded||_F^2`` is the sum of the discarded squared
        singular values. Ranks never grow. This is how the sum of two MPOs is
        brought back to a small rank. As in :func:`mpo.decompose`, the bound
        covers rounding: a ``tol`` below 1e-5 is worked in float64, and one
        finer than the cores' dtype can hold raises :class:`MPOError`.

        >>> import numpy as np, mpo
        >>> a = mpo.decompose(np.random.default_rng(1).standard_normal((8, 8)), ((2, 4), (4, 2)), 4)
        >>> (a + a).ranks, (a + a).truncate(tol=1e-12).ranks
        ((8,), (4,))
        """
        return MPO(round_cores(self._cores, self._backend, rank, checked_tol(tol)))


def _direct_sum(a: tuple[Any, ...], b: tuple[Any, ...], xp: Backend) -> list[Any]:
    """Cores of ``A + B``: first cores side by side, last stacked, middle block-diagonal."""
    if len(a) == 1:
        return [a[0] + b[0]]
    cores = [xp.concat([a[0], b[0]], axis=3)]
    for core_a, core_b in zip(a[1:-1], b[1:-1], strict=True):
        ra0, i, j, ra1 = core_a.shape
        rb0, _, _, rb1 = core_b.shape
        top = xp.concat([core_a, xp.zeros((ra0, i, j, rb1), like=core_a)], axis=3)
        bottom = xp.concat([xp.zeros((rb0, i, j, ra1), like=core_b), core_b], axis=3)
        cores.append(xp.concat([top, bottom], axis=0))
    cores.append(xp.concat([a[-1], b[-1]], axis=0))
    return cores
