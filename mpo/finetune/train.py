"""The training loop: the paper's recipe, validation, the best checkpoint, and resuming.

One optimizer step sees ``batch_size`` examples, fed in micro-batches of
``micro_batch_size`` (gradient accumulation). The loss is the mean cross
entropy over the response tokens of the whole batch (each micro-batch's
summed loss is divided by the batch's token count), so accumulation gives the
gradient a single large batch would. The learning rate warms up linearly over
the first ``ceil(warmup_ratio * steps)`` steps, then follows a cosine to zero:

.. math::

    \\eta_s = \\eta \\, \\frac{s + 1}{w} \\ (s < w), \\qquad
    \\eta_s = \\frac{\\eta}{2} \\Big(1 + \\cos \\pi \\frac{s - w}{S - w}\\Big) \\ (s \\ge w).

The examples are visited in a seeded random order, a new order each epoch,
so step ``s`` always sees the same examples: that makes a resumed run take
exactly the steps an uninterrupted one would.

Files in the run folder ``out``:

``metrics.json``, ``metrics.csv``
    one row per step: ``step``, ``epoch``, ``train_loss``, ``val_loss`` (on
    evaluation steps), ``lr``, ``elapsed_s``, ``tokens_per_s``,
    ``peak_memory_mb`` (CUDA: ``max_memory_allocated``; CPU: the process's peak
    resident memory, which includes everything the process holds).
``val_loss.png``
    validation (and training) loss against steps.
``best/``
    the checkpoint with the lowest validation loss (see
    :func:`mpo.finetune.methods.save_finetuned`).
``state/``
    what resuming needs: the trainable parameters and AdamW's moments
    (safetensors), the step, the metrics so far and the run's settings (JSON).
    Written at every evaluation and when the run is interrupted (Ctrl-C).

Every file is written atomically, so an interruption at any moment leaves a
run that resumes from its last saved step.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import resource
import signal
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from mpo.atomic import recover_folder, staged_folder, write_bytes, write_csv, write_json
from mpo.errors import Interrupted, MPOError
from mpo.finetune.data import Example, collate
from mpo.finetune.methods import count_parameters, save_finetuned, save_pissa_init

__all__ = ["RunResult", "TrainConfig", "learning_rate", "train"]


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of :func:`train`; the defaults are the paper's recipe (Appendix B).

    Attributes:
        learning_rate: AdamW's peak learning rate (the paper: 3e-4 for DoTA
            on math, 1e-4 for QDoTA).
        batch_size: examples per optimizer step (the paper: 16).
        micro_batch_size: examples per forward pass; ``batch_size`` must be a
            multiple of it.
        epochs: passes over the training set (the paper: 1); may be fractional.
        max_steps: if set, the number of steps, overriding ``epochs``.
        warmup_ratio: share of the steps spent warming up (the paper: 0.03).
        weight_decay: AdamW's decoupled weight decay.
        max_grad_norm: gradient clipping threshold (``None``: no clipping).
        eval_every: evaluate (and save the state) every this many steps; also
            before the first step and after the last.
        seed: the data order.
        gradient_checkpointing: recompute activations in the backward
            (transformers models), trading time for memory.
    """

    learning_rate: float = 3e-4
    batch_size: int = 16
    micro_batch_size: int = 4
    epochs: float = 1.0
    max_steps: int | None = None
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 50
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        positive = {
            "learning_rate": self.learning_rate,
            "batch_size": self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "epochs": self.epochs,
            "eval_every": self.eval_every,
        }
        for name, value in positive.items():
            if not value > 0:
                raise MPOError(f"{name} must be positive, got {value}")
        if self.batch_size % self.micro_batch_size:
            raise MPOError(
                f"batch_size {self.batch_size} is not a multiple of micro_batch_size "
                f"{self.micro_batch_size}; pick a micro-batch size that divides it"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise MPOError(f"max_steps must be at least 1, got {self.max_steps}")
        if not 0 <= self.warmup_ratio < 1:
            raise MPOError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")

    def steps(self, num_examples: int) -> int:
        """The number of optimizer steps for a training set of ``num_examples``."""
        if self.max_steps is not None:
            return self.max_steps
        return max(1, math.ceil(self.epochs * num_examples / self.batch_size))


def learning_rate(step: int, total: int, config: TrainConfig) -> float:
    """The learning rate of step ``step`` (0-based) of ``total``: linear warmup, then cosine.

    >>> config = TrainConfig(learning_rate=1.0, warmup_ratio=0.1)
    >>> [round(learning_rate(s, 20, config), 3) for s in (0, 1, 2, 11, 19)]
    [0.5, 1.0, 1.0, 0.5, 0.008]
    """
    warmup = math.ceil(config.warmup_ratio * total)
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class RunResult:
    """What :func:`train` returns: the metrics and where the best checkpoint is."""

    out: Path
    steps: int
    best_step: int
    best_val_loss: float
    trainable_params: int
    total_params: int
    wall_time_s: float
    metrics: list[dict[str, Any]] = field(repr=False)

    @property
    def trainable_share(self) -> float:
        """Trainable parameters as a share of all parameters."""
        return self.trainable_params / self.total_params if self.total_params else 0.0


def _order(num_examples: int, seed: int, epoch: int) -> list[int]:
    order = list(range(num_examples))
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def _batch(examples: Sequence[Example], step: int, config: TrainConfig) -> list[Example]:
    """Step ``step``'s examples: positions ``[step * B, (step + 1) * B)`` of the epoch orders."""
    n = len(examples)
    batch = []
    for position in range(step * config.batch_size, (step + 1) * config.batch_size):
        epoch, index = divmod(position, n)
        batch.append(examples[_order(n, config.seed, epoch)[index]])
    return batch


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(model: nn.Module) -> contextlib.AbstractContextManager:
    """bfloat16/float16 autocast when the model's weights are in half precision."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    half = next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), None)
    if half is None:
        return contextlib.nullcontext()
    return torch.autocast(_device_of(model).type, dtype=half)


def _loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed cross entropy over the supervised (label != -100) next tokens, and their count."""
    with _autocast(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    logits = logits[:, :-1].float()
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((labels != -100).sum())


def _micro_batches(
    examples: Sequence[Example], size: int, pad_id: int, device: torch.device
) -> list[dict[str, torch.Tensor]]:
    return [
        {k: v.to(device) for k, v in collate(examples[i : i + size], pad_id).items()}
        for i in range(0, len(examples), size)
    ]


def _tokens(examples: Sequence[Example]) -> int:
    return sum(sum(label != -100 for label in e.labels[1:]) for e in examples)


@torch.no_grad()
def validation_loss(
    model: nn.Module, examples: Sequence[Example], *, micro_batch_size: int, pad_id: int
) -> float:
    """Mean cross entropy per response token over ``examples``, in eval mode."""
    training = model.training
    model.eval()
    try:
        total, count = 0.0, 0
        for batch in _micro_batches(examples, micro_batch_size, pad_id, _device_of(model)):
            loss, tokens = _loss_sum(model, batch)
            total, count = total + float(loss), count + tokens
    finally:
        model.train(training)
    return total / max(1, count)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    usage = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return usage / 2**20 if sys.platform == "darwin" else usage / 2**10  # bytes vs KiB


def _differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ, e.g. ``["config.learning_rate"]``."""
    keys = sorted({*old, *new})
    found = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append(f"{prefix}{key} was {a!r}, now {b!r}")
    return found


# -- the resumable state -------------------------------------------------------------


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _save_state(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: dict[str, Any],
) -> None:
    params = _trainable(model)
    index = {id(p): name for name, p in params.items()}
    moments: dict[str, torch.Tensor] = {}
    steps: dict[str, float] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                if key == "step":
                    steps[index[id(p)]] = float(value)
                else:
                    moments[f"{index[id(p)]}.{key}"] = value.detach().cpu().contiguous()
    with staged_folder(folder) as staging:
        tensors = {name: p.detach().cpu().contiguous() for name, p in params.items()}
        safetensors.torch.save_file(tensors, staging / "trainable.safetensors")
        safetensors.torch.save_file(moments, staging / "optimizer.safetensors")
        write_json(staging / "progress.json", {**progress, "adam_steps": steps})


def _read_progress(folder: Path) -> dict[str, Any]:
    import json

    return json.loads((folder / "progress.json").read_text(encoding="utf-8"))


def _load_state(
    folder: Path, progress: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    """The trainable tensors and AdamW moments saved in ``folder`` (with ``progress``)."""
    params = _trainable(model)
    tensors = safetensors.torch.load_file(folder / "trainable.safetensors")
    if set(tensors) != set(params):
        raise MPOError(
            f"{folder} holds other trainable parameters than this model has; it was written by "
            "another method or model: pass --restart or choose another --out"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(tensors[name])
    moments = safetensors.torch.load_file(folder / "optimizer.safetensors")
    for name, p in params.items():
        if name in progress["adam_steps"]:
            optimizer.state[p] = {
                "step": torch.tensor(progress["adam_steps"][name]),
                "exp_avg": moments[f"{name}.exp_avg"].to(p.device),
                "exp_avg_sq": moments[f"{name}.exp_avg_sq"].to(p.device),
            }


# -- plotting ------------------------------------------------------------------------


def loss_figure() -> tuple[Any, Any]:
    """A headless matplotlib figure and axes for validation-loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(6.4, 4.0))


def loss_png(fig: Any, ax: Any, title: str, ylabel: str = "validation loss") -> bytes:
    """The curves drawn on ``ax``, labelled as losses, as PNG bytes (figure closed)."""
    import io

    import matplotlib.pyplot as plt

    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"{ylabel} (per response token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def plot_losses(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: Path, title: str) -> None:
    """Validation-loss curves (points) and training-loss curves (thin lines, the mean loss
    of each optimizer step), one of each per name in ``curves`` (metric rows), as a PNG."""
    fig, ax = loss_figure()
    for name, rows in curves.items():
        points = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        steps, losses = [p[0] for p in points], [p[1] for p in points]
        (line,) = ax.plot(steps, losses, marker="o", markersize=3, label=f"{name} (validation)")
        train = [(r["step"], r["train_loss"]) for r in rows if r.get("train_loss") is not None]
        if train:  # the run's colour, thinner
            steps, losses = [p[0] for p in train], [p[1] for p in train]
            ax.plot(
                steps,
                losses,
                color=line.get_color(),
                linewidth=0.8,
                alpha=0.6,
                label=f"{name} (train)",
            )
    write_bytes(path, loss_png(fig, ax, title, ylabel="loss"))


# -- the loop ------------------------------------------------------------------------


@contextlib.contextmanager
def _deferred_interrupt() -> Any:
    """Turn Ctrl-C (SIGINT) into a flag the loop checks between steps.

    An interrupt in the middle of ``optimizer.step()`` would leave some
    parameters updated and others not; deferring it to the step boundary means
    the saved state is always that of a finished step.
    """
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag  # signal handlers can only be installed from the main thread
        return

    def handler(signum: int, frame: Any) -> None:
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _progress_bar(total: int, initial: int, enabled: bool | None) -> Any:
    from tqdm.auto import tqdm

    disable = not sys.stderr.isatty() if enabled is None else not enabled
    return tqdm(total=total, initial=initial, desc="fine-tuning", unit="step", disable=disable)


def train(
    model: nn.Module,
    train_examples: Sequence[Example],
    val_examples: Sequence[Example],
    out: str | os.PathLike,
    *,
    method: str,
    pad_id: int,
    config: TrainConfig = TrainConfig(),
    settings: Mapping[str, Any] | None = None,
    resume: bool = True,
    progress: bool | None = None,
) -> RunResult:
    """Fine-tune ``model`` (see :func:`~mpo.finetune.methods.prepare`); return the metrics.

    Parameters:
        model: the model with only its method's parameters trainable.
        train_examples: tokenized training examples (:func:`mpo.finetune.data.encode`).
        val_examples: tokenized validation examples.
        out: the run folder (layout in the module docstring).
        method: the method's name, for saving checkpoints.
        pad_id: the padding token id.
        config: the recipe.
        settings: everything else that defines the run (model path, data,
            rank, ...), JSON-serialisable; a resumed run must have the same.
        resume: continue from ``out/state`` if it exists; otherwise a run
            folder that already holds a state is refused.
        progress: a progress bar (default: on a terminal).

    Raises:
        MPOError: no training or validation examples, or a state written with
            other settings.
        Interrupted: Ctrl-C; the state of the last finished step is saved first.
    """
    if not train_examples or not val_examples:
        raise MPOError("need at least one training and one validation example")
    out = Path(out)
    device = _device_of(model)
    total_steps = config.steps(len(train_examples))
    fingerprint = {"method": method, "config": asdict(config), **dict(settings or {})}
    fingerprint["train_examples"] = len(train_examples)
    fingerprint["val_examples"] = len(val_examples)
    state_dir, best_dir = out / "state", out / "best"
    for folder in (state_dir, best_dir):  # killed while replacing one: the previous is kept
        recover_folder(folder)
    if state_dir.exists() and not resume:
        raise MPOError(
            f"{out} already holds a run; resume it, or start over with --restart (which deletes "
            "it), or choose another --out"
        )

    # the settings are compared before anything is loaded or written
    saved = _read_progress(state_dir) if state_dir.exists() else None
    if saved is not None and saved["fingerprint"] != fingerprint:
        differ = _differences(saved["fingerprint"], fingerprint)
        raise MPOError(
            f"{out} holds a run with other settings ({', '.join(differ)}); rerun with "
            "the same settings to resume, pass --restart to start over, or choose another --out"
        )

    if config.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if method == "pissa" and not (out / "pissa_init").exists():
        save_pissa_init(model, out / "pissa_init")
    params = list(_trainable(model).values())
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    trainable, total = count_parameters(model)

    step, metrics, best_step, best_loss, wall = 0, [], -1, math.inf, 0.0
    if saved is not None:
        _load_state(state_dir, saved, model, optimizer)
        step, metrics = saved["step"], saved["metrics"]
        best_step, best_loss, wall = saved["best_step"], saved["best_val_loss"], saved["wall_s"]

    def evaluate_and_save(row: dict[str, Any]) -> None:
        nonlocal best_step, best_loss
        row["val_loss"] = validation_loss(
            model, val_examples, micro_batch_size=config.micro_batch_size, pad_id=pad_id
        )
        if row["val_loss"] < best_loss:
            best_step, best_loss = row["step"], row["val_loss"]
            save_finetuned(model, method, best_dir, pissa_init=out / "pissa_init")

    def save_state() -> None:
        _save_state(
            state_dir,
            model,
            optimizer,
            {
                "fingerprint": fingerprint,
                "step": step,
                "metrics": metrics,
                "best_step": best_step,
                "best_val_loss": best_loss,
                "wall_s": wall,
            },
        )
        write_json(out / "metrics.json", metrics)
        write_csv(out / "metrics.csv", metrics)

    model.train()
    if step == 0 and not metrics:  # the loss before training: where every curve starts
        row = {"step": 0, "epoch": 0.0, "train_loss": None, "lr": 0.0, "elapsed_s": 0.0}
        row |= {"tokens_per_s": None, "peak_memory_mb": _peak_memory_mb(device)}
        evaluate_and_save(row)
        metrics.append(row)
        save_state()
    bar = _progress_bar(total_steps, step, progress)
    with _deferred_interrupt() as interrupted, contextlib.closing(bar):
        while step < total_steps and not interrupted["set"]:
            started = time.perf_counter()
            lr = learning_rate(step, total_steps, config)
            for group in optimizer.param_groups:
                group["lr"] = lr
            examples = _batch(train_examples, step, config)
            count = max(1, _tokens(examples))
            loss_total = 0.0
            for batch in _micro_batches(examples, config.micro_batch_size, pad_id, device):
                loss, _ = _loss_sum(model, batch)
                (loss / count).backward()
                loss_total += float(loss.detach())
            if config.max_grad_norm is not None:
                nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seconds = time.perf_counter() - started
            wall += seconds
            row = {
                "step": step,
                "epoch": step * config.batch_size / len(train_examples),
                "train_loss": loss_total / count,
                "val_loss": None,
                "lr": lr,
                "elapsed_s": wall,
                "tokens_per_s": count / seconds,
                "peak_memory_mb": _peak_memory_mb(device),
            }
            if step % config.eval_every == 0 or step == total_steps:
                evaluate_and_save(row)
            metrics.append(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['train_loss']:.3f}", best_val=f"{best_loss:.3f}")
            if row["val_loss"] is not None:
                save_state()
        if step < total_steps:
            save_state()  # the steps since the last evaluation are finished steps too: keep them
            raise Interrupted(
                f"interrupted after step {step} of {total_steps}; the state is saved in "
                f"{state_dir}: rerun the same command to resume"
            )
    with contextlib.suppress(ImportError):
        plot_losses(
            {method: metrics}, out / "val_loss.png", f"{method}: training and validation loss"
        )
    return RunResult(
        out=out,
        steps=total_steps,
        best_step=best_step,
        best_val_loss=best_loss,
        trainable_params=trainable,
        total_params=total,
        wall_time_s=wall,
        metrics=metrics,
    )
