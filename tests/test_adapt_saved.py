"""Modules trained whole next to the adapters (modules_to_save), task heads, and the
model-level switches (disable_adapter, merge_adapter, unmerge_adapter)."""

from __future__ import annotations

import importlib
import json
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from conftest import TINY_BERT, TINY_LLAMA  # noqa: E402

import mpo.adapt  # noqa: E402
from mpo.adapt import TrainedModule, load_adapter, save_adapter, wrap  # noqa: E402
from mpo.errors import MPOError  # noqa: E402

IDS = torch.randint(1, TINY_LLAMA["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(3))
LABELS = torch.tensor([0, 2])


def classifier():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_LLAMA, num_labels=3, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config)


def bert_classifier():
    torch.manual_seed(0)
    config = transformers.BertConfig(**TINY_BERT, num_labels=3)
    return transformers.BertForSequenceClassification(config)


def adapted(**config):
    defaults = {"target_modules": "all-linear", "modules_to_save": ["score"]}
    return wrap(classifier(), rank=4, num_cores=2, quiet=True, **{**defaults, **config})


def train(model, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(IDS, labels=LABELS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(
    ("build", "head"), [(classifier, "score"), (bert_classifier, "classifier")]
)
def test_all_linear_leaves_out_the_task_head_and_warns_that_it_stays_frozen(build, head):
    with pytest.warns(UserWarning, match=f"task head '{head}' stays frozen.*modules_to_save"):
        model = wrap(build(), target_modules="all-linear", rank=4, num_cores=2, quiet=True)
    assert type(getattr(model, head)) is torch.nn.Linear
    assert not getattr(model, head).weight.requires_grad


def test_the_head_to_save_trains_as_a_copy_next_to_the_frozen_original():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the head is covered: no warning
        model = adapted()
    assert isinstance(model.score, TrainedModule)
    assert model.score.copies["default"].weight.requires_grad
    assert not model.score.original_module.weight.requires_grad
    assert model.score.weight is model.score.copies["default"].weight  # reads go to the copy
    assert torch.equal(logits(model), logits(classifier()))  # unchanged at init
    original = model.score.original_module.weight.clone()
    train(model)
    assert torch.equal(model.score.original_module.weight, original)
    assert not torch.equal(model.score.copies["default"].weight, original)


def test_round_trip_restores_the_trained_head_exactly(tmp_path):
    model = train(adapted())
    save_adapter(model, tmp_path / "adapter")
    header = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert header["format_version"] == 2
    assert header["modules_to_save"] == {
        "score": {"weight": {"shape": [3, 32], "dtype": "float32"}}
    }
    loaded = load_adapter(classifier(), tmp_path / "adapter")
    assert torch.equal(logits(loaded), logits(model))


def test_checkpoints_without_modules_to_save_stay_format_1(tmp_path):
    model = wrap(classifier(), rank=4, num_cores=2, quiet=True)  # paper targets, no heads
    save_adapter(model, tmp_path / "adapter")
    header = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert header["format_version"] == 1
    assert "modules_to_save" not in header


def test_unwrap_gives_the_base_model_back_and_merging_keeps_the_trained_head():
    model = train(adapted())
    trained = logits(model)
    unwrapped = mpo.adapt.unwrap(train(adapted()))
    assert type(unwrapped.score) is torch.nn.Linear
    assert torch.equal(logits(unwrapped), logits(classifier()))
    merged = mpo.adapt.merge_and_unload(model)
    assert type(merged.score) is torch.nn.Linear
    torch.testing.assert_close(logits(merged), trained, rtol=1e-5, atol=1e-5)


def test_disable_adapter_runs_the_base_model_inside_the_block():
    model = train(adapted())
    trained, base = logits(model), logits(classifier())
    with mpo.adapt.disable_adapter(model):
        assert torch.equal(logits(model), base)  # cores and head both off
    assert torch.equal(logits(model), trained)


def test_each_adapter_trains_its_own_copy():
    model = train(adapted())
    first = model.score.copies["default"].weight.clone()
    wrap(model, adapter_name="b", target_modules="all-linear", rank=4, num_cores=2,
         modules_to_save=["score"], quiet=True)  # fmt: skip
    assert set(model.score.copies) == {"default", "b"}
    assert model.score.copies["b"].weight.requires_grad
    assert not model.score.copies["default"].weight.requires_grad
    train(model)
    assert torch.equal(model.score.copies["default"].weight, first)
    mpo.adapt.set_adapter(model, "default")
    assert model.score.weight is model.score.copies["default"].weight
    mpo.adapt.delete_adapter(model, "b")
    assert set(model.score.copies) == {"default"}


def test_plan_counts_the_copies_as_trainable():
    plain = mpo.adapt.plan(classifier(), target_modules="all-linear", rank=4, num_cores=2)
    saving = mpo.adapt.plan(
        classifier(), target_modules="all-linear", rank=4, num_cores=2, modules_to_save=["score"]
    )
    assert saving.trainable_params == plain.trainable_params + 3 * 32
    assert "modules to save: score (96 params)" in str(saving)
    model = adapted()
    assert mpo.adapt.trainable_parameters(model)[0] == saving.trainable_params


class TestBadInput:
    def test_modules_to_save_matching_nothing_lists_the_heads(self):
        with pytest.raises(
            MPOError, match=r"matches modules_to_save=\['scorer'\].*task heads: score"
        ):
            adapted(modules_to_save=["scorer"])

    def test_a_module_cannot_be_adapted_and_saved(self):
        with pytest.raises(MPOError, match="either adapted or trained whole"):
            adapted(target_modules=["q_proj", "score"])

    def test_checkpoint_saving_a_module_the_model_lacks(self, tmp_path):
        save_adapter(train(adapted()), tmp_path / "adapter")
        header_file = tmp_path / "adapter" / "adapter_config.json"
        header = json.loads(header_file.read_text())
        header["modules_to_save"]["score"]["weight"]["shape"] = [4, 32]
        header_file.write_text(json.dumps(header))
        base = classifier()
        before = {k: v.clone() for k, v in base.state_dict().items()}
        with pytest.raises(MPOError, match="saves 'score' with entries"):
            load_adapter(base, tmp_path / "adapter")
        assert not mpo.adapt.dota_layers(base)
        assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())

    def test_saving_warns_about_trainable_parameters_it_would_lose(self, tmp_path):
        model = wrap(classifier(), rank=4, num_cores=2, quiet=True)
        model.score.weight.requires_grad_(True)  # unfrozen by hand
        with pytest.warns(UserWarning, match=r"not saved, e\.g\. \['score\.weight'\].*\['score'\]"):
            save_adapter(model, tmp_path / "adapter")


def test_merge_adapter_folds_in_place_and_unmerge_adapter_takes_it_out():
    model = train(adapted())
    trained = logits(model)
    weight = model.model.layers[0].self_attn.q_proj.base_layer.weight.clone()
    mpo.adapt.merge_adapter(model)
    torch.testing.assert_close(logits(model), trained, rtol=1e-5, atol=1e-5)
    with pytest.raises(MPOError, match="is merged: disabling it would unmerge it"):
        mpo.adapt.disable_adapter(model).__enter__()
    mpo.adapt.unmerge_adapter(model)
    restored = model.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(restored, weight, rtol=0, atol=1e-6)  # W0 up to rounding
    torch.testing.assert_close(logits(model), trained, rtol=1e-5, atol=1e-5)
    assert not any(layer.merged for _, layer in mpo.adapt.dota_layers(model))


def toy_with_head():
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.dense = torch.nn.Linear(16, 16)
    model.q_proj = torch.nn.Linear(16, 16)
    model.classifier = torch.nn.Sequential()
    model.classifier.add_module("dense", torch.nn.Linear(16, 16))
    model.classifier.add_module("act", torch.nn.ReLU())
    model.classifier.add_module("out_proj", torch.nn.Linear(16, 3))
    return model


def wrap_toy(model, **config):
    return wrap(model, rank=2, num_cores=2, quiet=True, **config)


class TestWithOtherAdapters:
    def test_a_later_adapter_never_targets_inside_a_module_to_save(self):
        model = wrap_toy(toy_with_head(), target_modules=["q_proj"], modules_to_save=["classifier"])
        wrap_toy(model, adapter_name="b", target_modules=["dense"])
        assert [name for name, _ in mpo.adapt.dota_layers(model)] == ["dense", "q_proj"]

    def test_a_module_to_save_cannot_be_adapted_by_a_later_adapter(self):
        model = wrap_toy(toy_with_head(), target_modules=["q_proj"], modules_to_save=["classifier"])
        with pytest.raises(MPOError, match="'classifier', which an adapter of this model trains"):
            wrap_toy(model, adapter_name="b", target_modules=["classifier"])

    def test_an_adapted_module_cannot_be_saved_whole_by_a_later_adapter(self):
        model = wrap_toy(toy_with_head(), target_modules=["q_proj"])
        with pytest.raises(MPOError, match="'q_proj', which is or holds 'q_proj', adapted"):
            wrap_toy(model, adapter_name="b", target_modules=["dense"], modules_to_save=["q_proj"])

    def test_a_module_without_state_cannot_be_saved(self):
        with pytest.raises(MPOError, match=r"'classifier\.act', a ReLU without parameters"):
            wrap_toy(toy_with_head(), target_modules=["q_proj"], modules_to_save=["act"])

    def test_a_failed_load_gives_each_module_to_save_its_active_copy_back(
        self, tmp_path, monkeypatch
    ):
        model = train(adapted())
        save_adapter(model, tmp_path / "adapter")
        before = logits(model)
        module = importlib.import_module("mpo.adapt.wrap")  # the package's wrap is the function
        real = module.set_adapter

        def interrupted(*args):
            real(*args)
            raise KeyboardInterrupt  # Ctrl-C at the very end of installing

        monkeypatch.setattr(module, "set_adapter", interrupted)
        with pytest.raises(KeyboardInterrupt):
            load_adapter(model, tmp_path / "adapter", adapter_name="second")
        assert model.score.active_adapter == "default"
        assert set(model.score.copies) == {"default"}
        assert torch.equal(logits(model), before)


def test_saving_works_where_torch_keeps_dtensor_in_its_private_module(tmp_path, monkeypatch):
    # torch 2.4 (the oldest supported) has DTensor in torch.distributed._tensor only
    import sys
    import types

    monkeypatch.setitem(sys.modules, "torch.distributed.tensor", types.ModuleType("empty"))
    model = train(adapted())
    save_adapter(model, tmp_path / "adapter")
    mpo.adapt.merge_adapter(model)
    assert torch.equal(
        logits(load_adapter(classifier(), tmp_path / "adapter")), logits(train(adapted()))
    )
