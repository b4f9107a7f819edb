"""Shared strategies and helpers for the test suite."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings
from hypothesis import strategies as st

settings.register_profile("default", deadline=None, max_examples=40, print_blob=True)
settings.load_profile("default")

BACKENDS = ["numpy", "torch"]

#: A LLaMA small enough to build, wrap and train in milliseconds (grouped-query attention).
TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@st.composite
def factor_shapes(draw, min_cores: int = 2, max_cores: int = 6, max_entries: int = 2048):
    """(row_factors, col_factors): 2-6 cores, factors 1-6, at most max_entries matrix entries."""
    n = draw(st.integers(min_cores, max_cores))
    factors = [1] * (2 * n)
    budget = max_entries
    for slot in draw(st.permutations(range(2 * n))):
        factors[slot] = draw(st.integers(1, max(1, min(6, budget))))
        budget //= factors[slot]
    return tuple(factors[:n]), tuple(factors[n:])


def gaussian(shape, seed: int, dtype=np.float64, backend: str = "numpy"):
    """A seeded Gaussian matrix as a numpy array or a torch tensor."""
    array = np.random.default_rng(seed).standard_normal(shape).astype(dtype)
    if backend == "torch":
        torch = pytest.importorskip("torch")
        return torch.from_numpy(array)
    return array


def to_numpy64(x) -> np.ndarray:
    """Any array as a float64 numpy array (errors are compared in float64)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def rel_error(approx, exact) -> float:
    a, e = to_numpy64(approx), to_numpy64(exact)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))
