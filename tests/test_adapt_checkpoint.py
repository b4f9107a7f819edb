"""mpo.adapt.checkpoint: adapter-only checkpoints that restore a model exactly, and export_delta."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from conftest import TINY_BERT  # noqa: E402
from conftest import tiny_llama as llama  # noqa: E402
from safetensors import safe_open  # noqa: E402

import mpo  # noqa: E402
from mpo.adapt import (  # noqa: E402
    DoTALinear,
    QDoTALinear,
    dota_layers,
    trainable_parameters,
    unwrap,
    wrap,
)
from mpo.adapt.checkpoint import (  # noqa: E402
    CONFIG_NAME,
    FORMAT_VERSION,
    WEIGHTS_NAME,
    export_delta,
    load_adapter,
    save_adapter,
)
from mpo.errors import MPOError  # noqa: E402

GPT2 = dict(n_layer=2, n_embd=32, n_head=2, vocab_size=64, bos_token_id=0, eos_token_id=0)
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


def gpt2():
    """A tiny GPT-2 (Conv1D layers) with the same weights on every call."""
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2)).eval()


def bert():
    """A tiny BERT masked LM (an encoder, every linear layer adapted)."""
    torch.manual_seed(0)
    return transformers.BertForMaskedLM(transformers.BertConfig(**TINY_BERT)).eval()


BUILDS = pytest.mark.parametrize(
    "build", [llama, gpt2, bert], ids=["llama-Linear", "gpt2-Conv1D", "bert-all-linear"]
)


def adapted(build, steps: int = 2, **config):
    """``build()`` wrapped at rank 4 with 3 cores, after ``steps`` Adam steps (so T != T0)."""
    if build is gpt2:
        config.setdefault("target_modules", GPT2_TARGETS)
    if build is bert:
        config.setdefault("target_modules", "all-linear")
    model = wrap(build(), rank=4, num_cores=3, quiet=True, **config)
    train(model, steps)
    return model


def train(model, steps: int = 1) -> None:
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(TOKENS, labels=TOKENS).loss.backward()
        optimizer.step()


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def bits(tensor):
    return tensor.detach().reshape(-1).view(torch.uint8)


def snapshot(model) -> dict:
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_untouched(model, before: dict) -> None:
    """No DoTA layers, no dota_config, and every tensor of the state dict equal bit for bit."""
    assert dota_layers(model) == []
    assert not hasattr(model, "dota_config")
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(bits(after[key]), bits(before[key])) for key in before)


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory):
    """A trained LLaMA adapter and the checkpoint folder it was saved to (do not modify)."""
    model = adapted(llama)
    folder = tmp_path_factory.mktemp("checkpoint") / "adapter"
    save_adapter(model, folder)
    return model, folder


@pytest.fixture
def checkpoint_copy(trained_llama, tmp_path) -> Path:
    """A private copy of the trained LLaMA checkpoint, free to corrupt."""
    copy = tmp_path / "adapter"
    shutil.copytree(trained_llama[1], copy)
    return copy


# -- round trip ----------------------------------------------------------------------


@BUILDS
@pytest.mark.parametrize("init", ["dota", "random"])
def test_round_trip_gives_the_saved_models_output_exactly(build, init, tmp_path):
    model = adapted(build, init=init)
    save_adapter(model, tmp_path / "adapter")
    base = build()
    loaded = load_adapter(base, tmp_path / "adapter")
    assert loaded is base
    assert torch.equal(logits(loaded), logits(model))
    assert not torch.equal(logits(loaded), logits(build()))


def test_wrappers_names_are_left_out_of_the_checkpoint(trained_llama, tmp_path):
    # torch.compile (and FSDP1, activation checkpointing) insert a segment into every
    # module name; the checkpoint must name the plain model's modules
    model, _ = trained_llama
    save_adapter(torch.compile(model), tmp_path / "adapter")
    header = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not any("_orig_mod" in name for name in header["modules"])
    assert torch.equal(logits(load_adapter(llama(), tmp_path / "adapter")), logits(model))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_loading_never_decomposes(trained_llama, monkeypatch, tmp_path, quantize):
    # the cores come from the file; a TT-SVD of the base weight would be wasted time
    def no_decomposition(*args, **kwargs):
        raise AssertionError("load_adapter decomposed a weight")

    if quantize:
        pytest.importorskip("bitsandbytes")
        model = adapted(llama, quantize=quantize)
        save_adapter(model, tmp_path / "adapter")
        folder = tmp_path / "adapter"
    else:
        model, folder = trained_llama
    monkeypatch.setattr(mpo.adapt.layer, "_dota_cores", no_decomposition)
    monkeypatch.setattr(mpo.adapt.layer, "_random_cores", no_decomposition)
    loaded = load_adapter(llama(), folder)
    assert torch.equal(logits(loaded), logits(model))


@BUILDS
@pytest.mark.parametrize("init", ["dota", "random"])
def test_round_trip_restores_every_core_and_setting_bit_for_bit(build, init, tmp_path):
    model = adapted(build, init=init)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(build(), tmp_path / "adapter")
    saved_layers, loaded_layers = dota_layers(model), dota_layers(loaded)
    assert [name for name, _ in loaded_layers] == [name for name, _ in saved_layers]
    for (_, saved), (_, layer) in zip(saved_layers, loaded_layers, strict=True):
        assert layer.adapter_settings == saved.adapter_settings
        pairs = list(zip(layer.cores(), saved.cores(), strict=True))
        if init == "dota":
            pairs += list(zip(layer.initial_cores(), saved.initial_cores(), strict=True))
        else:
            assert layer.initial_cores() is None
        assert all(torch.equal(bits(a), bits(b)) for a, b in pairs)


def test_trained_cores_differ_from_initial_cores_before_saving(trained_llama):
    _, layer = dota_layers(trained_llama[0])[0]
    assert not torch.equal(layer.cores()[0], layer.initial_cores()[0])


def test_round_trip_keeps_bfloat16_cores_exactly(tmp_path):
    model = adapted(llama, dtype="bfloat16")
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(llama(), tmp_path / "adapter")
    assert dota_layers(loaded)[0][1].cores()[0].dtype == torch.bfloat16
    assert torch.equal(logits(loaded), logits(model))


def test_load_leaves_base_weights_untouched(trained_llama):
    base = llama()
    before = snapshot(base)
    load_adapter(base, trained_llama[1])
    assert_untouched(unwrap(base), before)


def test_loaded_model_trains_only_the_cores(trained_llama):
    loaded = load_adapter(llama(), trained_llama[1])
    assert trainable_parameters(loaded) == trainable_parameters(trained_llama[0])
    assert all(("dota_cores" in name) == p.requires_grad for name, p in loaded.named_parameters())


def test_load_sets_dota_config_and_adapter_name(trained_llama):
    model, folder = trained_llama
    loaded = load_adapter(llama(), folder)
    assert loaded.dota_config == model.dota_config
    renamed = load_adapter(llama(), folder, adapter_name="task")
    assert set(renamed.dota_config) == {"task"}
    assert all(layer.active_adapter == "task" for _, layer in dota_layers(renamed))


def test_load_draws_no_random_numbers(trained_llama):
    base = llama()
    state = torch.get_rng_state()
    load_adapter(base, trained_llama[1])
    assert torch.equal(torch.get_rng_state(), state)


# -- the files -----------------------------------------------------------------------


def test_tensors_file_holds_exactly_the_trained_and_initial_cores(trained_llama):
    model, folder = trained_llama
    expected = {}
    for name, layer in dota_layers(model):
        for k, core in enumerate(layer.cores()):
            expected[f"{name}.dota_cores.{k}"] = core
        for k, core in enumerate(layer.initial_cores()):
            expected[f"{name}.dota_init.{k}"] = core
    with safe_open(folder / WEIGHTS_NAME, framework="pt") as handle:
        assert set(handle.keys()) == set(expected)
        assert handle.metadata()["format"] == "pt"
        for key, core in expected.items():
            assert torch.equal(handle.get_tensor(key), core.detach())


@pytest.mark.parametrize(("init", "copies"), [("dota", 2), ("random", 1)])
def test_tensors_file_size_is_the_cores_bytes_plus_a_small_header(init, copies, tmp_path):
    model = wrap(llama(), rank=4, num_cores=3, init=init, quiet=True)
    save_adapter(model, tmp_path / "adapter")
    data = (tmp_path / "adapter" / WEIGHTS_NAME).read_bytes()
    header = int.from_bytes(data[:8], "little")
    trainable, _ = trainable_parameters(model)
    assert len(data) == 8 + header + copies * trainable * 4
    tensors = copies * 3 * len(dota_layers(model))
    assert header < 150 * tensors  # one short JSON entry per tensor


def test_config_records_versions_config_and_modules(trained_llama):
    model, folder = trained_llama
    data = json.loads((folder / CONFIG_NAME).read_text())
    assert data["method"] == "dota"
    assert data["format_version"] == 1  # no modules to save: readable by mpo before them
    assert data["mpo_version"] == mpo.__version__
    assert data["adapter_name"] == "default"
    assert data["config"] == model.dota_config["default"].to_dict()
    name, layer = dota_layers(model)[0]
    assert list(data["modules"]) == [n for n, _ in dota_layers(model)]
    assert data["modules"][name] == {
        "kind": "Linear",
        "weight_shape": [layer.out_features, layer.in_features],
        "row_factors": layer.adapter_settings["default"]["shape"][0],
        "col_factors": layer.adapter_settings["default"]["shape"][1],
        "ranks": layer.adapter_settings["default"]["ranks"],
        "rank": 4,
        "init": "dota",
        "dtype": "float32",
    }


def test_config_records_conv1d_as_out_by_in(tmp_path):
    model = wrap(gpt2(), rank=4, num_cores=3, target_modules=["c_attn"], quiet=True)
    save_adapter(model, tmp_path / "adapter")
    entry = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["modules"]
    assert entry["transformer.h.0.attn.c_attn"]["kind"] == "Conv1D"
    assert entry["transformer.h.0.attn.c_attn"]["weight_shape"] == [96, 32]


def test_config_records_the_base_model_name(tmp_path):
    base = llama()
    base.config._name_or_path = "org/tiny-llama"
    save_adapter(wrap(base, rank=4, num_cores=3, quiet=True), tmp_path / "adapter")
    data = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert data["base_model_name_or_path"] == "org/tiny-llama"


# -- atomic saving -------------------------------------------------------------------


def test_save_replaces_an_older_checkpoint(tmp_path):
    model = adapted(llama)
    save_adapter(model, tmp_path / "adapter")
    train(model)
    save_adapter(model, tmp_path / "adapter")
    assert torch.equal(logits(load_adapter(llama(), tmp_path / "adapter")), logits(model))
    assert os.listdir(tmp_path) == ["adapter"]


def _fail(*args, **kwargs):
    raise OSError("simulated: disk full")


@pytest.mark.parametrize(
    "target", [(safetensors_torch, "save_file"), (json, "dumps")], ids=["tensors", "config"]
)
def test_failed_save_keeps_the_old_checkpoint_and_leaves_no_temporary_folder(
    target, tmp_path, monkeypatch
):
    model = adapted(llama)
    save_adapter(model, tmp_path / "adapter")
    old = logits(model)
    train(model)
    monkeypatch.setattr(*target, _fail)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(model, tmp_path / "adapter")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["adapter"]
    assert torch.equal(logits(load_adapter(llama(), tmp_path / "adapter")), old)


def test_failed_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    model = adapted(llama)
    save_adapter(model, tmp_path / "adapter")
    old = logits(model)
    train(model)
    rename = os.rename

    def failing_rename(source, destination):
        if str(source).endswith(".tmp") and Path(destination) == tmp_path / "adapter":
            raise OSError("simulated: rename failed")
        rename(source, destination)

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(model, tmp_path / "adapter")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["adapter"]
    assert torch.equal(logits(load_adapter(llama(), tmp_path / "adapter")), old)


@pytest.mark.parametrize("other", ["README.md", CONFIG_NAME])
def test_save_refuses_a_folder_holding_other_files(trained_llama, tmp_path, other):
    # a folder named like a checkpoint file is someone else's too
    if other == CONFIG_NAME:
        (tmp_path / other).mkdir()
    else:
        (tmp_path / other).write_text("mine")
    with pytest.raises(MPOError, match=re.escape(other)):
        save_adapter(trained_llama[0], tmp_path)
    assert os.listdir(tmp_path) == [other]


@pytest.mark.parametrize("where", [".", ".."])
def test_save_refuses_the_working_directory(trained_llama, tmp_path, monkeypatch, where):
    # an empty working directory passes the other checks; renaming it would fail midway
    (tmp_path / "empty").mkdir()
    monkeypatch.chdir(tmp_path / "empty")
    with pytest.raises(MPOError, match="is the working directory or holds it"):
        save_adapter(trained_llama[0], where)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]
    assert not any((tmp_path / "empty").iterdir())


def test_save_refuses_a_core_with_nan(tmp_path):
    model = wrap(llama(), rank=4, num_cores=3, quiet=True)
    name, layer = dota_layers(model)[0]
    with torch.no_grad():
        layer.cores()[1][0, 0, 0, 0] = float("nan")
    with pytest.raises(MPOError, match=rf"{name}\.dota_cores\.1 holds NaN"):
        save_adapter(model, tmp_path / "adapter")
    assert os.listdir(tmp_path) == []


def test_save_needs_dota_layers(tmp_path):
    with pytest.raises(MPOError, match="no DoTA layers"):
        save_adapter(llama(), tmp_path / "adapter")


# -- refused checkpoints: a clear error, the model untouched ------------------------


def _edit_config(folder: Path, change) -> None:
    file = folder / CONFIG_NAME
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def _edit_tensors(folder: Path, change) -> None:
    file = folder / WEIGHTS_NAME
    tensors = safetensors_torch.load_file(file)
    change(tensors)
    safetensors_torch.save_file(tensors, file)


FIRST = "model.layers.0.self_attn.q_proj"


def _set_nan(tensors):
    tensors[f"{FIRST}.dota_cores.1"][0, 0, 0, 0] = float("nan")


CORRUPTIONS = {
    "missing folder": (lambda f: shutil.rmtree(f), "is not a folder"),
    "missing config": (lambda f: (f / CONFIG_NAME).unlink(), "has no adapter_config.json"),
    "missing tensors": (
        lambda f: (f / WEIGHTS_NAME).unlink(),
        "has no adapter_model.safetensors",
    ),
    "truncated tensors": (
        lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:-100]),
        "adapter_model.safetensors cannot be read as safetensors",
    ),
    "garbage tensors": (
        lambda f: (f / WEIGHTS_NAME).write_bytes(os.urandom(4096)),
        "adapter_model.safetensors cannot be read as safetensors",
    ),
    "invalid JSON": (
        lambda f: (f / CONFIG_NAME).write_text('{"method": "dota",'),
        "adapter_config.json cannot be read as JSON",
    ),
    "other method": (
        lambda f: _edit_config(f, lambda d: d.update(method="lora")),
        "method 'lora', not 'dota'",
    ),
    "newer format": (
        lambda f: _edit_config(f, lambda d: d.update(format_version=FORMAT_VERSION + 1)),
        "newer than this mpo",
    ),
    "kind mismatch": (
        lambda f: _edit_config(f, lambda d: d["modules"][FIRST].update(kind="Conv1D")),
        f"adapts '{FIRST}' as a Conv1D",
    ),
    "inconsistent factors": (
        lambda f: _edit_config(f, lambda d: d["modules"][FIRST].update(row_factors=[2, 2, 2])),
        rf"modules\['{FIRST}'\]: row_factors \(2, 2, 2\)",
    ),
    "missing key": (
        lambda f: _edit_tensors(f, lambda t: t.pop(f"{FIRST}.dota_init.2")),
        rf"lacks 1 core\(s\) .* \['{FIRST}\.dota_init\.2'\]",
    ),
    "extra key": (
        lambda f: _edit_tensors(f, lambda t: t.update({"lm_head.weight": torch.zeros(64, 32)})),
        r"holds 1 tensor\(s\) that are not cores .* \['lm_head\.weight'\]; pass strict=False",
    ),
    "wrong shape": (
        lambda f: _edit_tensors(f, lambda t: t.update({f"{FIRST}.dota_cores.0": torch.zeros(3)})),
        rf"tensor '{FIRST}\.dota_cores\.0' is torch\.float32 of shape \(3,\)",
    ),
    "wrong dtype": (
        lambda f: _edit_tensors(f, lambda t: t.update({k: v.double() for k, v in t.items()})),
        "is torch.float64 of shape",
    ),
    "NaN in a core": (
        lambda f: _edit_tensors(f, _set_nan),
        rf"tensor '{FIRST}\.dota_cores\.1' holds NaN or Inf",
    ),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_load_refuses_a_damaged_checkpoint_and_leaves_the_model_untouched(case, checkpoint_copy):
    corrupt, message = CORRUPTIONS[case]
    corrupt(checkpoint_copy)
    base = llama()
    before = snapshot(base)
    with pytest.raises(MPOError, match=message):
        load_adapter(base, checkpoint_copy)
    assert_untouched(base, before)


def test_load_ignores_extra_tensors_when_not_strict(checkpoint_copy, trained_llama):
    _edit_tensors(checkpoint_copy, lambda t: t.update({"lm_head.weight": torch.zeros(64, 32)}))
    loaded = load_adapter(llama(), checkpoint_copy, strict=False)
    assert torch.equal(logits(loaded), logits(trained_llama[0]))


def test_load_refuses_a_model_missing_an_adapted_module(trained_llama):
    base = llama(num_hidden_layers=1)
    before = snapshot(base)
    with pytest.raises(MPOError, match=r"'model\.layers\.1\.self_attn\.q_proj', which .* does not"):
        load_adapter(base, trained_llama[1])
    assert_untouched(base, before)


def test_load_refuses_a_model_of_another_size(trained_llama):
    base = llama(hidden_size=64, intermediate_size=128)
    before = snapshot(base)
    with pytest.raises(
        MPOError, match=rf"'{FIRST}' as a Linear of weight \(out, in\) = \(32, 32\)"
    ):
        load_adapter(base, trained_llama[1])
    assert_untouched(base, before)


def test_a_failure_while_building_layers_puts_the_model_back(trained_llama, monkeypatch):
    base = llama()
    before = snapshot(base)
    flags = [p.requires_grad for p in base.parameters()]
    build, built = DoTALinear.from_cores, []

    def fail_third(*args, **kwargs):
        built.append(build(*args, **kwargs))
        if len(built) == 3:
            raise RuntimeError("simulated: out of memory")
        return built[-1]

    monkeypatch.setattr(DoTALinear, "from_cores", staticmethod(fail_third))
    with pytest.raises(RuntimeError, match="simulated"):
        load_adapter(base, trained_llama[1])
    assert_untouched(base, before)
    assert [p.requires_grad for p in base.parameters()] == flags


def test_load_refuses_an_adapter_name_the_model_already_has(trained_llama):
    model = wrap(llama(), rank=2, num_cores=3, quiet=True)
    before = snapshot(model)
    with pytest.raises(MPOError, match="already has an adapter named 'default'"):
        load_adapter(model, trained_llama[1])
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


# -- export_delta --------------------------------------------------------------------


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama-Linear", "gpt2-Conv1D"])
@pytest.mark.parametrize("init", ["dota", "random"])
def test_export_delta_is_the_layers_update_as_an_out_by_in_mpo(build, init):
    model = adapted(build, init=init)
    deltas = export_delta(model)
    assert list(deltas) == [name for name, _ in dota_layers(model)]
    for name, layer in dota_layers(model):
        expected = layer.get_delta_weight().detach()
        if layer.layout().transposed:
            expected = expected.T
        assert isinstance(deltas[name], mpo.MPO)
        torch.testing.assert_close(deltas[name].to_dense(), expected)


@pytest.mark.parametrize(("init", "factor"), [("dota", 2), ("random", 1)])
def test_export_delta_doubles_the_bond_ranks_only_with_initial_cores(init, factor):
    model = adapted(llama, init=init)
    deltas = export_delta(model)
    for name, layer in dota_layers(model):
        ranks = layer.adapter_settings["default"]["ranks"]
        assert deltas[name].ranks == tuple(factor * r for r in ranks)


@pytest.mark.parametrize("init", ["dota", "random"])
def test_export_delta_is_a_detached_snapshot(init):
    model = adapted(llama, init=init)
    exported = export_delta(model)[FIRST]
    before = exported.to_dense().clone()
    train(model)
    assert not any(core.requires_grad for core in exported.cores)
    assert torch.equal(exported.to_dense(), before)
    assert not torch.equal(export_delta(model)[FIRST].to_dense(), before)


def test_export_delta_needs_dota_layers():
    with pytest.raises(MPOError, match="no DoTA layers"):
        export_delta(llama())


# -- QDoTA: T and T0 saved, the 4-bit residual rebuilt from the base weights ----------

needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None, reason="QDoTA needs bitsandbytes"
)


def qdota(init: str = "dota", double_quant: bool = False, dtype: str = "float32"):
    """A tiny LLaMA with QDoTA layers, trained two steps (so T != T0)."""
    return adapted(llama, quantize="nf4", init=init, double_quant=double_quant, dtype=dtype)


@needs_bitsandbytes
@pytest.mark.parametrize("init", ["dota", "random"])
@pytest.mark.parametrize("double_quant", [False, True], ids=["nf4", "nf4-double"])
def test_qdota_round_trip_gives_the_saved_models_output_exactly(init, double_quant, tmp_path):
    model = qdota(init, double_quant, dtype="bfloat16")
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(llama(), tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(model))
    assert not torch.equal(logits(loaded), logits(llama()))


@needs_bitsandbytes
@pytest.mark.parametrize("init", ["dota", "random"])
def test_qdota_round_trip_rebuilds_the_residual_bytes_and_settings(init, tmp_path):
    model = qdota(init, double_quant=True)
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(llama(), tmp_path / "adapter")
    saved_layers, loaded_layers = dota_layers(model), dota_layers(loaded)
    assert [name for name, _ in loaded_layers] == [name for name, _ in saved_layers]
    for (_, saved), (_, layer) in zip(saved_layers, loaded_layers, strict=True):
        assert type(layer) is QDoTALinear
        assert layer.adapter_settings == saved.adapter_settings
        residual, saved_residual = layer.residual.state_dict(), saved.residual.state_dict()
        assert residual.keys() == saved_residual.keys()
        assert all(torch.equal(residual[k], saved_residual[k]) for k in residual)
        assert all(
            torch.equal(bits(a), bits(b)) for a, b in zip(layer.cores(), saved.cores(), strict=True)
        )


@needs_bitsandbytes
def test_qdota_tensors_file_holds_the_cores_and_not_the_residual(tmp_path):
    model = qdota()
    save_adapter(model, tmp_path / "adapter")
    with safe_open(tmp_path / "adapter" / WEIGHTS_NAME, framework="pt") as handle:
        keys = set(handle.keys())
    groups = {key.rsplit(".", 2)[1] for key in keys}
    assert groups == {"dota_cores", "dota_init"}
    assert len(keys) == 2 * 3 * len(dota_layers(model))


@needs_bitsandbytes
def test_qdota_config_records_the_quantization(tmp_path):
    save_adapter(qdota(double_quant=True), tmp_path / "adapter")
    data = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    assert (data["config"]["quantize"], data["config"]["double_quant"]) == ("nf4", True)
    assert data["modules"][FIRST]["kind"] == "Linear"


@needs_bitsandbytes
def test_loaded_qdota_model_trains_only_the_cores(tmp_path):
    model = qdota()
    save_adapter(model, tmp_path / "adapter")
    loaded = load_adapter(llama(), tmp_path / "adapter")
    assert trainable_parameters(loaded) == trainable_parameters(model)
    assert all(("dota_cores" in name) == p.requires_grad for name, p in loaded.named_parameters())
    assert not any(name.endswith("q_proj.weight") for name, _ in loaded.named_parameters())


@needs_bitsandbytes
def test_loading_a_qdota_checkpoint_without_bitsandbytes_names_the_extra(tmp_path, monkeypatch):
    save_adapter(qdota(), tmp_path / "adapter")
    real_import = importlib.import_module

    def no_bitsandbytes(name, *args, **kwargs):
        if name.startswith("bitsandbytes"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", no_bitsandbytes)
    base = llama()
    before = snapshot(base)
    with pytest.raises(MPOError, match=r'pip install "mpo-dota\[quant\]"'):
        load_adapter(base, tmp_path / "adapter")
    assert_untouched(base, before)


@needs_bitsandbytes
def test_loading_a_qdota_checkpoint_into_a_wrapped_model_is_refused(tmp_path):
    save_adapter(qdota(), tmp_path / "adapter")
    model = wrap(llama(), quantize="nf4", rank=2, num_cores=3, quiet=True)
    before = snapshot(model)
    with pytest.raises(MPOError, match="cannot take a second adapter with QDoTA"):
        load_adapter(model, tmp_path / "adapter", adapter_name="other")
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[key], before[key]) for key in before)


@needs_bitsandbytes
def test_save_refuses_layers_the_config_does_not_describe(tmp_path):
    model = qdota(double_quant=True)
    model.dota_config = {
        "default": dataclasses.replace(
            model.dota_config["default"], quantize=None, double_quant=False
        )
    }
    with pytest.raises(MPOError, match=rf"{FIRST} has quantize='nf4', double_quant=True"):
        save_adapter(model, tmp_path / "adapter")
    assert os.listdir(tmp_path) == []


def test_load_refuses_an_adapter_for_multihead_attention_out_proj(tmp_path):
    # saved from a look-alike whose out_proj is called; MultiheadAttention never calls it
    torch.manual_seed(0)
    look_alike = torch.nn.Module()
    look_alike.self_attn = torch.nn.Module()
    look_alike.self_attn.out_proj = torch.nn.Linear(32, 32)
    wrap(look_alike, target_modules=["out_proj"], rank=2, num_cores=2, quiet=True)
    save_adapter(look_alike, tmp_path / "adapter")
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    before = snapshot(layer)
    with pytest.raises(MPOError, match=r"'self_attn.out_proj', the out_proj of a torch.nn.Mult"):
        load_adapter(layer, tmp_path / "adapter")
    assert_untouched(layer, before)
