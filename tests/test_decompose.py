import subprocess
import sys
from math import prod, sqrt

import numpy as np
import pytest
from conftest import BACKENDS, factor_shapes, gaussian, rel_error, to_numpy64
from hypothesis import given
from hypothesis import strategies as st

import mpo

torch = pytest.importorskip("torch")

# float64 reconstructions are exact to rounding; float32 ones to about 1e-6 relative
EXACT = {np.float64: 1e-10, np.float32: 1e-5}
# slack on squared-error bounds, relative to ||W||^2
SLACK = {np.float64: 1e-10, np.float32: 1e-5}

cases = st.tuples(
    factor_shapes(),
    st.integers(0, 2**16),
    st.sampled_from([np.float64, np.float32]),
    st.sampled_from(BACKENDS),
)


def _matrix(shape, seed, dtype, backend):
    rows, cols = shape
    return gaussian((prod(rows), prod(cols)), seed, dtype, backend)


def _tails(W, shape, ranks):
    """Energy beyond rank r_k of each unfolding of W (numpy float64, independent SVDs)."""
    rows, cols = shape
    T = mpo.matrix_to_tensor(to_numpy64(W), rows, cols)
    pairs = [i * j for i, j in zip(rows, cols, strict=True)]
    tails = []
    for k, r in enumerate(ranks):
        s = np.linalg.svd(T.reshape(prod(pairs[: k + 1]), -1), compute_uv=False)
        tails.append(float((s[r:] ** 2).sum()))
    return tails


@given(case=cases)
def test_full_rank_decomposition_reconstructs_exactly(case):
    shape, seed, dtype, backend = case
    W = _matrix(shape, seed, dtype, backend)
    m = mpo.decompose(W, shape)
    assert m.ranks == mpo.full_ranks(*shape)
    assert rel_error(m.to_dense(), W) < EXACT[dtype]


@given(case=cases, rank=st.integers(1, 12))
def test_rank_truncation_error_lies_between_the_unfolding_tails(case, rank):
    shape, seed, dtype, backend = case
    W = _matrix(shape, seed, dtype, backend)
    m = mpo.decompose(W, shape, rank)
    norm_sq = float(np.linalg.norm(to_numpy64(W)) ** 2)
    error_sq = float(np.linalg.norm(to_numpy64(m.to_dense()) - to_numpy64(W)) ** 2)
    tails = _tails(W, shape, m.ranks)
    slack = SLACK[dtype] * norm_sq
    assert error_sq <= sum(tails) + slack
    assert error_sq >= max(tails) - slack


@given(case=cases, tol=st.floats(1e-6, 0.9))
def test_tolerance_bounds_the_relative_error(case, tol):
    # no slack: the rounding of the arithmetic and of the cores is inside the bound
    shape, seed, dtype, backend = case
    W = _matrix(shape, seed, dtype, backend)
    m = mpo.decompose(W, shape, tol=tol)
    assert rel_error(m.astype("float64").to_dense(), W) <= tol


@given(
    shape=factor_shapes(max_cores=4),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from(["bfloat16", "float16"]),
    tol=st.floats(0.05, 0.9),
)
def test_tolerance_bound_holds_for_half_precision_cores(shape, seed, dtype, tol):
    W = _matrix(shape, seed, np.float32, "torch").to(getattr(torch, dtype))
    m = mpo.decompose(W, shape, tol=tol)
    assert m.dtype == getattr(torch, dtype)
    assert rel_error(m.astype("float64").to_dense(), W.double()) <= tol


class TestTolerancePrecision:
    def test_fine_tolerance_on_float32_is_worked_in_float64(self):
        W = gaussian((256, 256), 0, np.float32)
        shape = ((4, 4, 4, 4), (4, 4, 4, 4))
        m = mpo.decompose(W, shape, tol=1e-6)
        by_hand = mpo.decompose(W, shape, tol=1e-6, compute_dtype="float64")
        assert m.dtype == np.float32
        for a, b in zip(m.cores, by_hand.cores, strict=True):
            np.testing.assert_array_equal(a, b)
        assert rel_error(m.astype("float64").to_dense(), W) <= 1e-6

    def test_float32_arithmetic_is_refused_for_a_fine_tolerance(self):
        W = gaussian((64, 64), 0, np.float32)
        with pytest.raises(mpo.MPOError, match="compute_dtype=float32 cannot keep tol=1e-06"):
            mpo.decompose(W, num_cores=3, tol=1e-6, compute_dtype="float32")

    def test_tolerance_finer_than_the_cores_dtype_is_refused_with_the_fix(self):
        W = gaussian((64, 64), 0, np.float32, "torch").bfloat16()
        with pytest.raises(mpo.MPOError, match=r"tol=0\.01 is finer than 3 torch\.bfloat16 cores"):
            mpo.decompose(W, num_cores=3, tol=0.01)
        m = mpo.decompose(W, num_cores=3, tol=0.01, dtype="float32")
        assert rel_error(m.astype("float64").to_dense(), W.double()) <= 0.01
        with pytest.raises(mpo.MPOError, match="dtype='float64' for the cores"):
            mpo.decompose(gaussian((64, 64), 0, np.float32), num_cores=3, tol=1e-7)
        with pytest.raises(mpo.MPOError, match="pass a tol of at least"):
            mpo.decompose(gaussian((64, 64), 0), num_cores=3, tol=1e-15)

    def test_zero_matrix_with_a_tolerance_has_rank_one(self):
        zero = np.zeros((16, 16))
        assert mpo.decompose(zero, ((2, 4, 2), (4, 2, 2)), tol=0.1).ranks == (1, 1)
        full = mpo.decompose(zero, ((2, 4, 2), (4, 2, 2)))
        assert full.ranks == mpo.full_ranks((2, 4, 2), (4, 2, 2))  # no tol: the shapes asked for
        assert full.truncate(tol=0.1).ranks == (1, 1)

    def test_long_double_is_worked_in_float64(self):
        W = gaussian((64, 64), 0)
        wide = mpo.decompose(W.astype(np.longdouble), num_cores=3, rank=4)
        assert wide.dtype == np.longdouble
        for a, b in zip(wide.cores, mpo.decompose(W, num_cores=3, rank=4).cores, strict=True):
            np.testing.assert_array_equal(a.astype(np.float64), b)


@given(shape=factor_shapes(), seed=st.integers(0, 2**16), tol=st.floats(1e-12, 1e-6))
def test_tight_tolerance_is_met_in_float64(shape, seed, tol):
    W = _matrix(shape, seed, np.float64, "numpy")
    m = mpo.decompose(W, shape, tol=tol)
    assert rel_error(m.to_dense(), W) <= tol * (1 + 1e-6) + 1e-14


def test_tight_tolerance_finds_the_true_rank_of_a_low_rank_tensor():
    rng = np.random.default_rng(0)
    cores = [rng.standard_normal(s) for s in [(1, 3, 3, 2), (2, 4, 4, 3), (3, 3, 3, 1)]]
    W = mpo.MPO(cores).to_dense()
    assert mpo.decompose(W, ((3, 4, 3), (3, 4, 3)), tol=1e-12).ranks == (2, 3)


@given(case=cases, rank=st.integers(1, 12))
def test_ranks_are_min_of_threshold_and_eq_1(case, rank):
    shape, seed, dtype, backend = case
    m = mpo.decompose(_matrix(shape, seed, dtype, backend), shape, rank)
    assert m.ranks == tuple(min(rank, r) for r in mpo.full_ranks(*shape))
    assert m.num_params == mpo.param_count(*shape, rank)
    assert m.num_params == sum(prod(core.shape) for core in m.cores)


@given(case=cases, rank=st.integers(1, 12))
def test_left_cores_are_orthonormal(case, rank):
    shape, seed, dtype, backend = case
    m = mpo.decompose(_matrix(shape, seed, dtype, backend), shape, rank)
    for core in m.cores[:-1]:
        U = to_numpy64(core).reshape(-1, core.shape[-1])
        np.testing.assert_allclose(U.T @ U, np.eye(U.shape[1]), atol=10 * EXACT[dtype])


@given(
    shape=factor_shapes(min_cores=2, max_cores=2),
    seed=st.integers(0, 2**16),
    rank=st.integers(1, 8),
)
def test_two_cores_are_the_best_rank_r_approximation(shape, seed, rank):
    rows, cols = shape
    W = _matrix(shape, seed, np.float64, "numpy")
    m = mpo.decompose(W, shape, rank)
    T = mpo.matrix_to_tensor(W, rows, cols).reshape(rows[0] * cols[0], -1)
    s = np.linalg.svd(T, compute_uv=False)
    best = np.sqrt((s[m.ranks[0] :] ** 2).sum())
    np.testing.assert_allclose(np.linalg.norm(m.to_dense() - W), best, rtol=1e-8, atol=1e-10)


@given(case=cases, rank=st.integers(1, 8))
def test_transposing_the_matrix_gives_the_same_error(case, rank):
    shape, seed, dtype, backend = case
    W = _matrix(shape, seed, dtype, backend)
    rows, cols = shape
    error = rel_error(mpo.decompose(W, shape, rank).to_dense(), W)
    error_t = rel_error(mpo.decompose(W.T, (cols, rows), rank).to_dense(), W.T)
    assert error_t == pytest.approx(error, rel=1e-6, abs=EXACT[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_matrix_gives_bit_identical_cores(backend):
    W = gaussian((96, 120), 7, np.float32, backend)
    first = mpo.decompose(W, rank=6)
    second = mpo.decompose(W.copy() if backend == "numpy" else W.clone(), rank=6)
    for a, b in zip(first.cores, second.cores, strict=True):
        assert np.array_equal(to_numpy64(a), to_numpy64(b))


@given(case=cases, rank=st.integers(1, 8))
def test_signs_follow_the_largest_entry_rule(case, rank):
    shape, seed, dtype, backend = case
    m = mpo.decompose(_matrix(shape, seed, dtype, backend), shape, rank)
    for core in m.cores[:-1]:
        U = to_numpy64(core).reshape(-1, core.shape[-1])
        pivots = np.abs(U).argmax(axis=0)
        assert (U[pivots, np.arange(U.shape[1])] > 0).all()


def test_numpy_and_torch_agree():
    W = gaussian((64, 48), 3)
    a = mpo.decompose(W, ((4, 4, 4), (4, 3, 4)), 6)
    b = mpo.decompose(torch.from_numpy(W), ((4, 4, 4), (4, 3, 4)), 6)
    assert a.ranks == b.ranks
    np.testing.assert_allclose(to_numpy64(b.to_dense()), a.to_dense(), atol=1e-10)
    for core_a, core_b in zip(a.cores, b.cores, strict=True):
        np.testing.assert_allclose(to_numpy64(core_b), core_a, atol=1e-8)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("rank", [1, 3, 8])
def test_error_and_ranks_match_tensorlys_tensor_train_matrix(seed, rank):
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import tensor_train_matrix

    tl.set_backend("numpy")
    rows, cols = (3, 4, 2, 3), (2, 3, 4, 2)
    W = gaussian((prod(rows), prod(cols)), seed)
    ours = mpo.decompose(W, (rows, cols), rank)
    theirs = tensor_train_matrix(W.reshape(rows + cols), [1, *ours.ranks, 1])
    assert tuple(theirs.rank[1:-1]) == ours.ranks
    dense = tl.tt_matrix_to_tensor(theirs).reshape(W.shape)
    assert rel_error(ours.to_dense(), W) == pytest.approx(rel_error(dense, W), rel=1e-6)


class TestDtypes:
    def test_bfloat16_torch_input_is_decomposed_in_float32_and_returned_in_bfloat16(self):
        W = gaussian((64, 64), 0, np.float32, "torch")
        m16 = mpo.decompose(W.bfloat16(), rank=4)
        m32 = mpo.decompose(W.bfloat16().float(), rank=4)
        assert m16.dtype == torch.bfloat16
        for a, b in zip(m16.cores, m32.cores, strict=True):
            assert torch.equal(a, b.bfloat16())

    def test_cores_come_back_in_the_requested_dtype(self):
        W = gaussian((64, 64), 0, np.float32, "torch").half()
        m = mpo.decompose(W, rank=4, dtype="float32")
        assert m.dtype == torch.float32

    def test_float64_compute_for_float32_input(self):
        W = gaussian((64, 64), 0, np.float32)
        m = mpo.decompose(W, compute_dtype="float64")
        assert m.dtype == np.float32
        assert rel_error(m.to_dense(), W) < 1e-6

    def test_float16_numpy_input_gives_float16_cores(self):
        W = gaussian((32, 32), 0, np.float16)
        assert mpo.decompose(W, rank=2).dtype == np.float16

    def test_compute_dtype_must_be_float32_or_float64(self):
        with pytest.raises(mpo.MPOError, match="compute_dtype must be float32 or float64"):
            mpo.decompose(gaussian((16, 16), 0), compute_dtype="float16")

    def test_input_with_gradient_is_detached(self):
        W = gaussian((16, 16), 0, backend="torch").requires_grad_()
        m = mpo.decompose(W, rank=2)
        assert not any(core.requires_grad for core in m.cores)


def test_torch_cores_stay_on_the_input_device():
    W = gaussian((16, 16), 0, backend="torch")
    assert all(core.device == W.device for core in mpo.decompose(W, rank=2).cores)


def test_default_shape_uses_factorize_and_five_cores():
    m = mpo.decompose(gaussian((1024, 768), 0, np.float32), rank=8)
    assert m.row_factors == mpo.factorize(1024)
    assert m.col_factors == mpo.factorize(768)
    assert m.num_cores == 5


def test_num_cores_picks_the_factorization():
    assert mpo.decompose(gaussian((64, 64), 0), num_cores=3).row_factors == (4, 4, 4)


def test_single_core_is_the_matrix_itself():
    W = gaussian((6, 5), 0)
    m = mpo.decompose(W, num_cores=1)
    assert m.ranks == ()
    assert np.array_equal(m.to_dense(), W)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unfolding_spectra_match_direct_svds(backend):
    shape = ((2, 3, 2), (3, 2, 2))
    W = gaussian((12, 12), 5, backend=backend)
    spectra = mpo.unfolding_spectra(W, shape)
    assert all(type(s) is type(W) for s in spectra)
    T = mpo.matrix_to_tensor(to_numpy64(W), *shape)
    for k, s in enumerate(spectra):
        expected = np.linalg.svd(
            T.reshape(prod(p * q for p, q in zip(*[x[: k + 1] for x in shape], strict=True)), -1),
            compute_uv=False,
        )
        np.testing.assert_allclose(to_numpy64(s)[: len(expected)], expected, atol=1e-7)


def test_importing_mpo_does_not_import_torch():
    code = (
        "import sys, numpy, mpo; mpo.decompose(numpy.eye(4), num_cores=2); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class TestBadInput:
    @pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
    def test_non_finite_entries(self, bad):
        W = gaussian((8, 8), 0)
        W[3, 4] = bad
        with pytest.raises(mpo.MPOError, match="NaN or Inf"):
            mpo.decompose(W, num_cores=2)

    def test_empty_matrix(self):
        with pytest.raises(mpo.MPOError, match="empty"):
            mpo.decompose(np.zeros((0, 4)), num_cores=2)

    def test_one_dimensional_input(self):
        with pytest.raises(mpo.MPOError, match="expected a 2-D matrix, got an array of shape"):
            mpo.decompose(np.zeros(16), num_cores=2)

    def test_integer_matrix(self):
        with pytest.raises(mpo.MPOError, match="floating-point"):
            mpo.decompose(np.ones((4, 4), dtype=np.int64), num_cores=2)

    def test_not_an_array(self):
        with pytest.raises(mpo.MPOError, match="numpy array or a torch tensor, got list"):
            mpo.decompose([[1.0, 2.0], [3.0, 4.0]])

    def test_factor_product_mismatch(self):
        with pytest.raises(
            mpo.MPOError, match=r"describe a 16 x 16 matrix, but the matrix is 16 x 12"
        ):
            mpo.decompose(np.zeros((16, 12)), ((4, 4), (4, 4)))

    def test_shape_not_a_pair(self):
        with pytest.raises(mpo.MPOError, match=r"pair \(row_factors, col_factors\)"):
            mpo.decompose(np.zeros((16, 16)), (4, 4))

    @pytest.mark.parametrize("rank", [0, -1])
    def test_rank_below_one(self, rank):
        with pytest.raises(mpo.MPOError, match="rank must be at least 1"):
            mpo.decompose(np.ones((16, 16)), num_cores=2, rank=rank)

    @pytest.mark.parametrize("num_cores", [0, -2, 2.5])
    def test_num_cores_below_one(self, num_cores):
        with pytest.raises(mpo.MPOError, match="num_cores must be a positive integer"):
            mpo.decompose(np.ones((16, 16)), num_cores=num_cores)

    def test_num_cores_disagrees_with_shape(self):
        with pytest.raises(mpo.MPOError, match="shape has 2 factor pairs but num_cores=3"):
            mpo.decompose(np.ones((16, 16)), ((4, 4), (4, 4)), num_cores=3)

    @pytest.mark.parametrize("tol", [-0.1, "big"])
    def test_bad_tolerance(self, tol):
        with pytest.raises(mpo.MPOError, match="tol must be a non-negative number"):
            mpo.decompose(np.ones((16, 16)), num_cores=2, tol=tol)


def test_tolerance_and_rank_together_take_the_smaller_rank():
    W = gaussian((64, 64), 1)
    both = mpo.decompose(W, ((8, 8), (8, 8)), rank=5, tol=1e-9)
    assert both.ranks == (5,)
    loose = mpo.decompose(W, ((8, 8), (8, 8)), rank=60, tol=0.5)
    assert loose.ranks[0] < 60
    assert rel_error(loose.to_dense(), W) <= 0.5 * sqrt(1) + 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
def test_matrix_of_small_tt_rank_keeps_the_requested_ranks(backend):
    rng = np.random.default_rng(0)
    shapes = [(1, 4, 4, 2), (2, 4, 4, 3), (3, 4, 4, 1)]
    W = mpo.MPO([rng.standard_normal(s) for s in shapes]).to_dense()
    if backend == "torch":
        W = torch.from_numpy(W)
    m = mpo.decompose(W, ((4, 4, 4), (4, 4, 4)), rank=8)
    assert m.ranks == (8, 8)
    assert rel_error(m.to_dense(), W) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
def test_cores_are_contiguous(backend):
    m = mpo.decompose(gaussian((48, 64), 0, np.float32, backend), ((4, 3, 4), (4, 4, 4)), 3)
    for core in m.cores:
        contiguous = core.is_contiguous() if backend == "torch" else core.flags.c_contiguous
        assert contiguous


def test_peak_extra_memory_is_about_twice_the_matrix():
    tracemalloc = pytest.importorskip("tracemalloc")
    W = gaussian((4096, 4096), 0, np.float32)
    tracemalloc.start()
    try:
        mpo.decompose(W, rank=16)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= 2.1 * W.nbytes


@pytest.mark.parametrize("decay", [0.5, 2.0])
def test_fixed_rank_float32_error_matches_a_float64_tt_svd(decay):
    """The working-precision Gram matrix plus refinement loses nothing measurable."""
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((256, 256)))
    v, _ = np.linalg.qr(rng.standard_normal((256, 256)))
    W = ((u * np.arange(1, 257) ** -decay) @ v.T).astype(np.float32)
    shape = ((4, 4, 4, 4), (4, 4, 4, 4))
    ours = rel_error(mpo.decompose(W, shape, 12).to_dense(), W)
    reference = rel_error(mpo.decompose(W.astype(np.float64), shape, 12).to_dense(), W)
    assert ours == pytest.approx(reference, rel=1e-5)


def test_overflowing_norm_is_reported_with_the_fix():
    W = np.full((4, 4), 1e200)
    with pytest.raises(mpo.MPOError, match="overflows float64; scale it down"):
        mpo.decompose(W, num_cores=2)
