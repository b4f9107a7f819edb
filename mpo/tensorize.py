"""Tensorization: a matrix as an order-2N tensor, and the factor shapes that define it.

A matrix ``W`` of shape ``(I, J)`` with ``I = I_1 ... I_N`` and ``J = J_1 ... J_N``
is viewed as the order-2N tensor

    T[i_1, j_1, i_2, j_2, ..., i_N, j_N] = W[i, j],
    i = (i_1, ..., i_N) and j = (j_1, ..., j_N) read as C-order (row-major) multi-indices,

so ``i_1`` is the slowest-varying digit of the row index. This interleaved
order puts the two indices of core ``k`` next to each other, which is what
the MPO cores ``(R_{k-1}, I_k, J_k, R_k)`` need; it is the order used by
tensorly, t3f, torchtt and tntorch, and with all bond ranks 1 the matrix is
exactly ``numpy.kron`` of the core slices.

Rows are ``I``. For ``torch.nn.Linear``, whose ``weight`` has shape
``(out_features, in_features)``, decomposing ``weight`` makes the row factors
split ``out_features`` and the column factors split ``in_features``.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod
from typing import Any

from mpo.backend import backend_of
from mpo.errors import MPOError, is_count

__all__ = ["PAPER_SHAPES", "factorize", "matrix_to_tensor", "tensor_to_matrix"]

#: Factor shapes of Table 2 of the DoTA paper (N = 5); ``factorize`` returns them as they are.
PAPER_SHAPES: dict[int, tuple[int, ...]] = {
    50400: (5, 10, 14, 12, 6),
    14336: (4, 8, 8, 8, 7),
    11008: (4, 4, 43, 4, 4),
    768: (4, 4, 4, 4, 3),
    3072: (4, 4, 8, 6, 4),
    1024: (4, 4, 4, 4, 4),
    4096: (4, 4, 8, 8, 4),
    2304: (4, 4, 8, 6, 3),
}


def _prime_factors(n: int) -> list[int]:
    factors, p = [], 2
    while p * p <= n:
        while n % p == 0:
            factors.append(p)
            n //= p
        p += 1
    if n > 1:
        factors.append(n)
    return factors


def factorize(n: int, num_factors: int = 5) -> tuple[int, ...]:
    """Split a dimension ``n`` into ``num_factors`` integers whose product is ``n``.

    For ``num_factors == 5`` and the dimensions of the DoTA paper's Table 2
    (:data:`PAPER_SHAPES`) the paper's shapes are returned. Every other ``n``
    follows one rule:

    1. Deal the prime factors of ``n``, largest first, each onto the bin whose
       product is smallest so far (the first such bin on ties). This keeps the
       factors as balanced as the primes allow.
    2. Sort the bins and place them from the outside in, smallest first,
       alternating left end and right end, so the small factors sit at the ends
       of the chain and the large ones in the middle, where bond ranks are
       largest anyway.

    A prime, or a number with fewer prime factors than ``num_factors``, is
    padded with factors of 1: exact, but such a dimension compresses poorly
    (GPT-2's vocabulary, 50257 = 29 x 1733, is one).

    >>> factorize(4096)
    (4, 4, 8, 8, 4)
    >>> factorize(32000)
    (5, 8, 10, 10, 8)
    >>> factorize(50257)
    (1, 1, 1733, 29, 1)
    >>> factorize(12, 3)
    (2, 3, 2)
    """
    if not is_count(n) or n < 1:
        raise MPOError(f"cannot factorize dimension {n!r}: it must be a positive integer")
    if not is_count(num_factors) or num_factors < 1:
        raise MPOError(f"num_factors must be a positive integer, got {num_factors!r}")
    n, num_factors = int(n), int(num_factors)
    if num_factors == 5 and n in PAPER_SHAPES:
        return PAPER_SHAPES[n]
    bins = [1] * num_factors
    for p in sorted(_prime_factors(n), reverse=True):
        smallest = min(range(num_factors), key=lambda k: bins[k])
        bins[smallest] *= p
    placed: list[int] = [0] * num_factors
    left, right = 0, num_factors - 1
    for index, factor in enumerate(sorted(bins)):
        if index % 2 == 0:
            placed[left] = factor
            left += 1
        else:
            placed[right] = factor
            right -= 1
    return tuple(placed)


def factor_pairs(
    row_factors: Sequence[int], col_factors: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate factor shapes (positive integers, one row and one column factor per
    core) and return them as tuples of ints."""
    if not all(isinstance(f, Sequence) for f in (row_factors, col_factors)):
        raise MPOError(
            f"factor shapes must be a pair (row_factors, col_factors) of integer lists, got "
            f"{row_factors!r} and {col_factors!r}; e.g. ((4, 4, 8, 8, 4), (4, 4, 8, 8, 4))"
        )
    if not all(is_count(f) and f >= 1 for f in (*row_factors, *col_factors)):
        raise MPOError(
            f"factors must be positive integers, got rows {tuple(row_factors)} and columns "
            f"{tuple(col_factors)}"
        )
    rows, cols = tuple(int(f) for f in row_factors), tuple(int(f) for f in col_factors)
    if len(rows) != len(cols) or not rows:
        raise MPOError(
            f"row factors {rows} and column factors {cols} must be non-empty and of equal "
            "length (one pair per core); pad the shorter one with 1s"
        )
    return rows, cols


def check_factors(
    shape: tuple[int, int], row_factors: Sequence[int], col_factors: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Validate that the factors multiply to ``shape`` and return them as tuples."""
    rows, cols = factor_pairs(row_factors, col_factors)
    if prod(rows) != shape[0] or prod(cols) != shape[1]:
        raise MPOError(
            f"factor shapes {rows} x {cols} describe a {prod(rows)} x {prod(cols)} matrix, "
            f"but the matrix is {shape[0]} x {shape[1]}; use mpo.factorize({shape[0]}, "
            f"{len(rows)}) and mpo.factorize({shape[1]}, {len(rows)}) for valid ones"
        )
    return rows, cols


def matrix_to_tensor(W: Any, row_factors: Sequence[int], col_factors: Sequence[int]) -> Any:
    """View ``W`` (``I x J``) as the order-2N tensor with axes ``(I_1, J_1, ..., I_N, J_N)``.

    >>> import numpy as np
    >>> W = np.arange(24.0).reshape(4, 6)
    >>> T = matrix_to_tensor(W, (2, 2), (3, 2))
    >>> T.shape
    (2, 3, 2, 2)
    >>> bool(T[1, 2, 0, 1] == W[1 * 2 + 0, 2 * 2 + 1])
    True
    """
    if len(getattr(W, "shape", ())) != 2:
        raise MPOError(f"expected a 2-D matrix, got shape {tuple(getattr(W, 'shape', ()))}")
    rows, cols = check_factors(tuple(W.shape), row_factors, col_factors)
    n = len(rows)
    interleave = tuple(axis for k in range(n) for axis in (k, n + k))
    return backend_of(W).permute(W.reshape(rows + cols), interleave)


def tensor_to_matrix(T: Any) -> Any:
    """Inverse of :func:`matrix_to_tensor`: axes ``(I_1, J_1, ..., I_N, J_N)`` to ``I x J``.

    >>> import numpy as np
    >>> W = np.arange(24.0).reshape(4, 6)
    >>> bool((tensor_to_matrix(matrix_to_tensor(W, (2, 2), (3, 2))) == W).all())
    True
    """
    shape = tuple(T.shape)
    if len(shape) % 2 or not shape:
        raise MPOError(f"expected a tensor of even order (I_1, J_1, ..., I_N, J_N), got {shape}")
    n = len(shape) // 2
    rows, cols = shape[0::2], shape[1::2]
    deinterleave = tuple(range(0, 2 * n, 2)) + tuple(range(1, 2 * n, 2))
    return backend_of(T).permute(T, deinterleave).reshape(prod(rows), prod(cols))
