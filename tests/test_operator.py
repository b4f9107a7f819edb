from math import prod

import numpy as np
import pytest
from conftest import BACKENDS, factor_shapes, gaussian, rel_error, to_numpy64
from hypothesis import given
from hypothesis import strategies as st

import mpo
from mpo.contract import apply_plan

torch = pytest.importorskip("torch")


def random_mpo(shape, rank, seed, backend="numpy", dtype=np.float64):
    """An MPO with Gaussian cores (not orthonormal) and the given bond-rank threshold."""
    rows, cols = shape
    ranks = (1, *mpo.bond_ranks(rows, cols, rank), 1)
    rng = np.random.default_rng(seed)
    cores = [
        rng.standard_normal((ranks[k], rows[k], cols[k], ranks[k + 1])).astype(dtype)
        for k in range(len(rows))
    ]
    if backend == "torch":
        cores = [torch.from_numpy(c) for c in cores]
    return mpo.MPO(cores)


mpos = st.builds(
    random_mpo,
    factor_shapes(),
    st.integers(1, 6),
    st.integers(0, 2**16),
    st.sampled_from(BACKENDS),
)


@given(m=mpos, batch=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_x_matmul_mpo_equals_x_matmul_dense(m, batch, seed):
    x = gaussian((batch, m.shape[0]), seed, backend=m.backend)
    y = x @ m
    assert type(y) is type(x)
    assert tuple(y.shape) == (batch, m.shape[1])
    np.testing.assert_allclose(to_numpy64(y), to_numpy64(x) @ to_numpy64(m.to_dense()), atol=1e-9)


@given(m=mpos, seed=st.integers(0, 2**16))
def test_mpo_matmul_vector_and_matrix_equal_dense(m, seed):
    dense = to_numpy64(m.to_dense())
    v = gaussian((m.shape[1],), seed, backend=m.backend)
    Y = gaussian((m.shape[1], 3), seed + 1, backend=m.backend)
    np.testing.assert_allclose(to_numpy64(m @ v), dense @ to_numpy64(v), atol=1e-9)
    np.testing.assert_allclose(to_numpy64(m @ Y), dense @ to_numpy64(Y), atol=1e-9)


def test_leading_batch_axes_are_kept():
    m = random_mpo(((2, 3), (3, 2)), 3, 0)
    x = gaussian((4, 5, 6), 1)
    y = x @ m
    assert y.shape == (4, 5, 6)
    np.testing.assert_allclose(y, x @ m.to_dense(), atol=1e-10)


def test_vector_times_mpo():
    m = random_mpo(((2, 3), (3, 2)), 3, 0)
    v = gaussian((6,), 1)
    np.testing.assert_allclose(v @ m, v @ m.to_dense(), atol=1e-10)


def test_gradients_flow_through_x_matmul_mpo():
    m = random_mpo(((2, 3, 2), (2, 2, 3)), 3, 0, backend="torch")
    cores = [c.clone().requires_grad_() for c in m.cores]
    x = gaussian((4, 12), 1, backend="torch").requires_grad_()

    def through_mpo(x, *cores):
        return x @ mpo.MPO(cores)

    def through_dense(x, *cores):
        return x @ mpo.MPO(cores).to_dense()

    assert torch.autograd.gradcheck(through_mpo, (x, *cores))
    grads = torch.autograd.grad(through_mpo(x, *cores).sum(), (x, *cores))
    dense_grads = torch.autograd.grad(through_dense(x, *cores).sum(), (x, *cores))
    for a, b in zip(grads, dense_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_plans_are_cached_per_shape():
    m = random_mpo(((2, 3, 2), (2, 2, 3)), 3, 0)
    x = gaussian((5, 12), 1)
    x @ m
    before = apply_plan.cache_info()
    x @ m
    after = apply_plan.cache_info()
    assert after.misses == before.misses
    assert after.hits == before.hits + 1
    assert m.plan(5) is m.plan(5)


def test_many_unit_factors_plan_like_the_factors_that_are_not():
    # Planned with its factors of 1, this 24-core x @ mpo took minutes (the search of
    # pairings grew 4x per two cores); the unit indices are left out of the search.
    rows, cols = (2, 3, 2) + (1,) * 21, (3, 2, 2) + (1,) * 21
    m = random_mpo((rows, cols), 3, 0)
    x = gaussian((5, 12), 1)
    np.testing.assert_allclose(x @ m, x @ m.to_dense(), atol=1e-10)
    compact = random_mpo(((2, 3, 2), (3, 2, 2)), 3, 0)
    assert m.plan(5).flops <= 2 * compact.plan(5).flops


def test_a_plan_refuses_operands_of_other_shapes():
    m = random_mpo(((2, 3, 2), (3, 2, 2)), 3, 0)
    plan = apply_plan(2, tuple(tuple(core.shape) for core in m.cores))
    with pytest.raises(mpo.MPOError, match="this plan contracts operands of shapes"):
        plan(gaussian((2, 3, 2, 2), 0), *m.cores)  # (2, 2, 3, 2) planned: same size


def test_plan_prints_flops_and_largest_intermediate():
    m = random_mpo(((4, 4, 8, 8, 4), (4, 4, 8, 8, 4)), 16, 0)
    plan = m.plan(16)
    report = str(plan)
    assert "Optimized FLOP count" in report
    assert "Largest intermediate" in report
    assert plan.flops > 0
    assert plan.largest_intermediate >= 16 * 4096


@given(
    shape=factor_shapes(),
    seeds=st.tuples(st.integers(0, 99), st.integers(100, 199)),
    backend=st.sampled_from(BACKENDS),
)
def test_sum_and_difference_equal_dense_sum_and_difference(shape, seeds, backend):
    a = random_mpo(shape, 3, seeds[0], backend)
    b = random_mpo(shape, 2, seeds[1], backend)
    A, B = to_numpy64(a.to_dense()), to_numpy64(b.to_dense())
    scale = max(np.abs(A).max(), np.abs(B).max(), 1.0)
    np.testing.assert_allclose(to_numpy64((a + b).to_dense()), A + B, atol=1e-10 * scale)
    np.testing.assert_allclose(to_numpy64((a - b).to_dense()), A - B, atol=1e-10 * scale)
    assert (a + b).ranks == tuple(ra + rb for ra, rb in zip(a.ranks, b.ranks, strict=True))


@given(m=mpos, scalar=st.floats(-10, 10))
def test_scalar_multiplication(m, scalar):
    dense = to_numpy64(m.to_dense())
    np.testing.assert_allclose(to_numpy64((scalar * m).to_dense()), scalar * dense, atol=1e-9)
    np.testing.assert_allclose(to_numpy64((m * scalar).to_dense()), scalar * dense, atol=1e-9)
    np.testing.assert_allclose(to_numpy64((-m).to_dense()), -dense)


@given(m=mpos)
def test_transpose_is_the_dense_transpose(m):
    dense = to_numpy64(m.to_dense())
    # the contraction order may differ, so equality is to rounding, not bitwise
    np.testing.assert_allclose(to_numpy64(m.T.to_dense()), dense.T, rtol=1e-12, atol=1e-12)
    assert m.T.shape == m.shape[::-1]


@given(m=mpos, seed=st.integers(0, 2**16))
def test_gauge_change_between_cores_leaves_the_operator_unchanged(m, seed):
    if m.num_cores < 2:
        return
    cores = [to_numpy64(c) for c in m.cores]
    k = seed % (len(cores) - 1)
    r = cores[k].shape[-1]
    G = np.random.default_rng(seed).standard_normal((r, r)) + 3 * np.eye(r)
    cores[k] = cores[k] @ G
    cores[k + 1] = np.einsum("ab,bijc->aijc", np.linalg.inv(G), cores[k + 1])
    np.testing.assert_allclose(mpo.MPO(cores).to_dense(), to_numpy64(m.to_dense()), atol=1e-8)


@given(m=mpos, rank=st.integers(1, 6))
def test_truncation_never_increases_ranks_and_error_is_the_discarded_energy(m, rank):
    rounded = m.truncate(rank)
    assert all(
        r_new <= min(r_old, rank) for r_new, r_old in zip(rounded.ranks, m.ranks, strict=True)
    )
    dense = to_numpy64(m.to_dense())
    error_sq = np.linalg.norm(to_numpy64(rounded.to_dense()) - dense) ** 2
    # Rounding is TT-SVD of the represented matrix, so the TT-SVD bound applies to it.
    rows, cols = m.row_factors, m.col_factors
    T = mpo.matrix_to_tensor(dense, rows, cols)
    pairs = [i * j for i, j in zip(rows, cols, strict=True)]
    tails = [
        (np.linalg.svd(T.reshape(prod(pairs[: k + 1]), -1), compute_uv=False)[r:] ** 2).sum()
        for k, r in enumerate(rounded.ranks)
    ]
    norm_sq = np.linalg.norm(dense) ** 2
    assert error_sq <= sum(tails) + 1e-9 * norm_sq
    assert error_sq >= max(tails, default=0.0) - 1e-9 * norm_sq


@given(m=mpos, tol=st.floats(1e-6, 0.9))
def test_truncation_with_tolerance_respects_its_bound(m, tol):
    rounded = m.truncate(tol=tol)
    assert all(r_new <= r_old for r_new, r_old in zip(rounded.ranks, m.ranks, strict=True))
    assert rel_error(rounded.to_dense(), m.to_dense()) <= tol * (1 + 1e-6) + 1e-12


def test_sum_of_an_mpo_with_itself_rounds_back_to_its_rank():
    a = mpo.decompose(gaussian((64, 64), 0), ((4, 4, 4), (4, 4, 4)), 5)
    doubled = (a + a).truncate(tol=1e-10)
    assert doubled.ranks == a.ranks
    np.testing.assert_allclose(doubled.to_dense(), 2 * a.to_dense(), atol=1e-10)


def test_delta_of_a_trained_copy_is_exported_exactly():
    base = mpo.decompose(gaussian((48, 48), 0), ((4, 3, 4), (3, 4, 4)), 4)
    trained = mpo.MPO([c + 0.01 * gaussian(c.shape, k) for k, c in enumerate(base.cores)])
    delta = trained - base
    assert delta.ranks == tuple(2 * r for r in base.ranks)
    np.testing.assert_allclose(delta.to_dense(), trained.to_dense() - base.to_dense(), atol=1e-12)


def test_astype_casts_every_core():
    m = random_mpo(((2, 3), (3, 2)), 2, 0, backend="torch")
    assert m.astype("bfloat16").dtype == torch.bfloat16
    assert random_mpo(((2, 3), (3, 2)), 2, 0).astype("float32").dtype == np.float32


def test_properties_describe_the_structure():
    m = random_mpo(((4, 4, 8, 8, 4), (4, 4, 43, 4, 4)), 16, 0)
    assert m.shape == (4096, 11008)
    assert m.row_factors == (4, 4, 8, 8, 4)
    assert m.col_factors == (4, 4, 43, 4, 4)
    assert m.ranks == (16, 16, 16, 16)
    assert m.num_params == 100_864
    assert m.dtype == np.float64
    assert m.backend == "numpy"
    assert "ranks=(16, 16, 16, 16)" in repr(m)


class TestBadInput:
    def test_cores_that_do_not_chain(self):
        with pytest.raises(mpo.MPOError, match="bond dimensions do not chain"):
            mpo.MPO([np.zeros((1, 2, 2, 3)), np.zeros((4, 2, 2, 1))])

    def test_outer_bonds_must_be_one(self):
        with pytest.raises(mpo.MPOError, match="outer two must be 1"):
            mpo.MPO([np.zeros((2, 2, 2, 1))])

    def test_cores_must_be_four_dimensional(self):
        with pytest.raises(mpo.MPOError, match="cores are 4-D"):
            mpo.MPO([np.zeros((1, 2, 2))])

    def test_no_cores(self):
        with pytest.raises(mpo.MPOError, match="at least one core"):
            mpo.MPO([])

    def test_mixed_dtypes(self):
        with pytest.raises(mpo.MPOError, match="all cores must match"):
            mpo.MPO([np.zeros((1, 2, 2, 1)), np.zeros((1, 2, 2, 1), dtype=np.float32)])

    def test_mixed_devices(self):
        here, elsewhere = torch.zeros(1, 2, 2, 1), torch.zeros(1, 2, 2, 1, device="meta")
        with pytest.raises(mpo.MPOError, match="core 1 is on meta, core 0 on cpu"):
            mpo.MPO([here, elsewhere])

    @pytest.mark.parametrize("scalar", [float("nan"), float("inf"), 10**400])
    def test_scaling_by_a_non_finite_number(self, scalar):
        m = random_mpo(((2, 3), (3, 2)), 2, 0)
        with pytest.raises(mpo.MPOError, match="cores must stay finite"):
            m * scalar

    @pytest.mark.parametrize("backend", BACKENDS)
    def test_scaling_past_the_dtypes_range(self, backend):
        m = random_mpo(((2, 3), (3, 2)), 2, 0, backend=backend).astype("float16")
        with pytest.raises(mpo.MPOError, match=r"overflows the .*float16 last core; cast"):
            m * 1e6
        wide = random_mpo(((2, 3), (3, 2)), 2, 0, backend=backend)
        with pytest.raises(mpo.MPOError, match=r"overflows the .*float64 last core$"):
            wide * 1e308

    def test_scaling_passes_non_finite_cores_through(self):
        # an MPO may hold Inf (MPO() accepts it); scaling it is no overflow of ours
        m = mpo.MPO([np.ones((1, 2, 2, 1)), np.full((1, 2, 2, 1), np.inf)])
        assert np.isinf((m * 1.0).to_dense()).all()
        assert np.isinf((-m).to_dense()).all()
        assert np.isinf((m * 3.0).to_dense()).all()

    def test_adding_mpos_of_different_factors(self):
        a = random_mpo(((2, 3), (3, 2)), 2, 0)
        b = random_mpo(((3, 2), (3, 2)), 2, 0)
        with pytest.raises(mpo.MPOError, match="same factor shapes"):
            a + b

    def test_adding_numpy_and_torch_mpos(self):
        a = random_mpo(((2, 3), (3, 2)), 2, 0)
        b = random_mpo(((2, 3), (3, 2)), 2, 0, backend="torch")
        with pytest.raises(mpo.MPOError, match="cannot combine a numpy"):
            a + b

    def test_applying_to_the_wrong_width(self):
        m = random_mpo(((2, 3), (3, 2)), 2, 0)
        with pytest.raises(mpo.MPOError, match="needs a last axis of 6"):
            np.ones((3, 5)) @ m

    def test_applying_a_numpy_mpo_to_a_torch_tensor(self):
        m = random_mpo(((2, 3), (3, 2)), 2, 0)
        with pytest.raises(mpo.MPOError, match="cannot apply a numpy MPO to a Tensor"):
            torch.ones(3, 6) @ m

    def test_mpo_times_three_dimensional_array(self):
        m = random_mpo(((2, 3), (3, 2)), 2, 0)
        with pytest.raises(mpo.MPOError, match=r"use x @ mpo.T"):
            m @ np.ones((6, 2, 2))

    def test_multiplying_two_mpos_is_not_supported(self):
        m = random_mpo(((2, 3), (3, 2)), 2, 0)
        with pytest.raises(TypeError):
            m @ m


def test_equations_are_renamed_to_letters_for_torch_einsum():
    # opt_einsum's symbols go past z and Z; torch.einsum (used while compiling) takes letters
    from mpo.contract import _letters, dense_plan

    plan = dense_plan(tuple((1 if k == 0 else 2, 2, 2, 1 if k == 19 else 2) for k in range(20)))
    assert not plan.equation.isascii()
    assert plan.letters is None
    assert _letters(plan.equation) is None
    small = dense_plan(((1, 2, 3, 2), (2, 4, 5, 1)))
    renamed = small.letters
    assert renamed.replace(",", "").replace("->", "").isalpha()
    operands = [np.random.default_rng(k).normal(size=s) for k, s in enumerate(small.shapes)]
    np.testing.assert_allclose(np.einsum(renamed, *operands), small(*operands))


@pytest.mark.parametrize("scalar", [np.float64(2.5), np.int64(3), np.float32(-1.5), 2])
def test_scaling_by_any_real_number_keeps_the_cores_dtype(scalar):
    W = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    m = mpo.decompose(W, ((4, 4), (4, 4)))
    for scaled in (m * scalar, scalar * m):
        assert scaled.dtype == np.float32
        np.testing.assert_allclose(scaled.to_dense(), float(scalar) * m.to_dense(), atol=1e-5)
    with pytest.raises(mpo.MPOError, match="scaled by a real number"):
        m * 1j


def test_torch_operands_of_another_dtype_are_promoted_as_numpy_does():
    torch = pytest.importorskip("torch")
    W = np.random.default_rng(0).normal(size=(16, 12))
    x = np.random.default_rng(1).normal(size=(3, 16))
    m_np = mpo.decompose(W.astype(np.float32), ((4, 4), (4, 3)))
    m_torch = mpo.decompose(torch.tensor(W, dtype=torch.float32), ((4, 4), (4, 3)))
    y_np = x @ m_np  # float64 rows times float32 cores: float64
    y_torch = torch.tensor(x) @ m_torch
    assert y_np.dtype == np.float64
    assert y_torch.dtype == torch.float64
    np.testing.assert_allclose(y_torch.numpy(), y_np, rtol=1e-5)


def test_integer_dtypes_are_refused_for_cores():
    W = np.random.default_rng(0).normal(size=(16, 16))
    with pytest.raises(mpo.MPOError, match="not floating point"):
        mpo.decompose(W, ((4, 4), (4, 4)), dtype="int64")
    with pytest.raises(mpo.MPOError, match="would truncate them"):
        mpo.decompose(W, ((4, 4), (4, 4))).astype("int32")


def test_numpy_integers_are_sizes_and_ranks_too():
    W = np.random.default_rng(0).normal(size=(16, 16))
    assert mpo.factorize(np.int64(16), np.int32(2)) == mpo.factorize(16, 2)
    m = mpo.decompose(W, ((4, 4), (4, 4)), rank=np.int64(3))
    assert m.ranks == (3,)
    assert m.truncate(rank=[np.int32(2)]).ranks == (2,)
    assert mpo.decompose(W, num_cores=np.int64(2)).ranks == mpo.decompose(W, num_cores=2).ranks


@pytest.mark.parametrize("tol", [-0.5, float("nan"), float("inf"), "0.1"])
def test_truncate_refuses_a_tol_that_is_not_a_relative_error(tol):
    m = mpo.decompose(np.random.default_rng(0).normal(size=(16, 16)), ((4, 4), (4, 4)))
    with pytest.raises(mpo.MPOError, match="tol must be a non-negative number"):
        (m + m).truncate(tol=tol)
    with pytest.raises(mpo.MPOError, match="tol must be a non-negative number"):
        mpo.decompose(m.to_dense(), ((4, 4), (4, 4)), tol=tol)
