"""The DoTA layer and wrap(): structure, initialisation, merging, switches and bad input."""

import math
import sys
import threading

import pytest
from conftest import factor_shapes
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

import mpo  # noqa: E402
import mpo.adapt  # noqa: E402
import mpo.adapt.delta  # noqa: E402
from mpo.adapt import DoTAConfig, DoTALinear  # noqa: E402
from mpo.adapt.delta import Layout, choose  # noqa: E402

SHAPE = ((4, 3, 4), (4, 4, 4))  # a 48 x 64 weight


def linear(out_features=48, in_features=64, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return torch.nn.Linear(in_features, out_features).to(dtype)


def perturb(layer, scale=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for core in layer.cores():
            core.add_(scale * torch.randn(core.shape, generator=generator).to(core.dtype))


class TestInitialisation:
    def test_dota_cores_are_the_tt_svd_of_the_weight(self):
        base = linear()
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        expected = mpo.decompose(base.weight.detach(), SHAPE, 4)
        for core, reference in zip(layer.cores(), expected.cores, strict=True):
            assert torch.equal(core.detach(), reference)
        assert layer.initial_cores() is not None

    def test_random_init_has_the_same_shapes_and_a_zero_last_core(self):
        dota = DoTALinear(linear(), rank=4, shape=SHAPE)
        random = DoTALinear(linear(), rank=4, shape=SHAPE, init="random")
        assert [c.shape for c in random.cores()] == [c.shape for c in dota.cores()]
        assert not random.cores()[-1].any()
        assert all(c.abs().sum() > 0 for c in random.cores()[:-1])
        assert random.initial_cores() is None

    @pytest.mark.parametrize("init", ["dota", "random"])
    @pytest.mark.parametrize("strategy", ["dense", "factored"])
    def test_output_equals_the_base_layer_bit_for_bit(self, init, strategy):
        base = linear()
        layer = DoTALinear(base, rank=4, shape=SHAPE, init=init)
        layer.strategy = strategy
        x = torch.randn(7, 64)
        assert torch.equal(layer(x), base(x))

    @pytest.mark.parametrize("strategy", ["dense", "factored"])
    def test_bfloat16_base_and_cores_are_exact_at_init(self, strategy):
        base = linear(dtype=torch.bfloat16)
        layer = DoTALinear(base, rank=4, shape=SHAPE, dtype="bfloat16")
        layer.strategy = strategy
        x = torch.randn(3, 64, dtype=torch.bfloat16)
        assert layer.cores()[0].dtype == torch.bfloat16
        assert torch.equal(layer(x), base(x))

    def test_only_cores_are_trainable(self):
        layer = DoTALinear(linear(), rank=4, shape=SHAPE)
        trainable = {name for name, p in layer.named_parameters() if p.requires_grad}
        assert trainable == {f"dota_cores.default.{k}" for k in range(3)}
        assert "dota_init.default.0" in dict(layer.named_buffers())

    def test_trainable_count_is_the_parameter_formula(self):
        layer = DoTALinear(linear(), rank=4, shape=SHAPE)
        count = sum(p.numel() for p in layer.parameters() if p.requires_grad)
        assert count == mpo.param_count(*SHAPE, 4)

    def test_default_shape_comes_from_factorize(self):
        layer = DoTALinear(linear(), rank=2)
        assert layer.adapter_settings["default"]["shape"] == [
            list(mpo.factorize(48)),
            list(mpo.factorize(64)),
        ]


class TestUpdate:
    @pytest.mark.parametrize("strategy", ["dense", "factored"])
    def test_output_is_x_times_the_updated_weight(self, strategy):
        base = linear()
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        perturb(layer)
        layer.strategy = strategy
        x = torch.randn(5, 64)
        with torch.no_grad():
            expected = x @ (base.weight + layer.get_delta_weight()).T + base.bias
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)

    def test_delta_weight_is_mpo_of_cores_minus_mpo_of_initial_cores(self):
        layer = DoTALinear(linear(), rank=4, shape=SHAPE)
        perturb(layer)
        with torch.no_grad():
            trained = mpo.MPO([c.detach() for c in layer.cores()]).to_dense()
            initial = mpo.MPO(layer.initial_cores()).to_dense()
            torch.testing.assert_close(layer.get_delta_weight(), trained - initial)

    def test_gradients_flow_to_cores_and_input_only(self):
        layer = DoTALinear(linear(), rank=4, shape=SHAPE)
        perturb(layer)
        x = torch.randn(4, 64, requires_grad=True)
        layer(x).square().sum().backward()
        assert x.grad is not None
        assert all(core.grad is not None for core in layer.cores())
        assert layer.base_layer.weight.grad is None


class TestSwitches:
    def test_disabling_gives_the_base_output_after_training(self):
        base = linear()
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        perturb(layer)
        x = torch.randn(3, 64)
        layer.enable_adapters(False)
        assert torch.equal(layer(x), base(x))
        layer.enable_adapters(True)
        assert not torch.equal(layer(x), base(x))

    def test_disabling_a_merged_layer_unmerges_it(self):
        base = linear()
        reference = linear()  # the same weights, never adapted
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        perturb(layer)
        x = torch.randn(3, 64)
        with torch.no_grad():
            layer.merge()
            layer.enable_adapters(False)
            assert not layer.merged
            torch.testing.assert_close(layer(x), reference(x), rtol=0, atol=1e-6)

    def test_merge_returns_the_base_layer_with_the_update_folded_in(self):
        layer = DoTALinear(linear(), rank=4, shape=SHAPE)
        perturb(layer)
        x = torch.randn(3, 64)
        with torch.no_grad():
            adapted = layer(x)
            merged = layer.merge()
            assert isinstance(merged, torch.nn.Linear)
            torch.testing.assert_close(merged(x), adapted, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(layer(x), adapted, rtol=1e-5, atol=1e-5)

    def test_merge_folds_the_named_adapters_as_peft_does(self):
        base = linear()
        original = base.weight.detach().clone()
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        layer.update_layer("other", rank=2, shape=SHAPE)
        perturb(layer)
        layer.set_adapter("other")
        perturb(layer, seed=3)
        assert layer.active_adapters == ["other"]
        deltas = [layer.get_delta_weight(name) for name in ("default", "other")]
        layer.merge(adapter_names=["default", "other"])
        assert layer.merged_adapters == ["default", "other"]
        torch.testing.assert_close(base.weight.detach(), original + sum(deltas))
        layer.unmerge()
        torch.testing.assert_close(base.weight.detach(), original, rtol=0, atol=1e-6)

    def test_safe_merge_refuses_a_weight_with_nan_and_leaves_it(self):
        base = linear()
        original = base.weight.detach().clone()
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        with torch.no_grad():
            layer.cores()[0][0, 0, 0, 0] = float("nan")
        with pytest.raises(mpo.MPOError, match="NaN or Inf in the weight, which is left"):
            layer.merge(safe_merge=True)
        assert not layer.merged
        assert torch.equal(base.weight, original)

    def test_unmerge_restores_the_weight_to_rounding(self):
        base = linear()
        original = base.weight.detach().clone()
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        perturb(layer)
        layer.merge()
        assert layer.merged
        layer.unmerge()
        assert not layer.merged
        torch.testing.assert_close(base.weight.detach(), original, rtol=0, atol=1e-6)

    def test_a_second_adapter_can_be_added_and_selected(self):
        base = linear()
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        layer.update_layer("other", rank=2, shape=SHAPE, init="random")
        layer.set_adapter("other")
        assert layer.active_adapter == "other"
        assert [c.shape[3] for c in layer.cores()[:-1]] == [2, 2]
        x = torch.randn(2, 64)
        assert torch.equal(layer(x), base(x))

    def test_unknown_adapter_name_is_an_error(self):
        layer = DoTALinear(linear(), rank=4, shape=SHAPE)
        with pytest.raises(mpo.MPOError, match=r"no adapter named 'missing'.*\['default'\]"):
            layer.set_adapter("missing")

    def test_frozen_cores_still_pass_the_input_gradient(self):
        base = linear()
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        perturb(layer)
        layer.strategy = "dense"
        x = torch.randn(5, 64, requires_grad=True)
        (expected,) = torch.autograd.grad(layer(x).square().sum(), [x])
        for core in layer.cores():
            core.requires_grad_(False)
        (grad,) = torch.autograd.grad(layer(x).square().sum(), [x])
        torch.testing.assert_close(grad, expected)
        assert all(core.grad is None for core in layer.cores())

    def test_a_one_core_layout_trains(self):
        base = torch.nn.Linear(7, 5)
        layer = DoTALinear(base, rank=4, shape=((5,), (7,)))
        perturb(layer)
        x = torch.randn(3, 7)
        (y, grads), (y_ref, grads_ref) = _step(layer, x, "dense"), _step(layer, x, "factored")
        torch.testing.assert_close(y, y_ref)
        for grad, reference in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, reference)

    def test_unknown_strategy_is_an_error(self):
        layer = DoTALinear(linear(), rank=4, shape=SHAPE)
        with pytest.raises(mpo.MPOError, match=r"strategy must be one of .*'fast'"):
            layer.strategy = "fast"
        assert layer.strategy == "auto"

    def test_duplicate_adapter_name_is_an_error(self):
        layer = DoTALinear(linear(), rank=4, shape=SHAPE)
        with pytest.raises(mpo.MPOError, match="already has an adapter named 'default'"):
            layer.update_layer("default", rank=2)

    def test_weight_and_bias_are_the_base_layers(self):
        base = linear()
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        assert layer.weight is base.weight
        assert layer.bias is base.bias


class TestStrategyChoice:
    layout = Layout(
        tuple(
            (r0, i, j, r1)
            for r0, i, j, r1 in [
                (1, 4, 4, 16),
                (16, 4, 4, 16),
                (16, 8, 8, 16),
                (16, 8, 8, 16),
                (16, 4, 4, 1),
            ]
        ),
        transposed=False,
    )

    def test_a_single_token_goes_through_the_cores(self):
        assert choose(1, self.layout, training=False, with_init=True) == "factored"

    def test_a_long_training_batch_rebuilds_the_dense_update(self):
        assert choose(4096, self.layout, training=True, with_init=True) == "dense"


@given(shape=factor_shapes(min_cores=2, max_cores=6, max_entries=1024), seed=st.integers(0, 99))
def test_the_halves_and_their_gradients_agree_with_the_matrix_and_autograd(shape, seed):
    # random bond ranks (not only TT-SVD's), so that every split and chain length occurs
    rows, cols = shape
    generator = torch.Generator().manual_seed(seed)
    ranks = [1, *torch.randint(1, 5, (len(rows) - 1,), generator=generator).tolist(), 1]
    cores = [
        torch.randn(ranks[k], i, j, ranks[k + 1], generator=generator, dtype=torch.float64)
        for k, (i, j) in enumerate(zip(rows, cols, strict=True))
    ]
    layout = Layout(tuple(tuple(core.shape) for core in cores), transposed=False)
    leaves = [core.requires_grad_(True) for core in cores]
    left, right = mpo.adapt.delta.halves(leaves, layout)
    i_l, j_l, i_r, j_r = layout.blocks
    matrix = (left @ right).view(i_l, j_l, i_r, j_r).permute(0, 2, 1, 3).reshape(i_l * i_r, -1)
    torch.testing.assert_close(matrix, mpo.MPO(cores).to_dense(), rtol=1e-12, atol=1e-12)
    # the dense strategy's own backward through the chains, against autograd's
    weights = [
        torch.randn(half.shape, generator=generator, dtype=torch.float64) for half in (left, right)
    ]
    expected = torch.autograd.grad((left * weights[0]).sum() + (right * weights[1]).sum(), leaves)
    with torch.no_grad():
        chains, _ = mpo.adapt.delta._halves_of(cores, layout)
        got = mpo.adapt.delta._chain_gradients(chains, *weights)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_float64_cores_get_float64_accurate_gradients_from_the_dense_strategy():
    base = linear().double()
    layer = DoTALinear(base, rank=4, shape=SHAPE, dtype=torch.float64)
    perturb(layer, scale=0.01)
    x = torch.randn(5, 64, dtype=torch.float64)
    _, dense = _step(layer, x, "dense")
    _, factored = _step(layer, x, "factored")  # plain autograd, float64 throughout
    for got, expected in zip(dense, factored, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-13)


def test_delta_weight_and_merge_ignore_autocast():
    layer = DoTALinear(linear(), rank=4, shape=SHAPE)
    perturb(layer)
    expected = layer.get_delta_weight()
    merged = (layer.base_layer.weight + expected).detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer.get_delta_weight(), expected)
        layer.merge()
    assert torch.equal(layer.base_layer.weight, merged)


def _step(layer, x, strategy):
    """Output and gradients (input, then cores) of ``sum(y * w)`` for a fixed ``w``."""
    layer.strategy = strategy
    x = x.clone().requires_grad_(True)
    y = layer(x)
    weights = torch.linspace(-1, 1, y.numel()).view(y.shape).to(y.dtype)
    return y.detach(), torch.autograd.grad((y * weights).sum(), [x, *layer.cores()])


def _conv1d(out_features, in_features, dtype=torch.float32):
    from transformers.pytorch_utils import Conv1D

    base = Conv1D(out_features, in_features).to(dtype)
    with torch.no_grad():
        base.weight.normal_()
        base.bias.normal_()
    return base


class TestBlocks:
    """The dense strategy rebuilds ``W0 + Delta`` in blocks of rows (forward) and of
    columns (backward) when the weight exceeds one block, or (on a CPU, above
    ``_WORKSPACE_MIN_BYTES``) whole into the thread's workspace, then forms ``G`` there:
    each forced here for small layers, with tiny blocks, and checked against the
    factored strategy, which shares none of that code."""

    @pytest.fixture(autouse=True, params=["blocks", "workspace"])
    def tiny_blocks(self, request, monkeypatch):
        monkeypatch.setattr(mpo.adapt.delta, "_CPU_BLOCK_BYTES", 1)
        monkeypatch.setattr(mpo.adapt.delta, "_MIN_LINES", 1)
        if request.param == "workspace":
            monkeypatch.setattr(mpo.adapt.delta, "_WORKSPACE_MIN_BYTES", 0)
            monkeypatch.setattr(mpo.adapt.delta, "_workspace", mpo.adapt.delta._Workspace())

    @pytest.mark.parametrize("kind", ["linear", "no-bias", "conv1d"])
    @pytest.mark.parametrize("init", ["dota", "random"])
    def test_blocked_step_is_exact_at_init_and_matches_the_factored_one(self, kind, init):
        torch.manual_seed(0)
        if kind == "conv1d":
            base = _conv1d(48, 64)
        else:
            base = torch.nn.Linear(64, 48, bias=kind == "linear")
        layer = DoTALinear(base, rank=4, shape=SHAPE, init=init)
        i_l, _, i_r, _ = layer.layout().blocks
        cpu = torch.device("cpu")
        assert len(mpo.adapt.delta._blocks(i_l, 4, cpu, unit_lines=i_r, rows=10)) > 1
        x = torch.randn(2, 5, 64)
        layer.strategy = "dense"
        assert torch.equal(layer(x), base(x))
        perturb(layer)
        y, grads = _step(layer, x, "dense")
        y_ref, grads_ref = _step(layer, x, "factored")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for grad, reference in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5)

    def test_bfloat16_blocks_agree_to_bfloat16_precision(self):
        torch.manual_seed(0)
        base = linear(dtype=torch.bfloat16)
        layer = DoTALinear(base, rank=4, shape=SHAPE)
        x = torch.randn(6, 64, dtype=torch.bfloat16)
        layer.strategy = "dense"
        assert torch.equal(layer(x), base(x))
        perturb(layer)
        (y, grads), (y_ref, grads_ref) = _step(layer, x, "dense"), _step(layer, x, "factored")
        assert y.dtype == y_ref.dtype == torch.bfloat16
        weight = base.weight.double() + layer.get_delta_weight().double()
        exact = x.double() @ weight.T + base.bias.double()
        for output in (y, y_ref):  # both within bfloat16 rounding of the exact output
            assert (output.double() - exact).abs().max() <= 2**-7 * exact.abs().max()
        for grad, reference in zip(grads, grads_ref, strict=True):
            scale = reference.abs().max()
            assert (grad.float() - reference.float()).abs().max() <= 2e-2 * scale

    def test_bfloat16_cores_leave_a_float32_product_in_float32(self):
        # the halves carry the cores' rounding; W0 and the products must not get it too
        torch.manual_seed(0)
        layer = DoTALinear(linear(), rank=4, shape=SHAPE, dtype=torch.bfloat16)
        perturb(layer)
        x = torch.randn(10, 64)
        (y, grads), (y_ref, grads_ref) = _step(layer, x, "dense"), _step(layer, x, "factored")
        assert y.dtype == y_ref.dtype == torch.float32
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grads[0], grads_ref[0], rtol=1e-5, atol=1e-5)

    @pytest.mark.parametrize("transposed", [False, True])
    def test_a_zero_w0_given_as_none_gives_the_update_alone(self, transposed):
        """QDoTA applies its residual apart and passes ``W0 = None``."""
        layer = DoTALinear(linear(), rank=4, shape=SHAPE)
        perturb(layer)
        cores = layer.cores()
        layout = Layout(layer.layout().shapes, transposed)
        x = torch.randn(10, 64, requires_grad=True)
        y = mpo.adapt.delta.dense_forward(x, None, None, cores, None, layout)
        reference = mpo.adapt.delta.factored_delta(
            x, *mpo.adapt.delta.pair(cores, None, layout), layout
        )
        torch.testing.assert_close(y, reference, rtol=1e-5, atol=1e-6)
        grads = torch.autograd.grad(y.square().sum(), [x, *cores])
        expected = torch.autograd.grad(reference.square().sum(), [x, *cores])
        for grad, reference_grad in zip(grads, expected, strict=True):
            torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-5)

    @given(
        shape=factor_shapes(min_cores=2, max_cores=4, max_entries=512),
        rank=st.integers(1, 6),
        block_bytes=st.integers(1, 4096),
        conv1d=st.booleans(),
    )
    def test_any_blocking_gives_the_same_step(self, shape, rank, block_bytes, conv1d):
        rows, cols = shape
        out_features, in_features = math.prod(rows), math.prod(cols)
        torch.manual_seed(0)
        if conv1d:
            base = _conv1d(out_features, in_features)
        else:
            base = torch.nn.Linear(in_features, out_features)
        layer = DoTALinear(base, rank=rank, shape=shape)
        perturb(layer)
        x = torch.randn(3, in_features)
        mpo.adapt.delta._CPU_BLOCK_BYTES = block_bytes
        (y, grads), (y_ref, grads_ref) = _step(layer, x, "dense"), _step(layer, x, "factored")
        torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
        for grad, reference in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-4)


class TestWorkspace:
    """One CPU buffer, lent to one call at a time, grown to the largest layer."""

    @pytest.fixture(autouse=True)
    def workspace(self, monkeypatch):
        monkeypatch.setattr(mpo.adapt.delta, "_WORKSPACE_MIN_BYTES", 0)
        workspace = mpo.adapt.delta._Workspace()
        monkeypatch.setattr(mpo.adapt.delta, "_workspace", workspace)
        return workspace

    def dense_layer(self, out_features=48, dtype=torch.float32):
        rows = (4, 3, 4) if out_features == 48 else (4, 4, 4)
        base = torch.nn.Linear(64, out_features).to(dtype)
        layer = DoTALinear(base, rank=4, shape=(rows, (4, 4, 4)))
        layer.strategy = "dense"
        perturb(layer)
        return layer

    def test_one_buffer_for_all_layers_and_dtypes(self, workspace):
        torch.manual_seed(0)
        layers = self.dense_layer(48), self.dense_layer(64), self.dense_layer(48, torch.float64)
        for layer in layers:
            _step(layer, torch.randn(3, 64, dtype=layer.weight.dtype), "dense")
        # the largest: 48 x 64 in float64 (24576 bytes), above 64 x 64 in float32
        assert workspace.buffer.dtype == torch.uint8
        assert workspace.buffer.numel() == 48 * 64 * 8
        assert not workspace.lock.locked()

    def test_none_below_the_threshold_off_the_cpu_or_taken_again(self, workspace, monkeypatch):
        layout = self.dense_layer().layout()
        cpu, meta = torch.device("cpu"), torch.device("meta")
        assert workspace.take(layout, torch.float32, meta) is None
        lent = workspace.take(layout, torch.float32, cpu)
        assert lent.dtype == torch.float32
        assert lent.numel() == 48 * 64
        assert workspace.take(layout, torch.float32, cpu) is None  # the blocks, meanwhile
        workspace.give_back()
        monkeypatch.setattr(mpo.adapt.delta, "_WORKSPACE_MIN_BYTES", 48 * 64 * 4 + 1)
        assert workspace.take(layout, torch.float32, cpu) is None
        assert workspace.take(layout, torch.float64, cpu) is not None
        workspace.give_back()

    def test_another_thread_waits_for_it(self, workspace):
        layout = self.dense_layer().layout()
        cpu = torch.device("cpu")
        assert workspace.take(layout, torch.float32, cpu) is not None
        taken = []
        thread = threading.Thread(
            target=lambda: taken.append(workspace.take(layout, torch.float32, cpu))
        )
        thread.start()
        thread.join(0.2)
        assert thread.is_alive()  # waiting, not falling back to the blocks
        workspace.give_back()
        thread.join(5)
        assert taken[0] is not None
        assert workspace.owner == thread.ident
        workspace.give_back()

    def test_a_failed_allocation_leaves_it_free(self, workspace, monkeypatch):
        layout = self.dense_layer().layout()

        def out_of_memory(*args, **kwargs):
            raise MemoryError

        with monkeypatch.context() as patch:
            patch.setattr(torch, "empty", out_of_memory)
            with pytest.raises(MemoryError):
                workspace.take(layout, torch.float32, torch.device("cpu"))
        assert not workspace.lock.locked()
        assert workspace.owner is None

    def test_a_step_while_lent_takes_the_blocks(self, workspace):
        torch.manual_seed(0)
        layer = self.dense_layer()
        x = torch.randn(3, 64)
        y_ref, grads_ref = _step(layer, x, "factored")
        assert workspace.take(layer.layout(), torch.float32, x.device) is not None
        try:
            y, grads = _step(layer, x, "dense")
        finally:
            workspace.give_back()
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for grad, reference in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5)

    def test_made_under_inference_mode_it_serves_training_after(self, workspace):
        torch.manual_seed(0)
        layer = self.dense_layer()
        x = torch.randn(3, 64)
        with torch.inference_mode():
            layer(x)
        assert not workspace.buffer.is_inference()
        (y, grads), (y_ref, grads_ref) = _step(layer, x, "dense"), _step(layer, x, "factored")
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for grad, reference in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5)

    def test_a_fake_tensor_trace_leaves_nothing_behind(self, workspace):
        from torch._subclasses.fake_tensor import FakeTensorMode

        layer = self.dense_layer()
        x = torch.randn(3, 64)
        with FakeTensorMode(allow_non_fake_inputs=True):
            layer(x)
        assert workspace.buffer is None
        assert type(layer(x)) is torch.Tensor

    def test_on_the_cpu_whatever_the_default_device(self, workspace):
        layer = self.dense_layer()
        x = torch.randn(3, 64)
        expected = layer(x)
        workspace.buffer = None
        with torch.device("meta"):
            y = layer(x)
        assert workspace.buffer.device.type == "cpu"
        assert torch.equal(y, expected)


class TestWrap:
    def model(self):
        torch.manual_seed(0)
        model = torch.nn.Sequential()
        model.add_module("q_proj", torch.nn.Linear(64, 64))
        model.add_module("v_proj", torch.nn.Linear(64, 64))
        model.add_module("lm_head", torch.nn.Linear(64, 10))
        return model

    def test_wrap_replaces_targets_and_freezes_everything_else(self):
        model = mpo.adapt.wrap(self.model(), rank=4, num_cores=3, quiet=True)
        assert isinstance(model.q_proj, DoTALinear)
        assert isinstance(model.lm_head, torch.nn.Linear)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable
        assert all("dota_cores" in name for name in trainable)

    def test_config_object_and_keywords_agree(self):
        a = mpo.adapt.wrap(self.model(), DoTAConfig(rank=4, num_cores=3), quiet=True)
        b = mpo.adapt.wrap(self.model(), rank=4, num_cores=3, quiet=True)
        assert mpo.adapt.trainable_parameters(a) == mpo.adapt.trainable_parameters(b)

    def test_report_is_printed_like_peft(self, capsys):
        mpo.adapt.wrap(self.model(), rank=4, num_cores=3)
        assert capsys.readouterr().out.startswith("trainable params: 768 || all params:")

    def test_shapes_from_the_config_override_factorize(self):
        model = mpo.adapt.wrap(
            self.model(), rank=4, num_cores=3, shapes={64: (2, 8, 4)}, quiet=True
        )
        assert model.q_proj.adapter_settings["default"]["shape"] == [[2, 8, 4], [2, 8, 4]]

    def test_unwrap_restores_the_original_modules(self):
        model = self.model()
        q_proj = model.q_proj
        mpo.adapt.wrap(model, rank=4, num_cores=3, quiet=True)
        mpo.adapt.unwrap(model)
        assert model.q_proj is q_proj
        assert not hasattr(model, "dota_config")

    def test_wrapping_twice_under_one_name_is_an_error(self):
        model = mpo.adapt.wrap(self.model(), rank=4, num_cores=3, quiet=True)
        with pytest.raises(mpo.MPOError, match="already has an adapter named 'default'"):
            mpo.adapt.wrap(model, rank=4, num_cores=3, quiet=True)

    def assert_untouched(self, model, modules, trainable):
        assert not mpo.adapt.dota_layers(model)
        assert not hasattr(model, "dota_config")
        assert not hasattr(model, "_dota_trainable")
        assert dict(model.named_children()) == modules
        assert [n for n, p in model.named_parameters() if p.requires_grad] == trainable

    def test_a_layer_that_fails_to_decompose_leaves_the_model_as_it_was(self):
        model = self.model()
        model.q_proj.weight.requires_grad_(False)  # a flag wrap must give back as it was
        with torch.no_grad():
            model.v_proj.weight[3, 5] = float("nan")  # q_proj is replaced before v_proj fails
        modules = dict(model.named_children())
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        with pytest.raises(mpo.MPOError, match=r"^v_proj: the matrix contains NaN.*left as it"):
            mpo.adapt.wrap(model, rank=4, num_cores=3, quiet=True)
        self.assert_untouched(model, modules, trainable)

    def test_an_interrupt_halfway_leaves_the_model_as_it_was(self, monkeypatch):
        model = self.model()
        modules = dict(model.named_children())
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        built = []
        real_init = DoTALinear.__init__

        def interrupted(layer, *args, **kwargs):
            if built:
                raise KeyboardInterrupt
            real_init(layer, *args, **kwargs)
            built.append(layer)

        monkeypatch.setattr(DoTALinear, "__init__", interrupted)
        with pytest.raises(KeyboardInterrupt):
            mpo.adapt.wrap(model, rank=4, num_cores=3, quiet=True)
        assert len(built) == 1
        self.assert_untouched(model, modules, trainable)

    def test_a_model_without_weights_is_refused_before_anything_changes(self):
        with torch.device("meta"):
            model = self.model()
        with pytest.raises(mpo.MPOError, match=r"q_proj's weight is on the meta device.*plan"):
            mpo.adapt.wrap(model, rank=4, num_cores=3, quiet=True)
        assert all(p.requires_grad for p in model.parameters())

    @pytest.mark.parametrize("name", ["", "a.b", 3])
    def test_an_adapter_name_that_cannot_be_a_key_is_refused(self, name):
        model = self.model()
        with pytest.raises(mpo.MPOError, match=r"must be a non-empty string without '\.'"):
            mpo.adapt.wrap(model, adapter_name=name, rank=4, num_cores=3, quiet=True)
        assert all(p.requires_grad for p in model.parameters())
        with pytest.raises(mpo.MPOError, match=r"must be a non-empty string without '\.'"):
            DoTALinear(model.q_proj, name, rank=4, shape=((4, 4, 4), (4, 4, 4)))

    @pytest.mark.parametrize(
        ("quiet", "progress", "shown"),
        [(False, None, True), (True, None, False), (True, True, True), (False, False, False)],
    )
    def test_quiet_hides_the_progress_bar_unless_asked_for(
        self, capsys, monkeypatch, quiet, progress, shown
    ):
        monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # as on a terminal
        mpo.adapt.wrap(self.model(), rank=4, num_cores=3, quiet=quiet, progress=progress)
        assert ("DoTA: decomposing" in capsys.readouterr().err) is shown

    @pytest.mark.parametrize("action", ["unwrap", "merge_and_unload"])
    def test_undoing_a_model_without_adapters_is_an_error_that_changes_nothing(self, action):
        model = self.model()
        model.lm_head.weight.requires_grad_(False)
        flags = [p.requires_grad for p in model.parameters()]
        with pytest.raises(mpo.MPOError, match="has no DoTA layers, so there is nothing"):
            getattr(mpo.adapt, action)(model)
        assert [p.requires_grad for p in model.parameters()] == flags

    def test_a_model_wrapped_under_inference_mode_runs_and_trains(self):
        model = self.model()
        x = torch.randn(3, 64)
        with torch.inference_mode():
            mpo.adapt.wrap(model, rank=4, num_cores=3, quiet=True)
            inside = model(x)
        assert not any(p.is_inference() for p in model.parameters())
        torch.testing.assert_close(model(x), inside)
        model(x).square().sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)

    def test_a_weight_tied_to_another_module_is_refused(self):
        model = self.model()
        model.add_module("embed", torch.nn.Embedding(10, 64))
        model.embed.weight = model.lm_head.weight  # tied, as tie_word_embeddings does
        with pytest.raises(mpo.MPOError, match=r"lm_head.weight is also embed.weight"):
            mpo.adapt.wrap(model, target_modules=["q_proj", "lm_head"], rank=4, quiet=True)
        assert not mpo.adapt.dota_layers(model)
        assert all(p.requires_grad for p in model.parameters())

    def test_no_matching_target_lists_the_linear_names(self):
        with pytest.raises(mpo.MPOError, match=r"lm_head.*q_proj.*v_proj"):
            mpo.adapt.wrap(self.model(), target_modules=["c_attn"], quiet=True)

    def test_unknown_keyword_names_the_fields(self):
        with pytest.raises(mpo.MPOError, match="DoTAConfig fields are"):
            mpo.adapt.wrap(self.model(), lora_alpha=16, quiet=True)


def test_numpy_integers_are_accepted_as_sizes():
    np = pytest.importorskip("numpy")
    config = DoTAConfig(rank=np.int64(8), num_cores=np.int32(3))
    assert (config.rank, config.num_cores) == (8, 3)
    assert type(config.rank) is int


@pytest.mark.parametrize("dtype", ["fp16", "int8", torch.int8, torch.float8_e4m3fn, None])
def test_a_layer_refuses_a_cores_dtype_it_does_not_support(dtype):
    with pytest.raises(mpo.MPOError, match="dtype must be one of float32, bfloat16, float16"):
        DoTALinear(linear(), rank=4, shape=SHAPE, dtype=dtype)


def test_a_layer_takes_the_cores_dtype_as_torch_prints_it():
    layer = DoTALinear(linear(), rank=4, shape=SHAPE, dtype=str(torch.bfloat16))
    assert {core.dtype for core in layer.cores()} == {torch.bfloat16}


class TestConfigErrors:
    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"rank": 0}, "rank must be a positive integer"),
            ({"num_cores": 0}, "num_cores must be a positive integer"),
            ({"num_cores": True}, "num_cores must be a positive integer"),
            ({"init": "gaussian"}, "init must be one of"),
            ({"dtype": "int8"}, "dtype must be one of"),
            ({"quantize": "int4"}, "quantize must be None or 'nf4'"),
            ({"double_quant": True}, "double_quant applies to a quantized residual"),
            ({"shapes": {64: (4, 4, 2)}}, r"shapes\[64\] = \(4, 4, 2\) must be 5 factors"),
            ({"target_modules": ""}, "target_modules is empty"),
        ],
    )
    def test_bad_fields(self, kwargs, message):
        with pytest.raises(mpo.MPOError, match=message):
            DoTAConfig(**kwargs)

    def test_round_trip_through_a_dict(self):
        config = DoTAConfig(rank=8, shapes={4096: (4, 4, 8, 8, 4)}, target_modules="all-linear")
        assert DoTAConfig.from_dict(config.to_dict()) == config


def test_unwrap_restores_which_parameters_were_trainable():
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(16, 16))
    model.add_module("head", torch.nn.Linear(16, 4))
    model.head.bias.requires_grad_(False)
    mpo.adapt.wrap(model, rank=2, num_cores=2, quiet=True)
    mpo.adapt.unwrap(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    assert flags == {
        "q_proj.weight": True,
        "q_proj.bias": True,
        "head.weight": True,
        "head.bias": False,
    }


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    # a fused step bumps no version counter
    "adamw-fused": lambda params: torch.optim.AdamW(params, lr=0.1, fused=True),
    "adamw-foreach": lambda params: torch.optim.AdamW(params, lr=0.1, foreach=True),
}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("training", ["dense", "factored"])
@pytest.mark.parametrize("evaluate", [None, "before backward", "before step"])
def test_generation_after_an_optimizer_step_uses_the_new_cores(optimizer, training, evaluate):
    base = linear()
    layer = DoTALinear(base, rank=4, shape=SHAPE)
    x = torch.randn(1, 64)
    step = OPTIMIZERS[optimizer]([p for p in layer.parameters() if p.requires_grad])

    def generate():
        layer.strategy = "factored"  # the path that caches the halves between calls
        with torch.no_grad():
            return layer(x)

    before = generate()
    layer.strategy = training
    loss = layer(torch.randn(4, 64)).square().sum()
    if evaluate == "before backward":  # e.g. a metric computed without autograd
        generate()
    loss.backward()
    if evaluate == "before step":  # e.g. a sample generated between backward and step
        generate()
    step.step()
    step.zero_grad()
    after = generate()
    with torch.no_grad():
        expected = x @ (base.weight + layer.get_delta_weight()).T + base.bias
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_generation_reuses_the_halves_while_the_cores_stay_put(monkeypatch):
    layer = DoTALinear(linear(), rank=4, shape=SHAPE)
    layer.strategy = "factored"
    computed = []
    real_pair = mpo.adapt.layer.pair

    def counted(*args):
        computed.append(1)
        return real_pair(*args)

    monkeypatch.setattr(mpo.adapt.layer, "pair", counted)
    x = torch.randn(1, 64)
    layer(x).sum().item()  # a forward with autograd on and no backward (a logged loss)
    with torch.no_grad():
        for _ in range(5):  # five generated tokens
            layer(x)
    assert len(computed) == 2  # the logged forward, then once for the five
    torch.optim.SGD([p for p in layer.parameters() if p.requires_grad], lr=0.1).step()
    with torch.no_grad():
        layer(x)
    assert len(computed) == 3  # a step, even without gradients, recomputes


def test_bfloat16_generation_prepares_the_factors_once(monkeypatch):
    # float32 cores under a bfloat16 layer: A and B converted (and A transposed) once,
    # not once a token
    torch.manual_seed(0)
    layer = DoTALinear(linear(dtype=torch.bfloat16), rank=4, shape=SHAPE, dtype=torch.float32)
    perturb(layer)
    layer.strategy = "factored"
    prepared = []
    real_operands = mpo.adapt.layer.factored_operands

    def counted(*args):
        prepared.append(args[2])
        return real_operands(*args)

    monkeypatch.setattr(mpo.adapt.layer, "factored_operands", counted)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        outputs = [layer(x) for _ in range(3)]
        pair = mpo.adapt.delta.pair(layer.cores(), layer.initial_cores(), layer.layout())
        expected = layer.base_layer(x) + mpo.adapt.delta.factored_delta(x, *pair, layer.layout())
    assert prepared == [torch.bfloat16]
    for y in outputs:
        assert torch.equal(y, expected)


def generating_layer():
    """A trained-looking layer on the factored path, which caches its halves without
    autograd, and one token."""
    layer = DoTALinear(linear(), rank=4, shape=SHAPE)
    perturb(layer)
    layer.strategy = "factored"
    return layer, torch.randn(1, 64)


@pytest.mark.parametrize(
    "write",
    [
        lambda core: setattr(core, "data", core.data * 1.5),  # new storage
        lambda core: torch.nn.utils.vector_to_parameters(
            torch.nn.utils.parameters_to_vector([core]) * 1.5, [core]
        ),
    ],
    ids=["data-assignment", "vector_to_parameters"],
)
def test_generation_sees_cores_given_new_data(write):
    layer, x = generating_layer()
    with torch.no_grad():
        before = layer(x)
        write(layer.cores()[-1])
        after = layer(x)
        expected = layer.base_layer(x) + x @ layer.get_delta_weight().T
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-5)


def test_generation_sees_cores_given_new_data_twice():
    # the second new storage could take the address of the first core's, freed
    layer, x = generating_layer()
    for trial in range(20):
        core = layer.cores()[trial % 3]
        with torch.no_grad():
            layer(x)
        core.data = core.data + 0.01
        core.data = core.data * 1.0
        with torch.no_grad():
            expected = layer.base_layer(x) + x @ layer.get_delta_weight().T
            torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_a_fake_tensor_trace_leaves_nothing_for_generation():
    from torch._subclasses.fake_tensor import FakeTensorMode

    layer, x = generating_layer()
    with torch.no_grad():
        expected = layer(x)
    layer.clear_cache()
    with FakeTensorMode(allow_non_fake_inputs=True) as mode, torch.no_grad():
        layer(mode.from_tensor(x))
    with torch.no_grad():
        y = layer(x)
    assert type(y) is torch.Tensor
    assert torch.equal(y, expected)


def test_generation_under_vmap_over_parameters():
    layer, x = generating_layer()
    params = {name: p.detach() for name, p in layer.named_parameters()}
    stacked = {name: torch.stack([p, 1.01 * p]) for name, p in params.items()}
    with torch.no_grad():
        ys = torch.func.vmap(lambda p: torch.func.functional_call(layer, p, (x,)))(stacked)
        expected = torch.func.functional_call(layer, params, (x,))
    torch.testing.assert_close(ys[0], expected)
    assert not torch.allclose(ys[1], expected)


def test_clear_cache_after_a_write_autograd_does_not_see():
    layer, x = generating_layer()
    with torch.no_grad():
        before = layer(x)
        layer.cores()[-1].data.mul_(1.5)  # in place, behind the version counter
        assert torch.equal(layer(x), before)  # the documented blind spot
        layer.clear_cache()
        expected = layer.base_layer(x) + x @ layer.get_delta_weight().T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strategy", ["dense", "factored"])
def test_conv1d_layer_matches_its_updated_weight(strategy):
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    base = Conv1D(48, 64)  # weight (in=64, out=48)
    torch.nn.init.normal_(base.bias)
    layer = DoTALinear(base, rank=4, shape=SHAPE)
    perturb(layer)
    layer.strategy = strategy
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = x @ (base.weight + layer.get_delta_weight()) + base.bias
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("init", ["dota", "random"])
def test_generation_without_autograd_is_exact_at_init_and_agrees_after_training(init):
    base = linear()
    layer = DoTALinear(base, rank=4, shape=SHAPE, init=init)
    layer.strategy = "factored"
    x = torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))
    perturb(layer)
    with_autograd = layer(x).detach()
    with torch.no_grad():
        torch.testing.assert_close(layer(x), with_autograd, rtol=1e-5, atol=1e-6)
