"""The runnable examples stay runnable: each is executed at a small size."""

import json
import os
import subprocess
import sys
from pathlib import Path

import mpo

ROOT = Path(__file__).resolve().parents[1]


def test_compression_demo_writes_consistent_results(tmp_path):
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/compression_demo.py"),
            "--size",
            "256",
            "--out",
            str(tmp_path),
            "--no-plot",
        ],
        check=True,
        capture_output=True,
    )
    rows = json.loads((tmp_path / "results.json").read_text())
    assert {row["matrix"] for row in rows} == {"gaussian", "power-law", "smooth-kernel"}
    assert (tmp_path / "results.csv").read_text().count("\n") == len(rows) + 1
    factors = mpo.factorize(256)
    for row in rows:
        assert 0.0 <= row["mpo_error"] <= 1.0
        if row["matrix"] == "gaussian":
            assert row["params"] == mpo.param_count(factors, factors, row["R"])
    kernel = [row for row in rows if row["matrix"] == "smooth-kernel"]
    assert kernel[-1]["mpo_error"] < 1e-3


def test_the_reproduction_script_runs_a_rank_study_over_seeds(tiny_lm, instruction_data, tmp_path):
    train, test = instruction_data
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples/reproduce.py"),
            "ranks",
            "--ranks",
            "2",
            "4",
            "--seeds",
            "0",
            "1",
            "--steps",
            "2",
            "--eval-every",
            "1",
            "--val-size",
            "4",
            "--max-length",
            "256",
            "--model",
            str(tiny_lm),
            "--data",
            str(train),
            "--test",
            str(test),
            "--out",
            str(tmp_path),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    rows = json.loads((tmp_path / "results.json").read_text())
    assert [(r["label"], r["seed"]) for r in rows] == [
        ("R=2", 0),
        ("R=2", 1),
        ("R=4", 0),
        ("R=4", 1),
    ]
    assert rows[0]["trainable_params"] < rows[2]["trainable_params"]
    summary = (tmp_path / "summary.csv").read_text().splitlines()
    assert len(summary) == 3
    assert summary[0].startswith("label,method,rank,seeds")
    assert (tmp_path / "val_loss.png").stat().st_size > 0
