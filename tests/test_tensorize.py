from math import prod

import numpy as np
import pytest
from conftest import factor_shapes, gaussian, to_numpy64
from hypothesis import assume, given
from hypothesis import strategies as st

import mpo

PAPER_TABLE_2 = {
    50400: (5, 10, 14, 12, 6),
    14336: (4, 8, 8, 8, 7),
    11008: (4, 4, 43, 4, 4),
    768: (4, 4, 4, 4, 3),
    3072: (4, 4, 8, 6, 4),
    1024: (4, 4, 4, 4, 4),
    4096: (4, 4, 8, 8, 4),
    2304: (4, 4, 8, 6, 3),
}


@pytest.mark.parametrize(("n", "shape"), PAPER_TABLE_2.items())
def test_factorize_returns_the_papers_table_2_shapes(n, shape):
    assert mpo.factorize(n, 5) == shape


@pytest.mark.parametrize("n", [50257, 32000, 151936, 1, 2, 3, 7919, 65536, 128256, 5120])
def test_factorize_product_is_n_for_awkward_dimensions(n):
    factors = mpo.factorize(n, 5)
    assert len(factors) == 5
    assert prod(factors) == n


@given(n=st.integers(1, 200_000), k=st.integers(1, 8))
def test_factorize_product_length_and_small_factors_at_the_ends(n, k):
    assume(not (k == 5 and n in mpo.PAPER_SHAPES))
    factors = mpo.factorize(n, k)
    assert len(factors) == k
    assert prod(factors) == n
    ends = [factors[0]] if k == 1 else [factors[0], factors[-1]]
    assert sorted(ends) == sorted(factors)[: len(ends)]


@given(exponent=st.integers(0, 40), k=st.integers(1, 8))
def test_factorize_balances_powers_of_two_within_a_factor_of_two(exponent, k):
    factors = mpo.factorize(2**exponent, k)
    assert max(factors) <= 2 * min(factors)


@pytest.mark.parametrize(("n", "k"), [(0, 5), (-4, 5), (4.0, 5), (8, 0), (8, -1)])
def test_factorize_rejects_bad_arguments(n, k):
    with pytest.raises(mpo.MPOError, match="positive integer"):
        mpo.factorize(n, k)


@given(shape=factor_shapes(), seed=st.integers(0, 2**16))
def test_tensorization_round_trip_is_bit_exact(shape, seed):
    rows, cols = shape
    W = gaussian((prod(rows), prod(cols)), seed)
    T = mpo.matrix_to_tensor(W, rows, cols)
    assert T.shape == tuple(d for pair in zip(rows, cols, strict=True) for d in pair)
    assert np.array_equal(mpo.tensor_to_matrix(T), W)


def test_tensorization_round_trip_torch():
    W = gaussian((12, 20), 0, backend="torch")
    T = mpo.matrix_to_tensor(W, (3, 4), (5, 4))
    assert type(T) is type(W)
    assert (mpo.tensor_to_matrix(T) == W).all()


def test_tensor_entry_follows_the_documented_index_order():
    rows, cols = (2, 3, 2), (3, 2, 2)
    W = gaussian((12, 12), 1)
    T = mpo.matrix_to_tensor(W, rows, cols)
    i1, i2, i3, j1, j2, j3 = 1, 2, 0, 2, 1, 1
    row = (i1 * 3 + i2) * 2 + i3
    col = (j1 * 2 + j2) * 2 + j3
    assert T[i1, j1, i2, j2, i3, j3] == W[row, col]


@given(shape=factor_shapes(max_cores=4, max_entries=512), seed=st.integers(0, 2**16))
def test_rank_one_mpo_is_the_kronecker_product_of_core_slices(shape, seed):
    rows, cols = shape
    rng = np.random.default_rng(seed)
    slices = [rng.standard_normal((i, j)) for i, j in zip(rows, cols, strict=True)]
    cores = [s.reshape(1, *s.shape, 1) for s in slices]
    kron = slices[0]
    for s in slices[1:]:
        kron = np.kron(kron, s)
    np.testing.assert_allclose(mpo.MPO(cores).to_dense(), kron, rtol=1e-12, atol=1e-12)


def test_matrix_to_tensor_rejects_mismatched_factors():
    W = np.zeros((12, 8))
    with pytest.raises(mpo.MPOError, match=r"describe a 12 x 6 matrix, but the matrix is 12 x 8"):
        mpo.matrix_to_tensor(W, (3, 4), (2, 3))


def test_matrix_to_tensor_rejects_unequal_numbers_of_factors():
    with pytest.raises(mpo.MPOError, match="equal length"):
        mpo.matrix_to_tensor(np.zeros((12, 8)), (3, 4), (8,))


def test_tensor_to_matrix_rejects_odd_order():
    with pytest.raises(mpo.MPOError, match="even order"):
        mpo.tensor_to_matrix(np.zeros((2, 3, 4)))


def test_float64_tensor_of_torch_input_keeps_values():
    W = gaussian((6, 6), 3, backend="torch")
    T = mpo.matrix_to_tensor(W, (2, 3), (3, 2))
    np.testing.assert_array_equal(to_numpy64(mpo.tensor_to_matrix(T)), to_numpy64(W))
