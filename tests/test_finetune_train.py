"""The training loop: schedule, gradient accumulation, the best checkpoint, resuming."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import re
import signal
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from mpo.errors import Interrupted, MPOError  # noqa: E402
from mpo.finetune.pipeline import FinetuneSpec, finetune  # noqa: E402
from mpo.finetune.train import TrainConfig, learning_rate  # noqa: E402


@given(
    total=st.integers(1, 500),
    ratio=st.floats(0, 0.5, allow_nan=False),
    peak=st.floats(1e-6, 1.0),
)
def test_the_schedule_warms_up_then_decays_and_never_exceeds_the_peak(total, ratio, peak):
    config = TrainConfig(learning_rate=peak, warmup_ratio=ratio)
    rates = [learning_rate(s, total, config) for s in range(total)]
    warmup = math.ceil(ratio * total)
    assert all(0 <= r <= peak * (1 + 1e-12) for r in rates)
    assert rates == sorted(rates[:warmup]) + rates[warmup:]
    decay = rates[warmup:]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    if decay:
        assert decay[0] == pytest.approx(peak)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_size": 6, "micro_batch_size": 4}, "not a multiple"),
        ({"learning_rate": 0.0}, "learning_rate must be positive"),
        ({"max_steps": 0}, "max_steps"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
    ],
)
def test_bad_recipes_are_refused(options, message):
    with pytest.raises(MPOError, match=message):
        TrainConfig(**options)


def spec(tiny_lm, data, **train):
    recipe = {"max_steps": 6, "batch_size": 4, "micro_batch_size": 2, "eval_every": 2}
    recipe |= {"learning_rate": 1e-2, **train}
    return FinetuneSpec(
        model=str(tiny_lm),
        data=str(data),
        method="dota",
        rank=4,
        num_cores=3,
        val_size=8,
        max_length=256,
        dtype="float32",
        train=TrainConfig(**recipe),
    )


def trained(folder):
    from safetensors.torch import load_file

    return load_file(folder / "state" / "trainable.safetensors")


def test_a_run_writes_metrics_and_keeps_the_best_checkpoint(tiny_lm, instruction_data, tmp_path):
    result = finetune(spec(tiny_lm, instruction_data[0]), tmp_path / "run", progress=False)
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [r["step"] for r in rows] == list(range(7))
    evaluated = {r["step"]: r["val_loss"] for r in rows if r["val_loss"] is not None}
    assert sorted(evaluated) == [0, 2, 4, 6]
    assert result.best_val_loss == min(evaluated.values())
    assert evaluated[result.best_step] == result.best_val_loss
    assert result.best_val_loss < evaluated[0]  # a learning rate of 1e-2 learns in 6 steps
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["result"]["best_step"] == result.best_step
    csv_lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(rows)
    for name in ("best/adapter/adapter_model.safetensors", "best/mpo_method.json", "val_loss.png"):
        assert (tmp_path / "run" / name).is_file()
    assert 0 < result.trainable_params < result.total_params


def test_micro_batches_give_the_gradient_of_the_whole_batch(tiny_lm, instruction_data, tmp_path):
    one = finetune(
        spec(tiny_lm, instruction_data[0], max_steps=2, micro_batch_size=4, eval_every=2),
        tmp_path / "one",
        progress=False,
    )
    two = finetune(
        spec(tiny_lm, instruction_data[0], max_steps=2, micro_batch_size=1, eval_every=2),
        tmp_path / "two",
        progress=False,
    )
    one_state, two_state = trained(tmp_path / "one"), trained(tmp_path / "two")
    assert one_state.keys() == two_state.keys()
    for name, tensor in one_state.items():
        torch.testing.assert_close(two_state[name], tensor, rtol=1e-4, atol=1e-6)
    assert one.metrics[1]["train_loss"] == pytest.approx(two.metrics[1]["train_loss"], rel=1e-5)


def test_an_interrupted_run_resumes_to_the_same_result(
    tiny_lm, instruction_data, tmp_path, monkeypatch
):
    straight = finetune(spec(tiny_lm, instruction_data[0]), tmp_path / "straight", progress=False)

    calls = {"n": 0}
    step = torch.optim.AdamW.step

    def interrupt_at_step_3(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C in the middle of an optimizer step
            os.kill(os.getpid(), signal.SIGINT)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupt_at_step_3)
    with pytest.raises(Interrupted, match="after step 3 of 6"):
        finetune(spec(tiny_lm, instruction_data[0]), tmp_path / "resumed", progress=False)
    monkeypatch.undo()
    progress = json.loads((tmp_path / "resumed" / "state" / "progress.json").read_text())
    assert progress["step"] == 3  # the step after the last evaluation was kept
    resumed = finetune(spec(tiny_lm, instruction_data[0]), tmp_path / "resumed", progress=False)

    for name, tensor in trained(tmp_path / "straight").items():
        torch.testing.assert_close(trained(tmp_path / "resumed")[name], tensor, rtol=0, atol=1e-6)
    assert [r["step"] for r in resumed.metrics] == list(range(7))
    for a, b in zip(straight.metrics[1:], resumed.metrics[1:], strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5, abs=0)
    assert resumed.best_step == straight.best_step


def test_resuming_with_other_settings_is_refused(tiny_lm, instruction_data, tmp_path):
    finetune(spec(tiny_lm, instruction_data[0], max_steps=2), tmp_path / "run", progress=False)
    with pytest.raises(
        MPOError, match=r"other settings \(config.learning_rate was 0.01, now 0.001\)"
    ):
        finetune(
            spec(tiny_lm, instruction_data[0], max_steps=2, learning_rate=1e-3),
            tmp_path / "run",
            progress=False,
        )
    restarted = finetune(
        spec(tiny_lm, instruction_data[0], max_steps=2, learning_rate=1e-3),
        tmp_path / "run",
        restart=True,
        progress=False,
    )
    assert restarted.steps == 2


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rank": 8}, "rank was 4, now 8"),  # other core shapes: loading them would crash
        ({"method": "pissa"}, "method was 'dota', now 'pissa'"),
    ],
)
def test_resuming_with_other_adapter_settings_names_them_and_writes_nothing(
    tiny_lm, instruction_data, tmp_path, change, message
):
    run = tmp_path / "run"
    finetune(spec(tiny_lm, instruction_data[0], max_steps=2), run, progress=False)
    files = sorted(p.relative_to(run) for p in run.rglob("*"))
    other = dataclasses.replace(spec(tiny_lm, instruction_data[0], max_steps=2), **change)
    with pytest.raises(MPOError, match=re.escape(message)):
        finetune(other, run, progress=False)
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == files


def test_the_loss_plot_shows_training_and_validation_losses(monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    module = sys.modules["mpo.finetune.train"]  # the package exports a function named train
    drawn = {}

    def capture(fig, ax, title, ylabel="validation loss"):
        lines = ax.get_lines()
        drawn.update(ylabel=ylabel, lines={ln.get_label(): ln.get_ydata() for ln in lines})
        drawn["colors"] = {ln.get_label(): ln.get_color() for ln in lines}
        return b"png"

    monkeypatch.setattr(module, "loss_png", capture)
    rows = [
        {"step": 0, "train_loss": None, "val_loss": 3.0},
        {"step": 1, "train_loss": 2.9},
        {"step": 2, "train_loss": 2.7, "val_loss": 2.8},
    ]
    module.plot_losses({"dota": rows}, tmp_path / "loss.png", "dota")
    assert drawn["ylabel"] == "loss"
    assert list(drawn["lines"]["dota (train)"]) == [2.9, 2.7]
    assert drawn["colors"]["dota (train)"] == drawn["colors"]["dota (validation)"]
    assert list(drawn["lines"]["dota (validation)"]) == [3.0, 2.8]
    assert (tmp_path / "loss.png").read_bytes() == b"png"


def test_a_state_left_aside_by_a_killed_save_is_resumed_not_restarted(
    tiny_lm, instruction_data, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    finetune(spec(tiny_lm, instruction_data[0], max_steps=2), run, progress=False)
    os.rename(run / "state", run / ".state.0123abcd.old")  # killed between the swap's renames

    def no_training(*args, **kwargs):
        raise AssertionError("the finished run was trained again")

    monkeypatch.setattr(torch.optim.AdamW, "step", no_training)
    again = finetune(spec(tiny_lm, instruction_data[0], max_steps=2), run, progress=False)
    assert again.steps == 2
    assert (run / "state").is_dir()
    assert not (run / ".state.0123abcd.old").exists()


def test_restart_ignores_a_state_left_aside_by_a_killed_save(tiny_lm, instruction_data, tmp_path):
    run = tmp_path / "run"
    finetune(spec(tiny_lm, instruction_data[0], max_steps=2), run, progress=False)
    os.rename(run / "state", run / ".state.0123abcd.old")  # killed between the swap's renames
    again = finetune(
        spec(tiny_lm, instruction_data[0], max_steps=3), run, restart=True, progress=False
    )
    assert again.steps == 3  # a fresh run with its own settings, not the old state
    assert not (run / ".state.0123abcd.old").exists()
