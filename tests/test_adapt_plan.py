"""mpo.adapt.targets and mpo.adapt.plan: which modules are adapted, and what that costs."""

from __future__ import annotations

import re
from math import prod

import pytest
from hypothesis import given
from hypothesis import strategies as st

torch = pytest.importorskip("torch")
from conftest import TINY_BERT, TINY_LLAMA  # noqa: E402
from torch import nn  # noqa: E402

from mpo import factorize, param_count  # noqa: E402
from mpo.adapt.config import DoTAConfig  # noqa: E402
from mpo.adapt.plan import AdapterPlan, ModulePlan, plan  # noqa: E402
from mpo.adapt.targets import find_targets, linear_modules, weight_shape  # noqa: E402
from mpo.errors import MPOError  # noqa: E402

LLAMA2_7B = dict(
    vocab_size=32000,
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    tie_word_embeddings=False,
)
LLAMA3_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def meta_causal_lm(transformers, config):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module")
def llama2_7b(transformers):
    return meta_causal_lm(transformers, transformers.LlamaConfig(**LLAMA2_7B))


@pytest.fixture(scope="module")
def llama3_8b(transformers):
    return meta_causal_lm(transformers, transformers.LlamaConfig(**LLAMA3_8B))


@pytest.fixture(scope="module")
def gpt2(transformers):
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=100)
    return meta_causal_lm(transformers, config)


def toy_model() -> nn.Module:
    """Two blocks of q/v/o projections and a norm, then an lm_head (``layers.0.q_proj``, ...)."""

    def block() -> nn.Module:
        return nn.ModuleDict(
            {
                "q_proj": nn.Linear(16, 16),
                "v_proj": nn.Linear(16, 8),
                "o_proj": nn.Linear(16, 16),
                "norm": nn.LayerNorm(16),
            }
        )

    return nn.ModuleDict(
        {"layers": nn.ModuleList([block(), block()]), "lm_head": nn.Linear(16, 32)}
    )


def targeted(model: nn.Module, **fields) -> list[str]:
    return [name for name, _ in find_targets(model, DoTAConfig(**fields))]


# --- the paper's numbers (FACTS.md, Table 1) ----------------------------------------------


def test_llama2_7b_at_rank_16_trains_10_043_392_params(llama2_7b):
    p = plan(llama2_7b, rank=16)
    assert p.trainable_params == 10_043_392
    assert p.base_params == 6_738_415_616
    assert p.total_params == 6_738_415_616 + 10_043_392
    assert round(100 * p.trainable_share, 3) == 0.149


def test_llama2_7b_adapts_q_k_v_up_down_of_every_layer(llama2_7b):
    p = plan(llama2_7b)
    assert len(p.modules) == 5 * 32
    leaves = {m.name.rsplit(".", 1)[-1] for m in p.modules}
    assert leaves == {"q_proj", "k_proj", "v_proj", "up_proj", "down_proj"}


def test_llama3_8b_at_rank_16_trains_5_206_016_params(llama3_8b):
    p = plan(llama3_8b)
    assert p.trainable_params == 5_206_016
    assert p.base_params == 8_030_261_248
    assert round(100 * p.trainable_share, 3) == 0.065


def test_llama3_8b_at_rank_32_trains_16_106_496_params(llama3_8b):
    assert plan(llama3_8b, rank=32).trainable_params == 16_106_496


@pytest.mark.parametrize(
    ("shape", "params"),
    [((4096, 4096), 37_376), ((11008, 4096), 100_864), ((4096, 11008), 100_864)],
)
def test_llama2_per_matrix_params_at_rank_16(llama2_7b, shape, params):
    rows = [m for m in plan(llama2_7b).modules if m.shape == shape]
    assert rows
    assert {m.params for m in rows} == {params}


@pytest.mark.parametrize(
    ("shape", "params"),
    [((4096, 4096), 37_376), ((14336, 4096), 41_664), ((1024, 4096), 20_992)],
)
def test_llama3_per_matrix_params_at_rank_16(llama3_8b, shape, params):
    rows = [m for m in plan(llama3_8b).modules if m.shape == shape]
    assert rows
    assert {m.params for m in rows} == {params}


def test_llama2_rows_use_table_2_shapes(llama2_7b):
    up = next(m for m in plan(llama2_7b).modules if m.name.endswith("layers.0.mlp.up_proj"))
    assert up == ModulePlan(
        name="model.layers.0.mlp.up_proj",
        shape=(11008, 4096),
        row_factors=(4, 4, 43, 4, 4),
        col_factors=(4, 4, 8, 8, 4),
        ranks=(16, 16, 16, 16),
        params=100_864,
    )


def test_str_ends_with_peft_style_totals_line(llama2_7b):
    text = str(plan(llama2_7b))
    assert text.splitlines()[-1] == (
        "trainable params: 10,043,392 || all params: 6,748,459,008 || trainable%: 0.1488"
    )


def test_str_groups_rows_by_name_and_shape_for_big_models(llama2_7b):
    lines = str(plan(llama2_7b)).splitlines()
    assert len(lines) == 1 + 1 + 5 + 1  # heading, header, one row per projection, totals
    q_row = next(line for line in lines if line.startswith("q_proj"))
    assert q_row.split()[-3:] == ["32", "37,376", "1,196,032"]


def test_table_lists_every_module(llama2_7b):
    p = plan(llama2_7b)
    assert len(p.table().splitlines()) == 1 + 160


def test_str_shows_the_full_table_for_small_models():
    p = plan(toy_model(), target_modules=["q_proj"])
    lines = str(p).splitlines()
    assert lines[1].split()[0] == "module"
    assert [line.split()[0] for line in lines[2:4]] == ["layers.0.q_proj", "layers.1.q_proj"]
    assert lines[-1].startswith("trainable params: ")


# --- what plan() accepts ----------------------------------------------------------------


def test_plan_builds_a_config_on_the_meta_device(transformers):
    config = transformers.LlamaConfig(**TINY_LLAMA)
    from_config = plan(config)
    from_model = plan(meta_causal_lm(transformers, config))
    assert from_config == from_model
    assert len(from_config.modules) == 5 * 2


@pytest.mark.parametrize("as_str", [False, True])
def test_plan_reads_config_json_from_a_local_folder(transformers, tmp_path, as_str):
    config = transformers.LlamaConfig(**TINY_LLAMA)
    config.save_pretrained(tmp_path)
    p = plan(str(tmp_path) if as_str else tmp_path)
    assert p == plan(config)


def test_plan_rejects_a_folder_without_config_json(tmp_path):
    with pytest.raises(MPOError, match=r"config\.json"):
        plan(tmp_path)


def test_plan_rejects_a_path_that_does_not_exist(tmp_path):
    with pytest.raises(MPOError, match=r"config\.json"):
        plan(str(tmp_path / "meta-llama/Llama-2-7b-hf"))


@pytest.mark.parametrize("bad", [42, None, [nn.Linear(4, 4)], {"hidden_size": 64}])
def test_plan_rejects_what_is_not_a_model_config_or_folder(bad):
    with pytest.raises(MPOError, match="torch module, a transformers config, or a folder"):
        plan(bad)


def test_plan_rejects_a_config_without_a_causal_lm_class(transformers):
    config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2)
    with pytest.raises(MPOError, match=r"T5Config.*meta device"):
        plan(config)


def test_keyword_overrides_replace_config_fields():
    p = plan(toy_model(), DoTAConfig(rank=32, target_modules=["o_proj"]), rank=8)
    assert p.config == DoTAConfig(rank=8, target_modules=["o_proj"])
    assert [m.ranks for m in p.modules] == [DoTAConfig(rank=8).bond_ranks(16, 16)] * 2


def test_unknown_keyword_is_an_mpo_error():
    with pytest.raises(MPOError, match="ranks"):
        plan(toy_model(), ranks=8)


def test_base_params_count_every_parameter_once():
    model = toy_model()
    model.layers[1] = model.layers[0]  # a shared block counts once, as in PEFT
    p = plan(model, target_modules=["q_proj"])
    assert p.base_params == sum(t.numel() for t in model.parameters())
    assert [m.name for m in p.modules] == ["layers.0.q_proj"]


@given(
    out_features=st.integers(1, 300),
    in_features=st.integers(1, 300),
    rank=st.integers(1, 20),
    cores=st.integers(2, 6),
)
def test_a_linear_plans_as_factorize_and_param_count_say(out_features, in_features, rank, cores):
    model = nn.ModuleDict({"proj": nn.Linear(in_features, out_features, device="meta")})
    p = plan(model, target_modules=["proj"], rank=rank, num_cores=cores)
    (row,) = p.modules
    assert row.shape == (out_features, in_features)
    assert row.row_factors == factorize(out_features, cores)
    assert row.col_factors == factorize(in_features, cores)
    assert prod(row.row_factors) == out_features
    assert prod(row.col_factors) == in_features
    assert len(row.ranks) == cores - 1
    assert row.params == param_count(row.row_factors, row.col_factors, rank)
    assert p.base_params == out_features * in_features + out_features
    assert isinstance(p, AdapterPlan)


# --- target matching --------------------------------------------------------------------


def test_a_list_entry_matches_whole_names_and_dotted_suffixes():
    model = toy_model()
    assert targeted(model, target_modules=["q_proj"]) == ["layers.0.q_proj", "layers.1.q_proj"]
    assert targeted(model, target_modules=["1.v_proj", "lm_head"]) == [
        "layers.1.v_proj",
        "lm_head",
    ]


def test_a_list_entry_does_not_match_part_of_a_name():
    with pytest.raises(MPOError, match="no module"):
        targeted(toy_model(), target_modules=["proj"])


def test_a_string_is_a_regex_over_the_whole_qualified_name():
    model = toy_model()
    assert targeted(model, target_modules=r"layers\.1\.[qv]_proj") == [
        "layers.1.q_proj",
        "layers.1.v_proj",
    ]
    with pytest.raises(MPOError, match=r"no module.*pass \[\'q_proj\'\] to match it as a name"):
        targeted(model, target_modules="q_proj")  # fullmatch: no top-level q_proj


def test_all_linear_is_recognised_in_any_case():
    model = toy_model()
    assert targeted(model, target_modules="ALL-Linear") == targeted(
        model, target_modules="all-linear"
    )


def test_the_cores_dtype_may_be_a_torch_dtype():
    import torch

    assert DoTAConfig(dtype=torch.bfloat16).dtype == "bfloat16"
    assert DoTAConfig(dtype=torch.bfloat16).to_dict()["dtype"] == "bfloat16"
    with pytest.raises(MPOError, match="dtype must be one of"):
        DoTAConfig(dtype=torch.int8)


def test_an_invalid_regex_is_an_mpo_error():
    with pytest.raises(MPOError, match="regular expression"):
        targeted(toy_model(), target_modules="layers.(")


def test_all_linear_leaves_out_a_module_named_lm_head():
    names = targeted(toy_model(), target_modules="all-linear")
    assert len(names) == 6
    assert "lm_head" not in names


def test_another_librarys_adapter_layer_is_not_a_linear_target():
    # a PEFT LoRA layer computes more than its base_layer: adapting it as one would be wrong
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(toy_model(), peft.LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(MPOError, match=r"DoTA adapts only nn.Linear and Conv1D.*base_layer"):
        targeted(model, target_modules=["q_proj"])


def test_multihead_attention_out_proj_is_never_adapted():
    # nn.MultiheadAttention reads out_proj.weight directly: an adapter there would never run
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)
    names = targeted(layer, target_modules="all-linear")
    assert names == ["linear1", "linear2"]
    with pytest.raises(MPOError, match=r"'self_attn.out_proj', the out_proj of a torch.nn.Multi"):
        targeted(layer, target_modules=["out_proj", "linear1"])
    assert targeted(layer, target_modules=["linear1"], exclude_modules=["out_proj"])


def test_all_linear_leaves_out_the_models_output_embeddings(transformers):
    config = transformers.BertConfig(**{**TINY_BERT, "vocab_size": 100}, is_decoder=True)
    model = meta_causal_lm(transformers, config)
    names = targeted(model, target_modules="all-linear")
    assert model.get_output_embeddings() is model.cls.predictions.decoder
    assert "cls.predictions.decoder" not in names
    assert "cls.predictions.transform.dense" in names
    assert len(names) == 6 * 2 + 1
    assert plan(config, target_modules="all-linear").modules[0].name == names[0]


def test_all_linear_on_llama_takes_seven_projections_per_layer(transformers):
    p = plan(transformers.LlamaConfig(**TINY_LLAMA), target_modules="all-linear")
    assert len(p.modules) == 7 * 2
    assert all("lm_head" not in m.name for m in p.modules)


@pytest.mark.parametrize("exclude", [["0.q_proj", "0.v_proj"], r"layers\.0\..*"])
def test_exclusion_wins_over_targets(exclude):
    names = targeted(toy_model(), target_modules=["q_proj", "v_proj"], exclude_modules=exclude)
    assert names == ["layers.1.q_proj", "layers.1.v_proj"]


def test_excluding_everything_targeted_is_an_error():
    with pytest.raises(MPOError, match="exclude_modules"):
        targeted(toy_model(), target_modules=["q_proj"], exclude_modules=["q_proj"])


def test_no_match_error_lists_the_linear_leaf_names_sorted():
    with pytest.raises(MPOError) as info:
        targeted(toy_model(), target_modules=["query"])
    assert "lm_head, o_proj, q_proj, v_proj" in str(info.value)


def test_no_match_error_on_llama_names_its_projections(llama2_7b):
    with pytest.raises(MPOError, match="q_proj") as info:
        plan(llama2_7b, target_modules=["c_attn"])
    assert "down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj" in str(
        info.value
    )


def test_targeting_a_non_linear_module_names_it_and_its_type():
    with pytest.raises(MPOError, match=re.escape("'layers.0.norm', a LayerNorm")):
        targeted(toy_model(), target_modules=["norm"])


def test_targeting_a_container_suggests_its_linear_layers():
    with pytest.raises(MPOError, match=re.escape("ModuleList") + ".*o_proj, q_proj, v_proj"):
        targeted(toy_model(), target_modules=["layers"])


def test_an_excluded_non_linear_match_is_not_an_error():
    names = targeted(toy_model(), target_modules=r"layers\.0\..*", exclude_modules=["norm"])
    assert names == ["layers.0.q_proj", "layers.0.v_proj", "layers.0.o_proj"]


# --- linear layers and their shapes -----------------------------------------------------


def test_linear_modules_lists_linear_layers_in_model_order():
    names = [name for name, _ in linear_modules(toy_model())]
    assert names[:3] == ["layers.0.q_proj", "layers.0.v_proj", "layers.0.o_proj"]
    assert names[-1] == "lm_head"
    assert len(names) == 7


def test_linear_modules_skips_the_root():
    assert linear_modules(nn.Linear(4, 4)) == []


def test_weight_shape_of_a_linear_is_out_by_in():
    assert weight_shape(nn.Linear(3, 5, device="meta")) == (5, 3)


@given(out_features=st.integers(1, 64), in_features=st.integers(1, 64))
def test_weight_shape_of_a_conv1d_matches_the_equivalent_linear(out_features, in_features):
    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D
    layer = conv1d(nf=out_features, nx=in_features)
    assert tuple(layer.weight.shape) == (in_features, out_features)
    assert weight_shape(layer) == weight_shape(nn.Linear(in_features, out_features))


def test_weight_shape_rejects_other_modules():
    with pytest.raises(MPOError, match="LayerNorm"):
        weight_shape(nn.LayerNorm(4))


def test_gpt2_conv1d_layers_plan_as_out_by_in(gpt2):
    p = plan(gpt2, target_modules=["c_attn", "c_proj", "c_fc"])
    shapes = {m.name: m.shape for m in p.modules if ".h.0." in m.name}
    assert shapes == {
        "transformer.h.0.attn.c_attn": (3 * 64, 64),
        "transformer.h.0.attn.c_proj": (64, 64),
        "transformer.h.0.mlp.c_fc": (4 * 64, 64),
        "transformer.h.0.mlp.c_proj": (64, 4 * 64),
    }
    assert len(p.modules) == 4 * 2


def test_gpt2_all_linear_leaves_out_the_tied_head(gpt2):
    names = targeted(gpt2, target_modules="all-linear")
    assert len(names) == 4 * 2
    assert "lm_head" not in names


def test_wrap_warns_about_adapters_as_large_as_their_weight():
    import torch

    from mpo.adapt import wrap

    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(97, 97))  # prime: one factor and 1s
    model.add_module("v_proj", torch.nn.Linear(64, 64))
    with pytest.warns(UserWarning, match=r"1 adapter\(s\) .* q_proj \(97x97: 9,413 parameters\)"):
        wrap(model, target_modules=["q_proj", "v_proj"], rank=4, quiet=True)
