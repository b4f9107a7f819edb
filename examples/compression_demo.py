"""Compression analysis of built-in matrices: MPO (TT-SVD) against a truncated SVD.

For three 1024 x 1024 matrices that the script builds itself, it decomposes
each into a 5-core MPO at rank thresholds R = 1..64 and prints, for every R,
the parameters the cores hold and the relative error ||W - MPO||_F / ||W||_F,
next to the error of the best low-rank (truncated SVD, what LoRA/PiSSA keep of a
weight) approximation with at most the same number of parameters (rank 0, error
1, when even rank 1 needs more):

* ``gaussian``: i.i.d. entries, the incompressible worst case;
* ``power-law``: random singular vectors with singular values ``k^-1``, the
  heavy-tailed spectrum of trained weight matrices;
* ``smooth-kernel``: ``exp(-|x_i - y_j|)`` on a grid, a matrix whose
  tensorized form has small TT ranks although its matrix rank is full.

Writes ``results.json``, ``results.csv`` and ``compression.png`` (error against
parameters) to ``--out``. Run with ``python dev.py demo`` or directly.
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np

import mpo
from mpo.atomic import write_bytes, write_csv, write_json

RANKS = (1, 2, 4, 8, 16, 32, 64)


def gaussian(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.standard_normal((n, n))


def power_law(n: int, rng: np.random.Generator) -> np.ndarray:
    u, _ = np.linalg.qr(rng.standard_normal((n, n)))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)))
    return (u * (1.0 / np.arange(1, n + 1))) @ v.T


def smooth_kernel(n: int, rng: np.random.Generator) -> np.ndarray:
    grid = np.linspace(0.0, 1.0, n)
    return np.exp(-np.abs(grid[:, None] - grid[None, :]))


MATRICES = {"gaussian": gaussian, "power-law": power_law, "smooth-kernel": smooth_kernel}


def low_rank_error_at_budget(singular_values: np.ndarray, shape: tuple[int, int], params: int):
    """Relative error of the best rank-r approximation with r (I + J) <= params (r may be 0)."""
    r = params // sum(shape)
    energy = singular_values**2
    return r, float(np.sqrt(energy[r:].sum() / energy.sum()))


def analyse(name: str, W: np.ndarray) -> list[dict]:
    singular_values = np.linalg.svd(W, compute_uv=False)
    norm = np.linalg.norm(W)
    rows = []
    for rank in RANKS:
        start = time.perf_counter()
        m = mpo.decompose(W, rank=rank)
        seconds = time.perf_counter() - start
        error = float(np.linalg.norm(m.to_dense() - W) / norm)
        svd_rank, svd_error = low_rank_error_at_budget(singular_values, W.shape, m.num_params)
        rows.append(
            {
                "matrix": name,
                "R": rank,
                "bond_ranks": list(m.ranks),
                "params": m.num_params,
                "compression": W.size / m.num_params,
                "mpo_error": error,
                "svd_rank_same_params": svd_rank,
                "svd_error": svd_error,
                "seconds": seconds,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    header = (
        f"{'matrix':<14} {'R':>3} {'params':>8} {'x smaller':>9} {'MPO err':>8} "
        f"{'SVD r':>5} {'SVD err':>8}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['matrix']:<14} {row['R']:>3} {row['params']:>8,} {row['compression']:>9.1f} "
            f"{row['mpo_error']:>8.4f} {row['svd_rank_same_params']:>5} {row['svd_error']:>8.4f}"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MATRICES), figsize=(4.2 * len(MATRICES), 3.6), sharey=True)
    for ax, name in zip(axes, MATRICES, strict=True):
        mine = [row for row in rows if row["matrix"] == name]
        params = [row["params"] for row in mine]
        ax.plot(params, [row["mpo_error"] for row in mine], "o-", label="MPO (TT-SVD)")
        ax.plot(params, [row["svd_error"] for row in mine], "s--", label="truncated SVD")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(name)
        ax.set_xlabel("parameters")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative error ||W - W'||_F / ||W||_F")
    axes[0].legend()
    fig.suptitle("1024 x 1024, N = 5 cores: error at equal parameter budgets")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    write_bytes(path, buffer.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="matrix side (default 1024)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib)")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    rows = []
    for name, build in MATRICES.items():
        W = build(args.size, rng).astype(np.float32)
        rows.extend(analyse(name, W))
    print(table(rows))

    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", rows)
    write_csv(args.out / "results.csv", rows)
    written = ["results.json", "results.csv"]
    if not args.no_plot:
        plot(rows, args.out / "compression.png")
        written.append("compression.png")
    print(f"\nwrote {', '.join(str(args.out / name) for name in written)}")


if __name__ == "__main__":
    main()
