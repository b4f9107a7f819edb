"""TT-SVD: the MPO decomposition of a matrix (Algorithm 1 of the DoTA paper; Oseledets 2011).

With ``W`` viewed as the order-2N tensor of :mod:`mpo.tensorize`, step ``k``
reshapes what is left into the unfolding ``C_k`` of shape
``(R_{k-1} I_k J_k, prod_{n > k} I_n J_n)``, splits it as ``C_k ~ U_k (U_k^T C_k)``
keeping ``R_k`` directions, stores ``U_k`` as core ``k`` and passes ``U_k^T C_k``
on; what is left after ``N - 1`` steps is core ``N``. The left cores are
therefore orthonormal and the norm of the approximation sits in the last one.

Because the left cores are orthonormal, the squared error is exactly the sum
of the squared singular values dropped at each step, which gives the
guarantees tested in ``tests/``:

* with ``tol``, each step drops at most ``(tol' / sqrt(N - 1))^2 ||W||_F^2``, where
  ``tol' = tol - reserve`` leaves room for rounding (``sqrt(N) eps`` of the cores'
  dtype plus the arithmetic's error: :func:`mpo.svd.tolerance_budget`), so
  ``||W - MPO||_F <= tol ||W||_F`` for the cores as returned;
* with a rank threshold, ``||W - MPO||_F^2 <= sum_k tail_k``, where ``tail_k``
  is the energy beyond rank ``R_k`` of the k-th unfolding of ``W`` itself
  (see :func:`unfolding_spectra`).

How each step's split is computed, and the sign convention that makes the
result deterministic, is in :mod:`mpo.svd`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from math import prod
from typing import Any

from mpo.backend import Backend, backend_of
from mpo.count import Rank, bond_ranks
from mpo.errors import MPOError, checked_tol, is_count
from mpo.operator import MPO
from mpo.svd import singular_values, split, squared_norm, tolerance_budget
from mpo.tensorize import check_factors, factorize, matrix_to_tensor

__all__ = ["decompose", "unfolding_spectra"]

Shape = tuple[Sequence[int], Sequence[int]]


def _check_matrix(W: Any) -> Backend:
    xp = backend_of(W)
    shape = tuple(W.shape)
    if len(shape) != 2:
        raise MPOError(
            f"expected a 2-D matrix, got an array of shape {shape}; reshape it to (rows, columns)"
        )
    if 0 in shape:
        raise MPOError(f"the matrix is empty (shape {shape}); there is nothing to decompose")
    if not xp.is_floating(W.dtype):
        raise MPOError(f"expected a floating-point matrix, got dtype {W.dtype}; cast it first")
    return xp


def _checked_norm(W: Any, tensor: Any, xp: Backend) -> float:
    """``||W||_F^2``, which is finite exactly when every entry is (short of overflow)."""
    with warnings.catch_warnings():  # an overflow is reported below, as an MPOError
        warnings.simplefilter("ignore", RuntimeWarning)
        norm_sq = squared_norm(tensor, xp)
    if math.isfinite(norm_sq):
        return norm_sq
    if not xp.all_finite(W):
        raise MPOError(
            "the matrix contains NaN or Inf, so an MPO of it would be meaningless; check where "
            "it came from (a diverged run, a failed load, an overflowing cast to float16)"
        )
    raise MPOError(
        "the matrix's squared Frobenius norm overflows float64; scale it down before "
        "decomposing (the MPO of c W is c times that of W)"
    )


def _factors(
    matrix_shape: tuple[int, int], shape: Shape | None, num_cores: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    if num_cores is not None and (not is_count(num_cores) or num_cores < 1):
        raise MPOError(f"num_cores must be a positive integer, got {num_cores!r}")
    if shape is None:
        n = 5 if num_cores is None else num_cores
        return factorize(matrix_shape[0], n), factorize(matrix_shape[1], n)
    if not isinstance(shape, Sequence) or len(shape) != 2 or isinstance(shape[0], int):
        raise MPOError(
            f"shape must be a pair (row_factors, col_factors), got {shape!r}; "
            "e.g. ((4, 4, 8, 8, 4), (4, 4, 8, 8, 4)) for 4096 x 4096"
        )
    rows, cols = check_factors(matrix_shape, shape[0], shape[1])
    if num_cores is not None and num_cores != len(rows):
        raise MPOError(f"shape has {len(rows)} factor pairs but num_cores={num_cores}; drop one")
    return rows, cols


def _working(W: Any, xp: Backend, dtype: Any) -> Any:
    """The dtype TT-SVD computes in: ``compute_dtype`` if given, else float64 for float64
    (and wider) input and float32 for the rest."""
    working = xp.dtype(dtype) if dtype is not None else xp.working_dtype(W.dtype)
    if working not in (xp.dtype("float32"), xp.dtype("float64")):
        raise MPOError(f"compute_dtype must be float32 or float64, got {dtype!r}")
    return working


def _tensor(W: Any, xp: Backend, rows: tuple[int, ...], cols: tuple[int, ...], dtype: Any) -> Any:
    """The interleaved tensor of ``W`` as a contiguous array of the dtype ``dtype``."""
    return xp.cast(xp.contiguous(matrix_to_tensor(xp.no_grad(W), rows, cols)), dtype)


def decompose(
    W: Any,
    shape: Shape | None = None,
    rank: Rank = None,
    *,
    num_cores: int | None = None,
    tol: float | None = None,
    dtype: Any = None,
    compute_dtype: Any = None,
) -> MPO:
    """Decompose the matrix ``W`` (``I x J``) into an :class:`~mpo.MPO` by TT-SVD.

    Parameters
    ----------
    W:
        A 2-D numpy array or torch tensor (any float dtype, any device). For
        ``nn.Linear.weight`` the rows are the output features.
    shape:
        ``(row_factors, col_factors)`` with ``prod(row_factors) == I`` and
        ``prod(col_factors) == J``; by default :func:`mpo.factorize` of each side.
    rank:
        ``None`` for the full ranks of Eq. 1 (exact), an int threshold ``R``
        (bond ``k`` gets ``min(R, R_k)``), or a list of ``N - 1`` bond ranks.
    num_cores:
        ``N`` when ``shape`` is not given (default 5).
    tol:
        Relative Frobenius error target: the result satisfies
        ``||W - MPO||_F <= tol ||W||_F``, with each bond as small as the
        per-step threshold ``tol' / sqrt(N - 1) ||W||_F`` allows, where ``tol'``
        is ``tol`` less a reserve for rounding (``sqrt(N) eps`` of the cores'
        dtype, plus 2e-6 when worked in float32). With ``rank``
        too, the smaller of the two ranks wins on each bond. A ``tol`` below
        1e-5 is worked in float64 (float32 arithmetic errs by about 1e-6), and
        one finer than the cores' dtype can hold (``2 sqrt(N) eps``: 0.035
        for five bfloat16 cores, 5e-7 for float32) raises :class:`MPOError`.
    dtype:
        dtype of the returned cores (default: that of ``W``).
    compute_dtype:
        ``"float32"`` or ``"float64"``; by default float64 for float64 (or wider)
        input and for a ``tol`` below 1e-5, float32 for everything else
        (bfloat16 and float16 are never decomposed in their own precision).

    Returns
    -------
    MPO
        Cores of the input's array library and device; cores ``1..N-1`` are
        left-orthonormal. The same ``W`` gives bit-identical cores on the same
        machine and library versions.

    Examples
    --------
    >>> import numpy as np, mpo
    >>> W = np.random.default_rng(0).standard_normal((64, 64))
    >>> m = mpo.decompose(W, ((4, 4, 4), (4, 4, 4)), rank=16)
    >>> m.ranks
    (16, 16)
    >>> exact = mpo.decompose(W, ((4, 4, 4), (4, 4, 4)))
    >>> float(np.abs(exact.to_dense() - W).max()) < 1e-12
    True
    >>> approx = mpo.decompose(W, ((4, 4, 4), (4, 4, 4)), tol=0.5)
    >>> bool(np.linalg.norm(approx.to_dense() - W) <= 0.5 * np.linalg.norm(W))
    True
    """
    xp = _check_matrix(W)
    rows, cols = _factors(tuple(W.shape), shape, num_cores)
    caps = bond_ranks(rows, cols, rank)
    tol = checked_tol(tol)
    out_dtype = xp.dtype(dtype) if dtype is not None else W.dtype
    if not xp.is_floating(out_dtype):
        raise MPOError(f"dtype {dtype!r} is not floating point: cores are; pass e.g. 'float32'")
    n = len(rows)
    working, budget = tolerance_budget(
        xp, tol, _working(W, xp, compute_dtype), out_dtype, n, chosen=compute_dtype is not None
    )
    remainder = _tensor(W, xp, rows, cols, working)
    norm_sq = _checked_norm(W, remainder, xp)

    max_discarded = 0.0
    if tol and n > 1:
        max_discarded = budget**2 / (n - 1) * norm_sq
        if norm_sq == 0.0:  # the zero matrix: rank 1 everywhere is exact
            caps = (1,) * (n - 1)
    # `remainder` is the only reference to the tensorized copy, so it is freed after
    # the first step: peak memory stays near twice the matrix.
    cores, previous = [], 1
    for k in range(n - 1):
        step = split(
            remainder.reshape(previous * rows[k] * cols[k], -1), xp, caps[k], max_discarded
        )
        bond = step.left.shape[1]
        cores.append(step.left.reshape(previous, rows[k], cols[k], bond))
        remainder, previous = step.right, bond
    cores.append(remainder.reshape(previous, rows[-1], cols[-1], 1))
    return MPO([xp.cast(core, out_dtype) for core in cores])


def unfolding_spectra(
    W: Any, shape: Shape | None = None, *, num_cores: int | None = None
) -> list[Any]:
    """Singular values of the ``N - 1`` unfoldings of ``W`` that TT-SVD truncates.

    Unfolding ``k`` is the order-2N tensor reshaped to
    ``(prod_{n <= k} I_n J_n, prod_{n > k} I_n J_n)``; its rank is ``R_k`` of
    Eq. 1, and the energy beyond rank ``r`` is the least squared error any MPO
    with ``R_k = r`` can have. Returned in descending order, float64, as arrays
    of ``W``'s kind. They come from the eigenvalues of the smaller Gram matrix
    ``C C^T`` in float64, which resolve ``sigma^2`` to about ``1e-16 sigma_1^2``:
    values below about ``1e-8 sigma_1`` are rounding noise of that size (an
    exactly low-rank ``W`` shows a floor there, not zeros); tail energies are
    exact to that level.

    >>> import numpy as np
    >>> W = np.random.default_rng(0).standard_normal((8, 8))
    >>> [len(s) for s in unfolding_spectra(W, ((2, 2, 2), (2, 2, 2)))]
    [4, 4]
    """
    xp = _check_matrix(W)
    rows, cols = _factors(tuple(W.shape), shape, num_cores)
    tensor = _tensor(W, xp, rows, cols, _working(W, xp, None))
    _checked_norm(W, tensor, xp)
    pair_sizes = [i * j for i, j in zip(rows, cols, strict=True)]
    return [
        xp.from_numpy(singular_values(tensor.reshape(prod(pair_sizes[: k + 1]), -1), xp), W)
        for k in range(len(rows) - 1)
    ]
