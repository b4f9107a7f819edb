"""The DoTA update ``x (MPO(T) - MPO(T0))^T`` of a linear layer, computed two ways.

A DoTA layer computes ``y = x W'^T + b`` with ``W' = W0 + Delta`` and
``Delta = MPO(T) - MPO(T0)`` (``out x in``): ``T`` the trainable cores, ``T0``
their frozen initial values, ``W0`` the untouched pretrained weight. There are
two ways to evaluate it, and which is cheaper depends on the number of rows
``B`` of ``x`` (tokens):

* **factored**: push ``x`` through the cores (an opt_einsum plan, cached):
  ``y = x W0^T + b + x MPO(T)^T - x MPO(T0)^T``. Its cost grows with ``B``
  times the contraction's flops per row, which for R >= 16 is about that of
  the dense matrix itself, so it wins only for a few rows (generation).
* **dense**: rebuild ``Delta`` and do one matrix product with ``W0 + Delta``.
  The rebuild is split at one bond into halves ``L`` (``I_L J_L x r``) and
  ``R`` (``r x I_R J_R``) so that ``Delta`` is a single matrix product
  written in place, and ``W0 + Delta`` is one pass over memory. Nothing
  full-size is saved for the backward: it rebuilds ``W'`` for ``dL/dx`` and
  turns ``dL/dDelta = dy^T x`` into the gradients of ``L`` and ``R`` with two
  thin products. Against a frozen layer it adds that one product ``dy^T x``,
  so about 1.5x a frozen layer's training step is its floor.

:func:`choose` picks one from a cost estimate (see its docstring). Both are
exactly zero at initialisation: ``MPO(T)`` and ``MPO(T0)`` are computed by the
same operations on equal values and subtracted before anything else is added.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import prod
from typing import Any

import torch

from mpo.contract import apply_plan, core_shapes, half_plans

__all__ = ["Layout", "choose", "delta_weight", "dense_forward", "factored_delta"]


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


def _halves(cores: list[Any], layout: Layout) -> tuple[Any, Any]:
    """``L`` (``I_L J_L x r``) and ``R`` (``r x I_R J_R``) with ``Delta ~ L @ R`` permuted."""
    if len(cores) == 1:
        return cores[0].reshape(-1, 1), cores[0].new_ones(1, 1)
    split, left_plan, right_plan = half_plans(layout.shapes)
    left = left_plan(*cores[:split])
    right = right_plan(*cores[split:])
    rank = left.shape[-1]
    return left.reshape(-1, rank), right.reshape(rank, -1)


def _product(cores: list[Any], init: list[Any] | None, layout: Layout) -> Any:
    """``Delta`` in the ``(I_L, J_L, I_R, J_R)`` layout of the halves' product."""
    left, right = _halves(cores, layout)
    delta = left @ right
    if init is not None:
        left0, right0 = _halves(init, layout)
        delta = delta - left0 @ right0
    return delta.view(layout.blocks)


def _as_weight_layout(delta4: Any, layout: Layout) -> Any:
    """View ``(I_L, J_L, I_R, J_R)`` as ``(I_L, I_R, J_L, J_R)`` (or transposed for Conv1D)."""
    return delta4.permute(1, 3, 0, 2) if layout.transposed else delta4.permute(0, 2, 1, 3)


def _merged(weight: Any, delta4: Any, layout: Layout) -> Any:
    """``W0 + Delta`` in the weight's own layout and dtype, in one pass over memory."""
    i_l, j_l, i_r, j_r = layout.blocks
    view = (j_l, j_r, i_l, i_r) if layout.transposed else (i_l, i_r, j_l, j_r)
    merged = weight.view(view) + _as_weight_layout(delta4, layout).to(weight.dtype)
    return merged.view(weight.shape)


def delta_weight(cores: list[Any], init: list[Any] | None, layout: Layout) -> Any:
    """``Delta = MPO(T) - MPO(T0)`` in the layout of the layer's weight, cores' dtype."""
    delta = _as_weight_layout(_product(cores, init, layout), layout)
    shape = (
        (layout.in_features, layout.out_features)
        if layout.transposed
        else (layout.out_features, layout.in_features)
    )
    return delta.reshape(shape)


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
            merged = _merged(weight, _product(cores, init, layout), layout)
        with torch.no_grad():
            y = _linear(
                x, merged.to(x.dtype), None if bias is None else bias.to(x.dtype), layout.transposed
            )
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
            left, right = _halves(leaves, layout)
        with torch.no_grad():
            delta4 = left @ right
            if init is not None:
                left0, right0 = _halves(init, layout)
                delta4 = delta4 - left0 @ right0
            delta4 = delta4.view(layout.blocks)
            if needs[0]:
                merged = _merged(weight, delta4, layout).to(dy.dtype)
                grad_x = (dy @ merged.T if layout.transposed else dy @ merged).to(x.dtype)
            del delta4
            rows_dy = dy.reshape(-1, layout.out_features)
            rows_x = x.reshape(-1, layout.in_features).to(dy.dtype)
            i_l, j_l, i_r, j_r = layout.blocks
            # dL/dDelta = dy^T x, regrouped as (I_L J_L) x (I_R J_R) to match L @ R.
            grad_delta = (rows_dy.T @ rows_x).view(i_l, i_r, j_l, j_r).permute(0, 2, 1, 3)
            grad_delta = grad_delta.reshape(i_l * j_l, i_r * j_r).to(left.dtype)
            grad_left = grad_delta @ right.detach().T
            grad_right = left.detach().T @ grad_delta
            del grad_delta
            if ctx.has_bias and needs[2]:
                grad_bias = rows_dy.sum(0)
        core_grads = torch.autograd.grad((left, right), leaves, (grad_left, grad_right))
        return (grad_x, None, grad_bias, None, None, *core_grads, *([None] * len(init or [])))


def dense_forward(
    x: Any, weight: Any, bias: Any, cores: list[Any], init: list[Any] | None, layout: Layout
) -> Any:
    """``x (W0 + Delta)^T + b`` by the dense strategy (autograd: cores and ``x``)."""
    return _DenseDelta.apply(x, weight, bias, layout, len(cores), *cores, *(init or []))


def factored_delta(x: Any, cores: list[Any], init: list[Any] | None, layout: Layout) -> Any:
    """``x Delta^T`` by pushing ``x`` through the cores, without any full-size matrix.

    Under autocast everything is cast once to the autocast dtype and the chain
    runs with autocast off: autocast would otherwise change the dtype halfway
    through opt_einsum's pairwise products.
    """
    device = x.device.type
    autocast = torch.is_autocast_enabled(device)
    dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
    rows = x.reshape(-1, *(shape[2] for shape in layout.shapes)).to(dtype)
    plan = apply_plan(rows.shape[0], core_shapes(cores), transpose=True)
    with torch.autocast(device, enabled=False):
        out = plan(rows, *(core.to(dtype) for core in cores))
        if init is not None:
            out = out - plan(rows, *(core.to(dtype) for core in init))
    return out.reshape(*x.shape[:-1], layout.out_features)


# One flop of the small einsum steps of the factored path costs about this many
# flops of a large matrix product, and one pass over a full-size matrix about
# this many flops per entry (memory-bound). Measured on 4096 x 4096 and
# 11008 x 4096 layers at R = 16 and 32 (benchmarks/layer_vs_lora.py).
_EINSUM_PENALTY = 2.0
_FLOPS_PER_PASS = 60.0


def choose(rows: int, layout: Layout, *, training: bool, with_init: bool) -> str:
    """``"factored"`` or ``"dense"``, whichever the cost estimate says is cheaper.

    Over a frozen layer, in units of large-matmul flops:

    * factored: ``p * F(B) * (5 if training else 2)`` with ``F(B)`` the flops of
      the cached contraction plan for ``B`` rows (forward through ``T`` and
      ``T0``; backward through ``T`` twice, ``T0`` once) and ``p`` the penalty
      of small einsum steps;
    * dense: ``2 B I J`` for ``dy^T x`` when training, plus, per rebuild (one in
      the forward, one in the backward), the halves' products ``4 I J r`` and
      about four passes over a full-size matrix.

    Without ``T0`` (random init) the factored and rebuild costs halve accordingly.
    """
    if len(layout.shapes) == 1:
        return "dense"
    size = layout.out_features * layout.in_features
    terms = 2 if with_init else 1
    factored = apply_plan(rows, layout.shapes, transpose=True).flops * _EINSUM_PENALTY
    factored *= (terms + 3) if training else terms
    rank = layout.shapes[half_plans(layout.shapes)[0]][0]
    rebuild = terms * 2 * size * rank + 4 * _FLOPS_PER_PASS * size
    dense = rebuild * (2 if training else 1) + (2 * rows * size if training else 0)
    return "factored" if factored < dense else "dense"
