"""Shared strategies and helpers for the test suite."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st

settings.register_profile("default", deadline=None, max_examples=40, print_blob=True)
settings.load_profile("default")

BACKENDS = ["numpy", "torch"]

#: A LLaMA small enough to build, wrap and train in milliseconds (grouped-query attention).
TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


#: A BERT of the same scale (the encoder-only case).
TINY_BERT = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
)


def tiny_llama(**overrides):
    """A ``LlamaForCausalLM`` of :data:`TINY_LLAMA` (``overrides`` applied), in eval mode,
    seeded: the same weights on every call, as two loads of one checkpoint."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**{**TINY_LLAMA, **overrides})
    return transformers.LlamaForCausalLM(config).eval()


@st.composite
def factor_shapes(draw, min_cores: int = 2, max_cores: int = 6, max_entries: int = 2048):
    """(row_factors, col_factors): 2-6 cores, factors 1-6, at most max_entries matrix entries."""
    n = draw(st.integers(min_cores, max_cores))
    factors = [1] * (2 * n)
    budget = max_entries
    for slot in draw(st.permutations(range(2 * n))):
        factors[slot] = draw(st.integers(1, max(1, min(6, budget))))
        budget //= factors[slot]
    return tuple(factors[:n]), tuple(factors[n:])


def gaussian(shape, seed: int, dtype=np.float64, backend: str = "numpy"):
    """A seeded Gaussian matrix as a numpy array or a torch tensor."""
    array = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(array)
    return array


def to_numpy64(x) -> np.ndarray:
    """Any array as a float64 numpy array (errors are compared in float64)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_error(approx, exact) -> float:
    a, e = to_numpy64(approx), to_numpy64(exact)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


def adamw_losses(model, ids, steps: int = 8, **options) -> list[float]:
    """The loss before each of ``steps`` AdamW steps (lr 1e-2, other ``options`` as given)
    on the one batch ``ids``, a causal LM predicting its own tokens."""
    import torch

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, **options)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def byte_tokenizer(*, bos: bool = True, adds_bos: bool = False):
    """One token per UTF-8 byte plus <s>, </s>, <pad>, built offline; ``bos=False``: no <s>
    token; ``adds_bos``: it prepends <s> itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    if adds_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", vocab["<s>"])]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>" if bos else None,
        eos_token="</s>",
        pad_token="<pad>",
    )


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A local transformers folder: a 2-layer LLaMA (hidden 64) and a byte-level tokenizer."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = byte_tokenizer()
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny_lm")
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def instruction_data(tmp_path_factory):
    """(train.json, test.json): a true/false task in the LLM-Adapters format, 48 + 8 records."""
    import json

    def record(a: int, b: int) -> dict:
        answer = "true" if a > b else "false"
        return {
            "instruction": f"Is {a} greater than {b}? Answer true or false.",
            "input": "",
            "output": f"the correct answer is {answer}",
            "answer": answer,
        }

    pairs = [(a, (a * 7 + 3) % 50) for a in range(56)]
    folder = tmp_path_factory.mktemp("data")
    (folder / "train.json").write_text(json.dumps([record(a, b) for a, b in pairs[:48]]))
    (folder / "test.json").write_text(json.dumps([record(a, b) for a, b in pairs[48:]]))
    return folder / "train.json", folder / "test.json"
