"""``mpo demo`` end to end on the shipped model, shrunk to a few steps and records."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import mpo.demo.run as demo
from mpo.cli import main


def test_the_demo_compares_the_methods_and_writes_table_and_curves(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "TRAIN_RECORDS", 80)
    monkeypatch.setattr(demo, "TEST_RECORDS_PER_TASK", 4)
    monkeypatch.setattr(demo, "VAL_RECORDS", 8)
    status = main(
        ["demo", "--out", str(tmp_path), "--steps", "2", "--methods", "dota,lora", "--quiet"]
    )
    assert status == 0
    out = capsys.readouterr().out
    table = out[out.index("arm ") :]
    assert table.splitlines()[0].split()[:4] == ["arm", "trainable", "share", "best"]
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in rows] == ["dota", "lora"]
    tasks = {"compare", "fill_blank", "multiple_choice", "word_problem"}
    for row in rows:
        assert set(row["accuracy"]) == tasks
        assert 0 <= row["average_accuracy"] <= 1
        assert row["best_val_loss"] > 0
    # the paper's defaults: DoTA R = 16 against LoRA r = 32, which trains more parameters
    assert (rows[0]["rank"], rows[1]["rank"]) == (16, 32)
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"]
    assert (tmp_path / "val_loss.png").stat().st_size > 0
    assert len((tmp_path / "data" / "train.json").read_text()) > 0


def test_a_method_named_twice_is_refused(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--methods", "dota,dota", "--quiet"]) == 2
    assert "two arms are labelled 'dota'" in capsys.readouterr().err
    assert not (tmp_path / "dota").exists()
