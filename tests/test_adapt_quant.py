"""QDoTA: a 4-bit NF4 residual ``W0 - MPO(T0)`` plus trainable cores."""

import builtins
import json
import math
import warnings

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from conftest import TINY_LLAMA, adamw_losses  # noqa: E402

import mpo  # noqa: E402
import mpo.adapt  # noqa: E402
from mpo.adapt import QDoTALinear  # noqa: E402
from mpo.adapt.delta import Layout, choose, delta_weight  # noqa: E402
from mpo.adapt.quant import float_weight, is_4bit  # noqa: E402

SHAPE = ((4, 4, 4, 4), (4, 4, 4, 4))
WIDE_SHAPE = ((4, 4, 4, 2), (4, 4, 4, 4))  # a 128 x 256 (out x in) weight
GPT2 = dict(n_embd=32, n_layer=1, n_head=2, vocab_size=64)
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


def trained_like(n=256, m=256, seed=0):
    """A power-law spectrum, a low-rank spike and noise: what pretrained weights look like."""
    g = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(n, n, generator=g))[0]
    v = torch.linalg.qr(torch.randn(m, m, generator=g))[0]
    k = min(n, m)
    s = 2.0 * torch.arange(1, k + 1, dtype=torch.float32) ** -0.8
    spike = 3.0 * torch.randn(n, 4, generator=g) @ torch.randn(4, m, generator=g) / m**0.5
    return (u[:, :k] * s) @ v[:, :k].T + spike + 0.02 * torch.randn(n, m, generator=g)


def linear(weight, bias=True):
    layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight)
    return layer


def conv1d(weight):
    """transformers' ``Conv1D`` computing ``x weight^T + b`` (it stores ``weight^T``: in x out)."""
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    layer = pytorch_utils.Conv1D(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        layer.weight.copy_(weight.T)
        layer.bias.copy_(torch.linspace(-1, 1, weight.shape[0]))
    return layer


def mpo_dense(cores):
    layout = Layout(tuple(tuple(c.shape) for c in cores), False)
    return delta_weight([c.detach().float() for c in cores], None, layout)


def nf4(matrix):
    packed, state = bnb_functional.quantize_4bit(matrix, blocksize=64, quant_type="nf4")
    return bnb_functional.dequantize_4bit(packed, state)


def tiny_llama(**overrides):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2():
    """A tiny GPT-2 (its linear layers are ``Conv1D``), same weights every call, no dropout."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()


def wrap_gpt2(model):
    return mpo.adapt.wrap(
        model, target_modules=GPT2_TARGETS, quantize="nf4", rank=4, num_cores=2, quiet=True
    )


def all_cores(model):
    return [c for _, layer in mpo.adapt.dota_layers(model) for c in layer.cores()]


def trainer(model, folder, steps=3):
    """transformers' ``Trainer`` for ``steps`` steps of 2 rows on the cpu, saving nothing."""
    transformers = pytest.importorskip("transformers")
    ids = torch.randint(0, 64, (8, 12), generator=torch.Generator().manual_seed(0))
    args = transformers.TrainingArguments(
        output_dir=folder,
        max_steps=steps,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
    )
    data = [{"input_ids": row, "labels": row} for row in ids]
    return transformers.Trainer(model=model, args=args, train_dataset=data)


def losses_over_adamw_steps(model, steps=8):
    """:func:`conftest.adamw_losses` on one fixed batch of the tiny LLaMA's tokens."""
    ids = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    return adamw_losses(model, ids, steps)


def linear_4bit(weight, bias=True, quant_type="nf4", double_quant=True):
    """A bitsandbytes ``Linear4bit`` holding ``weight``, quantized on the move to the cpu.

    By default its block scales are quantized again (``Params4bit``'s default double
    quantization); transformers' ``BitsAndBytesConfig`` does not by default.
    """
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(weight.shape[1], weight.shape[0], bias=bias, quant_type=quant_type)
    layer.weight = bnb.nn.Params4bit(
        weight, requires_grad=False, quant_type=quant_type, compress_statistics=double_quant
    )
    if bias:
        with torch.no_grad():
            layer.bias.copy_(torch.linspace(-1, 1, weight.shape[0]))
    return layer.to("cpu")


# bitsandbytes' cpu inference kernel (eval mode, no grad, AVX512-BF16) needs in_features >= 64
WIDER = {"hidden_size": 64, "intermediate_size": 128}


@pytest.fixture(scope="module")
def tiny_llama_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(**WIDER).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide_llama_folder(tmp_path_factory):
    """Rows of 128 entries: two 64-entry blocks each, whose scales the cpu repacking
    transposes (with one block a row, the transpose changes nothing)."""
    folder = tmp_path_factory.mktemp("wide_llama")
    tiny_llama(hidden_size=128, intermediate_size=256).save_pretrained(folder)
    return folder


def load_in_4bit(folder, skip=None):
    """The tiny LLaMA as ``from_pretrained`` loads it with a 4-bit ``BitsAndBytesConfig``.

    With bitsandbytes >= 0.46 this works on the cpu (``device_map="cpu"``): the
    linear layers become ``Linear4bit`` with NF4 weights, as on a GPU, except
    those named in ``skip`` (``llm_int8_skip_modules``).
    """
    transformers = pytest.importorskip("transformers")
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=skip,
    )
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=config, device_map="cpu"
    )


def wrap_4bit(model):
    """``wrap(model, quantize="nf4")``, returning the model and the warnings it raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mpo.adapt.wrap(model, quantize="nf4", rank=4, num_cores=2, quiet=True)
    return model, caught


def test_residual_is_quantized_after_decomposing():
    weight = trained_like()
    layer = QDoTALinear(linear(weight), rank=16, shape=SHAPE)
    expected = nf4(weight - mpo_dense(layer.initial_cores()))
    assert torch.equal(layer.residual.dequantize(), expected)


def test_initial_weight_is_closer_to_w0_than_qlora():
    weight = trained_like()
    layer = QDoTALinear(linear(weight), rank=16, shape=SHAPE)
    qdota = (weight - layer.effective_weight()).norm() / weight.norm()
    qlora = (weight - nf4(weight)).norm() / weight.norm()
    assert qdota < 0.95 * qlora  # measured: 0.081 against 0.092


def test_effective_weight_ignores_autocast():
    layer = QDoTALinear(linear(trained_like()), rank=16, shape=SHAPE)
    expected = layer.effective_weight()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer.effective_weight(), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [False, True])
def test_forward_applies_the_effective_weight(dtype, double_quant):
    base = linear(trained_like()).to(dtype)
    layer = QDoTALinear(base, rank=8, shape=SHAPE, double_quant=double_quant)
    x = torch.randn(3, 5, 256, dtype=dtype)
    reference = torch.nn.functional.linear(x.float(), layer.effective_weight(), base.bias.float())
    y = layer(x)
    assert y.dtype == dtype
    assert torch.allclose(y.float(), reference, rtol=2e-2, atol=2e-2 * reference.abs().max())


def test_only_the_cores_get_gradients():
    layer = QDoTALinear(linear(trained_like()), rank=8, shape=SHAPE)
    x = torch.randn(4, 256, requires_grad=True)
    layer(x).square().sum().backward()
    trainable = [name for name, p in layer.named_parameters() if p.requires_grad]
    assert trainable == [f"dota_cores.default.{k}" for k in range(4)]
    assert all(core.grad is not None and core.grad.abs().sum() > 0 for core in layer.cores())
    assert x.grad is not None
    assert layer.bias.grad is None


@pytest.mark.parametrize("base", [linear, conv1d], ids=["Linear", "Conv1D"])
@pytest.mark.parametrize("rows", [3, 2048])  # the factored and the dense strategy
def test_gradients_of_the_cores_match_autograd_through_the_dense_weight(base, rows):
    weight = trained_like(128, 256)
    layer = QDoTALinear(base(weight), rank=8, shape=WIDE_SHAPE, dtype=torch.float32)
    with torch.no_grad():
        layer.cores()[-1].add_(0.05)
    expected = "factored" if rows == 3 else "dense"
    assert choose(rows, layer.layout(), training=True, with_init=False) == expected
    x = torch.randn(rows, 256)
    layer(x).square().mean().backward()
    leaves = [core.detach().clone().requires_grad_(True) for core in layer.cores()]
    weight = layer.residual.dequantize() + mpo.MPO(leaves).to_dense()
    torch.nn.functional.linear(x, weight, layer.bias).square().mean().backward()
    for core, leaf in zip(layer.cores(), leaves, strict=True):
        assert torch.allclose(core.grad, leaf.grad, rtol=1e-4, atol=1e-6 * leaf.grad.abs().max())


def test_disabled_adapter_gives_the_layer_at_initialisation():
    layer = QDoTALinear(linear(trained_like()), rank=8, shape=SHAPE, dtype=torch.float32)
    x = torch.randn(2, 256)
    before = layer(x)
    with torch.no_grad():
        layer.cores()[0].add_(0.1)
    layer.enable_adapters(False)
    assert torch.equal(layer(x), before)


def test_state_dict_is_plain_tensors_and_survives_a_dtype_cast(tmp_path):
    safetensors_torch = pytest.importorskip("safetensors.torch")
    layer = QDoTALinear(linear(trained_like()), rank=8, shape=SHAPE, double_quant=True)
    x = torch.randn(2, 256)
    expected = layer(x)
    safetensors_torch.save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    loaded = safetensors_torch.load_file(tmp_path / "layer.safetensors")
    assert {k: v.dtype for k, v in loaded.items() if k.startswith("residual.")} == {
        f"residual.{k}": torch.uint8
        for k in ("weight", "absmax", "quant_map", "nested_absmax", "nested_quant_map", "offset")
    }
    other = QDoTALinear(linear(trained_like(seed=1)), rank=8, shape=SHAPE, double_quant=True)
    other.load_state_dict(loaded)
    assert torch.equal(other(x), expected)
    layer.to(torch.bfloat16)  # the stored residual is bytes: untouched by the cast
    assert torch.equal(layer.residual.dequantize(), other.residual.dequantize())


class TestWrap:
    def test_wrap_builds_qdota_layers_with_bfloat16_cores(self):
        model = mpo.adapt.wrap(
            tiny_llama(), quantize="nf4", rank=4, num_cores=2, dtype="bfloat16", quiet=True
        )
        layers = mpo.adapt.dota_layers(model)
        assert len(layers) == 10
        assert all(isinstance(layer, QDoTALinear) for _, layer in layers)
        assert all(layer.cores()[0].dtype == torch.bfloat16 for _, layer in layers)
        assert not any(name.endswith("q_proj.weight") for name, _ in model.named_parameters())

    def test_trainable_share_counts_the_residual_entries(self):
        model = tiny_llama()
        _, total = mpo.adapt.trainable_parameters(model)
        mpo.adapt.wrap(model, quantize="nf4", rank=4, num_cores=2, quiet=True)
        trainable, quantized_total = mpo.adapt.trainable_parameters(model)
        assert quantized_total == total + trainable

    def test_a_few_adamw_steps_reduce_the_loss(self):
        model = mpo.adapt.wrap(tiny_llama(), quantize="nf4", rank=4, num_cores=2, quiet=True)
        losses = losses_over_adamw_steps(model)
        assert losses[-1] < losses[0] - 0.05

    def test_merge_and_unload_gives_plain_linear_layers_with_the_same_outputs(self):
        model = mpo.adapt.wrap(tiny_llama(), quantize="nf4", rank=4, num_cores=2, quiet=True)
        with torch.no_grad():
            for _, layer in mpo.adapt.dota_layers(model):
                layer.cores()[-1].add_(0.05)
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            adapted = model(input_ids=ids).logits
        merged = mpo.adapt.merge_and_unload(model)
        q_proj = merged.model.layers[0].self_attn.q_proj
        assert type(q_proj) is torch.nn.Linear
        assert q_proj.weight.dtype == torch.float32
        assert not mpo.adapt.dota_layers(merged)
        with torch.no_grad():
            assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-3)

    def test_model_level_merge_takes_a_dtype_for_the_quantized_layers(self):
        model = mpo.adapt.wrap(tiny_llama(), quantize="nf4", rank=4, num_cores=2, quiet=True)
        expected = model.model.layers[0].self_attn.q_proj.effective_weight()
        merged = mpo.adapt.merge_and_unload(model, dtype=torch.bfloat16)
        q_proj = merged.model.layers[0].self_attn.q_proj
        assert q_proj.weight.dtype == torch.bfloat16
        assert torch.equal(q_proj.weight, expected.to(torch.bfloat16))
        # the rest of the float32 model follows, so that it runs (it mixed dtypes)
        assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}
        with torch.no_grad():
            assert torch.isfinite(
                merged(input_ids=torch.zeros(1, 4, dtype=torch.long)).logits
            ).all()

    def test_transformers_trainer_trains_the_cores(self, tmp_path):
        model = mpo.adapt.wrap(tiny_llama(), quantize="nf4", rank=4, num_cores=2, quiet=True)
        before = [c.detach().clone() for c in all_cores(model)]
        trainer(model, tmp_path).train()
        after = all_cores(model)
        assert not any(torch.equal(a, b) for a, b in zip(after, before, strict=True))
        assert all(isinstance(layer, QDoTALinear) for _, layer in mpo.adapt.dota_layers(model))

    def test_merge_and_unload_rounds_the_effective_weight_to_the_chosen_dtype(self):
        layer = QDoTALinear(linear(trained_like()), rank=8, shape=SHAPE)
        with torch.no_grad():
            layer.cores()[-1].add_(0.05)
        merged = layer.merge_and_unload(dtype="bfloat16")
        assert type(merged) is torch.nn.Linear
        assert merged.weight.dtype == merged.bias.dtype == torch.bfloat16
        assert torch.equal(merged.weight, layer.effective_weight().to(torch.bfloat16))
        assert torch.equal(merged.bias, layer.bias.to(torch.bfloat16))
        x = torch.randn(3, 256)
        with torch.no_grad():
            expected = layer(x)
            y = merged(x.to(torch.bfloat16)).float()
        assert torch.allclose(y, expected, rtol=2e-2, atol=2e-2 * expected.abs().max())

    @pytest.mark.parametrize("dtype", ["fp16", "int8", torch.int8, torch.float8_e4m3fn])
    def test_merge_and_unload_refuses_a_dtype_it_does_not_support(self, dtype):
        layer = QDoTALinear(linear(trained_like()), rank=8, shape=SHAPE)
        with pytest.raises(mpo.MPOError, match="dtype must be one of float32, bfloat16, float16"):
            layer.merge_and_unload(dtype=dtype)

    def test_unwrap_refuses_and_names_the_way_out(self):
        model = mpo.adapt.wrap(tiny_llama(), quantize="nf4", rank=4, num_cores=2, quiet=True)
        with pytest.raises(mpo.MPOError, match=r"cannot restore.*reload the base model"):
            mpo.adapt.unwrap(model)
        assert len(mpo.adapt.dota_layers(model)) == 10

    def test_merge_adapter_refuses_and_names_the_way_out(self):
        model = mpo.adapt.wrap(tiny_llama(), quantize="nf4", rank=4, num_cores=2, quiet=True)
        with pytest.raises(mpo.MPOError, match=r"4-bit weight cannot take.*merge_and_unload"):
            mpo.adapt.merge_adapter(model)
        assert not any(getattr(layer, "merged", False) for _, layer in mpo.adapt.dota_layers(model))


class TestFourBitInput:
    """A model loaded in 4 bits: W0 is dequantized, decomposed, and the residual requantized."""

    @pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
    def test_effective_weight_requantizes_the_dequantized_weight(self, quant_type):
        base = linear_4bit(trained_like(), quant_type=quant_type)
        w0 = bnb_functional.dequantize_4bit(base.weight.data, base.weight.quant_state)
        layer = QDoTALinear(base, rank=16, shape=SHAPE)
        t0 = mpo_dense(layer.initial_cores())
        expected = nf4(w0 - t0) + t0
        effective = layer.effective_weight()
        assert torch.allclose(effective, expected, rtol=0, atol=2**-8 * expected.abs().max())
        assert torch.equal(layer.bias, base.bias)
        assert layer.base_dtype == torch.float32  # the weight's dtype before quantization

    def test_wrap_replaces_every_target_and_warns_once(self, tiny_llama_folder):
        model, caught = wrap_4bit(load_in_4bit(tiny_llama_folder))
        layers = mpo.adapt.dota_layers(model)
        assert len(layers) == 10
        assert all(isinstance(layer, QDoTALinear) for _, layer in layers)
        assert len(caught) == 1
        assert caught[0].category is UserWarning
        assert caught[0].filename == __file__  # points at the caller of wrap
        assert "already carries quantization error" in str(caught[0].message)
        assert "loaded in bfloat16 or float32" in str(caught[0].message)

    def test_trainable_share_counts_the_4_bit_weights_as_entries(self, tiny_llama_folder):
        _, total = mpo.adapt.trainable_parameters(tiny_llama(**WIDER))
        model, _ = wrap_4bit(load_in_4bit(tiny_llama_folder))
        trainable, quantized_total = mpo.adapt.trainable_parameters(model)
        assert quantized_total == total + trainable

    def test_an_evaluation_before_wrap_changes_the_wrapped_model_by_rounding_only(
        self, wide_llama_folder
    ):
        # the evaluation may repack every Linear4bit for the cpu kernel; wrap unpacks them
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        fresh = wrap_4bit(load_in_4bit(wide_llama_folder))[0]
        evaluated = load_in_4bit(wide_llama_folder).eval()
        with torch.no_grad():
            evaluated(input_ids=ids)
            wrap_4bit(evaluated)
            expected, actual = fresh(input_ids=ids).logits, evaluated(input_ids=ids).logits
        # bfloat16 scales shift W0 by up to 2^-9, which may flip a few NF4 codes of the
        # residual; without the unpacking fix the logits differed by half their size
        assert torch.allclose(actual, expected, rtol=0, atol=2**-4 * expected.abs().max())
        o_proj = [m.model.layers[0].self_attn.o_proj for m in (fresh, evaluated)]  # not a target
        weights = [float_weight(layer) for layer in o_proj]
        assert torch.allclose(weights[1], weights[0], rtol=2**-8, atol=0)

    def test_forward_is_close_to_the_4_bit_model_at_initialisation(self, tiny_llama_folder):
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        model = load_in_4bit(tiny_llama_folder)
        with torch.no_grad():  # may repack the 4-bit weights for the cpu kernel, before wrap
            before = model(input_ids=ids).logits
            after = wrap_4bit(model)[0](input_ids=ids).logits
        assert after.shape == before.shape
        assert torch.allclose(after, before, atol=0.1 * before.abs().max())

    @pytest.mark.parametrize(("double_quant", "rtol"), [(True, 2**-5), (False, 2**-8)])
    def test_a_weight_repacked_for_the_cpu_kernel_is_read_back(self, double_quant, rtol):
        weight = trained_like()
        base = linear_4bit(weight, double_quant=double_quant).eval()
        expected = float_weight(linear_4bit(weight, double_quant=double_quant))
        with torch.no_grad():
            base(torch.randn(2, 256, dtype=torch.bfloat16))
        # where the cpu has AVX512-BF16 the repacking rounds the block scales to bfloat16, and
        # bitsandbytes' inverse quantizes them again with double quantization (to 8 bits)
        assert torch.allclose(float_weight(base), expected, rtol=rtol, atol=0)
        layer = QDoTALinear(base, rank=16, shape=SHAPE)
        assert (layer.effective_weight() - expected).norm() < 0.1 * expected.norm()

    def test_only_the_cores_get_gradients(self, tiny_llama_folder):
        model, _ = wrap_4bit(load_in_4bit(tiny_llama_folder))
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        model(input_ids=ids, labels=ids).loss.backward()
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert with_grad == trainable
        assert len(trainable) == 10 * 2
        assert all(".dota_cores.default." in name for name in trainable)

    def test_a_few_adamw_steps_reduce_the_loss(self, tiny_llama_folder):
        model, _ = wrap_4bit(load_in_4bit(tiny_llama_folder))
        losses = losses_over_adamw_steps(model)
        assert losses[-1] < losses[0] - 0.05

    def test_evaluation_before_and_after_wrap_leaves_every_core_a_gradient(self, tiny_llama_folder):
        """bitsandbytes repacks a frozen Linear4bit for its cpu inference kernel (no
        backward) on a forward in eval mode without grad; the wrapped model must unpack
        it and keep it off that kernel while it trains, and give the kernel back after."""
        model = load_in_4bit(tiny_llama_folder).eval()
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        frozen = [m for name, m in model.named_modules() if name.endswith(("o_proj", "gate_proj"))]
        fast = [m.support_avx512bf16_for_cpu for m in frozen]
        with torch.no_grad():
            model(input_ids=ids)
        packed = [getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in frozen]
        assert packed == fast  # repacked wherever this cpu has the kernel
        model, _ = wrap_4bit(model)
        with torch.no_grad():
            model(input_ids=ids)  # an evaluation between training steps
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        cores = [p for p in model.parameters() if p.requires_grad]
        assert len(cores) == 20
        assert all(p.grad is not None and p.grad.any() for p in cores)
        mpo.adapt.merge_and_unload(model)
        assert [m.support_avx512bf16_for_cpu for m in frozen] == fast

    def test_adapter_loads_bit_identically_onto_the_same_4_bit_base(
        self, tiny_llama_folder, tmp_path
    ):
        model, _ = wrap_4bit(load_in_4bit(tiny_llama_folder))
        with torch.no_grad():
            for _, layer in mpo.adapt.dota_layers(model):
                layer.cores()[-1].add_(0.05)
        mpo.adapt.save_adapter(model, tmp_path / "adapter")
        restored = mpo.adapt.load_adapter(load_in_4bit(tiny_llama_folder), tmp_path / "adapter")
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(restored(input_ids=ids).logits, model(input_ids=ids).logits)

    def test_a_full_precision_adapter_is_refused_on_a_4_bit_base(self, tiny_llama_folder, tmp_path):
        transformers = pytest.importorskip("transformers")
        full = transformers.AutoModelForCausalLM.from_pretrained(tiny_llama_folder)
        mpo.adapt.wrap(full, rank=4, num_cores=2, quiet=True)
        mpo.adapt.save_adapter(full, tmp_path / "adapter")
        base = load_in_4bit(tiny_llama_folder)
        before = {name: type(m) for name, m in base.named_modules()}
        with pytest.raises(mpo.MPOError, match=r"loaded in 4 bits.*quantize='nf4'"):
            mpo.adapt.load_adapter(base, tmp_path / "adapter")
        assert {name: type(m) for name, m in base.named_modules()} == before

    def test_merge_and_unload_returns_the_dtype_before_quantization(self, tiny_llama_folder):
        model, _ = wrap_4bit(load_in_4bit(tiny_llama_folder))
        expected = model.model.layers[0].self_attn.q_proj.effective_weight()
        merged = mpo.adapt.merge_and_unload(model)
        q_proj = merged.model.layers[0].self_attn.q_proj
        assert type(q_proj) is torch.nn.Linear
        assert q_proj.weight.dtype == torch.float32  # the checkpoint's dtype
        assert torch.equal(q_proj.weight, expected)

    def test_merged_4_bit_model_round_trips_through_save_pretrained(
        self, tiny_llama_folder, tmp_path
    ):
        transformers = pytest.importorskip("transformers")
        model, _ = wrap_4bit(load_in_4bit(tiny_llama_folder))
        losses_over_adamw_steps(model, steps=2)  # T != T0
        merged = mpo.adapt.merge_and_unload(model)
        merged.save_pretrained(tmp_path / "merged")
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "merged", device_map="cpu"
        )
        attention = loaded.model.layers[0].self_attn
        assert type(attention.q_proj) is torch.nn.Linear  # merged: plain
        assert is_4bit(attention.o_proj)  # not a target: still 4 bits
        assert type(loaded.lm_head) is torch.nn.Linear  # skipped by transformers' default
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(loaded(input_ids=ids).logits, merged(input_ids=ids).logits)


class TestTrainerOnA4BitModel:
    """transformers' Trainer refuses "purely quantized" models; a wrapped one carries adapters."""

    def test_trainer_refuses_the_model_before_wrap(self, tiny_llama_folder, tmp_path):
        with pytest.raises(ValueError, match="purely quantized"):
            trainer(load_in_4bit(tiny_llama_folder), tmp_path)

    def test_trainer_trains_the_cores_of_a_wrapped_model(self, tiny_llama_folder, tmp_path):
        model, _ = wrap_4bit(load_in_4bit(tiny_llama_folder))
        before = [c.detach().clone() for c in all_cores(model)]
        result = trainer(model, tmp_path, steps=2).train()
        assert result.global_step == 2
        assert math.isfinite(result.training_loss)
        after = all_cores(model)
        assert not any(torch.equal(a, b) for a, b in zip(after, before, strict=True))

    def test_the_wrapped_model_stays_4_bit_for_save_pretrained(self, tiny_llama_folder, tmp_path):
        model, _ = wrap_4bit(load_in_4bit(tiny_llama_folder))
        model.save_pretrained(tmp_path)
        config = json.loads((tmp_path / "config.json").read_text())
        assert config["quantization_config"]["load_in_4bit"] is True
        assert type(model.model.layers[0].self_attn.o_proj).__name__ == "Linear4bit"

    def test_a_loaded_adapter_is_accepted_by_trainer(self, tiny_llama_folder, tmp_path):
        model, _ = wrap_4bit(load_in_4bit(tiny_llama_folder))
        mpo.adapt.save_adapter(model, tmp_path / "adapter")
        restored = mpo.adapt.load_adapter(load_in_4bit(tiny_llama_folder), tmp_path / "adapter")
        assert trainer(restored, tmp_path).model is restored

    def test_merge_and_unload_gives_the_refusal_back(self, tiny_llama_folder, tmp_path):
        model, _ = wrap_4bit(load_in_4bit(tiny_llama_folder))
        merged = mpo.adapt.merge_and_unload(model)
        assert merged.is_quantized is True
        with pytest.raises(ValueError, match="purely quantized"):
            trainer(merged, tmp_path)

    def test_unwrap_gives_the_refusal_back(self, tiny_llama_folder, tmp_path):
        # DoTA (not QDoTA) on the targets a 4-bit loading skipped: unwrap is allowed
        skip = [*mpo.adapt.PAPER_TARGETS, "lm_head"]
        model = mpo.adapt.wrap(
            load_in_4bit(tiny_llama_folder, skip), rank=4, num_cores=2, quiet=True
        )
        assert trainer(model, tmp_path).model is model
        mpo.adapt.unwrap(model)
        assert model.is_quantized is True
        with pytest.raises(ValueError, match="purely quantized"):
            trainer(model, tmp_path)


class TestErrors:
    def test_missing_bitsandbytes_names_the_extra(self, monkeypatch):
        real_import = builtins.__import__

        def no_bitsandbytes(name, *args, **kwargs):
            if name.startswith("bitsandbytes"):
                raise ImportError(name)
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
        monkeypatch.setattr("importlib.import_module", no_bitsandbytes)
        model = tiny_llama()
        with pytest.raises(mpo.MPOError, match=r'pip install "mpo-dota\[quant\]"'):
            mpo.adapt.wrap(model, quantize="nf4", rank=4, num_cores=2, quiet=True)
        assert not mpo.adapt.dota_layers(model)

    def test_meta_device_is_refused(self):
        with torch.device("meta"):
            model = tiny_llama()
        with pytest.raises(mpo.MPOError, match=r"q_proj's weight is on the meta device"):
            mpo.adapt.wrap(model, quantize="nf4", rank=4, num_cores=2, quiet=True)

    def test_a_layer_failing_halfway_leaves_the_full_precision_model(self):
        # QDoTA layers keep no W0: wrap must put the original layers back itself
        model = tiny_llama()
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
        linear = torch.nn.Linear
        originals = {name: m for name, m in model.named_modules() if isinstance(m, linear)}
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        with pytest.raises(mpo.MPOError, match=r"^model.layers.1.mlp.down_proj: .*NaN"):
            mpo.adapt.wrap(model, quantize="nf4", rank=4, num_cores=2, quiet=True)
        assert not mpo.adapt.dota_layers(model)
        now = {name: m for name, m in model.named_modules() if isinstance(m, linear)}
        assert all(now[name] is module for name, module in originals.items())
        assert all(p.requires_grad for p in model.parameters())
        for name, p in model.named_parameters():
            torch.testing.assert_close(p, before[name], rtol=0, atol=0, equal_nan=True)

    def test_a_model_loaded_in_4_bits_needs_quantize_nf4(self):
        model = torch.nn.Sequential()
        model.add_module("q_proj", linear_4bit(trained_like(64, 64)))
        with pytest.raises(mpo.MPOError, match=r"q_proj is a Linear4bit.*Pass quantize='nf4'"):
            mpo.adapt.wrap(model, rank=4, num_cores=2, quiet=True)
        assert not mpo.adapt.dota_layers(model)

    @pytest.mark.parametrize("quantize", [None, "nf4"])
    def test_a_model_loaded_in_8_bits_is_refused(self, quantize):
        bnb = pytest.importorskip("bitsandbytes")
        model = torch.nn.Sequential()
        model.add_module("q_proj", bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False).to("cpu"))
        with pytest.raises(mpo.MPOError, match=r"Linear8bitLt.*8 bits.*Load it in bfloat16"):
            mpo.adapt.wrap(model, quantize=quantize, rank=4, num_cores=2, quiet=True)

    def test_other_layer_types_are_refused(self):
        with pytest.raises(mpo.MPOError, match=r"is a Conv1d; QDoTA adapts torch.nn.Linear"):
            QDoTALinear(torch.nn.Conv1d(8, 8, 1), rank=4)


class TestConv1D:
    """transformers' Conv1D stores W0 as (in, out); the residual and the MPO are (out, in)."""

    def test_residual_is_quantized_in_the_out_in_orientation(self):
        weight = trained_like(128, 256)
        layer = QDoTALinear(conv1d(weight), rank=16, shape=WIDE_SHAPE)
        assert layer.residual.shape == (128, 256)
        expected = nf4(weight - mpo_dense(layer.initial_cores()))
        assert torch.equal(layer.residual.dequantize(), expected)

    @pytest.mark.parametrize("rows", [3, 2048])  # the factored and the dense strategy
    def test_output_at_initialisation_is_the_residual_plus_the_initial_mpo(self, rows):
        weight = trained_like(128, 256)
        base = conv1d(weight)
        layer = QDoTALinear(base, rank=8, shape=WIDE_SHAPE, dtype=torch.float32)
        expected = "factored" if rows == 3 else "dense"
        assert choose(rows, layer.layout(), training=True, with_init=False) == expected
        initial = mpo_dense(layer.initial_cores())
        x = torch.randn(rows, 256)
        reference = x @ (nf4(weight - initial) + initial).T + base.bias
        y = layer(x)
        assert torch.allclose(y, reference, rtol=1e-4, atol=1e-5 * reference.abs().max())

    @staticmethod
    def trained_layer():
        """A QDoTA layer on a 128 x 256 Conv1D whose last core has moved."""
        base = conv1d(trained_like(128, 256))
        layer = QDoTALinear(base, rank=8, shape=WIDE_SHAPE, dtype=torch.float32)
        with torch.no_grad():
            layer.cores()[-1].add_(0.05)
        return layer

    def test_delta_weight_is_in_the_conv1d_layout(self):
        layer = self.trained_layer()
        delta = layer.get_delta_weight()
        expected = mpo_dense(layer.cores()) - mpo_dense(layer.initial_cores())
        assert delta.shape == (256, 128)
        assert torch.allclose(delta, expected.T, atol=1e-6)

    def test_merge_and_unload_gives_a_conv1d_holding_the_transposed_weight(self):
        layer = self.trained_layer()
        merged = layer.merge_and_unload()
        assert type(merged).__name__ == "Conv1D"
        assert merged.weight.shape == (256, 128)
        assert torch.equal(merged.weight, layer.effective_weight().T)
        assert torch.equal(merged.bias, layer.bias)
        x = torch.randn(3, 256)
        with torch.no_grad():
            expected = layer(x)
            assert torch.allclose(merged(x), expected, atol=1e-4 * expected.abs().max())

    def test_wrap_trains_only_the_cores_of_a_gpt2(self):
        model = wrap_gpt2(tiny_gpt2())
        layers = mpo.adapt.dota_layers(model)
        assert len(layers) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
        assert all(isinstance(layer, QDoTALinear) for _, layer in layers)
        before = {name: t.clone() for name, t in model.state_dict().items()}
        losses = losses_over_adamw_steps(model, steps=4)
        assert losses[-1] < losses[0]
        after = model.state_dict()
        changed = {name for name, t in after.items() if not torch.equal(t, before[name])}
        assert changed == {name for name, p in model.named_parameters() if p.requires_grad}
        assert len(changed) == 4 * 2
        assert all(".dota_cores.default." in name for name in changed)

    def test_merge_and_unload_gives_back_a_gpt2_with_conv1d_layers(self):
        model = wrap_gpt2(tiny_gpt2())
        with torch.no_grad():
            for _, layer in mpo.adapt.dota_layers(model):
                layer.cores()[-1].add_(0.05)
        expected_weight = model.transformer.h[0].attn.c_attn.effective_weight()
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            adapted = model(input_ids=ids).logits
        merged = mpo.adapt.merge_and_unload(model)
        c_attn = merged.transformer.h[0].attn.c_attn
        assert type(c_attn).__name__ == "Conv1D"
        assert torch.equal(c_attn.weight, expected_weight.T)  # (in, out) = (32, 96)
        assert not mpo.adapt.dota_layers(merged)
        with torch.no_grad():
            assert torch.allclose(merged(input_ids=ids).logits, adapted, atol=1e-4)

    def test_adapter_loads_bit_identically_onto_the_same_gpt2(self, tmp_path):
        model = wrap_gpt2(tiny_gpt2())
        with torch.no_grad():
            for _, layer in mpo.adapt.dota_layers(model):
                layer.cores()[-1].add_(0.05)
        mpo.adapt.save_adapter(model, tmp_path / "adapter")
        config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
        entry = config["modules"]["transformer.h.0.attn.c_attn"]
        assert (entry["kind"], entry["weight_shape"]) == ("Conv1D", [96, 32])
        restored = mpo.adapt.load_adapter(tiny_gpt2(), tmp_path / "adapter")
        assert all(isinstance(layer, QDoTALinear) for _, layer in mpo.adapt.dota_layers(restored))
        ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(restored(input_ids=ids).logits, model(input_ids=ids).logits)
