from math import prod

import numpy as np
import pytest
from conftest import factor_shapes
from hypothesis import given
from hypothesis import strategies as st

import mpo

LLAMA = (4, 4, 8, 8, 4)


def test_papers_worked_example_1024_square_rank_8():
    assert mpo.param_count((4,) * 5, (4,) * 5, 8) == 3328


@pytest.mark.parametrize(
    ("rows", "expected"),
    [
        ((4, 4, 8, 8, 4), 37_376),  # 4096 x 4096
        ((4, 4, 43, 4, 4), 100_864),  # 11008 x 4096
        ((4, 8, 8, 8, 7), 41_664),  # 14336 x 4096
        ((4, 4, 4, 4, 4), 20_992),  # 1024 x 4096
    ],
)
def test_llama_matrices_at_rank_16_match_facts(rows, expected):
    assert mpo.param_count(rows, LLAMA, 16) == expected
    assert mpo.param_count(LLAMA, rows, 16) == expected


def test_llama2_7b_total_matches_table_1():
    per_layer = 3 * mpo.param_count(LLAMA, LLAMA, 16) + 2 * mpo.param_count(
        (4, 4, 43, 4, 4), LLAMA, 16
    )
    assert 32 * per_layer == 10_043_392


def test_full_ranks_of_4096_square_match_numerics():
    assert mpo.full_ranks(LLAMA, LLAMA) == (16, 256, 1024, 16)
    assert mpo.bond_ranks(LLAMA, LLAMA, 64) == (16, 64, 64, 16)


@given(shape=factor_shapes(max_entries=1024), seed=st.integers(0, 2**16))
def test_full_ranks_equal_the_ranks_of_a_gaussian_matrixs_unfoldings(shape, seed):
    rows, cols = shape
    W = np.random.default_rng(seed).standard_normal((prod(rows), prod(cols)))
    T = mpo.matrix_to_tensor(W, rows, cols)
    pairs = [i * j for i, j in zip(rows, cols, strict=True)]
    ranks = tuple(
        int(np.linalg.matrix_rank(T.reshape(prod(pairs[: k + 1]), -1)))
        for k in range(len(rows) - 1)
    )
    assert mpo.full_ranks(rows, cols) == ranks


@given(shape=factor_shapes(), rank=st.integers(1, 40))
def test_bond_ranks_are_min_of_threshold_and_eq_1(shape, rank):
    rows, cols = shape
    expected = tuple(min(rank, r) for r in mpo.full_ranks(rows, cols))
    assert mpo.bond_ranks(rows, cols, rank) == expected


@given(shape=factor_shapes(), rank=st.integers(1, 40))
def test_param_count_is_the_sum_of_core_sizes_of_the_formula(shape, rank):
    rows, cols = shape
    ranks = (1, *mpo.bond_ranks(rows, cols, rank), 1)
    expected = sum(ranks[k] * rows[k] * cols[k] * ranks[k + 1] for k in range(len(rows)))
    assert mpo.param_count(rows, cols, rank) == expected


@given(shape=factor_shapes(), data=st.data())
def test_explicit_bond_ranks_never_exceed_what_neighbours_allow(shape, data):
    rows, cols = shape
    n = len(rows)
    wanted = data.draw(st.lists(st.integers(1, 50), min_size=n - 1, max_size=n - 1))
    ranks = (1, *mpo.bond_ranks(rows, cols, wanted), 1)
    for k in range(1, n):
        assert 1 <= ranks[k] <= wanted[k - 1]
        assert ranks[k] <= ranks[k - 1] * rows[k - 1] * cols[k - 1]
        assert ranks[k] <= ranks[k + 1] * rows[k] * cols[k]


@pytest.mark.parametrize("rank", [0, -3])
def test_rank_below_one_is_rejected(rank):
    with pytest.raises(mpo.MPOError, match="at least 1"):
        mpo.bond_ranks(LLAMA, LLAMA, rank)


def test_rank_list_of_wrong_length_is_rejected():
    with pytest.raises(mpo.MPOError, match="list of 4 ints"):
        mpo.bond_ranks(LLAMA, LLAMA, [16, 16])


def test_rank_list_with_zero_is_rejected():
    with pytest.raises(mpo.MPOError, match="every bond rank must be at least 1"):
        mpo.bond_ranks(LLAMA, LLAMA, [16, 0, 16, 16])


@pytest.mark.parametrize(
    ("rows", "cols", "message"),
    [
        ((4, 4), (4, 4, 4), "equal length"),
        ((4, 0), (4, 4), "positive integers"),
        ((4, -2), (4, 4), "positive integers"),
        ((4, 2.0), (4, 4), "positive integers"),
        (16, 16, "pair .* of integer lists"),
    ],
)
def test_bad_factor_shapes_are_rejected_by_every_count(rows, cols, message):
    for count in (mpo.full_ranks, mpo.param_count, lambda r, c: mpo.bond_ranks(r, c, 2)):
        with pytest.raises(mpo.MPOError, match=message):
            count(rows, cols)
