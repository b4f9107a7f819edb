"""Truncated splits of the short-and-fat matrices TT-SVD meets, by the cheapest accurate method.

Each TT-SVD step factors an unfolding ``C`` (``m x n``) as ``C ~ U (U^T C)``
with ``U`` orthonormal (``m x r``). The unfoldings of a weight matrix are very
unbalanced (16 x 1M and 256 x 65K for a 4096 x 4096 matrix with N = 5), and a
full SVD of such a matrix spends most of its time on singular vectors that are
thrown away. So the singular vectors come from the Gram matrix of the short
side, which is small:

* ``m <= n`` (wide): the eigenvectors of ``C C^T`` are ``U`` itself.
* ``m > n`` (tall): the eigenvectors of ``C^T C`` are the right singular
  vectors ``V``; ``C V_r = U_r S_r``, so a QR of the ``m x r`` matrix ``C V_r``
  gives ``U_r``.

Squaring the singular values halves the digits, so the precision of the Gram
matrix follows what decides the rank:

* a tolerance (the tail energies decide): the Gram matrix is accumulated in
  float64 whatever the working dtype, since in float32 tail energies below
  about ``1e-4 sigma_1`` would be wrong. Even float64 resolves energies only
  down to about ``min(m, n) eps_64 sigma_1^2``; a finer tolerance takes the
  slower, exact route: a Householder QR of the unfolding (or its transpose) and
  an SVD of the small triangular factor.
* a fixed rank (only the kept subspace matters): the Gram matrix in the working
  dtype, then one subspace-iteration step and a Rayleigh-Ritz rotation restore
  the kept singular vectors to working precision, at a fraction of the cost of
  casting the unfolding to float64.

Every way, the passed-on factor is the projection ``U^T C``, so
``||C||^2 = ||U^T C||^2 + ||C - U U^T C||^2`` holds for the ``U`` returned and
the discarded energy is what the error bound of TT-SVD adds up.

Signs: each column of ``U`` is flipped so that its entry of largest magnitude
(the first one on ties) is positive. With LAPACK's deterministic kernels this
makes the result a function of ``C`` alone, bit for bit on one machine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from mpo.backend import Backend
from mpo.errors import MPOError

__all__ = ["Split", "singular_values", "split", "squared_norm", "tolerance_budget"]

# Columns of the long side cast to float64 at a time while forming a Gram matrix:
# bounds the float64 copy to 8 MiB however long the unfolding is.
_GRAM_BLOCK_ELEMENTS = 1 << 20
# Eigenvalues of a float64 Gram matrix are accurate to about this times min(m, n) lambda_max.
_GRAM_RESOLUTION = 1e-14

# Relative error float32 arithmetic alone leaves in a TT-SVD: measured 5e-7 to 7e-7 at
# full rank (Gaussian matrices, 256 x 256 to 4096 x 4096); float64's is near 3e-15. A
# truncation keeps this much of its tolerance in reserve for it, and a tolerance below
# FLOAT32_TOL is worked in float64.
_ARITHMETIC_ERROR = {"float32": 2e-6, "float64": 1e-13}
FLOAT32_TOL = 1e-5

# energies (descending squared singular values) and a function giving the first r left vectors
_Route = tuple[np.ndarray, Callable[[int], Any]]


class Split(NamedTuple):
    """``C ~ left @ right`` with ``left`` orthonormal and ``right = left^T C``."""

    left: Any
    right: Any


def _gram(C: Any, xp: Backend, *, rows: bool, dtype: Any) -> Any:
    """``C C^T`` (``rows=True``) or ``C^T C`` in ``dtype``, one slab of the long side at a time.

    Casting slab by slab bounds the extra memory of a float64 Gram matrix of a
    float32 unfolding to one slab, however long the unfolding is.
    """
    if not rows:
        C = C.T
    if C.dtype == dtype:
        return C @ C.T
    m, n = C.shape
    step = max(1, _GRAM_BLOCK_ELEMENTS // m)
    gram = 0
    for start in range(0, n, step):
        slab = xp.cast(C[:, start : start + step], dtype)
        gram = gram + slab @ slab.T
        del slab
    return gram


def _gram_route(C: Any, xp: Backend, precise: bool) -> _Route:
    m, n = C.shape
    wide = m <= n
    dtype = xp.dtype("float64") if precise else C.dtype
    eigenvalues, eigenvectors = xp.eigh(_gram(C, xp, rows=wide, dtype=dtype))
    energies = xp.to_numpy(eigenvalues).astype(np.float64)[::-1].clip(min=0.0)
    vectors = xp.flip_columns(eigenvectors)

    def left(rank: int) -> Any:
        kept = xp.cast(vectors[:, :rank], C.dtype)
        if not precise and rank < min(m, n):
            # C V spans the left singular subspace; _refine orthonormalizes it anyway
            return _refine(C, kept if wide else C @ kept, xp)
        return kept if wide else xp.qr(C @ kept)[0]

    return energies, left


def _refine(C: Any, basis: Any, xp: Backend) -> Any:
    """One subspace-iteration step and a Rayleigh-Ritz rotation of ``r`` spanning directions.

    A Gram matrix in the working dtype (float32) blurs directions whose energy is
    below about ``eps sigma_1^2``; one step ``C C^T U`` squares the separation from
    the discarded directions again, and rotating by the eigenvectors of the small
    ``(U^T C)(U^T C)^T`` returns the singular vectors within the subspace, so the
    cores are those of TT-SVD. It costs four thin products, ``O(m n r)``.
    """
    subspace, _ = xp.qr(C @ (C.T @ basis))
    projected = subspace.T @ C
    small = xp.cast(projected, xp.dtype("float64"))
    _, rotation = xp.eigh(small @ small.T)
    return subspace @ xp.cast(xp.flip_columns(rotation), C.dtype)


def _qr_route(C: Any, xp: Backend) -> _Route:
    # Tall C = Q R and R = U_R S V^T give U = Q U_R; wide C^T = Q R gives C = R^T Q^T,
    # whose left singular vectors are those of the small R^T.
    m, n = C.shape
    wide = m <= n
    q, triangular = xp.qr(C.T if wide else C)
    small = xp.cast(triangular.T if wide else triangular, xp.dtype("float64"))
    u_small, sigma, _ = xp.svd(small)

    def left(rank: int) -> Any:
        kept = xp.cast(u_small[:, :rank], C.dtype)
        return kept if wide else q @ kept

    return xp.to_numpy(sigma) ** 2, left


def _keep(energies: np.ndarray, max_rank: int, max_discarded: float) -> int:
    """Smallest rank whose discarded energy is <= ``max_discarded``, capped at ``max_rank``.

    Without a tolerance the rank is ``max_rank`` even where the tail is zero: a
    rank-deficient matrix keeps the shapes its caller asked for.
    """
    if max_discarded <= 0.0:
        return min(max_rank, len(energies))
    tails = energies[::-1].cumsum()[::-1]  # tails[r] = sum_{i >= r} energies[i]
    allowed = [r for r in range(1, len(energies)) if tails[r] <= max_discarded]
    return min(allowed[0] if allowed else len(energies), max_rank)


def split(C: Any, xp: Backend, max_rank: int, max_discarded: float = 0.0) -> Split:
    """Truncated split ``C ~ U (U^T C)`` keeping at most ``max_rank`` directions.

    With ``max_discarded > 0`` (a tolerance), the rank is the smallest one whose
    discarded energy ``sum_{i >= r} sigma_i^2`` is at most ``max_discarded``: the
    tail sums decide, so the Gram matrix is formed in float64 (and a tolerance
    finer than even that resolves takes the QR route). Without one the rank is
    ``max_rank``, only the kept subspace matters, and the Gram matrix in the
    working dtype plus one refinement step (:func:`_refine`) is as accurate and
    twice as fast. The rank is never less than 1.
    """
    precise = max_discarded > 0.0
    energies, left_vectors = _gram_route(C, xp, precise)
    if precise and max_discarded < _GRAM_RESOLUTION * min(C.shape) * energies[0]:
        energies, left_vectors = _qr_route(C, xp)
    rank = _keep(energies, max_rank, max_discarded)
    # contiguous: slices of eigenvector matrices are strided, and cores are stored as they come
    left = xp.contiguous(xp.canonical_signs(left_vectors(rank)))
    return Split(left, left.T @ C)


def tolerance_budget(
    xp: Backend, tol: float | None, working: Any, cores: Any, num_cores: int, *, chosen: bool
) -> tuple[Any, float]:
    """The dtype to truncate in, and the share of ``tol`` the truncation itself may use.

    Two roundings stand between the exact truncation and the cores returned, and
    the bound ``||W - MPO||_F <= tol ||W||_F`` must absorb both (the errors add,
    by the triangle inequality), so each has a share of ``tol`` reserved:

    * the arithmetic: float32 errs by about 1e-6 relative (float64 by about
      1e-14), so below :data:`FLOAT32_TOL` the work is done in float64 (an
      error when the caller ``chosen`` float32);
    * the storage: rounding each of ``N`` cores to a dtype of epsilon ``eps``
      moves the product by about ``0.3 sqrt(N) eps`` relative (measured with
      bfloat16 and float16 cores, N = 3 to 8); ``sqrt(N) eps`` is reserved.

    A ``tol`` below twice the reserves is refused with the fix; ``tol=None`` and
    ``tol=0`` (no truncation) leave ``working`` as it is.
    """
    if not tol or num_cores < 2:
        return working, tol or 0.0
    float64 = xp.dtype("float64")
    if working != float64 and tol < FLOAT32_TOL:
        if chosen:
            raise MPOError(
                f"compute_dtype=float32 cannot keep tol={tol:g}: float32 arithmetic alone errs "
                f"by about 1e-6 relative; pass compute_dtype='float64' or leave it unset (a tol "
                f"below {FLOAT32_TOL:g} is then worked in float64)"
            )
        working = float64
    reserve = num_cores**0.5 * xp.eps(cores) + _ARITHMETIC_ERROR[str(working).split(".")[-1]]
    if tol < 2 * reserve:
        finer = " dtype='float64' for the cores, or" if xp.eps(cores) > xp.eps(float64) else ""
        raise MPOError(
            f"tol={tol:g} is finer than {num_cores} {cores} cores computed in {working} can be "
            f"trusted with (rounding alone moves them by up to about {reserve:.1g} relative); "
            f"pass{finer} a tol of at least {2 * reserve:.1g}"
        )
    return working, tol - reserve


def singular_values(C: Any, xp: Backend) -> np.ndarray:
    """All singular values of ``C`` (descending, float64 numpy), from the smaller Gram matrix:
    cheap for the short, wide unfoldings of TT-SVD, resolved down to about
    ``1e-8`` of the largest (the square root of float64's precision)."""
    m, n = C.shape
    eigenvalues, _ = xp.eigh(_gram(C, xp, rows=m <= n, dtype=xp.dtype("float64")))
    return xp.to_numpy(eigenvalues)[::-1].clip(min=0.0) ** 0.5


def squared_norm(x: Any, xp: Backend) -> float:
    """``||x||_F^2`` accumulated in float64 (a float32 sum over 16M entries is off by ~1e-4)."""
    return float(_gram(x.reshape(1, -1), xp, rows=True, dtype=xp.dtype("float64"))[0, 0])
