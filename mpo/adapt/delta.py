"""The DoTA update ``x (MPO(T) - MPO(T0))^T`` of a linear layer, computed two ways.

A DoTA layer computes ``y = x W'^T + b`` with ``W' = W0 + Delta`` and
``Delta = MPO(T) - MPO(T0)`` (``out x in``): ``T`` the trainable cores, ``T0``
their frozen initial values, ``W0`` the untouched pretrained weight.

Both ways go through the two *halves* of the MPO, split at one bond of rank
``r`` (:func:`mpo.contract.half_plans`): ``L`` (``I_L J_L x r``, cores
``1..k``) and ``R`` (``r x I_R J_R``, cores ``k+1..N``), so that ``Delta``
viewed as ``(I_L, J_L, I_R, J_R)`` is the product ``L @ R`` (minus
``L0 @ R0``). The halves are small; everything full-size is one of:

* **factored** (few rows ``B``): ``x Delta^T`` through the halves, two matrix
  products per term, ``2 r (J I_R + I J_L)`` flops a row: cheap for
  generation, but per row as costly as the dense matrix once ``r >= 16``.
* **dense** (many rows): ``W0 + Delta`` is rebuilt in row blocks that stay in
  cache (``L_block @ R`` minus ``L0_block @ R0``, permuted and added to ``W0``
  in one pass), then one matrix product does the layer. Nothing full-size is
  saved for the backward: it rebuilds ``W'`` for ``dL/dx``, and turns
  ``dL/dDelta = dy^T x`` into the gradients of ``L`` and ``R`` block by block,
  without forming it whole. Against a frozen layer it adds the product
  ``dy^T x`` and two rebuilds: about 1.5x a frozen training step is its floor.

:func:`choose` picks one from a cost estimate. Both are exactly zero at
initialisation: the ``T`` and ``T0`` terms are computed by the same operations
on equal values and subtracted before anything else is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any

import torch

from mpo.contract import half_plans

__all__ = ["Layout", "choose", "delta_weight", "dense_forward", "factored_delta", "halves"]

# Bytes of one row block of the rebuild: small enough to stay in a core's cache.
_BLOCK_BYTES = 1 << 21


@dataclass(frozen=True)
class Layout:
    """How one adapter's cores sit in its layer's weight.

    ``transposed`` is True for transformers' ``Conv1D``, whose weight is stored
    ``(in, out)``; the MPO always describes the ``(out, in)`` matrix.
    """

    shapes: tuple[tuple[int, int, int, int], ...]
    transposed: bool

    @property
    def out_features(self) -> int:
        return prod(shape[1] for shape in self.shapes)

    @property
    def in_features(self) -> int:
        return prod(shape[2] for shape in self.shapes)

    @property
    def rank(self) -> int:
        """The bond rank ``r`` at which the halves meet."""
        return 1 if len(self.shapes) == 1 else self.shapes[half_plans(self.shapes)[0]][0]

    @property
    def blocks(self) -> tuple[int, int, int, int]:
        """``(I_L, J_L, I_R, J_R)``: the row and column sizes of the two halves."""
        if len(self.shapes) == 1:
            return self.out_features, self.in_features, 1, 1
        split = half_plans(self.shapes)[0]
        return (
            prod(shape[1] for shape in self.shapes[:split]),
            prod(shape[2] for shape in self.shapes[:split]),
            prod(shape[1] for shape in self.shapes[split:]),
            prod(shape[2] for shape in self.shapes[split:]),
        )


def halves(cores: list[Any], layout: Layout) -> tuple[Any, Any]:
    """``L`` (``I_L J_L x r``) and ``R`` (``r x I_R J_R``) with ``Delta ~ L @ R`` permuted."""
    if len(cores) == 1:
        return cores[0].reshape(-1, 1), cores[0].new_ones(1, 1)
    split, left_plan, right_plan = half_plans(layout.shapes)
    left = left_plan(*cores[:split])
    right = right_plan(*cores[split:])
    rank = left.shape[-1]
    return left.reshape(-1, rank), right.reshape(rank, -1)


def _steps(size: int, row_bytes: int) -> range:
    return range(0, size, max(1, _BLOCK_BYTES // max(1, row_bytes)))


def _merged(weight: Any, terms: list[tuple[Any, Any]], layout: Layout) -> Any:
    """``W0 + L R - L0 R0`` in the weight's layout and dtype, one cache-sized block at a time.

    ``terms`` is ``[(L, R)]`` or ``[(L, R), (L0, R0)]``. A ``Linear`` weight viewed
    as ``(I_L, I_R, J_L, J_R)`` is blocked along ``I_L``; a ``Conv1D`` weight,
    ``(J_L, J_R, I_L, I_R)``, along ``J_L``.
    """
    i_l, j_l, i_r, j_r = layout.blocks
    rank = terms[0][0].shape[1]
    merged = torch.empty_like(weight)
    lefts = [left.view(i_l, j_l, rank) for left, _ in terms]
    if layout.transposed:
        view = (j_l, j_r, i_l, i_r)
        steps = _steps(j_l, i_l * i_r * j_r * 4)
    else:
        view = (i_l, i_r, j_l, j_r)
        steps = _steps(i_l, j_l * i_r * j_r * 4)
    source, target = weight.view(view), merged.view(view)
    for start in steps:
        stop = start + steps.step
        block = None
        for (_, right), left in zip(terms, lefts, strict=True):
            rows = left[:, start:stop] if layout.transposed else left[start:stop]
            product = rows.reshape(-1, rank) @ right
            block = product if block is None else block.sub_(product)
        if layout.transposed:  # (I_L, c, I_R, J_R) -> (c, J_R, I_L, I_R)
            block = block.view(i_l, -1, i_r, j_r).permute(1, 3, 0, 2)
        else:  # (c, J_L, I_R, J_R) -> (c, I_R, J_L, J_R)
            block = block.view(-1, j_l, i_r, j_r).permute(0, 2, 1, 3)
        torch.add(source[start:stop], block.to(weight.dtype), out=target[start:stop])
    return merged


def _grad_halves(rows_dy: Any, rows_x: Any, left: Any, right: Any, layout: Layout) -> tuple:
    """Gradients of ``L`` and ``R`` from ``dL/dDelta = dy^T x``, one block of rows at a time.

    Regrouped as ``G[(i_L, j_L), (i_R, j_R)]``, ``dL/dL = G R^T`` and ``dL/dR = L^T G``;
    ``G`` is never whole in memory.
    """
    i_l, j_l, i_r, j_r = layout.blocks
    grad_left = torch.empty_like(left)
    grad_right = torch.zeros_like(right)
    steps = _steps(i_l, i_r * layout.in_features * 4)
    for start in steps:
        stop = min(start + steps.step, i_l)
        block = rows_dy[:, start * i_r : stop * i_r].T @ rows_x
        block = block.view(stop - start, i_r, j_l, j_r).permute(0, 2, 1, 3)
        block = block.reshape((stop - start) * j_l, i_r * j_r).to(left.dtype)
        torch.mm(block, right.T, out=grad_left[start * j_l : stop * j_l])
        grad_right.addmm_(left[start * j_l : stop * j_l].T, block)
    return grad_left, grad_right


@torch.no_grad()
def delta_weight(cores: list[Any], init: list[Any] | None, layout: Layout) -> Any:
    """``Delta = MPO(T) - MPO(T0)`` in the layout of the layer's weight, cores' dtype (no grad)."""
    shape = (
        (layout.in_features, layout.out_features)
        if layout.transposed
        else (layout.out_features, layout.in_features)
    )
    zeros = cores[0].new_zeros(shape)
    return _merged(zeros, _terms(cores, init, layout), layout)


def _terms(cores: list[Any], init: list[Any] | None, layout: Layout) -> list[tuple[Any, Any]]:
    terms = [halves(cores, layout)]
    if init is not None:
        terms.append(halves(init, layout))
    return terms


def _linear(x: Any, weight: Any, bias: Any, transposed: bool) -> Any:
    """The frozen layer's own arithmetic (``F.linear``, or ``Conv1D``'s ``addmm``), so that
    with ``Delta == 0`` the result is the base layer's bit for bit."""
    if not transposed:
        return torch.nn.functional.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    y = rows @ weight if bias is None else torch.addmm(bias, rows, weight)
    return y.view(*x.shape[:-1], weight.shape[-1])


class _DenseDelta(torch.autograd.Function):
    """``x (W0 + MPO(T) - MPO(T0))^T + b`` with the dense rebuild done twice, saved never."""

    @staticmethod
    def forward(ctx, x, weight, bias, layout, n, *cores_and_init):  # type: ignore[override]
        cores, init = list(cores_and_init[:n]), list(cores_and_init[n:]) or None
        # The update is rebuilt in the cores' dtype even under autocast, as in the backward.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            merged = _merged(weight, _terms(cores, init, layout), layout)
        with torch.no_grad():
            bias = None if bias is None else bias.to(x.dtype)
            y = _linear(x, merged.to(x.dtype), bias, layout.transposed)
        ctx.layout, ctx.n = layout, n
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight, *cores_and_init)
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, weight, *cores_and_init = ctx.saved_tensors
        layout, n = ctx.layout, ctx.n
        cores, init = cores_and_init[:n], list(cores_and_init[n:]) or None
        needs = ctx.needs_input_grad
        grad_x = grad_bias = None
        with torch.enable_grad():
            leaves = [core.detach().requires_grad_(True) for core in cores]
            left, right = halves(leaves, layout)
        with torch.no_grad():
            terms = [(left.detach(), right.detach())]
            if init is not None:
                terms.append(halves(init, layout))
            rows_dy = dy.reshape(-1, layout.out_features)
            if needs[0]:
                merged = _merged(weight, terms, layout).to(dy.dtype)
                grad_x = rows_dy @ (merged.T if layout.transposed else merged)
                grad_x = grad_x.view(x.shape).to(x.dtype)
                del merged
            rows_x = x.reshape(-1, layout.in_features).to(dy.dtype)
            grad_left, grad_right = _grad_halves(rows_dy, rows_x, *terms[0], layout)
            if ctx.has_bias and needs[2]:
                grad_bias = rows_dy.sum(0)
        core_grads = torch.autograd.grad((left, right), leaves, (grad_left, grad_right))
        return (grad_x, None, grad_bias, None, None, *core_grads, *([None] * len(init or [])))


def dense_forward(
    x: Any, weight: Any, bias: Any, cores: list[Any], init: list[Any] | None, layout: Layout
) -> Any:
    """``x (W0 + Delta)^T + b`` by the dense strategy (autograd: cores and ``x``)."""
    return _DenseDelta.apply(x, weight, bias, layout, len(cores), *cores, *(init or []))


def _through_halves(rows: Any, left: Any, right: Any, layout: Layout) -> Any:
    """``x Delta_term^T`` for ``x`` of shape ``(B, J_L, J_R)``: ``(B, I_L, I_R)`` out.

    First ``Z[b, j_L, r, i_R] = sum_{j_R} x[b, j_L, j_R] R[r, i_R, j_R]``, then
    ``y[b, i_L, i_R] = sum_{j_L, r} L[i_L, j_L, r] Z[b, j_L, r, i_R]``.
    """
    i_l, j_l, i_r, j_r = layout.blocks
    rank = left.shape[1]
    batch = rows.shape[0]
    right_t = right.view(rank, i_r, j_r).permute(2, 0, 1).reshape(j_r, rank * i_r)
    z = (rows.reshape(batch * j_l, j_r) @ right_t).view(batch, j_l * rank, i_r)
    return left.reshape(i_l, j_l * rank) @ z


def factored_delta(x: Any, terms: list[tuple[Any, Any]], layout: Layout) -> Any:
    """``x Delta^T`` through the halves (``terms`` as for :func:`halves`), no full-size matrix.

    Computed in the halves' dtype with autocast off (a bf16 difference of two
    nearly equal terms would lose most of its digits), returned in the halves' dtype.
    """
    dtype = terms[0][0].dtype
    rows = x.reshape(-1, *layout.blocks[1::2]).to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        out = _through_halves(rows, *terms[0], layout)
        if len(terms) > 1:
            out = out - _through_halves(rows, *terms[1], layout)
    return out.reshape(*x.shape[:-1], layout.out_features)


# One flop of the factored path's small products costs about this many flops of
# a large matrix product, and a rebuild of W0 + Delta costs about this many flops
# per weight entry on top of its products (memory traffic: blocks written,
# permuted and added). Fitted on a 2-core CPU to 4096 x 4096 and 11008 x 4096
# layers at R = 16 and 32 (benchmarks/layer_vs_lora.py).
_FACTORED_PENALTY = 1.5
_REBUILD_FLOPS_PER_ENTRY = 60.0


def choose(rows: int, layout: Layout, *, training: bool, with_init: bool) -> str:
    """``"factored"`` or ``"dense"``, whichever the cost estimate says is cheaper.

    Over a frozen layer, in units of large-matmul flops, with ``r`` the rank
    where the halves meet and ``t`` the number of terms (2 with ``T0``):

    * factored: ``p B 2 r (J I_R + I J_L)`` per term and pass; the forward
      passes every term, training adds the backward of ``T`` (two passes) and
      of ``T0`` (one);
    * dense: per rebuild ``2 I J r t`` plus ``c I J`` of memory traffic, one
      rebuild in the forward and one in the backward; training adds the
      ``2 B I J`` of ``dy^T x``.
    """
    if len(layout.shapes) == 1:
        return "dense"
    _, j_l, i_r, _ = layout.blocks
    size = layout.out_features * layout.in_features
    terms = 2 if with_init else 1
    per_row = 2 * layout.rank * (layout.in_features * i_r + layout.out_features * j_l)
    passes = (2 * terms + 1) if training else terms
    factored = _FACTORED_PENALTY * rows * per_row * passes
    rebuild = 2 * size * layout.rank * terms + _REBUILD_FLOPS_PER_ENTRY * size
    dense = rebuild * (2 if training else 1) + (2 * rows * size if training else 0)
    return "factored" if factored < dense else "dense"
