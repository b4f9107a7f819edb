"""Answers read from generated text and scored against the gold answer, as LLM-Adapters does.

The gold answer says how to read a response; no data set name is needed:

==============  =======================================  ====================================
format          gold answers                             data sets
==============  =======================================  ====================================
``true/false``  ``true``, ``false``                      BoolQ
``solution``    ``solution1``, ``solution2``             PIQA
``answer``      ``answer1`` .. ``answer5``               SIQA, ARC-e, ARC-c, OpenBookQA
``ending``      ``ending1`` .. ``ending4``               HellaSwag
``option``      ``option1``, ``option2``                 WinoGrande
``number``      a decimal number such as ``42``,         GSM8K, SVAMP, MultiArith, AddSub,
                ``-3.5`` or ``1,250``                    SingleEq
==============  =======================================  ====================================

A choice is the *first* label of its format in the response, matched case-insensitively
(``answer3`` in ``"The answer is Answer3, not answer1"``); a letter may not precede
it and a digit may not follow it, so ``untrue`` is not ``true`` and ``answer12``
is no answer. A number is the *last* number in the response, with thousands
separators dropped (``1,250``), an optional minus sign and decimals; it is correct
within ``1e-3`` of the gold number, as in LLM-Adapters.

>>> is_correct("Each box holds 6, so 4 boxes hold 4 * 6 = 24. The answer is 24.", "24")
True
>>> is_correct("the correct answer is option2", "option1")
False
>>> extract("Answer: the correct answer is Ending4", answer_format("ending2"))
'ending4'
"""

from __future__ import annotations

import re

from mpo.errors import MPOError

__all__ = ["FORMATS", "answer_format", "extract", "is_correct"]

#: Each choice format and the labels it accepts.
CHOICES = {
    "true/false": ("true", "false"),
    "solution": ("solution1", "solution2"),
    "answer": ("answer1", "answer2", "answer3", "answer4", "answer5"),
    "ending": ("ending1", "ending2", "ending3", "ending4"),
    "option": ("option1", "option2"),
}
#: Every answer format, in the order :func:`answer_format` tries them.
FORMATS = (*CHOICES, "number")

_CHOICE_PATTERNS = {
    fmt: re.compile(rf"(?<![a-z])({'|'.join(labels)})(?!\d)") for fmt, labels in CHOICES.items()
}
# A minus sign counts only where it cannot be a hyphen or a subtraction ("pages 3-5");
# an exponent only with digits after it, so "5e" in "5eggs" stays 5.
_NUMBER = re.compile(r"(?:(?<![\w.])-)?(?:\d+(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")
# A comma between a digit and exactly three digits separates thousands ("1,250"); one
# between other digits separates list items ("1,2,3").
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
#: How far a predicted number may be from the gold number and still be correct.
TOLERANCE = 1e-3


def answer_format(gold: str) -> str:
    """The format (one of :data:`FORMATS`) that ``gold`` is written in.

    >>> answer_format("answer3"), answer_format("True"), answer_format("1,024")
    ('answer', 'true/false', 'number')
    >>> answer_format("(B)")
    Traceback (most recent call last):
    ...
    mpo.errors.MPOError: gold answer '(B)' fits no known format; ...
    """
    label = gold.strip().lower()
    for fmt, labels in CHOICES.items():
        if label in labels:
            return fmt
    if _NUMBER.fullmatch(_THOUSANDS.sub("", label)):
        return "number"
    raise MPOError(
        f"gold answer {gold!r} fits no known format; write it as true/false, solution1-2, "
        "answer1-5, ending1-4, option1-2 or a number (e.g. 42, -3.5)"
    )


def extract(text: str, fmt: str) -> str | None:
    """The answer in ``text`` in format ``fmt``, or ``None`` if there is none: for a choice
    the first label (lowercase), for ``"number"`` the last number without thousands
    separators.

    >>> extract("She pays $1,250.", "number"), extract("no idea", "option")
    ('1250', None)
    """
    if fmt == "number":
        numbers = _NUMBER.findall(_THOUSANDS.sub("", text))
        return numbers[-1] if numbers else None
    if fmt not in _CHOICE_PATTERNS:
        raise MPOError(f"unknown answer format {fmt!r}; use one of {', '.join(FORMATS)}")
    match = _CHOICE_PATTERNS[fmt].search(text.lower())
    return match.group(1) if match else None


def is_correct(text: str, gold: str) -> bool:
    """Whether the answer extracted from ``text`` matches ``gold``, in the format of ``gold``.

    >>> is_correct("-3.5", "-3.50"), is_correct("I cannot tell.", "true")
    (True, False)
    """
    fmt = answer_format(gold)
    predicted = extract(text, fmt)
    if predicted is None:
        return False
    if fmt == "number":
        return abs(float(predicted) - float(_THOUSANDS.sub("", gold.strip()))) <= TOLERANCE
    return predicted == gold.strip().lower()
