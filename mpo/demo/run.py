"""The embedded demo (``mpo demo``): the paper's comparison, small enough for a laptop CPU.

It fine-tunes the small causal LM shipped in ``mpo/demo/tiny_lm`` (pretrained
on Python's own documentation by :mod:`mpo.demo.pretrain`) on generated
reasoning tasks in the LLM-Adapters format (:mod:`mpo.demo.tasks`: true/false
comparisons, fill-in-the-blank, 4-way multiple choice, word problems), once per
method, with one recipe for every method (no per-method tuning), then
evaluates each best checkpoint by greedy generation. It writes the data to
``out/data`` and a comparison (:mod:`mpo.finetune.compare`: ``results.json``,
``results.csv``, ``summary.csv``, ``val_loss.png``, the small-scale analogue of
the paper's Figure 2) to ``out``, with each run's folder in ``out/<method>``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path

from mpo.demo.tasks import write_dataset
from mpo.finetune.compare import Arm, Comparison, compare
from mpo.finetune.evaluate import load_tasks
from mpo.finetune.pipeline import FinetuneSpec
from mpo.finetune.train import TrainConfig

__all__ = ["DEMO_RECIPE", "MODEL", "demo_arms", "demo_data", "run_demo"]

#: The shipped pretrained model.
MODEL = Path(__file__).resolve().parent / "tiny_lm"

#: One recipe for every method: the paper's, with a learning rate and length for a short run.
DEMO_RECIPE = TrainConfig(
    learning_rate=1e-3,
    batch_size=16,
    micro_batch_size=16,
    max_steps=100,
    warmup_ratio=0.03,
    eval_every=10,
)
TRAIN_RECORDS, TEST_RECORDS_PER_TASK, VAL_RECORDS, MAX_LENGTH = 2400, 50, 160, 160


def demo_data(folder: str | os.PathLike) -> tuple[Path, dict]:
    """Write the demo's data to ``folder``; return the training file and the test tasks."""
    folder = Path(folder)
    write_dataset(folder, TRAIN_RECORDS, TEST_RECORDS_PER_TASK, seed=0)
    return folder / "train.json", load_tasks(sorted((folder / "test").glob("*.json")))


def demo_arms(
    train: Path, methods: Sequence[str], recipe: TrainConfig = DEMO_RECIPE, **spec: object
) -> list[Arm]:
    """One arm per method: the shipped model, the demo's data and recipe, float32."""
    options = {"dtype": "float32", "val_size": VAL_RECORDS, "max_length": MAX_LENGTH, **spec}
    return [
        Arm(method, FinetuneSpec(str(MODEL), str(train), method, train=recipe, **options))
        for method in methods
    ]


def run_demo(
    out: str | os.PathLike = "out/demo",
    *,
    methods: Sequence[str] = ("dota", "dota-random", "lora"),
    steps: int | None = None,
    progress: bool | None = None,
) -> Comparison:
    """Fine-tune and evaluate the shipped model with each method; print and write the results.

    ``steps`` overrides the number of optimizer steps (default 100). Every run
    starts afresh.
    """
    out = Path(out)
    started = time.perf_counter()
    train, tests = demo_data(out / "data")
    recipe = DEMO_RECIPE if steps is None else dataclasses.replace(DEMO_RECIPE, max_steps=steps)
    comparison = compare(
        demo_arms(train, methods, recipe), tests, out, eval_batch_size=50, progress=progress
    )
    print("\n" + comparison.table())
    written = comparison.write(out, "The shipped model on the demo tasks")
    print(
        f"\nwrote {', '.join(str(p) for p in written)} "
        f"({time.perf_counter() - started:.0f} s in all)"
    )
    return comparison
