"""Side-by-side runs: several methods or settings, several seeds, one table and one plot.

A comparison is a list of :class:`Arm` (a label and a
:class:`~mpo.finetune.pipeline.FinetuneSpec`), each fine-tuned once per seed
(the seed sets the data order and any random initialisation), each best
checkpoint evaluated on the same test tasks. The embedded demo, the paper's
initialisation ablation (Figure 2) and its rank study (Figure 6) are all
comparisons; :meth:`Comparison.write` leaves in ``out``:

``results.json``, ``results.csv``
    one row per arm and seed: parameters, best validation loss, accuracy per
    task and on average, fine-tuning time.
``summary.csv``
    per arm: the mean and standard deviation over seeds.
``val_loss.png``
    validation loss against steps, the mean over seeds with a band of one
    standard deviation when there are several.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpo import report
from mpo.atomic import write_bytes, write_csv, write_json
from mpo.errors import MPOError
from mpo.finetune.data import Record
from mpo.finetune.evaluate import evaluate
from mpo.finetune.merge import load_merged
from mpo.finetune.methods import load_tokenizer
from mpo.finetune.pipeline import FinetuneSpec, finetune
from mpo.finetune.train import loss_figure, loss_png

__all__ = ["Arm", "Comparison", "compare"]


@dataclass(frozen=True)
class Arm:
    """One configuration of a comparison: a label for tables and plots, and its run."""

    label: str
    spec: FinetuneSpec


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, statistics.stdev(values) if len(values) > 1 else 0.0


@dataclass(frozen=True)
class Comparison:
    """The rows of a comparison (one per arm and seed) and each run's metrics."""

    rows: list[dict[str, Any]]
    curves: dict[str, list[list[dict[str, Any]]]]  # label -> one metrics list per seed
    tasks: list[str]

    def summary(self) -> list[dict[str, Any]]:
        """Per arm: parameters, and mean and standard deviation over seeds of the results."""
        summary = []
        for label in self.curves:
            rows = [r for r in self.rows if r["label"] == label]
            entry: dict[str, Any] = {
                "label": label,
                "method": rows[0]["method"],
                "rank": rows[0]["rank"],
                "seeds": len(rows),
                "trainable_params": rows[0]["trainable_params"],
                "trainable_share": rows[0]["trainable_share"],
            }
            for key in ("best_val_loss", "average_accuracy", "train_seconds"):
                entry[f"{key}_mean"], entry[f"{key}_std"] = _mean_std([r[key] for r in rows])
            for task in self.tasks:
                entry[f"{task}_mean"], entry[f"{task}_std"] = _mean_std(
                    [r["accuracy"][task] for r in rows]
                )
            summary.append(entry)
        return summary

    def table(self) -> str:
        """An aligned text table of :meth:`summary` (``mean +- std`` when there are seeds)."""
        header = ["arm", "trainable", "share", "best val loss", *self.tasks, "average", "time"]
        lines = [header]

        def cell(entry: Mapping[str, Any], key: str, scale: float, digits: int, unit: str) -> str:
            mean, std = entry[f"{key}_mean"] * scale, entry[f"{key}_std"] * scale
            text = f"{mean:.{digits}f}{unit}"
            return text + f" +- {std:.{digits}f}" if entry["seeds"] > 1 else text

        for entry in self.summary():
            lines.append(
                [
                    entry["label"],
                    f"{entry['trainable_params']:,d}",
                    f"{100 * entry['trainable_share']:.2f}%",
                    cell(entry, "best_val_loss", 1, 4, ""),
                    *(cell(entry, task, 100, 1, "%") for task in self.tasks),
                    cell(entry, "average_accuracy", 100, 1, "%"),
                    cell(entry, "train_seconds", 1, 0, " s"),
                ]
            )
        return report.table(lines[0], lines[1:])

    def plot(self, title: str) -> bytes:
        """The validation-loss curves as PNG bytes (mean over seeds, one-std band)."""
        fig, ax = loss_figure()
        for label, runs in self.curves.items():
            points = [
                {r["step"]: r["val_loss"] for r in run if r.get("val_loss") is not None}
                for run in runs
            ]
            steps = sorted(set.intersection(*(set(p) for p in points)))
            stats = [_mean_std([p[s] for p in points]) for s in steps]
            mean = [m for m, _ in stats]
            (line,) = ax.plot(steps, mean, marker="o", markersize=3, label=label)
            if len(runs) > 1:
                low = [m - s for m, s in stats]
                high = [m + s for m, s in stats]
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2)
        return loss_png(fig, ax, title)

    def write(self, out: str | os.PathLike, title: str) -> list[Path]:
        """Write results.json, results.csv, summary.csv and val_loss.png to ``out``."""
        out = Path(out)
        flat = [
            {**{k: v for k, v in r.items() if k != "accuracy"}, **r["accuracy"]} for r in self.rows
        ]
        files = {
            "results.json": lambda p: write_json(p, self.rows),
            "results.csv": lambda p: write_csv(p, flat),
            "summary.csv": lambda p: write_csv(p, self.summary()),
            "val_loss.png": lambda p: write_bytes(p, self.plot(title)),
        }
        for name, write in files.items():
            write(out / name)
        return [out / name for name in files]


def compare(
    arms: Sequence[Arm],
    tests: Mapping[str, Sequence[Record]],
    out: str | os.PathLike,
    *,
    seeds: Sequence[int] = (0,),
    eval_batch_size: int = 32,
    max_new_tokens: int = 32,
    progress: bool | None = None,
) -> Comparison:
    """Fine-tune every arm once per seed into ``out/<label>/seed-<s>`` and evaluate each.

    Every run starts afresh (a previous run in its folder is deleted).
    Returns the :class:`Comparison`; call :meth:`Comparison.write` to save it.
    """
    labels = [arm.label for arm in arms]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise MPOError(
            f"two arms are labelled {repeated[0]!r}; give each its own label (their runs would "
            f"share the folder {repeated[0]}/ and one table row)"
        )
    if len(set(seeds)) != len(seeds):
        raise MPOError(f"seeds {list(seeds)} repeat one; each seed runs into its own folder")
    out = Path(out)
    rows, curves = [], {}
    for arm in arms:
        curves[arm.label] = []
        for seed in seeds:
            print(f"\n== {arm.label}, seed {seed} ==", flush=True)
            spec = dataclasses.replace(
                arm.spec, train=dataclasses.replace(arm.spec.train, seed=seed)
            )
            folder = out / arm.label / f"seed-{seed}"
            result = finetune(spec, folder, restart=True, progress=progress)
            # merged: the same update, and generation at the base model's speed
            model = load_merged(spec.model, folder / "best", dtype=spec.dtype)
            report = evaluate(
                model,
                load_tokenizer(spec.model),
                tests,
                batch_size=eval_batch_size,
                max_new_tokens=max_new_tokens,
                progress=progress,
            )
            curves[arm.label].append(result.metrics)
            rows.append(
                {
                    "label": arm.label,
                    "method": spec.method,
                    "rank": spec.effective_rank,
                    "seed": seed,
                    "trainable_params": result.trainable_params,
                    "total_params": result.total_params,
                    "trainable_share": result.trainable_share,
                    "best_val_loss": result.best_val_loss,
                    "best_step": result.best_step,
                    "accuracy": report.accuracy,
                    "average_accuracy": report.average,
                    "train_seconds": result.wall_time_s,
                }
            )
            print(
                f"{arm.label}: best validation loss {result.best_val_loss:.4f}, "
                f"average accuracy {100 * report.average:.1f}%",
                flush=True,
            )
    return Comparison(rows=rows, curves=curves, tasks=list(tests))
