"""From files to a fine-tuned run: what ``mpo finetune`` does, as a function.

:func:`finetune` loads a local causal LM and an instruction data set,
applies a method (:mod:`mpo.finetune.methods`), splits off a validation set,
and trains with :func:`mpo.finetune.train.train`, writing everything to one
run folder (its layout is in :mod:`mpo.finetune.train`; ``run.json`` adds the
settings, the parameter counts and the data's SHA-256).
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from mpo.adapt.config import PAPER_TARGETS
from mpo.atomic import remove_folder, write_json
from mpo.errors import MPOError
from mpo.finetune.data import encode, load_records, split
from mpo.finetune.methods import METHODS, load_model, load_tokenizer, method, prepare
from mpo.finetune.train import RunResult, TrainConfig, train

__all__ = ["FinetuneSpec", "finetune"]

#: What a run folder may hold; ``restart`` deletes these and nothing else.
RUN_FILES = (
    "run.json",
    "metrics.json",
    "metrics.csv",
    "val_loss.png",
    "best",
    "state",
    "pissa_init",
)


@dataclass(frozen=True)
class FinetuneSpec:
    """Everything that defines a fine-tuning run (the ``mpo finetune`` options).

    Attributes:
        model: folder of a transformers causal LM (``save_pretrained`` output).
        data: a ``.json``/``.jsonl`` file of instruction records.
        method: one of :data:`mpo.finetune.methods.METHODS`.
        rank: DoTA's R or LoRA's r (default: the method's).
        num_cores: DoTA's N.
        targets: the adapted modules (names, a regex or ``"all-linear"``).
        dtype: ``"auto"`` (bfloat16 on a GPU that has it, else float32) or a name.
        val_data: a separate validation file; otherwise ``val_size`` records
            are split off ``data`` (capped at a tenth for small data).
        val_size: the validation split's size (the paper: 1,200).
        max_length: examples are cut to this many tokens.
        train: the optimisation recipe.
    """

    model: str
    data: str
    method: str = "dota"
    rank: int | None = None
    num_cores: int = 5
    targets: tuple[str, ...] | str = PAPER_TARGETS
    dtype: str = "auto"
    val_data: str | None = None
    val_size: int = 1200
    max_length: int = 256
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        method(self.method)  # unknown method or missing package: fail before loading anything
        if self.rank is not None and self.rank < 1:
            raise MPOError(f"rank must be at least 1, got {self.rank}")

    @property
    def effective_rank(self) -> int | None:
        """The rank used: ``rank``, or the method's default."""
        return METHODS[self.method].default_rank if self.rank is None else self.rank


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def clear_run(out: Path) -> None:
    """Delete what a previous run wrote to ``out`` (only the files a run writes, with the
    staging and backup folders of its atomic saves: a backup left by a killed save
    would otherwise be taken back as the run's state)."""
    for name in RUN_FILES:
        remove_folder(out / name)


def finetune(
    spec: FinetuneSpec,
    out: str | os.PathLike,
    *,
    restart: bool = False,
    progress: bool | None = None,
) -> RunResult:
    """Fine-tune ``spec.model`` on ``spec.data`` with ``spec.method``; write the run to ``out``.

    A run folder that holds a saved state is resumed (the settings must match);
    ``restart=True`` deletes the previous run's files first.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MPOError(f"--out {out} is a file; pass a folder for the run")
    if restart:
        clear_run(out)
    records = load_records(spec.data)
    if spec.val_data is None:
        train_records, val_records = split(records, spec.val_size, seed=spec.train.seed)
    else:
        train_records, val_records = records, load_records(spec.val_data)
    tokenizer = load_tokenizer(spec.model)
    train_examples = encode(train_records, tokenizer, spec.max_length)
    val_examples = encode(val_records, tokenizer, spec.max_length)
    model = load_model(spec.model, spec.method, dtype=spec.dtype)
    model = prepare(
        model,
        spec.method,
        rank=spec.rank,
        num_cores=spec.num_cores,
        targets=spec.targets,
        seed=spec.train.seed,
    )
    settings = {
        "model": str(Path(spec.model).resolve()),
        "data_sha256": _sha256(spec.data),
        "val_data_sha256": _sha256(spec.val_data) if spec.val_data else None,
        "rank": spec.effective_rank,
        "num_cores": spec.num_cores,
        "targets": spec.targets if isinstance(spec.targets, str) else list(spec.targets),
        "dtype": spec.dtype,
        "val_size": spec.val_size,
        "max_length": spec.max_length,
    }
    out.mkdir(parents=True, exist_ok=True)
    run = {**asdict(spec), "settings": settings}
    result = train(
        model,
        train_examples,
        val_examples,
        out,
        method=spec.method,
        pad_id=tokenizer.pad_token_id,
        config=spec.train,
        settings=settings,
        progress=progress,
    )
    run["result"] = {
        "steps": result.steps,
        "best_step": result.best_step,
        "best_val_loss": result.best_val_loss,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "trainable_share": result.trainable_share,
        "wall_time_s": result.wall_time_s,
    }
    write_json(out / "run.json", run)
    return result
