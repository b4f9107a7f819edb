"""mpo.demo.tasks: the demo's synthetic fine-tuning tasks in LLM-Adapters' record format."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from mpo.demo.tasks import TASKS, make_dataset, make_task, write_dataset
from mpo.errors import MPOError

N = 240  # a multiple of 2, 3 and 4: every label cycle is complete

GOLD = {
    "compare": re.compile(r"true|false"),
    "fill_blank": re.compile(r"option[12]"),
    "multiple_choice": re.compile(r"answer[1-4]"),
    "word_problem": re.compile(r"\d+"),
}

# What fill_blank's sentences mean, written out independently of the generator:
# the adjectives that give the first-named thing more of the quality, and the
# consequences that follow from having more of it.
MORE = {"heavier", "bigger", "more expensive", "faster", "hotter", "older", "taller"}
LESS = {"lighter", "smaller", "cheaper", "slower", "colder", "younger", "shorter"}
FROM_MORE = {
    "is harder to lift",
    "needs more space",
    "is harder to afford",
    "arrives first",
    "takes longer to cool down",
    "was born first",
    "can reach the top shelf",
}
FROM_LESS = {
    "is easier to lift",
    "fits in a small room",
    "is easier to afford",
    "arrives last",
    "is ready sooner",
    "was born later",
    "needs a ladder for the top shelf",
}


def solve_compare(text: str) -> str:
    facts = re.search(
        r"Passage: (\w+) has (\d+) (\w+) and (\w+) has (\d+) \3\. "
        r"Question: does (\w+) have (more|fewer) \3 than (\w+)\?",
        text,
    )
    assert facts, text
    counts = {facts[1]: int(facts[2]), facts[4]: int(facts[5])}
    subject, relation, other = facts[6], facts[7], facts[8]
    assert {subject, other} == set(counts)
    more = counts[subject] > counts[other]
    return "true" if more == (relation == "more") else "false"


def solve_fill_blank(text: str) -> str:
    sentence = re.search(
        r"sentence: (?:The )?(.+?) is (.+?) than (?:the )?(.+?), so (?:the )?_ (.+?)\. "
        r"Option1: (?:the )?(.+?) Option2: (?:the )?(.+?) Answer format",
        text,
    )
    assert sentence, text
    first, adjective, second, consequence, option1, option2 = sentence.groups()
    assert adjective in MORE | LESS, text
    assert consequence in FROM_MORE | FROM_LESS, text
    assert {option1, option2} == {first, second}, text
    answer = first if (adjective in MORE) == (consequence in FROM_MORE) else second
    return "option1" if answer == option1 else "option2"


def solve_multiple_choice(text: str) -> str:
    kind = re.search(r"which number is (?:the )?(largest|smallest|even|odd)\?", text)[1]
    numbers = [int(n) for n in re.findall(r"Answer[1-4]: (\d+)", text)]
    assert len(numbers) == len(set(numbers)) == 4
    fits = {
        "largest": [n == max(numbers) for n in numbers],
        "smallest": [n == min(numbers) for n in numbers],
        "even": [n % 2 == 0 for n in numbers],
        "odd": [n % 2 == 1 for n in numbers],
    }[kind]
    assert fits.count(True) == 1, text  # exactly one right answer
    return f"answer{fits.index(True) + 1}"


def solve_word_problem(text: str) -> str:
    numbers = [int(n) for n in re.findall(r"\d+", text)]
    assert len(numbers) == 2, text
    x, y = numbers
    if "more" in text:
        return str(x + y)
    if "left" in text:
        assert y < x
        return str(x - y)
    assert "Each box holds" in text
    return str(x * y)


def task_of(record: dict) -> str:
    (name,) = [name for name, gold in GOLD.items() if gold.fullmatch(record["answer"])]
    return name


SOLVERS = {
    "compare": solve_compare,
    "fill_blank": solve_fill_blank,
    "multiple_choice": solve_multiple_choice,
    "word_problem": solve_word_problem,
}


@pytest.fixture(scope="module")
def records() -> dict[str, list[dict]]:
    return {name: make_task(name, N, seed=0) for name in TASKS}


def test_the_tasks_are_the_four_benchmark_stand_ins():
    assert TASKS == ("compare", "fill_blank", "multiple_choice", "word_problem")


def test_same_seed_same_records_other_seed_other_records():
    for name in TASKS:
        assert make_task(name, 20, seed=3) == make_task(name, 20, seed=3)
        assert make_task(name, 20, seed=3) != make_task(name, 20, seed=4)
    assert make_dataset(12, 4, seed=5) == make_dataset(12, 4, seed=5)
    assert make_dataset(12, 4, seed=5) != make_dataset(12, 4, seed=6)


def test_every_record_has_the_fields_and_a_gold_answer_of_its_form(records):
    for name, task in records.items():
        assert len(task) == N
        for record in task:
            assert set(record) == {"instruction", "input", "output", "answer"}
            assert all(isinstance(value, str) for value in record.values())
            assert record["input"] == ""
            assert GOLD[name].fullmatch(record["answer"]), record


def test_the_gold_answer_is_correct(records):
    for name, task in records.items():
        for record in task:
            assert SOLVERS[name](record["instruction"]) == record["answer"], record


def test_fill_blank_uses_every_comparative_both_ways(records):
    adjectives = {re.search(r" is (.+?) than ", r["instruction"])[1] for r in records["fill_blank"]}
    assert adjectives == MORE | LESS


def test_the_output_states_the_gold_answer(records):
    for name, task in records.items():
        for record in task:
            if name == "word_problem":
                assert record["output"].endswith(f"The answer is {record['answer']}")
                assert re.findall(r"\d+", record["output"])[-1] == record["answer"]
            else:
                assert record["output"] == f"the correct answer is {record['answer']}"


def test_the_reasoning_of_a_word_problem_is_right(records):
    for record in records["word_problem"]:
        x, op, y, result = re.search(r"(\d+) ([-+*]) (\d+) = (\d+)", record["output"]).groups()
        value = {"+": int(x) + int(y), "-": int(x) - int(y), "*": int(x) * int(y)}[op]
        assert value == int(result) == int(record["answer"])


def test_labels_are_balanced(records):
    for name in ("compare", "fill_blank", "multiple_choice"):
        counts = Counter(record["answer"] for record in records[name])
        assert len(set(counts.values())) == 1, counts
    operations = Counter(re.search(r" ([-+*]) ", r["output"])[1] for r in records["word_problem"])
    assert operations == {"+": N // 3, "-": N // 3, "*": N // 3}


def test_labels_are_balanced_to_within_one_for_any_size():
    for name in ("compare", "multiple_choice"):
        counts = Counter(record["answer"] for record in make_task(name, 37, seed=2))
        assert max(counts.values()) - min(counts.values()) <= 1


def test_the_questions_of_a_task_are_distinct(records):
    for task in records.values():
        assert len({(r["instruction"], r["input"]) for r in task}) == len(task)


def test_train_mixes_the_tasks_evenly_and_test_is_per_task():
    train, test = make_dataset(402, 30, seed=0)
    assert len(train) == 402
    assert set(test) == set(TASKS)
    assert all(len(records) == 30 for records in test.values())
    per_task = Counter(task_of(record) for record in train)
    assert sorted(per_task.values()) == [100, 100, 101, 101]
    for name, records in test.items():
        if name != "word_problem":
            counts = Counter(record["answer"] for record in records)
            assert max(counts.values()) - min(counts.values()) <= 1


def test_train_is_shuffled_across_tasks():
    train, _ = make_dataset(400, 0, seed=0)
    first_words = [record["instruction"][:20] for record in train[:40]]
    assert len(set(first_words)) > 1


def test_train_and_test_share_no_question():
    train, test = make_dataset(800, 100, seed=0)
    seen = {(r["instruction"], r["input"]) for r in train}
    for records in test.values():
        assert not seen & {(r["instruction"], r["input"]) for r in records}


def test_write_dataset_writes_train_and_one_test_file_per_task(tmp_path):
    paths = write_dataset(tmp_path / "data", 40, 8, seed=1)
    train, test = make_dataset(40, 8, seed=1)
    assert paths == [tmp_path / "data" / "train.json"] + [
        tmp_path / "data" / "test" / f"{name}.json" for name in TASKS
    ]
    assert json.loads(paths[0].read_text()) == train
    for name in TASKS:
        assert json.loads((tmp_path / "data" / "test" / f"{name}.json").read_text()) == test[name]
    leftovers = [p.name for p in (tmp_path / "data").rglob(".*")]
    assert not leftovers  # temporary files were renamed into place
    assert paths[0].read_text().startswith("[\n  {")  # indented


def test_unknown_task_is_an_error():
    with pytest.raises(MPOError, match="unknown task 'boolq'; the tasks are compare, fill_blank"):
        make_task("boolq", 4)


@pytest.mark.parametrize("n", [-1, 2.5, True])
def test_bad_sizes_are_errors(n):
    with pytest.raises(MPOError, match="non-negative integer"):
        make_task("compare", n)
    with pytest.raises(MPOError, match="non-negative integers"):
        make_dataset(n, 4)


def test_asking_for_more_questions_than_exist_is_an_error():
    with pytest.raises(MPOError, match="ran out of distinct questions"):
        make_task("fill_blank", 20_000)
