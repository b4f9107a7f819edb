"""The demo's fine-tuning tasks: small synthetic stand-ins for the paper's benchmarks.

Each task is generated from a seed and written in the record format of
LLM-Adapters (the paper's Commonsense-170K and math data): a dict with
``instruction`` (the whole question, answer format included), ``input``
(always ``""``), ``output`` (the target text) and ``answer`` (the gold
answer, from which the evaluation infers how to read a generation). Every
question carries the facts that decide it, so none needs knowledge the
model lacks:

* ``compare`` (like BoolQ, ``true``/``false``): two people's counts of
  something; does one have more (or fewer) than the other?
* ``fill_blank`` (like WinoGrande, ``option1``/``option2``): a sentence
  compares two things and a consequence follows; which one fills the blank?
  The answer flips with the comparative *and* with the consequence.
* ``multiple_choice`` (like ARC, ``answer1``..``answer4``): which of four
  numbers is the largest, the smallest, the even or the odd one?
* ``word_problem`` (like GSM8K, a number): one addition, subtraction or
  multiplication in a sentence; the output shows the step and ends
  ``The answer is N``.

Labels are balanced: the gold labels of a task (and the operations of
``word_problem``) cycle through their values, so ``n`` records hold each
``n / k`` times, give or take one. No two records of a task share their
``instruction`` and ``input``, which is what keeps a test set apart from
the training set.

>>> record = make_task("compare", 1, seed=0)[0]
>>> sorted(record)
['answer', 'input', 'instruction', 'output']
>>> record["output"] == f"the correct answer is {record['answer']}"
True
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from pathlib import Path

from mpo.atomic import write_json
from mpo.errors import MPOError

__all__ = ["TASKS", "make_dataset", "make_task", "write_dataset"]

Record = dict[str, str]

_NAMES = (
    "Anna", "Ben", "Tom", "Sara", "Maria", "David", "Lucy", "Peter", "Emma", "Jack",
    "Paul", "Alice", "John", "Kate", "Mark", "Laura",
)  # fmt: skip
_OBJECTS = (
    "apples", "books", "pens", "coins", "cards", "stamps", "cups", "keys", "shells",
    "letters", "pencils", "boxes", "flowers", "marbles",
)  # fmt: skip
_THINGS = (
    "box", "bag", "table", "chair", "suitcase", "basket", "bucket", "parcel", "lamp",
    "bottle", "desk", "crate",
)  # fmt: skip

#: ``fill_blank``'s comparisons: (nouns, "more" adjective, "less" adjective,
#: consequence of having more, consequence of having less).
_COMPARISONS: tuple[tuple[tuple[str, ...], str, str, str, str], ...] = (
    (_THINGS, "heavier", "lighter", "is harder to lift", "is easier to lift"),
    (_THINGS, "bigger", "smaller", "needs more space", "fits in a small room"),
    (_THINGS, "more expensive", "cheaper", "is harder to afford", "is easier to afford"),
    (
        ("car", "bus", "train", "bike", "boat", "horse", "truck", "ship"),
        "faster",
        "slower",
        "arrives first",
        "arrives last",
    ),
    (
        ("tea", "soup", "water", "coffee", "milk", "bath"),
        "hotter",
        "colder",
        "takes longer to cool down",
        "is ready sooner",
    ),
    (_NAMES, "older", "younger", "was born first", "was born later"),
    (_NAMES, "taller", "shorter", "can reach the top shelf", "needs a ladder for the top shelf"),
)


def _choice_record(instruction: str, label: str) -> Record:
    return {
        "instruction": instruction,
        "input": "",
        "output": f"the correct answer is {label}",
        "answer": label,
    }


def _compare(rng: random.Random, label: str) -> Record:
    first, second = rng.sample(_NAMES, 2)
    objects = rng.choice(_OBJECTS)
    counts = dict(zip((first, second), rng.sample(range(1, 100), 2), strict=True))
    subject, other = rng.sample((first, second), 2)
    relation = rng.choice(("more", "fewer"))
    # the label is decided first: pick the relation that makes it come true
    holds = (counts[subject] > counts[other]) == (relation == "more")
    if holds != (label == "true"):
        relation = "fewer" if relation == "more" else "more"
    instruction = (
        "Please answer the following question with true or false. "
        f"Passage: {first} has {counts[first]} {objects} and {second} has {counts[second]} "
        f"{objects}. Question: does {subject} have {relation} {objects} than {other}? "
        "Answer format: true/false"
    )
    return _choice_record(instruction, label)


def _fill_blank(rng: random.Random, label: str) -> Record:
    nouns, more, less, more_consequence, less_consequence = rng.choice(_COMPARISONS)
    a, b = rng.sample(nouns, 2)
    a_has_more = rng.random() < 0.5
    consequence_of_more = rng.random() < 0.5
    answer = a if a_has_more == consequence_of_more else b
    other = b if answer == a else a
    options = (answer, other) if label == "option1" else (other, answer)
    the = "" if nouns is _NAMES else "the "
    sentence = (
        f"{the}{a} is {more if a_has_more else less} than {the}{b}, "
        f"so {the}_ {more_consequence if consequence_of_more else less_consequence}."
    )
    sentence = sentence[0].upper() + sentence[1:]
    instruction = (
        "Please choose the correct answer to fill in the blank to complete the given sentence: "
        f"{sentence} Option1: {the}{options[0]} Option2: {the}{options[1]} "
        "Answer format: option1/option2"
    )
    return _choice_record(instruction, label)


def _multiple_choice(rng: random.Random, label: str) -> Record:
    kind = rng.choice(("largest", "smallest", "even", "odd"))
    if kind in ("largest", "smallest"):
        numbers = rng.sample(range(1, 100), 4)
        correct = max(numbers) if kind == "largest" else min(numbers)
        numbers.remove(correct)
        what = f"is the {kind}"
    else:  # one number of the asked parity, three of the other
        parity = 0 if kind == "even" else 1
        correct = rng.randrange(2 - parity, 100, 2)
        numbers = rng.sample(range(1 + parity, 100, 2), 3)
        what = f"is {kind}"
    numbers.insert(int(label.removeprefix("answer")) - 1, correct)
    choices = " ".join(f"Answer{i}: {n}" for i, n in enumerate(numbers, 1))
    instruction = (
        f"Please choose the correct answer to the question: which number {what}? {choices} "
        "Answer format: answer1/answer2/answer3/answer4"
    )
    return _choice_record(instruction, label)


def _word_problem(rng: random.Random, operation: str) -> Record:
    name, friend = rng.sample(_NAMES, 2)
    objects = rng.choice([o for o in _OBJECTS if o != "boxes"])
    if operation == "+":
        x, y = rng.randint(2, 49), rng.randint(2, 49)
        result = x + y
        question = (
            f"{name} has {x} {objects}. {friend} gives {name} {y} more {objects}. "
            f"How many {objects} does {name} have now?"
        )
        steps = f"{name} has {x} + {y} = {result} {objects} now."
    elif operation == "-":
        x = rng.randint(10, 99)
        y = rng.randint(1, x - 1)
        result = x - y
        question = (
            f"{name} has {x} {objects}. {name} gives {y} {objects} to {friend}. "
            f"How many {objects} does {name} have left?"
        )
        steps = f"{name} has {x} - {y} = {result} {objects} left."
    else:
        x, y = rng.randint(2, 9), rng.randint(2, 9)
        result = x * y
        question = (
            f"{name} buys {x} boxes of {objects}. Each box holds {y} {objects}. "
            f"How many {objects} does {name} buy?"
        )
        steps = f"{name} buys {x} * {y} = {result} {objects}."
    return {
        "instruction": f"Please solve the following problem. {question}",
        "input": "",
        "output": f"{steps} The answer is {result}",
        "answer": str(result),
    }


#: Each task's generator and the values its records cycle through.
_TASKS: dict[str, tuple[Callable[[random.Random, str], Record], tuple[str, ...]]] = {
    "compare": (_compare, ("true", "false")),
    "fill_blank": (_fill_blank, ("option1", "option2")),
    "multiple_choice": (_multiple_choice, ("answer1", "answer2", "answer3", "answer4")),
    "word_problem": (_word_problem, ("+", "-", "*")),
}

#: The task names, in the order the demo reports them.
TASKS: tuple[str, ...] = tuple(_TASKS)

# Draws allowed per record before a task counts as exhausted (all its questions taken).
_MAX_DRAWS = 1000


def _generate(name: str, n: int, seed: int) -> list[Record]:
    """``n`` distinct records in label-cycling order: any slice of k in a row is balanced."""
    if name not in _TASKS:
        raise MPOError(f"unknown task {name!r}; the tasks are {', '.join(TASKS)}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise MPOError(f"the number of records must be a non-negative integer, got {n!r}")
    generate, cycle = _TASKS[name]
    rng = random.Random(f"{seed}:{name}")  # a string seed is stable across runs and platforms
    records: list[Record] = []
    seen: set[tuple[str, str]] = set()
    for i in range(n):
        for _ in range(_MAX_DRAWS):
            record = generate(rng, cycle[i % len(cycle)])
            key = (record["instruction"], record["input"])
            if key not in seen:
                break
        else:
            raise MPOError(
                f"task {name!r} ran out of distinct questions after {i} records; ask for fewer"
            )
        seen.add(key)
        records.append(record)
    return records


def make_task(name: str, n: int, seed: int = 0) -> list[Record]:
    """``n`` distinct records of the task ``name``, shuffled, labels balanced.

    >>> [r["answer"] for r in make_task("fill_blank", 4, seed=1)].count("option1")
    2
    """
    records = _generate(name, n, seed)
    random.Random(f"{seed}:{name}:order").shuffle(records)
    return records


def make_dataset(
    n_train: int, n_test: int, seed: int = 0
) -> tuple[list[Record], dict[str, list[Record]]]:
    """A training set mixing all tasks, and a test set per task that it never shows.

    ``n_train`` records in all, split as evenly as possible over :data:`TASKS`
    and shuffled together; ``n_test`` records per task. Within each task the
    test and training records are distinct questions (no shared
    ``instruction`` and ``input``), and both are balanced.

    >>> train, test = make_dataset(8, 2, seed=0)
    >>> len(train), {name: len(records) for name, records in test.items()}
    (8, {'compare': 2, 'fill_blank': 2, 'multiple_choice': 2, 'word_problem': 2})
    """
    if not all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (n_train, n_test)
    ):
        raise MPOError(
            f"n_train and n_test must be non-negative integers, got {n_train!r} and {n_test!r}"
        )
    train: list[Record] = []
    test: dict[str, list[Record]] = {}
    for index, name in enumerate(TASKS):
        share = n_train // len(TASKS) + (index < n_train % len(TASKS))
        # labels cycle in generation order, so both slices stay balanced to within one
        records = _generate(name, n_test + share, seed)
        test[name] = records[:n_test]
        random.Random(f"{seed}:{name}:test").shuffle(test[name])
        train.extend(records[n_test:])
    random.Random(f"{seed}:train").shuffle(train)
    return train, test


def write_dataset(
    out_dir: str | os.PathLike[str], n_train: int, n_test: int, seed: int = 0
) -> list[Path]:
    """Write :func:`make_dataset` as ``train.json`` and ``test/<task>.json`` under ``out_dir``.

    Each file is a JSON list of records, written to a temporary sibling and
    renamed into place. Returns the paths written, ``train.json`` first.
    """
    train, test = make_dataset(n_train, n_test, seed)
    folder = Path(out_dir)
    (folder / "test").mkdir(parents=True, exist_ok=True)
    paths = [folder / "train.json"]
    write_json(paths[0], train)
    for name, records in test.items():
        paths.append(folder / "test" / f"{name}.json")
        write_json(paths[-1], records)
    return paths
