"""The README's Python examples run as written (those that need no model on disk)."""

import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)
# The first decomposition defines W; the operations example builds on it.
RUNNABLE = [block for block in BLOCKS if "path/to" not in block]


def test_the_readme_has_runnable_examples():
    assert len(RUNNABLE) >= 3


def test_readme_examples_run_in_order_and_their_comments_hold(capsys):
    pytest.importorskip("torch")
    namespace: dict = {}
    for block in RUNNABLE:
        exec(compile(block, "README.md", "exec"), namespace)
    m = namespace["m"]
    assert (m.ranks, m.num_params) == ((16, 16, 16, 16), 37376)
    assert namespace["delta"].ranks == (32, 32, 32, 32)
    assert "Optimized FLOP count" in capsys.readouterr().out
