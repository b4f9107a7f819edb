"""The runnable examples stay runnable: each is executed at a small size."""

import json
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
