"""mpo: matrix product operators (tensor-train matrices) for numpy and torch.

The core is pure math over arrays of the caller's library:

* :func:`decompose` -- TT-SVD of a matrix into an :class:`MPO`;
* :class:`MPO` -- cores, ranks, ``x @ mpo`` without the dense matrix, sums, rounding;
* :func:`factorize`, :func:`matrix_to_tensor`, :func:`tensor_to_matrix` -- tensorization;
* :func:`full_ranks`, :func:`bond_ranks`, :func:`param_count` -- Eq. 1 and parameter counts;
* :func:`unfolding_spectra` -- the singular values TT-SVD truncates.

Trainable adapters built on it live in :mod:`mpo.adapt` (needs torch).

>>> import numpy as np, mpo
>>> W = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
>>> m = mpo.decompose(W, rank=8)
>>> m.row_factors, m.ranks, m.num_params
((4, 4, 4, 4, 4), (8, 8, 8, 8), 3328)
"""

from mpo.contract import ContractionPlan
from mpo.count import bond_ranks, full_ranks, param_count
from mpo.decompose import decompose, unfolding_spectra
from mpo.errors import MPOError
from mpo.operator import MPO
from mpo.tensorize import PAPER_SHAPES, factorize, matrix_to_tensor, tensor_to_matrix

__all__ = [
    "MPO",
    "PAPER_SHAPES",
    "ContractionPlan",
    "MPOError",
    "bond_ranks",
    "decompose",
    "factorize",
    "full_ranks",
    "matrix_to_tensor",
    "param_count",
    "tensor_to_matrix",
    "unfolding_spectra",
]

__version__ = "0.1.0"
