"""Several DoTA adapters on one model: adding, switching, saving, loading, deleting, merging.

A tiny LLaMA gets adapter "a" on q_proj and v_proj, then adapter "b" on q_proj and
k_proj: q_proj holds both, v_proj only "a", k_proj only "b".
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from conftest import adamw_losses  # noqa: E402
from conftest import tiny_llama as llama  # noqa: E402

import mpo.adapt  # noqa: E402
from mpo.adapt import (  # noqa: E402
    DoTALinear,
    delete_adapter,
    load_adapter,
    merge_and_unload,
    save_adapter,
    set_adapter,
    unwrap,
    wrap,
)
from mpo.errors import MPOError  # noqa: E402

TOKENS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
A_TARGETS, B_TARGETS = ["q_proj", "v_proj"], ["q_proj", "k_proj"]


def logits(model):
    with torch.no_grad():
        return model(TOKENS).logits


def add(model, name, targets, rank=4):
    return wrap(
        model, adapter_name=name, target_modules=targets, rank=rank, num_cores=3, quiet=True
    )


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def layer(model, module: str) -> DoTALinear:
    return model.get_submodule(f"model.layers.0.self_attn.{module}")


@pytest.fixture
def two_adapters():
    """The model with "a" trained and "b" added (active, at initialisation)."""
    model = add(llama(), "a", A_TARGETS)
    adamw_losses(model, TOKENS, steps=2)
    a_logits = logits(model)
    add(model, "b", B_TARGETS, rank=2)
    return model, a_logits


def test_a_second_adapter_goes_where_its_targets_are(two_adapters):
    model, _ = two_adapters
    assert set(layer(model, "q_proj").dota_cores) == {"a", "b"}
    assert set(layer(model, "v_proj").dota_cores) == {"a"}
    assert set(layer(model, "k_proj").dota_cores) == {"b"}
    assert isinstance(layer(model, "k_proj").base_layer, torch.nn.Linear)
    assert set(model.dota_config) == {"a", "b"}
    assert layer(model, "q_proj").adapter_settings["b"]["rank"] == 2


def test_the_new_adapter_is_active_and_the_only_one_trained(two_adapters):
    model, _ = two_adapters
    names = trainable_names(model)
    assert names
    assert all(".dota_cores.b." in name for name in names)
    assert all(m.active_adapter == "b" for _, m in mpo.adapt.dota_layers(model))


def test_switching_adapters_switches_outputs(two_adapters):
    model, a_logits = two_adapters
    # "b" is at initialisation and "a" inactive: the base model's output, bit for bit
    assert torch.equal(logits(model), logits(llama()))
    set_adapter(model, "a")
    assert torch.equal(logits(model), a_logits)  # k_proj, without "a", acts as its base
    assert all(".dota_cores.a." in name for name in trainable_names(model))
    with pytest.raises(MPOError, match=r"no adapter named 'c'; it has \['a', 'b'\]"):
        set_adapter(model, "c")


def test_each_adapter_saves_and_loads_on_its_own(two_adapters, tmp_path):
    model, a_logits = two_adapters
    adamw_losses(model, TOKENS, steps=2)  # "b" trained too
    b_logits = logits(model)
    save_adapter(model, tmp_path / "a", adapter_name="a")
    save_adapter(model, tmp_path / "b")  # the active one
    fresh = load_adapter(llama(), tmp_path / "a")
    assert torch.equal(logits(fresh), a_logits)
    load_adapter(fresh, tmp_path / "b")
    assert fresh.get_submodule("model.layers.0.self_attn.k_proj").active_adapter == "b"
    assert torch.equal(logits(fresh), b_logits)
    set_adapter(fresh, "a")
    assert torch.equal(logits(fresh), a_logits)


def test_a_second_adapter_failing_halfway_changes_nothing(two_adapters, monkeypatch):
    model, _ = two_adapters
    set_adapter(model, "a")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modules = dict(model.named_modules())
    real = DoTALinear.update_layer
    calls = []

    def fails_second_time(self, *args, **kwargs):
        calls.append(self)
        if len(calls) > 1:
            raise KeyboardInterrupt
        real(self, *args, **kwargs)

    monkeypatch.setattr(DoTALinear, "update_layer", fails_second_time)
    with pytest.raises(KeyboardInterrupt):
        add(model, "c", ["q_proj", "k_proj", "v_proj"])
    assert len(calls) == 2
    assert set(model.dota_config) == {"a", "b"}
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert all(m.active_adapter == "a" for _, m in mpo.adapt.dota_layers(model))


def test_delete_adapter_removes_an_inactive_one(two_adapters, tmp_path):
    model, a_logits = two_adapters
    with pytest.raises(MPOError, match="'b' is the active adapter"):
        delete_adapter(model, "b")
    set_adapter(model, "a")
    delete_adapter(model, "b")
    assert set(model.dota_config) == {"a"}
    assert all(set(m.dota_cores) <= {"a"} for _, m in mpo.adapt.dota_layers(model))
    assert not any(".b." in key for key in model.state_dict())
    assert torch.equal(logits(model), a_logits)
    with pytest.raises(MPOError, match="no DoTA layer has an adapter named 'b'"):
        save_adapter(model, tmp_path / "b", adapter_name="b")


def test_merge_and_unload_folds_the_active_adapter(two_adapters):
    model, a_logits = two_adapters
    set_adapter(model, "a")
    merged = merge_and_unload(model)
    assert not mpo.adapt.dota_layers(merged)
    assert not any("dota" in key for key in merged.state_dict())
    torch.testing.assert_close(logits(merged), a_logits, rtol=1e-5, atol=1e-5)


def test_unwrap_drops_every_adapter_bit_for_bit(two_adapters):
    model, _ = two_adapters
    base = llama()
    unwrap(model)
    assert model.state_dict().keys() == base.state_dict().keys()
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("first", [None, "nf4"])
def test_qdota_adapters_do_not_coexist(first):
    if first:
        pytest.importorskip("bitsandbytes")
    model = wrap(llama(), quantize=first, rank=2, num_cores=3, quiet=True)
    with pytest.raises(MPOError, match="cannot take a second adapter with QDoTA"):
        wrap(model, adapter_name="other", quantize="nf4", rank=2, num_cores=3, quiet=True)
    assert set(model.dota_config) == {"default"}


def test_deleting_a_layers_only_adapter_gives_back_its_plain_layer(two_adapters):
    model, _ = two_adapters
    set_adapter(model, "a")
    delete_adapter(model, "b")
    k_proj = layer(model, "k_proj")  # held only "b"
    assert type(k_proj) is torch.nn.Linear
    assert not k_proj.weight.requires_grad


def test_a_layer_asked_for_an_adapter_it_lacks_names_the_ones_it_has(two_adapters):
    model, _ = two_adapters
    set_adapter(model, "a")
    k_proj = layer(model, "k_proj")
    for method in (k_proj.cores, k_proj.initial_cores, k_proj.layout, k_proj.get_delta_weight):
        with pytest.raises(MPOError, match=r"no adapter named 'a', only \['b'\]"):
            method()
    assert "not in this layer" in repr(k_proj)


def test_set_adapter_on_a_model_with_a_merged_layer_changes_nothing(two_adapters):
    model, _ = two_adapters
    set_adapter(model, "a")
    layer(model, "v_proj").merge()  # holds "a"; q_proj and k_proj come first in model order
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(MPOError, match="v_proj is merged"):
        set_adapter(model, "b")
    assert all(m.active_adapter == "a" for _, m in mpo.adapt.dota_layers(model))
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_an_adapter_failing_inside_a_layer_leaves_no_trace(two_adapters, monkeypatch):
    model, _ = two_adapters
    q_proj = layer(model, "q_proj")
    keys = sorted(model.state_dict())

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(mpo.adapt.layer, "_Cores", out_of_memory)  # after T is built
    with pytest.raises(RuntimeError, match="simulated"):
        add(model, "c", ["q_proj"])
    assert set(q_proj.dota_cores) == set(q_proj.adapter_settings) == {"a", "b"}
    assert sorted(model.state_dict()) == keys
    monkeypatch.undo()
    add(model, "c", ["q_proj"])  # the name is free
    assert set(q_proj.dota_cores) == {"a", "b", "c"}


def test_update_layer_adds_an_inactive_frozen_adapter():
    base = torch.nn.Linear(64, 64)
    single = DoTALinear(base, rank=4, shape=((4, 4, 4), (4, 4, 4)))
    single.update_layer("other", rank=2, shape=((4, 4, 4), (4, 4, 4)))
    assert single.active_adapter == "default"
    assert all(p.requires_grad for p in single.dota_cores["default"])
    assert not any(p.requires_grad for p in single.dota_cores["other"])
    single.set_adapter("other")
    assert not any(p.requires_grad for p in single.dota_cores["default"])
    assert all(p.requires_grad for p in single.dota_cores["other"])


@pytest.mark.parametrize("name", ["training", "update", "keys"])
def test_adapter_names_that_are_module_dict_attributes_are_refused(name):
    model = llama()
    with pytest.raises(MPOError, match=f"{name}' is an attribute of torch's ModuleDict"):
        add(model, name, A_TARGETS)
    assert not mpo.adapt.dota_layers(model)


def test_delete_adapter_refuses_a_merged_one_before_changing_anything(two_adapters):
    model, _ = two_adapters
    set_adapter(model, "a")
    layer(model, "k_proj").merge(adapter_names=["b"])  # k_proj comes after q_proj
    with pytest.raises(MPOError, match="k_proj has 'b' merged"):
        delete_adapter(model, "b")
    assert "b" in layer(model, "q_proj").dota_cores
    assert set(model.dota_config) == {"a", "b"}


def test_merge_and_unload_keeps_only_the_active_adapter(two_adapters):
    model, a_logits = two_adapters
    set_adapter(model, "a")
    layer(model, "q_proj").merge(adapter_names=["b", "missing"])  # b by hand; missing skipped
    assert layer(model, "q_proj").merged_adapters == ["b"]
    merged = merge_and_unload(model)
    torch.testing.assert_close(logits(merged), a_logits, rtol=1e-5, atol=1e-5)


def test_function_transforms_run_through_a_training_layer():
    layer = DoTALinear(torch.nn.Linear(64, 64), rank=4, shape=((4, 4, 4), (4, 4, 4)))
    layer.strategy = "factored"
    x = torch.randn(3, 64)
    batched = torch.func.vmap(layer)(x)
    torch.testing.assert_close(batched, layer(x))
    _, tangent = torch.func.jvp(layer, (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, torch.ones_like(x) @ layer.base_layer.weight.T)
