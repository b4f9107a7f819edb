"""Evaluation by greedy generation: accuracy and its per-task average computed exactly
from fixed continuations, gold answers checked up front, task files loaded by stem, and
batched left-padded generation on a tiny LLaMA equal to one prompt at a time."""

from __future__ import annotations

import importlib
import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from conftest import byte_tokenizer  # noqa: E402

from mpo.errors import MPOError  # noqa: E402
from mpo.finetune.data import Record, prompt  # noqa: E402

# By import path: the package may also export a function named `evaluate`.
module = importlib.import_module("mpo.finetune.evaluate")


@pytest.fixture
def continuations(monkeypatch):
    """Replaces generation by a lookup: each prompt's instruction -> its fixed continuation."""
    table: dict[str, str] = {}

    def fake_generate(model, tokenizer, prompts, **options):
        return [
            next(v for k, v in table.items() if prompt(Record(k, answer="1")) == p) for p in prompts
        ]

    monkeypatch.setattr(module, "generate", fake_generate)
    return table


def records(*pairs):
    return [Record(instruction, answer=gold) for instruction, gold in pairs]


def test_accuracy_is_the_fraction_answered_correctly(continuations):
    continuations.update(
        {"q1": "the correct answer is answer3", "q2": "answer1", "q3": "no idea", "q4": "answer2"}
    )
    tasks = {
        "arc": records(("q1", "answer3"), ("q2", "answer2"), ("q3", "answer1"), ("q4", "answer2"))
    }
    report = module.evaluate(None, None, tasks)
    assert report.accuracy == {"arc": 0.5}
    assert [p.correct for p in report.tasks[0].predictions] == [True, False, False, True]
    assert [p.extracted for p in report.tasks[0].predictions] == [
        "answer3",
        "answer1",
        None,
        "answer2",
    ]


def test_the_average_is_the_mean_of_task_accuracies_not_of_samples(continuations):
    continuations.update(
        {"a": "true", "b": "The answer is 7", "c": "The answer is 8", "d": "The answer is 9"}
    )
    tasks = {"boolq": records(("a", "true")), "gsm8k": records(("b", "7"), ("c", "0"), ("d", "0"))}
    report = module.evaluate(None, None, tasks)
    assert report.accuracy == {"boolq": 1.0, "gsm8k": pytest.approx(1 / 3)}
    assert report.average == pytest.approx((1 + 1 / 3) / 2)


def test_to_json_holds_counts_average_and_predictions(continuations):
    continuations.update({"a": "option2", "b": "option2"})
    report = module.evaluate(
        None, None, {"winogrande": records(("a", "option2"), ("b", "option1"))}
    )
    data = json.loads(json.dumps(report.to_json()))
    assert data["tasks"] == {"winogrande": {"n": 2, "correct": 1, "accuracy": 0.5}}
    assert data["average"] == 0.5
    assert data["predictions"]["winogrande"][1] == {
        "generated": "option2",
        "extracted": "option2",
        "gold": "option1",
        "correct": False,
    }


def test_table_has_a_row_per_task_and_an_average_row(continuations):
    continuations.update({"a": "ending1", "b": "false"})
    report = module.evaluate(
        None, None, {"hellaswag": records(("a", "ending1")), "boolq": records(("b", "true"))}
    )
    assert report.table().splitlines() == [
        "task       n  accuracy (%)",
        "hellaswag  1        100.00",
        "boolq      1          0.00",
        "average    2         50.00",
    ]


def test_a_record_without_gold_answer_is_named_before_generating(continuations):
    tasks = {
        "boolq": records(("a", "true")),
        "piqa": [Record("a", answer="solution1"), Record("b", output="x")],
    }
    with pytest.raises(MPOError, match=r"task 'piqa', record at index 1: no gold 'answer'"):
        module.evaluate(None, None, tasks)


def test_a_gold_answer_in_no_format_is_named_with_its_task(continuations):
    with pytest.raises(MPOError, match=r"task 'aqua', record at index 0: gold answer 'C'"):
        module.evaluate(None, None, {"aqua": records(("a", "C"))})


def test_empty_tasks_are_errors(continuations):
    with pytest.raises(MPOError, match="no tasks"):
        module.evaluate(None, None, {})
    with pytest.raises(MPOError, match="task 'boolq' has no records"):
        module.evaluate(None, None, {"boolq": []})


def test_load_tasks_names_each_task_by_its_file_stem(tmp_path):
    (tmp_path / "boolq.json").write_text(json.dumps([{"instruction": "a", "answer": "true"}]))
    (tmp_path / "gsm8k.jsonl").write_text(json.dumps({"instruction": "b", "answer": "4"}))
    tasks = module.load_tasks([tmp_path / "gsm8k.jsonl", tmp_path / "boolq.json"])
    assert list(tasks) == ["gsm8k", "boolq"]
    assert tasks["boolq"] == [Record("a", answer="true")]


def test_load_tasks_rejects_two_files_with_one_stem(tmp_path):
    for name in ("a/boolq.json", "b/boolq.json"):
        (tmp_path / name).parent.mkdir()
        (tmp_path / name).write_text(json.dumps([{"instruction": "a", "answer": "true"}]))
    with pytest.raises(MPOError, match="would both be task 'boolq'"):
        module.load_tasks([tmp_path / "a/boolq.json", tmp_path / "b/boolq.json"])


# Real generation on a tiny LLaMA


@pytest.fixture(scope="module")
def tiny():
    tokenizer = byte_tokenizer()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # Large weights make each continuation depend on its prompt, so padding errors show.
        initializer_range=0.5,
    )
    return transformers.LlamaForCausalLM(config).float(), tokenizer


PROMPTS = [
    prompt(Record(q, answer="1")) for q in ("Is it?", "What is 12 + 30, exactly?", "Why", "x" * 40)
]


def test_generate_returns_one_string_per_prompt(tiny):
    model, tokenizer = tiny
    texts = module.generate(model, tokenizer, PROMPTS, batch_size=3, max_new_tokens=6)
    assert len(texts) == len(PROMPTS)
    assert all(isinstance(t, str) for t in texts)


def test_batched_generation_equals_one_prompt_at_a_time(tiny):
    model, tokenizer = tiny
    batched = module.generate(model, tokenizer, PROMPTS, batch_size=4, max_new_tokens=8)
    single = module.generate(model, tokenizer, PROMPTS, batch_size=1, max_new_tokens=8)
    assert batched == single
    assert any(batched)


def test_generate_leaves_the_tokenizer_and_model_mode_as_they_were(tiny):
    model, tokenizer = tiny
    model.train()
    module.generate(model, tokenizer, PROMPTS[:2], batch_size=2, max_new_tokens=2, progress=True)
    assert tokenizer.padding_side == "right"
    assert model.training
    model.eval()
    module.generate(model, tokenizer, PROMPTS[:1], max_new_tokens=2)
    assert not model.training


def test_generate_pads_with_eos_when_there_is_no_pad_token(tiny):
    model, tokenizer = tiny
    expected = module.generate(model, tokenizer, PROMPTS, batch_size=1, max_new_tokens=4)
    no_pad = byte_tokenizer()
    no_pad.pad_token = None
    assert module.generate(model, no_pad, PROMPTS, batch_size=4, max_new_tokens=4) == expected
