"""Instruction records: loading and validating LLM-Adapters JSON/JSONL files, the Alpaca
prompt, tokenized examples with the loss on the response only, the validation split and
padded batches. Tokenizers are tiny byte-level ones built here (no downloads)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from conftest import byte_tokenizer  # noqa: E402

from mpo.errors import MPOError  # noqa: E402
from mpo.finetune.data import (  # noqa: E402
    Example,
    Record,
    collate,
    encode,
    encode_prompts,
    load_records,
    prompt,
    split,
)


def write_json(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def write_jsonl(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("\n".join(lines))
    return path


BOOLQ = {"instruction": "Is the sky blue?", "input": "", "output": "the answer is true"}
GSM8K = {"instruction": "What is 6 * 7?", "input": "", "output": "", "answer": "42"}


# Records


def test_from_dict_reads_the_llm_adapters_fields():
    record = Record.from_dict({**BOOLQ, "answer": "true", "id": 7})
    assert record == Record("Is the sky blue?", "", "the answer is true", "true")


def test_response_is_output_or_else_answer():
    assert Record.from_dict(BOOLQ).response == "the answer is true"
    assert Record.from_dict(GSM8K).response == "42"


def test_a_json_number_answer_is_kept_as_its_text():
    assert Record.from_dict({**GSM8K, "answer": 42}).answer == "42"
    assert Record.from_dict({**GSM8K, "answer": 2.5}).answer == "2.5"


def test_a_missing_or_null_input_is_empty():
    assert Record.from_dict({"instruction": "x", "output": "y", "input": None}).input == ""
    assert Record.from_dict({"instruction": "x", "output": "y"}).input == ""


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"output": "y"}, "missing 'instruction'"),
        ({"instruction": "x"}, "neither 'output' nor 'answer'"),
        ({"instruction": "x", "output": "", "answer": ""}, "neither 'output' nor 'answer'"),
        ({"instruction": 3, "output": "y"}, "'instruction' must be a string, got int"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, "'input' must be a string"),
        ({"instruction": "x", "output": {"a": 1}}, "'output' must be a string, got dict"),
        ({"instruction": "x", "answer": True}, "JSON boolean"),
        (["x", "y"], "expected a JSON object"),
    ],
)
def test_from_dict_rejects_bad_records_naming_where(data, message):
    with pytest.raises(MPOError, match=message) as error:
        Record.from_dict(data, "train.json record at index 4")
    assert str(error.value).startswith("train.json record at index 4: ")


def test_the_constructor_validates_too():
    with pytest.raises(MPOError, match="'answer' must be a string"):
        Record("x", answer=42)


# Loading files


def test_load_records_reads_a_json_list_in_order(tmp_path):
    path = write_json(tmp_path, "data.json", [BOOLQ, GSM8K])
    assert [r.instruction for r in load_records(path)] == ["Is the sky blue?", "What is 6 * 7?"]


def test_load_records_reads_jsonl_skipping_blank_lines(tmp_path):
    path = write_jsonl(tmp_path, "data.jsonl", [json.dumps(BOOLQ), "", "  ", json.dumps(GSM8K), ""])
    assert [r.response for r in load_records(path)] == ["the answer is true", "42"]


def test_jsonl_records_may_hold_unicode_line_separators(tmp_path):
    record = {"instruction": "a\u2028b\u0085c", "output": "x"}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\r\n", encoding="utf-8")
    assert load_records(path) == [Record("a\u2028b\u0085c", output="x")]


def test_a_bad_jsonl_line_is_named_by_number(tmp_path):
    path = write_jsonl(tmp_path, "data.jsonl", [json.dumps(BOOLQ), "", "{not json"])
    with pytest.raises(MPOError, match=r"data.jsonl line 3: not valid JSON"):
        load_records(path)


def test_a_bad_jsonl_record_is_named_by_line(tmp_path):
    path = write_jsonl(tmp_path, "data.jsonl", [json.dumps(BOOLQ), json.dumps({"input": "x"})])
    with pytest.raises(MPOError, match=r"data.jsonl line 2: missing 'instruction'"):
        load_records(path)


def test_a_bad_json_record_is_named_by_index(tmp_path):
    path = write_json(tmp_path, "data.json", [BOOLQ, BOOLQ, {"instruction": "x"}])
    with pytest.raises(MPOError, match=r"data.json record at index 2: has neither"):
        load_records(path)


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n{"instruction": "x",\n}]')
    with pytest.raises(MPOError, match=r"data.json: not valid JSON .* line 3"):
        load_records(path)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.json", "", "the file is empty"),
        ("blank.jsonl", "\n\n  \n", "the file is empty"),
        ("none.json", "[]", "the list is empty"),
        ("object.json", json.dumps(BOOLQ), "expected a JSON list of record objects, got a dict"),
        ("records.csv", "instruction,output", "expected a .json or .jsonl file"),
    ],
)
def test_load_records_rejects_files_without_records(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(MPOError, match=message):
        load_records(path)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(MPOError, match=r"nope.json: no such file"):
        load_records(tmp_path / "nope.json")


# Prompts


def test_prompt_without_input_is_the_alpaca_template():
    assert prompt(Record("Add 2 and 3.", output="5")) == (
        "Below is an instruction that describes a task. Write a response that appropriately "
        "completes the request.\n\n### Instruction:\nAdd 2 and 3.\n\n### Response:\n"
    )


def test_prompt_with_input_is_the_alpaca_template():
    assert prompt(Record("Translate.", "chat", output="cat")) == (
        "Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nTranslate.\n\n### Input:\nchat\n\n### Response:\n"
    )


# Encoding


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("adds_bos", [False, True])
def test_an_example_is_bos_prompt_response_eos(adds_bos):
    tokenizer = byte_tokenizer(adds_bos=adds_bos)
    record = Record("Is the sky blue?", output="true")
    (example,) = encode([record], tokenizer, max_length=1000)
    prompt_ids = [tokenizer.bos_token_id, *ids(tokenizer, prompt(record))]
    target = [*ids(tokenizer, "true"), tokenizer.eos_token_id]
    assert example.input_ids == prompt_ids + target
    assert example.labels == [-100] * len(prompt_ids) + target


def test_no_bos_when_the_tokenizer_has_none():
    tokenizer = byte_tokenizer(bos=False)
    record = Record("Q", output="A")
    (example,) = encode([record], tokenizer, max_length=1000)
    assert example.input_ids[0] == ids(tokenizer, prompt(record))[0]


def test_the_supervised_tokens_decode_to_the_response():
    tokenizer = byte_tokenizer()
    (example,) = encode([Record("Q", output="Ünïcode answer: 42")], tokenizer, 1000)
    target = [t for t in example.labels if t != -100]
    assert tokenizer.decode(target, skip_special_tokens=True) == "Ünïcode answer: 42"


def test_encode_prompts_matches_the_prompt_part_of_an_example():
    tokenizer = byte_tokenizer(adds_bos=True)
    record = Record("Q", "context", output="A")
    (example,) = encode([record], tokenizer, 1000)
    (prompt_ids,) = encode_prompts(tokenizer, [prompt(record)])
    assert example.input_ids[: len(prompt_ids)] == prompt_ids
    assert example.labels[len(prompt_ids)] != -100


def test_a_long_response_is_cut_from_the_right():
    tokenizer = byte_tokenizer()
    record = Record("Q", output="x" * 50)
    (full,) = encode([record], tokenizer, 1000)
    (cut,) = encode([record], tokenizer, len(full.input_ids) - 10)
    assert cut.input_ids == full.input_ids[:-10]
    assert cut.labels == full.labels[:-10]
    assert tokenizer.eos_token_id not in cut.input_ids


def test_records_whose_prompt_fills_max_length_are_skipped_with_a_warning():
    tokenizer = byte_tokenizer()
    short, long = Record("Q", output="A"), Record("Q" * 300, output="A")
    limit = len(encode_prompts(tokenizer, [prompt(long)])[0])
    with pytest.warns(UserWarning, match="1 of 3 records skipped"):
        examples = encode([short, long, short], tokenizer, max_length=limit)
    assert len(examples) == 2
    assert all(any(t != -100 for t in e.labels) for e in examples)


def test_all_prompts_too_long_is_an_error():
    with pytest.raises(MPOError, match="raise max_length"):
        encode([Record("Q", output="A")], byte_tokenizer(), max_length=10)


def test_encode_needs_an_eos_token():
    tokenizer = byte_tokenizer()
    tokenizer.eos_token = None
    with pytest.raises(MPOError, match="no eos_token"):
        encode([Record("Q", output="A")], tokenizer, 100)


# Splitting


def records(n):
    return [Record(str(i), answer="1") for i in range(n)]


@pytest.mark.parametrize(("n", "val"), [(2, 1), (19, 1), (100, 10), (5000, 500), (20000, 1200)])
def test_the_validation_size_is_capped_at_a_tenth(n, val):
    train, validation = split(records(n))
    assert (len(train), len(validation)) == (n - val, val)


def test_split_is_a_seeded_partition():
    data = records(100)
    train, val = split(data, val_size=30, seed=3)
    assert sorted(train + val, key=lambda r: int(r.instruction)) == data
    assert split(data, val_size=30, seed=3) == (train, val)
    assert split(data, val_size=30, seed=4) != (train, val)


def test_split_needs_two_records():
    with pytest.raises(MPOError, match="at least 2 records"):
        split(records(1))


# Collating


def test_collate_pads_on_the_right():
    batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([5], [5])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [5, -100, -100]]
    assert all(t.dtype == torch.long for t in batch.values())
