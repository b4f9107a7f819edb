"""TT rounding: bring the bond ranks of an existing MPO down (Oseledets 2011, Algorithm 2).

First the cores are made right-orthonormal by QR sweeping from the right;
then every unfolding's singular values are those of the small core unfolding
in front of the sweep, so a left-to-right pass of truncated splits
(:func:`mpo.svd.split`) truncates with the same guarantees as TT-SVD.
"""

from __future__ import annotations

from typing import Any

from mpo.backend import Backend
from mpo.count import Rank, bond_ranks
from mpo.svd import split, squared_norm, tolerance_budget

__all__ = ["round_cores"]


def round_cores(cores: tuple[Any, ...], xp: Backend, rank: Rank, tol: float | None) -> list[Any]:
    """Rounded cores: at most ``rank`` per bond, relative error at most ``tol``.

    See :meth:`mpo.MPO.truncate` for the guarantees.
    """
    if len(cores) == 1:
        return list(cores)
    dtype = cores[0].dtype
    working, budget = tolerance_budget(
        xp, tol, xp.working_dtype(dtype), dtype, len(cores), chosen=False
    )
    rows = [int(core.shape[1]) for core in cores]
    cols = [int(core.shape[2]) for core in cores]
    caps = bond_ranks(rows, cols, rank)
    work = [xp.cast(core, working) for core in cores]

    for k in range(len(work) - 1, 0, -1):
        r0, i, j, r1 = work[k].shape
        q, r = xp.qr(work[k].reshape(r0, i * j * r1).T)
        work[k] = q.T.reshape(-1, i, j, r1)
        p0, pi, pj, _ = work[k - 1].shape
        work[k - 1] = (work[k - 1].reshape(-1, r0) @ r.T).reshape(p0, pi, pj, -1)

    max_discarded = 0.0
    if tol:
        norm_sq = squared_norm(work[0], xp)
        max_discarded = budget**2 / (len(work) - 1) * norm_sq
        if norm_sq == 0.0:  # the zero matrix: rank 1 everywhere is exact
            caps = (1,) * (len(work) - 1)
    for k in range(len(work) - 1):
        r0, i, j, r1 = work[k].shape
        step = split(work[k].reshape(r0 * i * j, r1), xp, caps[k], max_discarded)
        work[k] = step.left.reshape(r0, i, j, -1)
        work[k + 1] = (step.right @ work[k + 1].reshape(r1, -1)).reshape(
            step.right.shape[0], *work[k + 1].shape[1:]
        )
    return [xp.cast(core, dtype) for core in work]
