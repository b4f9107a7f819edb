"""How well the target matrices of a model compress into MPOs: errors, parameters, spectra.

:func:`analyze` picks the matrices DoTA would adapt (the rules of
:func:`mpo.adapt.plan` and :func:`mpo.adapt.wrap`) and, for each weight ``W``
(``out x in``; a ``Conv1D`` weight transposed) and each rank threshold ``R``,
decomposes it by TT-SVD and records

* the relative error ``||W - MPO_R(W)||_F / ||W||_F``, in float64;
* the parameters of the cores, ``rho = sum_k Rbar_{k-1} I_k J_k Rbar_k`` (Eq. 1);
* for context, the relative error of the best rank-``r`` approximation
  (truncated SVD, what LoRA and PiSSA keep of a weight) with at most as many
  parameters: ``r = floor(rho / (I + J))``, error ``1`` when ``r = 0``;

and once per weight the singular values of its ``N - 1`` bond unfoldings
(:func:`mpo.unfolding_spectra`), whose tails bound what any MPO with those
ranks can reach. The MPO at one rank is not a truncation of the MPO at a
larger one, so each rank is a decomposition of its own.

Weights are read one layer at a time on their own device, in float32 (float64
if stored so); nothing in the model changes.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import mpo
from mpo import report
from mpo.adapt.config import DoTAConfig, resolve_config
from mpo.adapt.targets import base_linear, find_targets, weight_shape
from mpo.atomic import write_bytes
from mpo.errors import MPOError

__all__ = ["Analysis", "AnalysisRow", "analyze"]

# what Analysis.write creates, in the order it returns them
_FILES = ("analysis.csv", "analysis.json", "errors.png", "spectra.png")
#: ``spectra.png`` shows the first module of each leaf name, at most this many.
_MAX_SPECTRA = 8


@dataclass(frozen=True)
class AnalysisRow:
    """One weight ``(out, in)`` at one rank threshold ``R``.

    ``bond_ranks`` are the ``N - 1`` inner ranks ``min(R, R_k)``, ``params`` the
    entries of the cores, ``mpo_error`` the relative Frobenius error of the
    MPO, and ``svd_error`` that of the truncated SVD of rank ``svd_rank`` (the
    largest with ``svd_rank (out + in) <= params``).
    """

    module: str
    shape: tuple[int, int]
    row_factors: tuple[int, ...]
    col_factors: tuple[int, ...]
    rank: int
    bond_ranks: tuple[int, ...]
    params: int
    mpo_error: float
    svd_rank: int
    svd_error: float

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form: tuples become lists."""
        return {
            "module": self.module,
            "shape": list(self.shape),
            "row_factors": list(self.row_factors),
            "col_factors": list(self.col_factors),
            "rank": self.rank,
            "bond_ranks": list(self.bond_ranks),
            "params": self.params,
            "mpo_error": self.mpo_error,
            "svd_rank": self.svd_rank,
            "svd_error": self.svd_error,
        }


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as err:
        raise MPOError('writing the plots needs matplotlib: pip install "mpo-dota[demo]"') from err
    matplotlib.use("Agg")  # files only: no display needed, none touched
    import matplotlib.pyplot as plt

    return plt


def _png(plt: Any, fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def _leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


@dataclass(frozen=True)
class Analysis:
    """What :func:`analyze` measured.

    Attributes:
        rows: one :class:`AnalysisRow` per target weight and rank, model order,
            ranks ascending within a weight.
        spectra: per module, the singular values (descending, float64) of its
            ``N - 1`` bond unfoldings, as :func:`mpo.unfolding_spectra` gives them.
    """

    rows: tuple[AnalysisRow, ...]
    spectra: Mapping[str, tuple[np.ndarray, ...]] = field(repr=False)

    @property
    def ranks(self) -> tuple[int, ...]:
        """The rank thresholds analysed, ascending."""
        return tuple(sorted({row.rank for row in self.rows}))

    def table(self) -> str:
        """One line per weight and rank: shapes, ranks, parameters, MPO and SVD errors."""
        header = ["module", "shape", "row factors", "col factors", "R", "bond ranks"]
        header += ["params", "MPO error", "SVD r", "SVD error"]
        rows = [
            [
                row.module,
                f"{row.shape[0]}x{row.shape[1]}",
                report.join(row.row_factors),
                report.join(row.col_factors),
                str(row.rank),
                report.join(row.bond_ranks),
                f"{row.params:,}",
                f"{row.mpo_error:.4f}",
                str(row.svd_rank),
                f"{row.svd_error:.4f}",
            ]
            for row in self.rows
        ]
        return report.table(header, rows, numeric_from=4)

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form: the rows, and each module's spectra as lists of floats."""
        return {
            "rows": [row.to_json() for row in self.rows],
            "spectra": {
                module: [values.tolist() for values in spectra]
                for module, spectra in self.spectra.items()
            },
        }

    def write(self, out_dir: str | os.PathLike[str]) -> list[Path]:
        """Write ``analysis.csv``, ``analysis.json``, ``errors.png`` and ``spectra.png``.

        The CSV has the rows of :meth:`to_json` with lists joined by commas;
        ``errors.png`` plots each module's relative error against ``R`` (MPO
        solid, truncated SVD at the same parameters dotted, one colour per leaf
        name); ``spectra.png`` has one panel per bond with the normalised
        singular values ``sigma_i / sigma_1`` of the first module of each leaf
        name. Each file is written to a temporary sibling and renamed into place.

        Returns:
            The paths written, in the order above.

        Raises:
            MPOError: matplotlib is not installed (checked before anything is written).
        """
        plt = _pyplot()
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        records = [row.to_json() for row in self.rows]
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=list(records[0]), lineterminator="\n")
        writer.writeheader()
        for record in records:
            writer.writerow(
                {key: report.join(v) if isinstance(v, list) else v for key, v in record.items()}
            )
        contents = {
            "analysis.csv": text.getvalue().encode(),
            "analysis.json": (json.dumps(self.to_json(), indent=2) + "\n").encode(),
            "errors.png": _png(plt, self._errors_figure(plt)),
            "spectra.png": _png(plt, self._spectra_figure(plt)),
        }
        paths = []
        for name in _FILES:
            write_bytes(folder / name, contents[name])
            paths.append(folder / name)
        return paths

    def _colours(self, plt: Any) -> dict[str, Any]:
        leaves = list(dict.fromkeys(_leaf(row.module) for row in self.rows))
        cycle = plt.get_cmap("tab10")
        return {leaf: cycle(i % 10) for i, leaf in enumerate(leaves)}

    def _errors_figure(self, plt: Any) -> Any:
        colours = self._colours(plt)
        by_module: dict[str, list[AnalysisRow]] = {}
        for row in self.rows:
            by_module.setdefault(row.module, []).append(row)
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        labelled: set[str] = set()
        for module, rows in by_module.items():
            leaf = _leaf(module)
            ranks = [row.rank for row in rows]
            ax.plot(
                ranks,
                [max(row.mpo_error, 1e-12) for row in rows],  # log axis: an exact MPO sits at 1e-12
                "o-",
                color=colours[leaf],
                alpha=0.7,
                label=None if leaf in labelled else leaf,
            )
            ax.plot(ranks, [max(row.svd_error, 1e-12) for row in rows], ":", color=colours[leaf])
            labelled.add(leaf)
        ax.plot([], [], "k:", label="truncated SVD, same params")
        ax.set_xscale("log", base=2)
        ax.set_xticks(self.ranks, [str(r) for r in self.ranks])
        ax.set_yscale("log")
        ax.set_xlabel("rank threshold R")
        ax.set_ylabel("||W - W'||_F / ||W||_F")
        ax.set_title(f"MPO (TT-SVD) error of {len(by_module)} matrices")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
        fig.tight_layout()
        return fig

    def _spectra_figure(self, plt: Any) -> Any:
        colours = self._colours(plt)
        shown: dict[str, str] = {}  # leaf name -> first module with it
        for module in self.spectra:
            shown.setdefault(_leaf(module), module)
        modules = list(shown.values())[:_MAX_SPECTRA]
        bonds = len(self.spectra[modules[0]])
        fig, axes = plt.subplots(1, bonds, figsize=(3.2 * bonds, 3.4), sharey=True, squeeze=False)
        for k, ax in enumerate(axes[0]):
            for module in modules:
                values = self.spectra[module][k]
                ax.plot(
                    np.arange(1, len(values) + 1),
                    np.maximum(values / values[0], 1e-12) if values[0] > 0 else values,
                    color=colours[_leaf(module)],
                    label=module,
                )
            longest = max(len(self.spectra[module][k]) for module in modules)
            for rank in self.ranks:
                if rank < longest:  # a rank beyond the spectrum would only stretch the axis
                    ax.axvline(rank, color="grey", linestyle=":", linewidth=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"bond {k + 1}")
            ax.set_xlabel("index i")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("sigma_i / sigma_1")
        axes[0][0].legend(fontsize="x-small")
        fig.suptitle("singular values of the bond unfoldings (dotted: the ranks analysed)")
        fig.tight_layout()
        return fig


def _check_ranks(ranks: int | Sequence[int]) -> tuple[int, ...]:
    values = (
        [ranks] if isinstance(ranks, int) else list(ranks) if isinstance(ranks, Sequence) else []
    )
    if not values or not all(isinstance(r, int) and not isinstance(r, bool) for r in values):
        raise MPOError(f"ranks must be a positive integer or a list of them, got {ranks!r}")
    if min(values) < 1:
        raise MPOError(f"every rank threshold must be at least 1, got ranks={list(values)}")
    return tuple(sorted(set(values)))


def _working_copy(name: str, module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight as float32 (float64 if stored so), on the layer's device
    (a DoTA layer's: its base layer's ``W0``)."""
    module = base_linear(module)
    weight = module.weight
    if weight.is_meta:
        raise MPOError(
            f"{name} has its weight on the meta device; load the model's weights "
            "(mpo.adapt.plan needs only shapes, analyze needs the values)"
        )
    if not weight.is_floating_point():
        raise MPOError(
            f"{name} holds a {weight.dtype} weight (a model loaded in 4 or 8 bits?); load it in "
            "bfloat16 or float32 to analyze it"
        )
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    matrix = weight.detach().to(dtype)
    return matrix if isinstance(module, nn.Linear) else matrix.T  # Conv1D stores (in, out)


def _relative_error(W: torch.Tensor, approximation: torch.Tensor, norm: float) -> float:
    # errors near 1e-4 would be noise if summed in float32 over millions of entries
    error = float(torch.linalg.vector_norm(W - approximation, dtype=torch.float64))
    return error / norm if norm > 0 else error  # every MPO of a zero matrix is exact


def _svd_error(
    singular_values: np.ndarray, shape: tuple[int, int], params: int
) -> tuple[int, float]:
    """``(r, error)`` of the best rank-``r`` approximation with ``r (I + J) <= params``."""
    r = params // sum(shape)
    energy = singular_values.astype(np.float64) ** 2
    total = energy.sum()
    return r, math.sqrt(energy[r:].sum() / total) if total > 0 else 0.0


def analyze(
    model: nn.Module,
    config: DoTAConfig | None = None,
    *,
    ranks: int | Sequence[int] = (4, 8, 16, 32),
    progress: bool | None = None,
    **overrides: Any,
) -> Analysis:
    """Decompose each target matrix of ``model`` at several ranks and measure the errors.

    Parameters:
        model: a ``torch.nn.Module`` with its weights loaded (any device and dtype).
        config: selects the targets and their factor shapes as for
            :func:`mpo.adapt.wrap`: ``target_modules``, ``exclude_modules``,
            ``num_cores``, ``shapes``; its ``rank`` is not used.
        ranks: the rank thresholds ``R`` to decompose at (sorted, duplicates dropped).
        progress: show a progress bar over the modules (default: on a terminal).
        **overrides: :class:`~mpo.adapt.config.DoTAConfig` fields replacing those of ``config``.

    Returns:
        An :class:`Analysis`; ``print`` it for the table, ``.write(folder)`` for
        the CSV, JSON and plots.

    Raises:
        MPOError: nothing matches ``target_modules``, a rank is below 1,
            ``num_cores < 2`` (no bond to truncate), ``rank=`` is passed (use
            ``ranks=``), or a target's weight is on the meta device or quantized.

    >>> import torch
    >>> from torch import nn
    >>> model = nn.ModuleDict({"q_proj": nn.Linear(64, 64), "v_proj": nn.Linear(64, 64)})
    >>> result = analyze(model, ranks=(2, 16), num_cores=3)
    >>> [(row.module, row.rank, row.bond_ranks, row.params) for row in result.rows]
    [('q_proj', 2, (2, 2), 128), ('q_proj', 16, (16, 16), 4608),
     ('v_proj', 2, (2, 2), 128), ('v_proj', 16, (16, 16), 4608)]
    >>> result.rows[1].mpo_error < 1e-6   # R = 16 is the full rank of 64 = 4 x 4 x 4: exact
    True
    >>> [len(values) for values in result.spectra["q_proj"]]
    [16, 16]
    """
    if "rank" in overrides:
        raise MPOError(
            f"analyze decomposes at several ranks: pass ranks=[{overrides['rank']}] (or a "
            "longer list) instead of rank="
        )
    thresholds = _check_ranks(ranks)
    resolved = resolve_config(config, overrides)
    if resolved.num_cores < 2:
        raise MPOError(
            f"num_cores={resolved.num_cores} gives an MPO without bonds, which is the matrix "
            "itself; analyze with num_cores >= 2 (the paper uses 5)"
        )
    rows: list[AnalysisRow] = []
    spectra: dict[str, tuple[np.ndarray, ...]] = {}
    for name, module in report.progress(
        find_targets(model, resolved), progress, "MPO: analyzing", "matrix"
    ):
        W = _working_copy(name, module)
        shape = weight_shape(module)
        factors = resolved.factor_shapes(*shape)
        spectra[name] = tuple(s.cpu().numpy() for s in mpo.unfolding_spectra(W, factors))
        # ((I, 1), (1, J)) is a 2-core shape whose only unfolding is W itself
        singular_values = mpo.unfolding_spectra(W, ((shape[0], 1), (1, shape[1])))[0].cpu()
        norm = float(torch.linalg.vector_norm(W, dtype=torch.float64))
        for rank in thresholds:
            decomposition = mpo.decompose(W, factors, rank)
            svd_rank, svd_error = _svd_error(
                singular_values.numpy(), shape, decomposition.num_params
            )
            rows.append(
                AnalysisRow(
                    module=name,
                    shape=shape,
                    row_factors=factors[0],
                    col_factors=factors[1],
                    rank=rank,
                    bond_ranks=decomposition.ranks,
                    params=decomposition.num_params,
                    mpo_error=_relative_error(W, decomposition.to_dense(), norm),
                    svd_rank=svd_rank,
                    svd_error=svd_error,
                )
            )
    return Analysis(rows=tuple(rows), spectra=spectra)
