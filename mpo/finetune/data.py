"""Instruction records in the LLM-Adapters format, their Alpaca prompts, and tokenized examples.

A record is one JSON object with the fields LLM-Adapters' data sets use
(``commonsense_170k.json``, ``math_10k.json`` and their test files):

``instruction``
    the task (a string, required);
``input``
    further context (a string, optional, often empty);
``output``
    the response to learn (a string; LLM-Adapters' math test sets leave it out or empty);
``answer``
    the gold answer that evaluation compares with (a string such as ``"answer2"``,
    ``"true"``, ``"option1"``, ``"solution2"``, ``"ending3"`` or ``"42"``; a JSON
    number is kept as its text). Optional for training, required for evaluation.

Other fields are ignored. The response trained on is ``output``, or ``answer``
when ``output`` is missing or empty.

Training follows LLM-Adapters (``train_on_inputs=False``): an example is
``[bos] + tokens(prompt) + tokens(response) + [eos]``, cut to ``max_length``
tokens from the right, with the loss on the response and ``eos`` only.

>>> record = Record(instruction="Add 2 and 3.", output="5")
>>> print(prompt(record) + record.response)
Below is an instruction that describes a task. Write a response that appropriately
completes the request.
<BLANKLINE>
### Instruction:
Add 2 and 3.
<BLANKLINE>
### Response:
5
>>> train, val = split([Record(instruction=str(i), answer="1") for i in range(50)])
>>> len(train), len(val)
(45, 5)
"""

from __future__ import annotations

import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mpo.errors import MPOError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "Example",
    "Record",
    "collate",
    "encode",
    "encode_prompts",
    "load_records",
    "prompt",
    "split",
]

#: Labels equal to this are left out of the loss (PyTorch's ``cross_entropy`` default).
IGNORE_INDEX = -100

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


@dataclass(frozen=True)
class Record:
    """One instruction record; see the module docstring for the fields.

    >>> Record(instruction="Is water wet?", answer="true").response
    'true'
    >>> Record(instruction="Is water wet?")
    Traceback (most recent call last):
    ...
    mpo.errors.MPOError: record: has neither 'output' nor 'answer'; give the response to learn ...
    """

    instruction: str
    input: str = ""
    output: str | None = None
    answer: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self.instruction, self.input, self.output, self.answer, "record")

    @property
    def response(self) -> str:
        """The text to learn: ``output``, or ``answer`` where ``output`` is missing or empty."""
        return self.output or self.answer  # type: ignore[return-value]

    @classmethod
    def from_dict(cls, data: Any, where: str = "record") -> Record:
        """A record from a parsed JSON object; ``where`` (e.g. ``"train.jsonl line 3"``)
        starts every error message. A JSON number in ``answer`` is kept as its text.

        >>> Record.from_dict({"instruction": "Sum 2 and 2.", "input": "", "answer": 4}).answer
        '4'
        """
        if not isinstance(data, dict):
            raise MPOError(
                f"{where}: expected a JSON object with 'instruction' and 'output' or 'answer', "
                f"got {type(data).__name__}"
            )
        if "instruction" not in data:
            raise MPOError(f"{where}: missing 'instruction'; every record needs one")
        answer = data.get("answer")
        if isinstance(answer, bool):
            raise MPOError(f'{where}: \'answer\' is a JSON boolean; write it as "true" or "false"')
        # Math sets often store the gold answer as a JSON number; its text is what is compared.
        if isinstance(answer, (int, float)):
            answer = str(answer)
        context = data.get("input")
        fields = (
            data["instruction"],
            "" if context is None else context,
            data.get("output"),
            answer,
        )
        _check_fields(*fields, where)
        return cls(*fields)


def _check_fields(instruction: Any, context: Any, output: Any, answer: Any, where: str) -> None:
    for name, value, optional in (
        ("instruction", instruction, False),
        ("input", context, False),
        ("output", output, True),
        ("answer", answer, True),
    ):
        if not isinstance(value, str) and not (optional and value is None):
            raise MPOError(f"{where}: '{name}' must be a string, got {type(value).__name__}")
    if not output and not answer:
        raise MPOError(
            f"{where}: has neither 'output' nor 'answer'; give the response to learn in "
            "'output' (or the gold answer in 'answer')"
        )


@dataclass(frozen=True)
class Example:
    """One tokenized training example: ``labels[i]`` is ``input_ids[i]`` on the response
    and ``eos``, and ``-100`` (no loss) on ``bos`` and the prompt."""

    input_ids: list[int]
    labels: list[int]


def load_records(path: str | Path) -> list[Record]:
    """Every record of a ``.json`` file (a list of objects) or a ``.jsonl`` file (one
    object per line, blank lines skipped), in file order.

    Raises :class:`~mpo.errors.MPOError` naming the file and the record (JSON: its
    index in the list) or line (JSONL: counted from 1) for a missing or empty file,
    text that is not JSON, and records with missing or mistyped fields; no record
    is ever dropped.

    >>> import json, tempfile, pathlib
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     file = pathlib.Path(folder, "boolq.jsonl")
    ...     _ = file.write_text(json.dumps({"instruction": "Is ice cold?", "answer": "true"}))
    ...     [r.answer for r in load_records(file)]
    ['true']
    """
    path = Path(path)
    if path.suffix not in (".json", ".jsonl"):
        raise MPOError(f"{path}: expected a .json or .jsonl file of instruction records")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise MPOError(f"{path}: no such file; check the data path") from None
    except UnicodeDecodeError as error:
        raise MPOError(f"{path}: not UTF-8 text ({error}); save the file as UTF-8") from None
    if not text.strip():
        raise MPOError(f"{path}: the file is empty; it needs at least one record")
    if path.suffix == ".jsonl":
        records = []
        # Not splitlines(): JSON strings may hold U+2028 and other characters it splits at.
        for number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as error:
                raise MPOError(
                    f"{path} line {number}: not valid JSON ({error.msg} at column {error.colno}); "
                    "a .jsonl file holds one JSON object per line"
                ) from None
            records.append(Record.from_dict(data, f"{path} line {number}"))
        return records
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise MPOError(
            f"{path}: not valid JSON ({error.msg} at line {error.lineno} column {error.colno})"
        ) from None
    if not isinstance(data, list):
        raise MPOError(
            f"{path}: expected a JSON list of record objects, got a {type(data).__name__}; "
            "for one object per line use a .jsonl file"
        )
    if not data:
        raise MPOError(f"{path}: the list is empty; it needs at least one record")
    return [Record.from_dict(item, f"{path} record at index {i}") for i, item in enumerate(data)]


def prompt(record: Record) -> str:
    """The Alpaca prompt LLM-Adapters uses, ending in ``"### Response:\\n"``; the
    ``### Input:`` section appears only when ``record.input`` is non-empty.

    >>> print(prompt(Record(instruction="Translate.", input="chat", output="cat")))
    Below is an instruction that describes a task, paired with an input that provides
    further context. Write a response that appropriately completes the request.
    <BLANKLINE>
    ### Instruction:
    Translate.
    <BLANKLINE>
    ### Input:
    chat
    <BLANKLINE>
    ### Response:
    <BLANKLINE>
    """
    if record.input:
        return PROMPT_WITH_INPUT.format(instruction=record.instruction, input=record.input)
    return PROMPT_NO_INPUT.format(instruction=record.instruction)


def encode_prompts(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text as training and generation both feed it to the model:
    ``[bos]`` (when the tokenizer has a ``bos_token``) followed by the text's tokens.

    The text is tokenized without the tokenizer's own special tokens and ``bos``
    is added here, so it appears exactly once whether or not the tokenizer would
    add it itself.
    """
    ids = _tokens(tokenizer, texts)
    prefix = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [prefix + row for row in ids]


def encode(
    records: Sequence[Record], tokenizer: PreTrainedTokenizerBase, max_length: int
) -> list[Example]:
    """Tokenized training examples, ``[bos] + tokens(prompt) + tokens(response) + [eos]``
    cut to the first ``max_length`` tokens, with labels ``-100`` on ``bos`` and the prompt.

    The prompt and the response are tokenized separately and concatenated, so
    the boundary between them is exact and the prompt's tokens are the ones
    :func:`~mpo.finetune.evaluate.generate` feeds the model at evaluation. (With
    a SentencePiece tokenizer the response then starts with a word-start token,
    as a reply after a newline is generated anyway.)

    A record whose ``bos`` and prompt fill all ``max_length`` tokens has nothing
    left to learn from; it is skipped with a :class:`UserWarning` that counts such
    records, so the result can be shorter than ``records``. If every record is
    like that, :class:`~mpo.errors.MPOError` is raised.
    """
    if not isinstance(max_length, int) or max_length < 2:
        raise MPOError(f"max_length must be an integer >= 2, got {max_length!r}")
    if not records:
        raise MPOError("no records to encode; pass at least one Record")
    if tokenizer.eos_token_id is None:
        raise MPOError(
            "the tokenizer has no eos_token, so responses cannot be terminated; "
            "set tokenizer.eos_token before encoding"
        )
    prompts = encode_prompts(tokenizer, [prompt(r) for r in records])
    responses = _tokens(tokenizer, [r.response for r in records])
    examples = []
    for prompt_ids, response_ids in zip(prompts, responses, strict=True):
        if len(prompt_ids) >= max_length:
            continue
        target = [*response_ids, tokenizer.eos_token_id][: max_length - len(prompt_ids)]
        examples.append(Example(prompt_ids + target, [IGNORE_INDEX] * len(prompt_ids) + target))
    skipped = len(records) - len(examples)
    if not examples:
        raise MPOError(
            f"all {skipped} prompts are at least max_length={max_length} tokens long, so no "
            "response token is left to learn from; raise max_length"
        )
    if skipped:
        warnings.warn(
            f"{skipped} of {len(records)} records skipped: their prompts are at least "
            f"max_length={max_length} tokens long, so no response token is left to learn "
            "from; raise max_length to keep them",
            stacklevel=2,
        )
    return examples


def _tokens(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    # One batched call: fast tokenizers encode a batch in parallel.
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def split(
    records: Sequence[Record], val_size: int = 1200, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """A seeded random split into ``(train, val)``.

    The validation set has ``min(val_size, max(1, len(records) // 10))`` records:
    the paper's 1,200 on its data, and never more than a tenth of a small data
    set (but at least one record). Both lists are in shuffled order.

    >>> records = [Record(instruction=str(i), answer="1") for i in range(5)]
    >>> train, val = split(records, seed=1)
    >>> len(train), len(val), sorted(r.instruction for r in train + val)
    (4, 1, ['0', '1', '2', '3', '4'])
    """
    if not isinstance(val_size, int) or val_size < 1:
        raise MPOError(f"val_size must be a positive integer, got {val_size!r}")
    if len(records) < 2:
        raise MPOError(f"need at least 2 records to split off a validation set, got {len(records)}")
    shuffled = list(records)
    random.Random(seed).shuffle(shuffled)
    size = min(val_size, max(1, len(records) // 10))
    return shuffled[size:], shuffled[:size]


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """A right-padded batch: ``input_ids`` (padded with ``pad_id``), ``attention_mask``
    (1 on tokens, 0 on padding) and ``labels`` (``-100`` on padding), each an int64
    tensor of shape ``(len(examples), longest example)``.

    >>> batch = collate([Example([5, 6, 7], [-100, 6, 7]), Example([5], [5])], pad_id=0)
    >>> batch["input_ids"].tolist(), batch["attention_mask"].tolist(), batch["labels"].tolist()
    ([[5, 6, 7], [5, 0, 0]], [[1, 1, 1], [1, 0, 0]], [[-100, 6, 7], [5, -100, -100]])
    """
    if not examples:
        raise MPOError("cannot collate an empty batch; pass at least one Example")
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        input_ids[row, :n] = torch.tensor(example.input_ids)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(example.labels)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
