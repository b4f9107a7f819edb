"""Answer extraction and scoring as LLM-Adapters does it: the format comes from the gold
answer, a choice is its first label in the response, a number the last number."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mpo.errors import MPOError
from mpo.finetune.answers import FORMATS, answer_format, extract, is_correct


@pytest.mark.parametrize(
    ("gold", "fmt"),
    [
        ("true", "true/false"),
        ("False", "true/false"),
        ("solution2", "solution"),
        ("answer1", "answer"),
        ("answer5", "answer"),
        ("ending4", "ending"),
        ("option1", "option"),
        ("42", "number"),
        ("-3.5", "number"),
        ("1,250", "number"),
        (" 18.0 ", "number"),
    ],
)
def test_the_format_is_read_from_the_gold_answer(gold, fmt):
    assert answer_format(gold) == fmt


@pytest.mark.parametrize("gold", ["answer6", "option3", "ending0", "yes", "(B)", "", "1/2"])
def test_a_gold_answer_in_no_format_is_an_error_naming_it(gold):
    with pytest.raises(MPOError, match=re.escape(f"gold answer {gold!r} fits no known format")):
        answer_format(gold)


@pytest.mark.parametrize(
    ("text", "gold"),
    [
        ("the correct answer is answer3", "answer3"),
        ("The answer is option2.", "option2"),
        ("the correct answer is true", "true"),
        ("ending4", "ending4"),
        ("Solution2 is the right one", "solution2"),
        ("The correct answer is Answer1", "answer1"),
        ("She has 5 + 3 = 8 apples. The answer is 8", "8"),
        ("The total cost is $1,250.", "1250"),
        ("The temperature drops to -3.5", "-3.5"),
        ("So she needs 18.0 eggs", "18"),
        ("12 * 3 = 36\n36 - 6 = 30\n#### 30", "30.0004"),
    ],
)
def test_responses_with_the_gold_answer_are_correct(text, gold):
    assert is_correct(text, gold)


@pytest.mark.parametrize(
    ("text", "gold"),
    [
        ("the correct answer is answer3", "answer2"),
        ("I do not know.", "true"),
        ("I do not know.", "42"),
        ("It is untrue.", "true"),
        ("pick answer12", "answer1"),
        ("The answer is 8.", "8.01"),
        ("", "option1"),
    ],
)
def test_responses_without_the_gold_answer_are_wrong(text, gold):
    assert not is_correct(text, gold)


def test_a_choice_is_the_first_label_in_the_response():
    assert extract("answer2 or answer4? I say answer4", "answer") == "answer2"
    assert extract("false, no wait: true", "true/false") == "false"


def test_choices_are_matched_case_insensitively_and_returned_lowercase():
    assert extract("OPTION1!", "option") == "option1"
    assert extract("It is TRUE", "true/false") == "true"


def test_a_number_is_the_last_number_in_the_response():
    assert extract("3 apples and 4 pears make 7 fruits.", "number") == "7"


@pytest.mark.parametrize(
    ("text", "number"),
    [
        ("She earns $1,234,567 a year", "1234567"),
        ("the list 1,2,3", "3"),
        ("pages 10-12", "12"),
        ("it is -7 degrees", "-7"),
        ("x = -0.25.", "-0.25"),
        ("about 6.02e23 atoms", "6.02e23"),
        ("5eggs", "5"),
    ],
)
def test_number_extraction_reads_separators_signs_and_decimals(text, number):
    assert extract(text, "number") == number


def test_no_answer_is_none():
    assert extract("no idea", "number") is None
    assert extract("no idea", "ending") is None


def test_an_unknown_format_is_an_error():
    with pytest.raises(MPOError, match="unknown answer format 'letter'"):
        extract("A", "letter")


def test_formats_lists_every_format():
    assert FORMATS == ("true/false", "solution", "answer", "ending", "option", "number")


finite = st.one_of(
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
)


@given(prefix=st.text(max_size=30), n=finite)
def test_a_text_ending_in_a_number_extracts_it(prefix, n):
    text = f"{prefix} The answer is {n}"
    assert extract(text, "number") == str(n)
    assert is_correct(text, str(n))
