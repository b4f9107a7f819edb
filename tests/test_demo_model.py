"""The embedded demo's pretrained LM: shipped assets that load offline and really learned.

The assets are written by ``python -m mpo.demo.pretrain``; ``pretraining.json``
records the run, including a held-out paragraph and its loss.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ASSETS = Path(str(resources.files("mpo.demo") / "tiny_lm"))
MAX_BYTES = 25_000_000


@pytest.fixture(scope="module")
def record() -> dict:
    return json.loads((ASSETS / "pretraining.json").read_text())


@pytest.fixture(scope="module")
def model():
    return transformers.AutoModelForCausalLM.from_pretrained(ASSETS, local_files_only=True)


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(ASSETS, local_files_only=True)


@torch.no_grad()
def loss_on(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids
    return model.eval()(input_ids=ids, labels=ids).loss.item()


def test_assets_fit_the_size_budget():
    size = sum(path.stat().st_size for path in ASSETS.iterdir())
    assert size <= MAX_BYTES


def test_model_is_the_configured_llama_with_grouped_query_attention(model):
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert len(model.model.layers) == model.config.num_hidden_layers == 4
    attention, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert attention.q_proj.weight.shape == (256, 256)
    assert attention.k_proj.weight.shape == attention.v_proj.weight.shape == (128, 256)
    assert attention.o_proj.weight.shape == (256, 256)
    assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (768, 256)
    assert mlp.down_proj.weight.shape == (256, 768)


def test_weights_are_float32_with_tied_embeddings(model):
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_and_model_agree_on_vocabulary_and_special_tokens(model, tokenizer):
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.bos_token_id == model.config.bos_token_id
    assert tokenizer.eos_token_id == model.config.eos_token_id
    assert tokenizer.pad_token_id == model.config.pad_token_id
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3


def test_encoding_starts_with_bos(tokenizer):
    assert tokenizer("Hello").input_ids[0] == tokenizer.bos_token_id


def test_tokenizer_round_trips_text_with_digits(tokenizer):
    text = "In 2024, 17 + 25 = 42;  pi is 3.14159\tand x[0] -> None.\n"
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_each_digit_is_its_own_token(tokenizer):
    tokens = tokenizer.tokenize("x = 9876543210 + 0.5")
    assert [t for t in tokens if any(c.isdigit() for c in t)] == [*"9876543210", "0", "5"]


def test_pretrained_loss_on_held_out_text_is_far_below_a_fresh_models(model, tokenizer, record):
    text = record["heldout_sample"]["text"]
    torch.manual_seed(record["training"]["seed"])
    fresh = transformers.LlamaForCausalLM(model.config)
    assert loss_on(model, tokenizer, text) < 0.6 * loss_on(fresh, tokenizer, text)


def test_pretrained_loss_on_held_out_text_matches_the_record(model, tokenizer, record):
    sample = record["heldout_sample"]
    assert loss_on(model, tokenizer, sample["text"]) == pytest.approx(sample["loss"], abs=0.05)


def test_record_describes_the_shipped_model(model, tokenizer, record):
    assert record["model"]["parameters"] == sum(p.numel() for p in model.parameters())
    assert record["tokenizer"]["vocab_size"] == len(tokenizer)
    assert record["heldout_sample"]["document"] in record["corpus"]["heldout_documents"]


def test_recorded_loss_on_the_whole_held_out_set_is_far_below_a_fresh_models(record):
    assert record["loss"]["heldout"] < 0.6 * record["loss"]["heldout_fresh"]
