"""Bond ranks and parameter counts of an MPO, from the factor shapes alone.

For row factors ``I_1..I_N`` and column factors ``J_1..J_N`` the largest rank
bond ``k`` can carry (Eq. 1 of the DoTA paper) is

    R_k = min(prod_{n <= k} I_n J_n, prod_{n > k} I_n J_n),    k = 1..N-1,

a rank threshold ``R`` gives ``Rbar_k = min(R, R_k)``, and the cores hold

    rho = sum_k Rbar_{k-1} I_k J_k Rbar_k,    Rbar_0 = Rbar_N = 1

numbers. Nothing here touches an array, so a whole model can be planned
without its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from math import prod

from mpo.errors import MPOError, is_count
from mpo.tensorize import factor_pairs

__all__ = ["bond_ranks", "full_ranks", "param_count"]

Rank = int | Sequence[int] | None


def full_ranks(row_factors: Sequence[int], col_factors: Sequence[int]) -> tuple[int, ...]:
    """Eq. 1: the bond ranks at which the MPO represents every matrix exactly.

    >>> full_ranks((4, 4, 8, 8, 4), (4, 4, 8, 8, 4))
    (16, 256, 1024, 16)
    """
    rows, cols = factor_pairs(row_factors, col_factors)
    pair_sizes = [i * j for i, j in zip(rows, cols, strict=True)]
    return tuple(
        min(prod(pair_sizes[: k + 1]), prod(pair_sizes[k + 1 :]))
        for k in range(len(pair_sizes) - 1)
    )


def bond_ranks(
    row_factors: Sequence[int], col_factors: Sequence[int], rank: Rank
) -> tuple[int, ...]:
    """The bond ranks an MPO gets for a rank threshold or an explicit list of ranks.

    ``rank=None`` gives the full ranks of Eq. 1; an integer ``R`` gives
    ``min(R, R_k)`` on every bond; a list gives one rank per bond (``N - 1``
    of them), each clipped to what its bond can carry: ``R_k``, and the rank of
    its neighbour times the pair of factors between them, since an unfolding
    has no more independent rows than that.

    >>> bond_ranks((4, 4, 8, 8, 4), (4, 4, 8, 8, 4), 64)
    (16, 64, 64, 16)
    >>> bond_ranks((2, 2, 2, 2), (2, 2, 2, 2), [100, 100, 1])
    (4, 4, 1)
    """
    full = full_ranks(row_factors, col_factors)
    if rank is None:
        return full
    if is_count(rank):
        if rank < 1:
            raise MPOError(f"rank must be at least 1, got {rank}")
        return tuple(min(int(rank), r) for r in full)
    ranks = list(rank) if isinstance(rank, Sequence) else None
    if ranks is None or len(ranks) != len(full) or not all(is_count(r) for r in ranks):
        raise MPOError(
            f"rank must be an int, None, or a list of {len(full)} ints (one per bond of a "
            f"{len(full) + 1}-core MPO), got {rank!r}"
        )
    if any(r < 1 for r in ranks):
        raise MPOError(f"every bond rank must be at least 1, got {list(ranks)}")
    pair_sizes = [i * j for i, j in zip(row_factors, col_factors, strict=True)]
    clipped = [min(int(r), f) for r, f in zip(ranks, full, strict=True)]
    for k in range(len(clipped)):  # left neighbour: rank_{k-1} * I_k J_k
        left = clipped[k - 1] if k else 1
        clipped[k] = min(clipped[k], left * pair_sizes[k])
    for k in reversed(range(len(clipped))):  # right neighbour: rank_{k+1} * I_{k+1} J_{k+1}
        right = clipped[k + 1] if k + 1 < len(clipped) else 1
        clipped[k] = min(clipped[k], right * pair_sizes[k + 1])
    return tuple(clipped)


def param_count(row_factors: Sequence[int], col_factors: Sequence[int], rank: Rank = None) -> int:
    """Number of entries in the cores: ``sum_k Rbar_{k-1} I_k J_k Rbar_k``.

    The DoTA paper's example, a 1024 x 1024 matrix with N = 5, R = 8 and all
    factors 4, and its LLaMA 4096 x 11008 matrix at R = 16:

    >>> param_count((4,) * 5, (4,) * 5, 8)
    3328
    >>> param_count((4, 4, 8, 8, 4), (4, 4, 43, 4, 4), 16)
    100864
    """
    ranks = (1, *bond_ranks(row_factors, col_factors, rank), 1)
    rows, cols = factor_pairs(row_factors, col_factors)
    return sum(
        ranks[k] * i * j * ranks[k + 1] for k, (i, j) in enumerate(zip(rows, cols, strict=True))
    )
