"""Contractions of MPO cores, planned once by opt_einsum and reused.

Applying an MPO to a batch ``x`` (``B x I``) without forming the matrix is the
contraction

    y[b, j_1..j_N] = sum x[b, i_1..i_N] T1[a_0, i_1, j_1, a_1] ... TN[a_{N-1}, i_N, j_N, a_N],

whose cost depends heavily on the order in which the N + 1 operands are
paired. Choosing that order is opt_einsum's job; planning takes milliseconds,
so plans are cached per operand shapes and a repeated call only executes.
A :class:`ContractionPlan` prints opt_einsum's report (flops, largest
intermediate, the pairwise steps) so the choice can be inspected.
"""

from __future__ import annotations

import functools
import string
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import opt_einsum

from mpo.errors import MPOError

__all__ = ["ContractionPlan", "apply_plan", "core_shapes", "dense_plan", "half_plans"]


# Dynamic programming over pairings, scored by flops plus the size of what each
# step writes ("combo"): opt_einsum's flop-optimal search picks paths with huge
# intermediates (16x the size of x for 4096 x 4096 at R = 16), and 'greedy' was up to
# 6x slower on 11008 x 4096 layers (an intermediate 86x the size of x at 128 rows).
def _optimizer() -> opt_einsum.paths.PathOptimizer:
    return opt_einsum.DynamicProgramming(minimize="combo")


@dataclass(frozen=True)
class ContractionPlan:
    """A planned contraction: call it with the operands; ``print`` it for opt_einsum's report."""

    equation: str
    shapes: tuple[tuple[int, ...], ...]
    #: opt_einsum's expression for ``equation`` without its indices of size 1, which
    #: change no cost but defeat the search's pruning: every pairing through them costs
    #: the same, and x @ mpo, whose x meets every core, has 2^N of those (14 cores with
    #: factors of 1: 7.7 s to plan; 1 ms without them). Operands are reshaped to
    #: ``squeezed`` (views) on the way in and the result back to ``output`` on the way out.
    expression: Any
    squeezed: tuple[tuple[int, ...], ...]
    output: tuple[int, ...]
    info: Any
    #: ``equation`` in ASCII letters for torch.einsum (None past 52 indices): made here,
    #: since torch.compile cannot trace the renaming
    letters: str | None

    @property
    def flops(self) -> int:
        """Floating-point operations of the chosen path (opt_einsum's count)."""
        return int(self.info.opt_cost)

    @property
    def largest_intermediate(self) -> int:
        """Number of entries in the largest intermediate tensor of the path."""
        return int(self.info.largest_intermediate)

    def __call__(self, *operands: Any) -> Any:
        torch = sys.modules.get("torch")  # imported by whoever passes torch tensors
        if torch is not None and torch.compiler.is_compiling():
            # torch.compile cannot trace opt_einsum's expression; the path is only an
            # optimisation, and the compiler plans torch.einsum's contraction itself
            if self.letters is None:
                raise MPOError(
                    f"torch.compile can trace contractions of at most {len(string.ascii_letters)} "
                    "indices (about 16 cores); use fewer cores"
                )
            return torch.einsum(self.letters, *operands)
        shapes = tuple(tuple(x.shape) for x in operands)
        if shapes != self.shapes:  # a reshape would take any operand of the right size
            raise MPOError(f"this plan contracts operands of shapes {self.shapes}, got {shapes}")
        squeezed = (x.reshape(shape) for x, shape in zip(operands, self.squeezed, strict=True))
        return self.expression(*squeezed).reshape(self.output)

    def __str__(self) -> str:
        return str(self.info)


def _letters(equation: str) -> str | None:
    """``equation`` with its index symbols renamed to ASCII letters, the only ones
    ``torch.einsum`` takes (opt_einsum's symbols go past ``z`` and ``Z``); None if it
    has more than 52."""
    symbols = list(dict.fromkeys(c for c in equation if c not in ",->"))
    if len(symbols) > len(string.ascii_letters):
        return None
    letters = string.ascii_letters[: len(symbols)]
    return equation.translate(str.maketrans(dict(zip(symbols, letters, strict=True))))


def _core_symbols(n: int) -> tuple[list[str], list[str], list[str]]:
    """Symbols for the row indices i_k, column indices j_k and bonds a_0..a_N."""
    symbols = [opt_einsum.get_symbol(k) for k in range(3 * n + 2)]
    return symbols[:n], symbols[n : 2 * n], symbols[2 * n :]


def _core_terms(rows: list[str], cols: list[str], bonds: list[str]) -> list[str]:
    return [bonds[k] + rows[k] + cols[k] + bonds[k + 1] for k in range(len(rows))]


def _without_unit_indices(
    equation: str, shapes: tuple[tuple[int, ...], ...]
) -> tuple[str, tuple[tuple[int, ...], ...], tuple[int, ...]]:
    """``equation`` and ``shapes`` with every index of size 1 dropped, and the output's
    shape with them."""
    inputs, output = equation.split("->")
    terms = inputs.split(",")
    sizes = {
        s: d
        for term, shape in zip(terms, shapes, strict=True)
        for s, d in zip(term, shape, strict=True)
    }

    def kept(term: str) -> str:
        return "".join(s for s in term if sizes[s] != 1)

    squeezed = ",".join(kept(term) for term in terms) + "->" + kept(output)
    squeezed_shapes = tuple(tuple(d for d in shape if d != 1) for shape in shapes)
    return squeezed, squeezed_shapes, tuple(sizes[s] for s in output)


def _plan(equation: str, shapes: tuple[tuple[int, ...], ...]) -> ContractionPlan:
    squeezed, squeezed_shapes, output = _without_unit_indices(equation, shapes)
    _, info = opt_einsum.contract_path(
        squeezed, *squeezed_shapes, shapes=True, optimize=_optimizer()
    )
    expression = opt_einsum.contract_expression(squeezed, *squeezed_shapes, optimize=info.path)
    return ContractionPlan(
        equation, shapes, expression, squeezed_shapes, output, info, _letters(equation)
    )


@functools.lru_cache(maxsize=512)
def apply_plan(
    batch: int, core_shapes: tuple[tuple[int, int, int, int], ...], *, transpose: bool = False
) -> ContractionPlan:
    """Plan ``x @ W`` for ``x`` of shape ``(batch, I_1, ..., I_N)``.

    The result has shape ``(batch, J_1, ..., J_N)``.

    With ``transpose=True`` the plan computes ``x @ W^T``: ``x`` is ``(batch, J_1, ..., J_N)``
    and the result ``(batch, I_1, ..., I_N)``.

    >>> plan = apply_plan(8, ((1, 2, 3, 4), (4, 5, 6, 1)))
    >>> plan.equation
    'iab,eacf,fbdg->icd'
    """
    n = len(core_shapes)
    rows, cols, bonds = _core_symbols(n)
    batch_symbol = opt_einsum.get_symbol(3 * n + 2)
    source, target = (cols, rows) if transpose else (rows, cols)
    equation = (
        batch_symbol
        + "".join(source)
        + ","
        + ",".join(_core_terms(rows, cols, bonds))
        + "->"
        + batch_symbol
        + "".join(target)
    )
    x_shape = (batch, *(shape[2 if transpose else 1] for shape in core_shapes))
    return _plan(equation, (x_shape, *core_shapes))


@functools.lru_cache(maxsize=512)
def dense_plan(core_shapes: tuple[tuple[int, int, int, int], ...]) -> ContractionPlan:
    """Plan the contraction of all cores into the tensor ``(I_1, ..., I_N, J_1, ..., J_N)``.

    Writing the result directly in row-factors-then-column-factors order lets
    einsum fold the final permute into the last pairwise product, which is where
    most of a naive rebuild's time goes; a reshape then gives the ``I x J`` matrix.
    """
    rows, cols, bonds = _core_symbols(len(core_shapes))
    equation = ",".join(_core_terms(rows, cols, bonds)) + "->" + "".join(rows) + "".join(cols)
    return _plan(equation, tuple(core_shapes))


@functools.lru_cache(maxsize=512)
def half_plans(
    core_shapes: tuple[tuple[int, int, int, int], ...],
) -> tuple[int, ContractionPlan, ContractionPlan]:
    """Plans for the two halves of the matrix, split at the cheapest bond ``k``.

    The left half contracts cores ``1..k`` into ``L[i_1..i_k, j_1..j_k, r]`` and
    the right half cores ``k+1..N`` into ``R[r, i_{k+1}..i_N, j_{k+1}..j_N]``,
    so that the matrix, viewed as ``(I_L, J_L, I_R, J_R)``, is one matrix
    product ``L @ R`` of inner size ``r = R_k``. The bond minimises the flops of
    the halves plus the ``2 I J R_k`` of that product. Needs ``N >= 2``.
    """
    n = len(core_shapes)
    rows, cols, bonds = _core_symbols(n)
    terms = _core_terms(rows, cols, bonds)
    size = prod(shape[1] * shape[2] for shape in core_shapes)

    def halves(k: int) -> tuple[ContractionPlan, ContractionPlan]:
        left = ",".join(terms[:k]) + "->" + "".join(rows[:k] + cols[:k]) + bonds[k]
        right = ",".join(terms[k:]) + "->" + bonds[k] + "".join(rows[k:] + cols[k:])
        return _plan(left, core_shapes[:k]), _plan(right, core_shapes[k:])

    def cost(k: int) -> int:
        left, right = halves(k)
        return left.flops + right.flops + 2 * size * core_shapes[k][0]

    split = min(range(1, n), key=cost)
    return (split, *halves(split))


def core_shapes(cores: Sequence[Any]) -> tuple[tuple[int, int, int, int], ...]:
    """The shapes of ``cores`` as plain tuples, the key the plans are cached under."""
    return tuple(tuple(int(d) for d in core.shape) for core in cores)  # type: ignore[misc]
