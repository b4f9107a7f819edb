"""Benchmark: ``mpo.decompose`` (TT-SVD) against tensorly's ``tensor_train_matrix``.

Both libraries decompose the same float32 matrix into an MPO (tensor-train matrix)
with the same factor shapes (``mpo.factorize(n, 5)``) and the same bond ranks
(``mpo.bond_ranks``), so they do the same job and the only differences are how.

What is measured, for 4096 x 4096 and 11008 x 4096 at rank thresholds R = 16 and 64
(rows x columns; a fixed seeded Gaussian matrix per size, the hardest case for
truncation because its spectra do not decay):

* **Speed ratios**, tensorly time / our time, each time the median of ``--repeats``
  runs timed with ``time.perf_counter``: numpy input against tensorly's numpy
  backend (bar: >= 10x) and torch input against its pytorch backend (bar: >= 5x).
  The four calls of a case take turns within each repeat so that drift of the
  machine hits all of them alike. Ours is warmed up once per case, untimed;
  tensorly is warmed up only on a small matrix, because a full-size warm-up
  costs as much as a timed run (its first, often slower, call is therefore
  among the timed runs; the median of 3 discards it, ``--warm-tensorly`` avoids it).
* **Accuracy**: the relative Frobenius error ``||W - B||_F / ||W||_F`` of each
  reconstruction, computed in float64; ours must agree with tensorly's to 1e-6
  relative, since both compute the same truncated TT-SVD.
* **Memory**: the peak of what numpy allocates during one ``decompose`` call on
  the numpy path (``tracemalloc`` sees numpy's array buffers, not LAPACK's
  workspaces), as a multiple of the matrix's size in bytes (bar: about 2x or less).

Thread counts are left at their defaults (torch: MKL/OpenMP, numpy: its own BLAS)
and printed in the header, together with the other machine details and the load
average: other jobs on the machine slow every call, and the times with them.

Run it with the project's runner, which installs the ``bench`` extra into ``.venv``::

    python dev.py bench                      # full run, ~10 minutes on 2 cores
    python dev.py bench --quick --repeats 1  # 4096 x 4096 at R = 16 only

or directly, in an environment with ``mpo``, torch and tensorly installed::

    python benchmarks/decompose_vs_tensorly.py --repeats 3 --out results.json

``--spectrum decaying`` (or ``both``) adds a matrix whose singular values fall as 1/k.
That is the matrix's spectrum; the TT unfoldings mix its rows and columns, so
their spectra decay little more than a Gaussian's and the errors stay close to 1.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tensorly as tl
import torch
from _common import load_average, machine_info, table, verdict
from tensorly.decomposition import tensor_train_matrix

import mpo
from mpo.atomic import write_json

SIZES: tuple[tuple[int, int], ...] = ((4096, 4096), (11008, 4096))
RANKS: tuple[int, ...] = (16, 64)
NUM_CORES = 5
NUMPY_BAR = 10.0  # tensorly-numpy time / ours-numpy time must be at least this
TORCH_BAR = 5.0  # tensorly-torch time / ours-torch time must be at least this
ERROR_BAR = 1e-6  # |our error - tensorly's error| / tensorly's error must be at most this
MEMORY_BAR = 2.05  # peak extra numpy memory / matrix bytes: "about 2x or less"
METHODS = ("ours_numpy", "tensorly_numpy", "ours_torch", "tensorly_torch")
# Rows of the float64 copies made while measuring an error: bounds them to ~64 MiB each.
ERROR_BLOCK_ROWS = 2048


@dataclass
class Case:
    """One matrix and rank threshold, with the factor shapes and bond ranks both libraries use."""

    rows: int
    cols: int
    rank: int
    spectrum: str
    row_factors: tuple[int, ...]
    col_factors: tuple[int, ...]
    bond_ranks: tuple[int, ...]

    @property
    def label(self) -> str:
        suffix = "" if self.spectrum == "gaussian" else f" ({self.spectrum})"
        return f"{self.rows}x{self.cols}{suffix}"


@dataclass
class CaseResult:
    case: Case
    times: dict[str, list[float]] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    peak_memory_ratio: float = float("nan")

    def median(self, method: str) -> float:
        return statistics.median(self.times[method])

    @property
    def numpy_ratio(self) -> float:
        return self.median("tensorly_numpy") / self.median("ours_numpy")

    @property
    def torch_ratio(self) -> float:
        return self.median("tensorly_torch") / self.median("ours_torch")

    @property
    def spread(self) -> float:
        """Largest slowest/fastest run among the methods: well above 1, the machine was busy."""
        return max(max(runs) / min(runs) for runs in self.times.values())

    def error_gap(self, backend: str) -> float:
        """Relative difference between our error and tensorly's on one backend."""
        ours, theirs = self.errors[f"ours_{backend}"], self.errors[f"tensorly_{backend}"]
        return abs(ours - theirs) / theirs

    def passes(self) -> dict[str, bool]:
        return {
            "numpy_speed": self.numpy_ratio >= NUMPY_BAR,
            "torch_speed": self.torch_ratio >= TORCH_BAR,
            "error_numpy": self.error_gap("numpy") <= ERROR_BAR,
            "error_torch": self.error_gap("torch") <= ERROR_BAR,
            "memory": self.peak_memory_ratio <= MEMORY_BAR,
        }


# --- inputs ---------------------------------------------------------------------------------


def make_matrix(rows: int, cols: int, spectrum: str) -> np.ndarray:
    """A fixed float32 matrix per size: Gaussian, or Gaussian factors around a power law."""
    rng = np.random.default_rng([rows, cols])  # seeded by the size, so runs are comparable
    if spectrum == "gaussian":
        return rng.standard_normal((rows, cols), dtype=np.float32)
    # Singular values ~ k^-1: most energy in few directions, as in trained weights.
    inner = min(rows, cols)
    scale = (np.arange(1, inner + 1, dtype=np.float32) ** -1.0) / np.sqrt(inner, dtype=np.float32)
    left = rng.standard_normal((rows, inner), dtype=np.float32) * scale
    return left @ rng.standard_normal((inner, cols), dtype=np.float32)


def make_cases(quick: bool, spectra: list[str]) -> list[Case]:
    sizes, ranks = (SIZES[:1], RANKS[:1]) if quick else (SIZES, RANKS)
    cases = []
    for spectrum in spectra:
        for rows, cols in sizes:
            row_f, col_f = mpo.factorize(rows, NUM_CORES), mpo.factorize(cols, NUM_CORES)
            for rank in ranks:
                bonds = mpo.bond_ranks(row_f, col_f, rank)
                cases.append(Case(rows, cols, rank, spectrum, row_f, col_f, bonds))
    return cases


# --- the four contenders --------------------------------------------------------------------


def _tensorly_ranks(case: Case) -> list[int]:
    # A fresh list each call: tensorly writes the ranks it used back into the list it gets.
    return [1, *case.bond_ranks, 1]


def contenders(case: Case, W: np.ndarray) -> dict[str, Callable[[], Any]]:
    """Zero-argument calls for each method; inputs are prepared here so no call times a copy."""
    shape = (case.row_factors, case.col_factors)
    W_torch = torch.from_numpy(W)  # shares memory with W
    tensorized = (*case.row_factors, *case.col_factors)  # tensorly wants (I1..IN, J1..JN)
    W_tl_numpy, W_tl_torch = W.reshape(tensorized), W_torch.reshape(tensorized)

    def tensorly_on(backend: str, tensor: Any) -> Callable[[], Any]:
        def call() -> Any:
            tl.set_backend(backend)  # global switch, microseconds; kept with its call
            return tensor_train_matrix(tensor, _tensorly_ranks(case))

        return call

    return {
        "ours_numpy": lambda: mpo.decompose(W, shape, rank=case.rank),
        "tensorly_numpy": tensorly_on("numpy", W_tl_numpy),
        "ours_torch": lambda: mpo.decompose(W_torch, shape, rank=case.rank),
        "tensorly_torch": tensorly_on("pytorch", W_tl_torch),
    }


def reconstruct(method: str, result: Any, case: Case) -> np.ndarray:
    """The dense float32 matrix a method's result represents, as numpy."""
    if method.startswith("ours"):
        dense = result.to_dense()
        # Bond ranks must match, or the comparison is between different jobs.
        assert tuple(result.ranks) == case.bond_ranks, (result.ranks, case.bond_ranks)
    else:
        tl.set_backend("numpy" if method.endswith("numpy") else "pytorch")
        ranks = tuple(int(core.shape[-1]) for core in result[:-1])
        assert ranks == case.bond_ranks, (ranks, case.bond_ranks)
        dense = tl.tt_matrix_to_tensor(result)
    if isinstance(dense, torch.Tensor):
        dense = dense.numpy()
    return dense.reshape(case.rows, case.cols)


def relative_error(W: np.ndarray, B: np.ndarray) -> float:
    """``||W - B||_F / ||W||_F`` in float64, a slab of rows at a time to bound the copies."""
    residual = norm = 0.0
    for start in range(0, W.shape[0], ERROR_BLOCK_ROWS):
        w = W[start : start + ERROR_BLOCK_ROWS].astype(np.float64).ravel()
        d = w - B[start : start + ERROR_BLOCK_ROWS].astype(np.float64).ravel()
        residual += float(d @ d)
        norm += float(w @ w)
    return (residual / norm) ** 0.5


def peak_memory_ratio(case: Case, W: np.ndarray) -> float:
    """Peak numpy allocation during one numpy-path decompose, in multiples of ``W.nbytes``."""
    tracemalloc.start()  # started after W exists, so W itself is not counted
    try:
        mpo.decompose(W, (case.row_factors, case.col_factors), rank=case.rank)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak / W.nbytes


# --- running --------------------------------------------------------------------------------


def warm_up_tensorly() -> None:
    """Load tensorly's lazily-built paths on a small matrix, once per backend."""
    small = np.random.default_rng(0).standard_normal((4, 4, 4, 4), dtype=np.float32)
    for backend, tensor in (("numpy", small), ("pytorch", torch.from_numpy(small))):
        tl.set_backend(backend)
        tensor_train_matrix(tensor, [1, 4, 1])


def run_case(case: Case, repeats: int, warm_tensorly: bool) -> CaseResult:
    W = make_matrix(case.rows, case.cols, case.spectrum)
    calls = contenders(case, W)
    warm = METHODS if warm_tensorly else ("ours_numpy", "ours_torch")
    for method in warm:  # first calls pay for lazy imports and first touches of big buffers
        calls[method]()
    result = CaseResult(case, times={method: [] for method in METHODS})
    firsts: dict[str, Any] = {}
    for _ in range(repeats):
        for method in METHODS:  # take turns, so machine drift hits every method alike
            start = time.perf_counter()
            output = calls[method]()
            result.times[method].append(time.perf_counter() - start)
            firsts.setdefault(method, output)
            del output
    for method, output in firsts.items():
        result.errors[method] = relative_error(W, reconstruct(method, output, case))
    result.peak_memory_ratio = peak_memory_ratio(case, W)
    return result


# --- reporting ------------------------------------------------------------------------------


def speed_table(results: list[CaseResult]) -> str:
    header = [
        "matrix",
        "R",
        "numpy: tensorly/ours",
        f">= {NUMPY_BAR:g}x",
        "torch: tensorly/ours",
        f">= {TORCH_BAR:g}x",
        "ours np (s)",
        "tensorly np (s)",
        "ours torch (s)",
        "tensorly torch (s)",
        "spread",
    ]
    rows = []
    for r in results:
        ok = r.passes()
        medians = [f"{r.median(method):.3f}" for method in METHODS]
        rows.append(
            [
                r.case.label,
                str(r.case.rank),
                f"{r.numpy_ratio:.1f}x",
                verdict(ok["numpy_speed"]),
                f"{r.torch_ratio:.1f}x",
                verdict(ok["torch_speed"]),
                *medians,
                f"{r.spread:.1f}x",
            ]
        )
    return table(header, rows)


def accuracy_table(results: list[CaseResult]) -> str:
    header = [
        "matrix",
        "R",
        "bond ranks",
        "error ours np",
        "error tensorly np",
        "rel diff np",
        "rel diff torch",
        f"<= {ERROR_BAR:g}",
        "peak mem / W",
        f"<= {MEMORY_BAR:g}x",
    ]
    rows = []
    for r in results:
        ok = r.passes()
        rows.append(
            [
                r.case.label,
                str(r.case.rank),
                str(r.case.bond_ranks),
                f"{r.errors['ours_numpy']:.7f}",
                f"{r.errors['tensorly_numpy']:.7f}",
                f"{r.error_gap('numpy'):.1e}",
                f"{r.error_gap('torch'):.1e}",
                verdict(ok["error_numpy"] and ok["error_torch"]),
                f"{r.peak_memory_ratio:.2f}x",
                verdict(ok["memory"]),
            ]
        )
    return table(header, rows)


def print_header(info: dict[str, Any], repeats: int, warm_tensorly: bool) -> None:
    print("# mpo.decompose vs tensorly.decomposition.tensor_train_matrix\n")
    print(f"- date: {info['date']}, {info['platform']}, {info['processor']}")
    print(f"- CPUs: {info['cpu_count']} ({info['cpus_usable']} usable); thread env: {info['env']}")
    print(
        f"- numpy {info['numpy']} ({info['numpy_blas']}, {info['numpy_blas_threads']} threads), "
        f"torch {info['torch']} ({info['torch_threads']} threads, "
        f"{info['torch_interop_threads']} interop), tensorly {info['tensorly']}, "
        f"mpo {info['mpo']} at {info['commit']}, Python {info['python']}"
    )
    print(
        f"- float32, factor shapes from mpo.factorize(n, {NUM_CORES}), equal bond ranks; "
        f"times are medians of {repeats} run(s), ratio = tensorly / ours (higher is better)"
    )
    if warm_tensorly:
        print("- every method warmed up once per case at full size (untimed)")
    else:
        print(
            "- ours warmed up once per case at full size (untimed); tensorly only on a 4x4x4x4 "
            "tensor, so its first full-size call (often slower) is among the timed runs"
        )
    print(f"- load average at start: {info['load_average_at_start']}\n", flush=True)


def print_report(results: list[CaseResult]) -> None:
    print("\n## Speed\n")
    print(speed_table(results))
    print(
        "\nspread = largest slowest/fastest run of any method; well above 1 means other work "
        "shared the CPUs (the load average counts this run's own threads too)"
    )
    print("\n## Accuracy and memory\n")
    print(accuracy_table(results))
    print(
        "\nerror = ||W - B||_F / ||W||_F in float64; rel diff = |ours - tensorly| / tensorly "
        "per backend; peak mem = tracemalloc peak of numpy buffers during one numpy-path "
        "decompose (LAPACK workspaces not seen) / W.nbytes"
    )
    failed = [
        f"{r.case.label} R={r.case.rank}: {name}"
        for r in results
        for name, ok in r.passes().items()
        if not ok
    ]
    print(f"\nload average at end: {load_average()}")
    print(f"all bars: {'PASS' if not failed else 'FAIL (' + '; '.join(failed) + ')'}")


def to_json(
    info: dict[str, Any], repeats: int, warm_tensorly: bool, results: list[CaseResult]
) -> dict[str, Any]:
    cases = []
    for r in results:
        cases.append(
            {
                **asdict(r.case),
                "times_s": r.times,
                "median_s": {method: r.median(method) for method in METHODS},
                "numpy_ratio": r.numpy_ratio,
                "torch_ratio": r.torch_ratio,
                "spread": r.spread,
                "errors": r.errors,
                "error_rel_diff_numpy": r.error_gap("numpy"),
                "error_rel_diff_torch": r.error_gap("torch"),
                "peak_memory_ratio": r.peak_memory_ratio,
                "passes": r.passes(),
            }
        )
    bars = {
        "numpy_ratio_min": NUMPY_BAR,
        "torch_ratio_min": TORCH_BAR,
        "error_rel_diff_max": ERROR_BAR,
        "peak_memory_ratio_max": MEMORY_BAR,
    }
    return {
        "machine": info,
        "load_average_at_end": load_average(),
        "repeats": repeats,
        "tensorly_warmed_up": warm_tensorly,
        "bars": bars,
        "cases": cases,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--quick", action="store_true", help="only 4096 x 4096 at R = 16")
    parser.add_argument("--spectrum", choices=("gaussian", "decaying", "both"), default="gaussian")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument(
        "--warm-tensorly",
        action="store_true",
        help="also warm tensorly up at full size (costs one extra tensorly run per case)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    spectra = ["gaussian", "decaying"] if args.spectrum == "both" else [args.spectrum]
    info = machine_info(libraries=(tl,))
    print_header(info, args.repeats, args.warm_tensorly)
    warm_up_tensorly()
    results = []
    for case in make_cases(args.quick, spectra):
        print(f"running {case.label} R={case.rank} ...", flush=True)
        results.append(run_case(case, args.repeats, args.warm_tensorly))
    print_report(results)
    if args.out is not None:
        write_json(args.out, to_json(info, args.repeats, args.warm_tensorly, results))
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
