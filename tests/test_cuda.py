"""The adapters on a CUDA device: what the cpu tests check, where device bugs would show.

Every tensor here lives on ``DEVICE``: layers and models are built, decomposed,
trained, saved, loaded and merged there, so a tensor left on the cpu, a dtype or
device mismatch in bitsandbytes' kernels, or a fault in the blocked dense path
under the GPU's block budget fails a test. Without CUDA the module is skipped;
``MPO_TEST_DEVICE=cpu`` runs the same checks on the cpu, which is how they were
checked where no GPU was. The QDoTA tests also need bitsandbytes and are skipped
without it.

    PYTHONPATH=. python -m pytest -q tests/test_cuda.py
    MPO_TEST_DEVICE=cpu PYTHONPATH=. python -m pytest -q tests/test_cuda.py
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
import conftest  # noqa: E402
from conftest import TINY_LLAMA, adamw_losses  # noqa: E402
from torch import nn  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

import mpo  # noqa: E402
import mpo.adapt  # noqa: E402
import mpo.adapt.delta  # noqa: E402
from mpo.adapt import DoTALinear, QDoTALinear  # noqa: E402
from mpo.adapt.delta import Layout, delta_weight  # noqa: E402

DEVICE = torch.device(os.environ.get("MPO_TEST_DEVICE", "cuda"))

pytestmark = pytest.mark.skipif(
    DEVICE.type == "cuda" and not torch.cuda.is_available(),
    reason="CUDA is not available (MPO_TEST_DEVICE=cpu runs these checks on the cpu)",
)

SHAPE = ((4, 3, 4), (4, 4, 4))  # a 48 x 64 weight
INITS = ["dota", "random"]
# (base weight, cores): float32 throughout; a bfloat16 layer with the default float32
# cores (what wrap makes of a bfloat16 model); bfloat16 throughout
DTYPES = [
    pytest.param(torch.float32, torch.float32, id="float32"),
    pytest.param(torch.bfloat16, torch.float32, id="bfloat16-float32-cores"),
    pytest.param(torch.bfloat16, torch.bfloat16, id="bfloat16"),
]
# bitsandbytes' cpu inference kernel needs in_features >= 64 and its one-row cuda
# kernel a multiple of 64, the NF4 block size: a LLaMA of those widths for QDoTA
QUANT_LLAMA = {"hidden_size": 64, "intermediate_size": 128}


# -- helpers -------------------------------------------------------------------------


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    """Seeded Gaussian values on ``DEVICE``, the same on every device."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(DEVICE, dtype)


def off_device(module: nn.Module) -> list[str]:
    """The names of the module's parameters and buffers that are not on ``DEVICE``."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    return [name for name, tensor in tensors if tensor.device.type != DEVICE.type]


def dota_layer(
    kind: str = "linear",
    dtype: torch.dtype = torch.float32,
    cores: torch.dtype = torch.float32,
    init: str = "dota",
) -> tuple[nn.Module, DoTALinear]:
    """A seeded ``nn.Linear(64, 48)`` (``"no-bias"``: without bias) or ``Conv1D`` on
    ``DEVICE`` and the DoTA layer adapting it, decomposed there."""
    torch.manual_seed(0)
    if kind == "conv1d":
        base = Conv1D(48, 64)
        with torch.no_grad():  # Conv1D starts with a zero bias, which would hide its handling
            base.weight.normal_()
            base.bias.normal_()
    else:
        base = nn.Linear(64, 48, bias=kind == "linear")
    base = base.to(DEVICE, dtype)
    return base, DoTALinear(base, rank=4, shape=SHAPE, init=init, dtype=cores)


def perturb(cores, scale: float = 0.05, seed: int = 1) -> None:
    """Move the cores off their initial values, so that the update is not zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for core in cores:
            core.add_(scale * torch.randn(core.shape, generator=generator).to(core))


def exact_output(base: nn.Module, layer: DoTALinear, x: torch.Tensor) -> torch.Tensor:
    """``x (W0 + MPO(T) - MPO(T0))^T + b`` in float64, the MPOs contracted by
    :class:`mpo.MPO`, independently of :mod:`mpo.adapt.delta`."""
    delta = mpo.MPO([c.detach().double() for c in layer.cores()]).to_dense()
    if layer.initial_cores() is not None:
        delta = delta - mpo.MPO([c.double() for c in layer.initial_cores()]).to_dense()
    weight = base.weight.double()
    weight = weight + (delta.T if isinstance(base, Conv1D) else delta)
    y = x.double() @ (weight if isinstance(base, Conv1D) else weight.T)
    return y if base.bias is None else y + base.bias.double()


def step(layer: DoTALinear, x: torch.Tensor, strategy: str) -> tuple:
    """Output and gradients (input, then cores) of ``sum(y * w)`` for a fixed ``w``."""
    layer.strategy = strategy
    x = x.clone().requires_grad_(True)
    y = layer(x)
    weights = torch.linspace(-1, 1, y.numel(), device=y.device).view(y.shape).to(y.dtype)
    return y.detach(), torch.autograd.grad((y * weights).sum(), [x, *layer.cores()])


def tiny_blocks(monkeypatch) -> None:
    """Blocks of one line whatever the device, so that the dense path rebuilds
    ``W0 + Delta`` in several blocks even for a small layer."""
    monkeypatch.setattr(mpo.adapt.delta, "_CPU_BLOCK_BYTES", 1)
    monkeypatch.setattr(mpo.adapt.delta, "_GPU_BLOCK_BYTES", 1)
    monkeypatch.setattr(mpo.adapt.delta, "_MIN_LINES", 1)


def tiny_llama(**overrides) -> nn.Module:
    """conftest's tiny LLaMA (seeded, in eval mode) on ``DEVICE``."""
    return conftest.tiny_llama(**overrides).to(DEVICE)


def token_ids(rows: int = 2, length: int = 8, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (rows, length), generator=generator)
    return ids.to(DEVICE)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def core_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters() if ".dota_cores." in name}


def all_cores(model: nn.Module) -> list[torch.Tensor]:
    return [core for _, layer in mpo.adapt.dota_layers(model) for core in layer.cores()]


def losses_on_a_fixed_batch(model: nn.Module, steps: int = 8) -> list[float]:
    """:func:`conftest.adamw_losses` (without weight decay) on one fixed batch."""
    return adamw_losses(model, token_ids(4, 12, seed=0), steps, weight_decay=0.0)


def mpo_dense(cores) -> torch.Tensor:
    """``MPO(cores)`` in float32, computed as QDoTA computes the matrix it subtracts."""
    layout = Layout(tuple(tuple(c.shape) for c in cores), False)
    return delta_weight([c.detach().float() for c in cores], None, layout)


def nf4(matrix: torch.Tensor, double_quant: bool = False) -> torch.Tensor:
    """``Dequant(Q(matrix))``: NF4, block size 64, by bitsandbytes itself."""
    functional = pytest.importorskip("bitsandbytes.functional")
    packed, state = functional.quantize_4bit(
        matrix, blocksize=64, compress_statistics=double_quant, quant_type="nf4"
    )
    return functional.dequantize_4bit(packed, state)


# -- the DoTA layer ---------------------------------------------------------------------


class TestLayer:
    def test_cores_are_on_the_device_and_agree_with_a_cpu_decomposition(self):
        base, layer = dota_layer()
        assert not off_device(layer)
        assert {c.dtype for c in [*layer.cores(), *layer.initial_cores()]} == {torch.float32}
        weight = base.weight.detach()
        on_cpu = mpo.decompose(weight.cpu(), SHAPE, 4).to_dense()
        here = mpo.MPO([c.detach() for c in layer.cores()]).to_dense().cpu()
        assert (here - on_cpu).abs().max() <= 1e-4 * on_cpu.abs().max()

    def test_random_cores_are_the_same_on_every_device(self):
        base = nn.Linear(64, 48)
        torch.manual_seed(3)
        on_cpu = DoTALinear(base, rank=4, shape=SHAPE, init="random").cores()
        torch.manual_seed(3)
        here = DoTALinear(base.to(DEVICE), rank=4, shape=SHAPE, init="random").cores()
        assert here[0].device.type == DEVICE.type
        for core, reference in zip(here, on_cpu, strict=True):
            assert torch.equal(core.detach().cpu(), reference.detach())

    @pytest.mark.parametrize("init", INITS)
    @pytest.mark.parametrize("strategy", ["dense", "factored"])
    @pytest.mark.parametrize(("dtype", "cores"), DTYPES)
    def test_output_equals_the_base_layers_bit_for_bit_at_init(self, dtype, cores, strategy, init):
        base, layer = dota_layer(dtype=dtype, cores=cores, init=init)
        layer.strategy = strategy
        assert layer.cores()[0].dtype == cores
        x = randn(2, 5, 64, dtype=dtype)
        expected = base(x)
        assert torch.equal(layer(x), expected)
        with torch.no_grad():  # as in generation (the factored path caches its halves)
            assert torch.equal(layer(x), expected)

    @pytest.mark.parametrize("init", INITS)
    def test_dense_and_factored_agree_in_float32(self, init):
        base, layer = dota_layer(init=init)
        perturb(layer.cores())
        x = randn(2, 5, 64)
        (y, grads), (y_ref, grads_ref) = step(layer, x, "dense"), step(layer, x, "factored")
        torch.testing.assert_close(y.double(), exact_output(base, layer, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for grad, reference in zip(grads, grads_ref, strict=True):
            assert grad.device.type == DEVICE.type
            assert reference.abs().max() > 0
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize("cores", [torch.float32, torch.bfloat16])
    def test_dense_and_factored_agree_in_bfloat16(self, cores):
        base, layer = dota_layer(dtype=torch.bfloat16, cores=cores)
        perturb(layer.cores())
        x = randn(6, 64, dtype=torch.bfloat16)
        (y, grads), (y_ref, grads_ref) = step(layer, x, "dense"), step(layer, x, "factored")
        assert y.dtype == y_ref.dtype == torch.bfloat16
        exact = exact_output(base, layer, x)
        for output in (y, y_ref):  # both within bfloat16 rounding of the exact output
            assert (output.double() - exact).abs().max() <= 2**-6 * exact.abs().max()
        assert [g.dtype for g in grads] == [torch.bfloat16] + [cores] * len(layer.cores())
        for grad, reference in zip(grads, grads_ref, strict=True):
            scale = reference.abs().max()
            assert scale > 0
            assert (grad.float() - reference.float()).abs().max() <= 2e-2 * scale

    # the backward outside the autocast region, as torch advises, or inside it, where
    # the dense path's own backward would run under autocast too
    @pytest.mark.parametrize("backward", ["after", "inside"])
    @pytest.mark.parametrize("strategy", ["dense", "factored", "blocked"])
    def test_float32_layer_under_bfloat16_autocast(self, strategy, backward, monkeypatch):
        base, layer = dota_layer()
        perturb(layer.cores())
        if strategy == "blocked":
            tiny_blocks(monkeypatch)
            strategy = "dense"
        layer.strategy = strategy
        x = randn(2, 5, 64).requires_grad_(True)
        exact = exact_output(base, layer, x.detach())
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            y = layer(x)
            if backward == "inside":
                y.float().square().mean().backward()
        if backward == "after":
            y.float().square().mean().backward()
        assert y.dtype == torch.bfloat16
        assert x.grad.dtype == torch.float32
        assert torch.isfinite(x.grad).all()
        assert (y.double() - exact).abs().max() <= 2**-5 * exact.abs().max()
        for core in layer.cores():
            assert core.grad.dtype == torch.float32
            assert core.grad.device.type == DEVICE.type
            assert torch.isfinite(core.grad).all()
            assert core.grad.abs().max() > 0


class TestBlocks:
    """The dense path rebuilding ``W0 + Delta`` in several blocks under the device's own
    budget (forced here with one-line blocks), against the factored path, which shares
    none of that code."""

    @pytest.fixture(autouse=True)
    def one_line_blocks(self, monkeypatch):
        tiny_blocks(monkeypatch)

    @staticmethod
    def assert_blocked(layer: DoTALinear, rows: int) -> None:
        i_l, j_l, i_r, j_r = layer.layout().blocks
        blocks = mpo.adapt.delta._blocks
        assert len(blocks(i_l, 4, DEVICE, unit_lines=i_r, rows=rows)) > 1  # forward
        assert len(blocks(j_l, 4, DEVICE, unit_lines=j_r, rows=rows)) > 1  # backward

    @pytest.mark.parametrize("kind", ["linear", "no-bias", "conv1d"])
    @pytest.mark.parametrize("init", INITS)
    def test_blocked_step_is_exact_at_init_and_matches_the_factored_one(self, kind, init):
        base, layer = dota_layer(kind, init=init)
        self.assert_blocked(layer, rows=10)
        x = randn(2, 5, 64)
        layer.strategy = "dense"
        assert torch.equal(layer(x), base(x))
        perturb(layer.cores())
        (y, grads), (y_ref, grads_ref) = step(layer, x, "dense"), step(layer, x, "factored")
        torch.testing.assert_close(y.double(), exact_output(base, layer, x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        for grad, reference in zip(grads, grads_ref, strict=True):
            torch.testing.assert_close(grad, reference, rtol=1e-4, atol=1e-5)

    def test_bfloat16_blocks_agree_to_bfloat16_precision(self):
        base, layer = dota_layer(dtype=torch.bfloat16)
        self.assert_blocked(layer, rows=6)
        x = randn(6, 64, dtype=torch.bfloat16)
        layer.strategy = "dense"
        assert torch.equal(layer(x), base(x))
        perturb(layer.cores())
        (y, grads), (y_ref, grads_ref) = step(layer, x, "dense"), step(layer, x, "factored")
        exact = exact_output(base, layer, x)
        for output in (y, y_ref):
            assert output.dtype == torch.bfloat16
            assert (output.double() - exact).abs().max() <= 2**-6 * exact.abs().max()
        for grad, reference in zip(grads, grads_ref, strict=True):
            scale = reference.abs().max()
            assert (grad.float() - reference.float()).abs().max() <= 2e-2 * scale


# -- a tiny LLaMA with DoTA adapters -----------------------------------------------------


class TestLlama:
    @pytest.mark.parametrize("init", INITS)
    @pytest.mark.parametrize("strategy", ["auto", "dense", "factored"])
    def test_logits_equal_the_base_models_at_init(self, strategy, init):
        ids = token_ids()
        expected = logits(tiny_llama(), ids)
        model = mpo.adapt.wrap(tiny_llama(), rank=4, num_cores=3, init=init, quiet=True)
        layers = mpo.adapt.dota_layers(model)
        assert len(layers) == 10  # q, k, v, up, down in 2 layers
        for _, layer in layers:
            layer.strategy = strategy
        assert not off_device(model)
        assert torch.equal(logits(model, ids), expected)

    @pytest.mark.parametrize("init", INITS)
    def test_a_few_adamw_steps_lower_the_loss_and_change_only_the_cores(self, init):
        model = mpo.adapt.wrap(tiny_llama(), rank=4, num_cores=3, init=init, quiet=True)
        before = {name: t.clone() for name, t in model.state_dict().items()}
        losses = losses_on_a_fixed_batch(model, steps=5)
        assert losses[-1] < losses[0] - 0.02, losses
        after = model.state_dict()
        changed = {name for name in before if not torch.equal(after[name], before[name])}
        assert changed == core_names(model)
        assert all(torch.isfinite(core).all() for core in all_cores(model))

    def test_bfloat16_model_with_float32_cores_trains_under_autocast(self):
        model = mpo.adapt.wrap(tiny_llama().to(torch.bfloat16), rank=4, num_cores=3, quiet=True)
        ids = token_ids()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss)
        for core in all_cores(model):
            assert core.dtype == core.grad.dtype == torch.float32
            assert torch.isfinite(core.grad).all()
            assert core.grad.abs().max() > 0

    def test_adapter_saved_and_loaded_onto_a_fresh_base_gives_identical_logits(self, tmp_path):
        model = mpo.adapt.wrap(tiny_llama(), rank=4, num_cores=3, quiet=True)
        losses_on_a_fixed_batch(model, steps=2)
        ids = token_ids()
        expected = logits(model, ids)
        assert not torch.equal(expected, logits(tiny_llama(), ids))  # the update is not zero
        mpo.adapt.save_adapter(model, tmp_path / "adapter")
        restored = mpo.adapt.load_adapter(tiny_llama(), tmp_path / "adapter")
        assert not off_device(restored)
        assert torch.equal(logits(restored, ids), expected)

    def test_merge_and_unload_gives_the_adapted_logits(self):
        model = mpo.adapt.wrap(tiny_llama(), rank=4, num_cores=3, quiet=True)
        perturb(all_cores(model), scale=0.1)
        ids = token_ids()
        adapted = logits(model, ids)
        base = logits(tiny_llama(), ids)
        assert (adapted - base).abs().max() > 1e-3  # the update is not zero
        merged = mpo.adapt.merge_and_unload(model)
        assert not mpo.adapt.dota_layers(merged)
        assert type(merged.model.layers[0].self_attn.q_proj) is nn.Linear
        torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-4, atol=1e-5)

    def test_a_trained_head_to_save_round_trips_and_merges_on_the_device(self, tmp_path):
        # modules_to_save: the head's copy is made, trained, saved and loaded on the device
        model = mpo.adapt.wrap(
            tiny_llama(), rank=4, num_cores=3, modules_to_save=["lm_head"], quiet=True
        )
        losses_on_a_fixed_batch(model, steps=2)
        ids = token_ids()
        expected = logits(model, ids)
        mpo.adapt.save_adapter(model, tmp_path / "adapter")
        restored = mpo.adapt.load_adapter(tiny_llama(), tmp_path / "adapter")
        assert not off_device(restored)
        assert torch.equal(logits(restored, ids), expected)
        with mpo.adapt.disable_adapter(restored):
            assert torch.equal(logits(restored, ids), logits(tiny_llama(), ids))
        mpo.adapt.merge_adapter(restored)
        torch.testing.assert_close(logits(restored, ids), expected, rtol=1e-4, atol=1e-5)


# -- QDoTA: the NF4 residual on the device ------------------------------------------------


class TestQDoTA:
    @pytest.fixture(autouse=True)
    def bitsandbytes(self):
        return pytest.importorskip("bitsandbytes")

    @staticmethod
    def wrapped(**overrides) -> nn.Module:
        return mpo.adapt.wrap(
            tiny_llama(**QUANT_LLAMA), quantize="nf4", rank=4, num_cores=2, quiet=True, **overrides
        )

    @pytest.mark.parametrize(
        ("cores", "double_quant"),
        [("float32", False), ("bfloat16", False), ("bfloat16", True)],
    )
    def test_output_at_init_is_x_times_the_quantized_residual_plus_the_initial_mpo(
        self, cores, double_quant
    ):
        base = tiny_llama(**QUANT_LLAMA)
        model = self.wrapped(dtype=cores, double_quant=double_quant)
        layers = mpo.adapt.dota_layers(model)
        assert len(layers) == 10
        assert not off_device(model)
        # bfloat16 cores: the update x MPO(T)^T is computed in bfloat16
        tolerance = 1e-4 if cores == "float32" else 2**-7
        reference = copy.deepcopy(base)
        for name, layer in layers:
            assert isinstance(layer, QDoTALinear)
            w0 = base.get_submodule(name).weight.detach()
            t0 = mpo_dense(layer.initial_cores())
            residual = nf4(w0 - t0, double_quant)
            # W_res = W0 - MPO(T0) quantized on the device, as bitsandbytes does it
            assert torch.equal(layer.residual.dequantize(), residual)
            weight = residual + t0  # x (Dequant(Q(W_res)) + MPO(T0))^T
            assert (weight - w0).norm() < 0.2 * w0.norm()  # only the residual is rounded
            for rows in [(1,), (3, 5)]:  # one row: bitsandbytes' fused inference kernel
                x = randn(*rows, layer.in_features, seed=len(rows))
                with torch.no_grad():
                    y = layer(x)
                expected = nn.functional.linear(x, weight)
                error = (y - expected).abs().max()
                assert error <= tolerance * expected.abs().max(), (name, rows)
            with torch.no_grad():
                reference.get_submodule(name).weight.copy_(weight)
        ids = token_ids()
        expected = logits(reference, ids)
        actual = logits(model, ids)
        assert (actual - expected).abs().max() <= tolerance * expected.abs().max()

    def test_bfloat16_input_applies_the_effective_weight(self):
        model = self.wrapped(dtype="bfloat16")
        layer = model.model.layers[0].mlp.down_proj
        x = randn(3, 5, layer.in_features, dtype=torch.bfloat16)
        with torch.no_grad():
            y = layer(x)
        expected = nn.functional.linear(x.float(), layer.effective_weight())
        assert y.dtype == torch.bfloat16
        assert (y.float() - expected).abs().max() <= 2e-2 * expected.abs().max()

    def test_only_the_cores_get_gradients(self):
        model = self.wrapped()
        ids = token_ids()
        model(input_ids=ids, labels=ids).loss.backward()
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert with_grad == trainable == core_names(model)
        assert len(trainable) == 10 * 2
        for core in all_cores(model):
            assert core.grad.device.type == DEVICE.type
            assert torch.isfinite(core.grad).all()
            assert core.grad.abs().max() > 0

    def test_a_few_adamw_steps_reduce_the_loss(self):
        losses = losses_on_a_fixed_batch(self.wrapped())
        assert losses[-1] < losses[0] - 0.05, losses

    @pytest.mark.parametrize("length", [8, 512])  # 16 rows: mostly factored; 1024: dense
    def test_bfloat16_cores_train_under_bfloat16_autocast(self, length):
        model = self.wrapped(dtype="bfloat16")
        ids = token_ids(2, length)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            output = model(input_ids=ids, labels=ids)
        output.loss.backward()
        assert output.logits.dtype == torch.bfloat16
        assert torch.isfinite(output.loss)
        for core in all_cores(model):
            assert core.grad.dtype == torch.bfloat16
            assert torch.isfinite(core.grad).all()
            assert core.grad.abs().max() > 0

    @pytest.mark.parametrize(
        ("rows", "blocked"),
        [
            pytest.param(3, False, id="factored"),
            pytest.param(2048, False, id="dense"),
            pytest.param(2048, True, id="dense-blocked"),
        ],
    )
    def test_core_gradients_match_autograd_through_the_dense_weight(
        self, rows, blocked, monkeypatch
    ):
        if blocked:
            tiny_blocks(monkeypatch)
        torch.manual_seed(0)
        base = nn.Linear(256, 128).to(DEVICE)
        layer = QDoTALinear(base, rank=8, shape=((4, 4, 4, 2), (4, 4, 4, 4)), dtype=torch.float32)
        with torch.no_grad():
            layer.cores()[-1].add_(0.05)
        x = randn(rows, 256)
        layer(x).square().mean().backward()
        leaves = [core.detach().clone().requires_grad_(True) for core in layer.cores()]
        weight = layer.residual.dequantize() + mpo.MPO(leaves).to_dense()
        nn.functional.linear(x, weight, layer.bias).square().mean().backward()
        for core, leaf in zip(layer.cores(), leaves, strict=True):
            assert core.grad.device.type == DEVICE.type
            torch.testing.assert_close(
                core.grad, leaf.grad, rtol=1e-4, atol=1e-6 * float(leaf.grad.abs().max())
            )

    def test_adapter_loads_bit_identically_onto_a_fresh_base(self, tmp_path):
        model = self.wrapped()
        perturb(all_cores(model))
        mpo.adapt.save_adapter(model, tmp_path / "adapter")
        restored = mpo.adapt.load_adapter(tiny_llama(**QUANT_LLAMA), tmp_path / "adapter")
        assert not off_device(restored)
        saved, loaded = model.state_dict(), restored.state_dict()
        assert saved.keys() == loaded.keys()
        assert all(torch.equal(saved[key], loaded[key]) for key in saved)  # the NF4 bytes too
        ids = token_ids()
        assert torch.equal(logits(restored, ids), logits(model, ids))

    def test_merge_and_unload_keeps_the_adapted_logits(self):
        model = self.wrapped()
        perturb(all_cores(model))
        ids = token_ids()
        adapted = logits(model, ids)
        merged = mpo.adapt.merge_and_unload(model)
        q_proj = merged.model.layers[0].self_attn.q_proj
        assert type(q_proj) is nn.Linear
        assert q_proj.weight.device.type == DEVICE.type
        assert q_proj.weight.dtype == torch.float32
        torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-4, atol=1e-5)

    def test_a_model_loaded_in_4_bits_is_wrapped_trains_and_stays_close(self, tmp_path):
        tiny_llama(**QUANT_LLAMA).save_pretrained(tmp_path)
        config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")

        def load() -> nn.Module:
            return transformers.AutoModelForCausalLM.from_pretrained(
                tmp_path, quantization_config=config, device_map=str(DEVICE)
            )

        model = load()
        assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            mpo.adapt.wrap(model, quantize="nf4", rank=4, num_cores=2, quiet=True)
        ours = [w for w in caught if "already carries quantization error" in str(w.message)]
        assert len(ours) == 1
        assert ours[0].category is UserWarning
        layers = mpo.adapt.dota_layers(model)
        assert len(layers) == 10
        assert all(isinstance(layer, QDoTALinear) for _, layer in layers)
        assert not off_device(model)
        # Gradients before any forward without them: on a cpu with AVX512-BF16, such a
        # forward in eval mode repacks the other Linear4bit layers (o_proj, gate_proj) for
        # bitsandbytes' cpu kernel, which has no backward, so q, k and v got no gradient.
        ids = token_ids()
        model(input_ids=ids, labels=ids).loss.backward()
        for core in all_cores(model):
            assert core.grad is not None
            assert core.grad.abs().max() > 0
        before, after = logits(load(), ids), logits(model, ids)
        assert after.shape == before.shape
        assert torch.isfinite(after).all()
        assert (after - before).abs().max() <= 0.1 * before.abs().max()
