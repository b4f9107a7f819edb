"""Accuracy of a causal language model on instruction tasks, by batched greedy generation.

Each record's Alpaca prompt (:func:`~mpo.finetune.data.prompt`) is tokenized as in
training (:func:`~mpo.finetune.data.encode_prompts`), left-padded into batches, and
continued greedily; the answer read from the continuation
(:mod:`~mpo.finetune.answers`) is scored against the record's gold ``answer``. The
average is the mean of the per-task accuracies, the paper's "Avg." column.

LLM-Adapters decodes with beam search (4 beams); greedy decoding here is deterministic
and cheaper, and its scores can differ slightly from beam-search ones.

>>> report = EvalReport((
...     TaskResult("boolq", (Prediction("true", "true", "true", True),
...                          Prediction("yes", None, "false", False))),
...     TaskResult("gsm8k", (Prediction("2 + 2 = 4", "4", "4", True),)),
... ))
>>> print(report.table())
task     n  accuracy (%)
boolq    2         50.00
gsm8k    1        100.00
average  3         75.00
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from mpo.errors import MPOError
from mpo.finetune.answers import answer_format, extract, is_correct
from mpo.finetune.data import Record, encode_prompts, load_records, prompt

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["EvalReport", "Prediction", "TaskResult", "evaluate", "generate", "load_tasks"]


@dataclass(frozen=True)
class Prediction:
    """One scored sample: the generated text, the answer read from it (``None`` if
    none), the gold answer, and whether they match."""

    generated: str
    extracted: str | None
    gold: str
    correct: bool


@dataclass(frozen=True)
class TaskResult:
    """The predictions on one task, in the order of its records."""

    name: str
    predictions: tuple[Prediction, ...]

    @property
    def n(self) -> int:
        """The number of samples."""
        return len(self.predictions)

    @property
    def correct(self) -> int:
        """The number of correctly answered samples."""
        return sum(p.correct for p in self.predictions)

    @property
    def accuracy(self) -> float:
        """The fraction of samples answered correctly, in ``[0, 1]``."""
        return self.correct / self.n


@dataclass(frozen=True)
class EvalReport:
    """The results of :func:`evaluate`, one :class:`TaskResult` per task in input order."""

    tasks: tuple[TaskResult, ...]

    @property
    def accuracy(self) -> dict[str, float]:
        """Each task's accuracy, by task name."""
        return {t.name: t.accuracy for t in self.tasks}

    @property
    def average(self) -> float:
        """The mean of the per-task accuracies (each task weighs the same, whatever its size)."""
        return sum(t.accuracy for t in self.tasks) / len(self.tasks)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: per task ``n``, ``correct`` and ``accuracy``; the ``average``;
        and every task's ``predictions`` as a list of dicts, in record order."""
        return {
            "tasks": {
                t.name: {"n": t.n, "correct": t.correct, "accuracy": t.accuracy} for t in self.tasks
            },
            "average": self.average,
            "predictions": {
                t.name: [
                    {
                        "generated": p.generated,
                        "extracted": p.extracted,
                        "gold": p.gold,
                        "correct": p.correct,
                    }
                    for p in t.predictions
                ]
                for t in self.tasks
            },
        }

    def table(self) -> str:
        """An aligned text table: task, sample count and accuracy in percent, then an
        ``average`` row (total samples, mean of the task accuracies)."""
        rows = [(t.name, str(t.n), f"{100 * t.accuracy:.2f}") for t in self.tasks]
        rows.append(("average", str(sum(t.n for t in self.tasks)), f"{100 * self.average:.2f}"))
        header = ("task", "n", "accuracy (%)")
        widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
        return "\n".join(
            f"{name:<{widths[0]}}  {n:>{widths[1]}}  {acc:>{widths[2]}}"
            for name, n, acc in [header, *rows]
        )


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> list[str]:
    """The greedy continuation of each prompt (only the new text, special tokens dropped,
    whitespace stripped), in the order of ``prompts``.

    Prompts are tokenized as in training (:func:`~mpo.finetune.data.encode_prompts`)
    and left-padded by hand (with the ``pad_token``, else the ``eos_token``), so the
    tokenizer is never changed. Batches are formed longest prompts first, which
    wastes the least padding and meets any out-of-memory error in the first batch.
    The model runs in eval mode under :func:`torch.no_grad` and is put back in its
    previous mode afterwards. ``progress`` shows a tqdm bar over the batches.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise MPOError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise MPOError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise MPOError(
            "the tokenizer has neither a pad_token nor an eos_token to pad batches with; "
            "set tokenizer.pad_token"
        )
    ids = encode_prompts(tokenizer, prompts)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device = next(model.parameters()).device
    texts = [""] * len(ids)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="generate", disable=not progress):
                rows = order[start : start + batch_size]
                width = len(ids[rows[0]])
                input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
                for row, i in enumerate(rows):
                    input_ids[row, width - len(ids[i]) :] = torch.tensor(ids[i])
                    attention_mask[row, width - len(ids[i]) :] = 1
                output = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    do_sample=False,
                    num_beams=1,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
                new = tokenizer.batch_decode(output[:, width:], skip_special_tokens=True)
                for i, text in zip(rows, new, strict=True):
                    texts[i] = text.strip()
    finally:
        model.train(was_training)
    return texts


def evaluate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tasks: Mapping[str, Sequence[Record]],
    *,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    progress: bool = False,
) -> EvalReport:
    """Accuracy on each task (name to records) by :func:`generate` and
    :func:`~mpo.finetune.answers.is_correct`; every record needs a gold ``answer``.

    All gold answers are checked before anything is generated: a task with no
    records, a record without ``answer`` or one in no known format raises
    :class:`~mpo.errors.MPOError` naming the task and the record's index.
    """
    if not tasks:
        raise MPOError("no tasks to evaluate; pass at least one task name with its records")
    for name, records in tasks.items():
        if not records:
            raise MPOError(f"task {name!r} has no records; give it at least one")
        for i, record in enumerate(records):
            if record.answer is None:
                raise MPOError(
                    f"task {name!r}, record at index {i}: no gold 'answer' to score against; "
                    "evaluation data needs an 'answer' field in every record"
                )
            try:
                answer_format(record.answer)
            except MPOError as error:
                raise MPOError(f"task {name!r}, record at index {i}: {error}") from None
    results = []
    for name, records in tasks.items():
        generated = generate(
            model,
            tokenizer,
            [prompt(r) for r in records],
            batch_size=batch_size,
            max_new_tokens=max_new_tokens,
            progress=progress,
        )
        predictions = tuple(
            Prediction(
                generated=text,
                extracted=extract(text, answer_format(r.answer)),
                gold=r.answer,
                correct=is_correct(text, r.answer),
            )
            for text, r in zip(generated, records, strict=True)
        )
        results.append(TaskResult(name, predictions))
    return EvalReport(tuple(results))


def load_tasks(paths: Iterable[str | Path]) -> dict[str, list[Record]]:
    """The records of each ``.json``/``.jsonl`` file (:func:`~mpo.finetune.data.load_records`),
    keyed by the file's stem (``data/boolq.json`` is task ``boolq``), in the given order.

    Two files with the same stem raise :class:`~mpo.errors.MPOError` naming both.
    """
    tasks: dict[str, list[Record]] = {}
    origin: dict[str, Path] = {}
    for path in map(Path, paths):
        if path.stem in origin:
            raise MPOError(
                f"{origin[path.stem]} and {path} would both be task {path.stem!r}; "
                "rename one of the files"
            )
        origin[path.stem] = path
        tasks[path.stem] = load_records(path)
    if not tasks:
        raise MPOError("no task files given; pass at least one .json or .jsonl file")
    return tasks
