"""The DoTA update ``x (MPO(T) - MPO(T0))^T`` of a linear layer, computed two ways.

A DoTA layer computes ``y = x W'^T + b`` with ``W' = W0 + Delta`` and
``Delta = MPO(T) - MPO(T0)`` (``out x in``): ``T`` the trainable cores, ``T0``
their frozen initial values, ``W0`` the untouched pretrained weight.

Both ways go through the two *halves* of the MPO, split at one bond of rank
``r`` (:func:`mpo.contract.half_plans`): ``L`` (``I_L J_L x r``, cores
``1..k``) and ``R`` (``r x I_R J_R``, cores ``k+1..N``), so that ``Delta``
viewed as ``(I_L, J_L, I_R, J_R)`` is ``L R - L0 R0``, which :func:`pair` writes
as one product ``A @ B`` of inner size ``2r``. The halves are small; everything
full-size is one of:

* **factored** (few rows ``B``): ``x Delta^T`` through ``A`` and ``B``,
  ``4 r (J I_R + I J_L)`` flops a row: cheap for generation, but per row as
  costly as the dense matrix once ``r >= 16``.
* **dense** (many rows): ``W0 + Delta`` is rebuilt one block of rows at a time
  (``A_block @ B``, permuted and added to ``W0``'s rows), each block used at once
  for its columns of ``y``, so ``W0 + Delta`` is whole in memory only when it fits
  one block's budget, and never saved for the backward. The backward rebuilds it
  in blocks of columns, for ``dL/dx`` and for the same columns of
  ``dL/dDelta = dy^T x``, which it turns
  into the gradients of ``L`` and ``R`` at once. Against a frozen layer this adds
  the product ``dy^T x`` and two rebuilds: 1.5x a frozen training step is its floor.
  On a CPU, a weight of 32 MiB or more is rebuilt whole instead, into one buffer that
  every layer shares (:class:`_Workspace`), and ``dy^T x`` is then
  formed there too.

:func:`choose` picks one from a cost estimate. Both are exactly zero at
initialisation, where every term of ``A @ B`` has a zero factor; the dense
strategy then returns the base layer's own product, since a blocked one may
round differently.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch

from mpo.contract import half_plans

__all__ = [
    "Layout",
    "apply_factored",
    "choose",
    "delta_weight",
    "dense_forward",
    "factored_delta",
    "factored_operands",
    "halves",
    "pair",
]


@dataclass(frozen=True)
class Layout:
    """How one adapter's cores sit in its layer's weight.

    ``transposed`` is True for transformers' ``Conv1D``, whose weight is stored
    ``(in, out)``; the MPO always describes the ``(out, in)`` matrix.
    """

    shapes: tuple[tuple[int, int, int, int], ...]
    transposed: bool
    #: the bond at which the halves meet, chosen by :func:`mpo.contract.half_plans` once,
    #: here (torch.compile then reads a constant); None for one core
    split: int | None = field(init=False, repr=False, compare=False)
    #: the ``(out, in)`` matrix's sizes
    out_features: int = field(init=False, repr=False, compare=False)
    in_features: int = field(init=False, repr=False, compare=False)
    #: the bond rank ``r`` at which the halves meet
    rank: int = field(init=False, repr=False, compare=False)
    #: ``(I_L, J_L, I_R, J_R)``: the row and column sizes of the two halves
    blocks: tuple[int, int, int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # all computed here, once: properties computed per call cost host time on every
        # forward, and torch.compile(fullgraph=True) cannot trace functools.cached_property
        # (it takes a lock on Python < 3.12)
        rows = tuple(shape[1] for shape in self.shapes)
        cols = tuple(shape[2] for shape in self.shapes)
        split = half_plans(self.shapes)[0] if len(self.shapes) > 1 else None
        values = {
            "split": split,
            "out_features": prod(rows),
            "in_features": prod(cols),
            "rank": 1 if split is None else self.shapes[split][0],
            "blocks": (
                (prod(rows), prod(cols), 1, 1)
                if split is None
                else (
                    prod(rows[:split]),
                    prod(cols[:split]),
                    prod(rows[split:]),
                    prod(cols[split:]),
                )
            ),
        }
        for name, value in values.items():
            object.__setattr__(self, name, value)


def halves(cores: list[Any], layout: Layout) -> tuple[Any, Any]:
    """``L`` (``I_L J_L x r``) and ``R`` (``r x I_R J_R``) with ``Delta ~ L @ R`` permuted.

    Each half is a chain of cores, contracted one matrix product per bond from its
    outer end (left to right for ``L``, right to left for ``R``), then permuted
    into rows-then-columns order once; :func:`mpo.contract.half_plans` chooses the
    split. Executing its opt_einsum plans per call instead cost about a third of a
    small layer's training step on a CPU, in Python bookkeeping alone. Plain torch
    operations: autograd, autocast and ``torch.func`` treat them as any others (the
    dense strategy takes their gradients itself, :func:`_chain_gradients`).
    """
    return _halves_of(cores, layout)[1]


def _halves_of(cores: list[Any], layout: Layout) -> tuple[_Chains | None, tuple[Any, Any]]:
    """The chains of :func:`halves` (None for one core: ``L`` is the core, ``R`` one)
    and the halves they give."""
    if layout.split is None:
        return None, (cores[0].reshape(-1, 1), cores[0].new_ones(1, 1))
    chains = _Chains(cores, layout.split)
    return chains, chains.halves()


class _Chains:
    """The products of :func:`halves`: ``lefts[m]`` contracts cores ``0..m`` and
    ``rights[m]`` the last ``m + 1`` cores, as matrices with the open bond last, resp. first.

    Left chain (cores ``1..k``): ``P_1 = C_1`` as ``(i_1 j_1, a_1)`` and
    ``P_m = P_{m-1} @ C_m`` with ``P_{m-1}`` as ``(., a_{m-1})`` and ``C_m`` as
    ``(a_{m-1}, i_m j_m a_m)``; the right chain (cores ``k+1..N``) mirrors it from ``C_N``.
    """

    def __init__(self, cores: Sequence[Any], split: int) -> None:
        self.left_cores, self.right_cores = cores[:split], cores[split:]
        first, last = cores[0], cores[-1]
        self.lefts = [first.reshape(-1, first.shape[-1])]
        for core in self.left_cores[1:]:
            rows = self.lefts[-1].reshape(-1, core.shape[0])
            self.lefts.append(rows @ core.reshape(core.shape[0], -1))
        self.rights = [last.reshape(last.shape[0], -1)]
        for core in reversed(self.right_cores[:-1]):
            columns = self.rights[-1].reshape(core.shape[-1], -1)
            self.rights.append(core.reshape(-1, core.shape[-1]) @ columns)
        k, m = len(self.left_cores), len(self.right_cores)
        rank = self.left_cores[-1].shape[-1]
        # the factors come out interleaved (i_1, j_1, i_2, j_2, ...): rows, then columns
        self.left_view = (*_factor_dims(self.left_cores), rank)
        self.left_order = (*range(0, 2 * k, 2), *range(1, 2 * k, 2), 2 * k)
        self.right_view = (rank, *_factor_dims(self.right_cores))
        self.right_order = (0, *range(1, 2 * m + 1, 2), *range(2, 2 * m + 1, 2))

    def halves(self) -> tuple[Any, Any]:
        """The last products of the chains as ``L`` and ``R``."""
        rank = self.left_view[-1]
        left = self.lefts[-1].reshape(self.left_view).permute(self.left_order)
        right = self.rights[-1].reshape(self.right_view).permute(self.right_order)
        return left.reshape(-1, rank), right.reshape(rank, -1)


def _factor_dims(cores: Sequence[Any]) -> list[int]:
    return [d for core in cores for d in core.shape[1:3]]


def _unpermuted(grad: Any, view: tuple[int, ...], order: tuple[int, ...]) -> Any:
    """The gradient of ``chain.reshape(view).permute(order)`` as a tensor of ``view``."""
    inverse = sorted(range(len(order)), key=order.__getitem__)
    return grad.reshape(tuple(view[axis] for axis in order)).permute(inverse)


def _chain_gradients(chains: _Chains, grad_left: Any, grad_right: Any) -> list[Any]:
    """The gradients of the cores from those of :meth:`_Chains.halves`' ``L`` and ``R``.

    The backward of ``P_m = P_{m-1} @ C_m`` (:class:`_Chains`) takes
    ``dC_m = P_{m-1}^T dP_m`` and ``dP_{m-1} = dP_m C_m^T``, and mirrored on the
    right. Written out for the dense strategy's backward, which thus needs no nested
    autograd call; it runs with autocast off there, so the gradients stay in the
    cores' dtype (under autocast these products would run in its dtype).
    """
    left_cores, right_cores = chains.left_cores, chains.right_cores
    grads = []
    grad = _unpermuted(grad_left, chains.left_view, chains.left_order)
    for m in range(len(left_cores) - 1, 0, -1):  # left_cores[m] took lefts[m - 1] on
        core = left_cores[m]
        rows = chains.lefts[m - 1].reshape(-1, core.shape[0])
        grad = grad.reshape(rows.shape[0], -1)
        grads.append((rows.T @ grad).reshape(core.shape))
        grad = grad @ core.reshape(core.shape[0], -1).T
    grads.append(grad.reshape(left_cores[0].shape))
    grads.reverse()
    grad = _unpermuted(grad_right, chains.right_view, chains.right_order)
    count = len(right_cores)
    for m in range(count - 1):  # right_cores[m] took rights[count - m - 2] on
        core = right_cores[m]
        columns = chains.rights[count - m - 2].reshape(core.shape[-1], -1)
        grad = grad.reshape(-1, columns.shape[1])
        grads.append((grad @ columns.T).reshape(core.shape))
        grad = core.reshape(-1, core.shape[-1]).T @ grad
    grads.append(grad.reshape(right_cores[-1].shape))
    return grads


def pair(cores: list[Any], init: list[Any] | None, layout: Layout) -> tuple[Any, Any]:
    """``A`` (``I_L J_L x k``) and ``B`` (``k x I_R J_R``) with ``Delta = A @ B``, permuted.

    Without ``T0``, ``A = L`` and ``B = R``. With it, ``A = [L - L0, L0]`` and
    ``B = [R; R - R0]`` (``k = 2r``), since ``(L - L0) R + L0 (R - R0) = L R - L0 R0``:
    one product instead of two, and each of its terms is of the size of ``Delta``,
    not of ``W0``, so nothing cancels catastrophically. At initialisation
    (``L = L0``, ``R = R0``) every term has an exactly zero factor, so ``Delta`` is
    exactly zero in any dtype.
    """
    return _join(halves(cores, layout), None if init is None else halves(init, layout))


def _join(term: tuple[Any, Any], initial: tuple[Any, Any] | None) -> tuple[Any, Any]:
    """:func:`pair` from the halves ``(L, R)`` of ``T`` and ``(L0, R0)`` of ``T0``
    (``None`` without ``T0``)."""
    if initial is None:
        return term
    (left, right), (left0, right0) = term, initial
    return torch.cat([left - left0, left0], 1), torch.cat([right, right - right0], 0)


def _is_zero(term: tuple[Any, Any], initial: tuple[Any, Any] | None) -> bool:
    """True when ``Delta`` is exactly zero: halves equal to ``T0``'s (every term of
    :func:`_join`'s product then has a zero factor), or (without ``T0``) a zero half."""
    if initial is None:
        return any(not half.any() for half in term)
    return all(torch.equal(half, half0) for half, half0 in zip(term, initial, strict=True))


# The dtypes autocast casts (it leaves float64 alone).
_AUTOCAST_CASTS = (torch.float32, torch.float16, torch.bfloat16)

# Bytes of one block of W0 + Delta. On a CPU, small enough to stay in a core's cache
# between its rebuild and its use, and below glibc's mmap threshold (32 MiB), above which
# every fresh buffer is new pages whose first touch costs as much as the rebuild (a 64 MB
# copy: 7 ms into an existing buffer, 24 ms into a new one). On a GPU, large enough that
# kernel launches do not count and a 7B model's layers are one block each (a layer of
# several blocks reads _is_zero's answer back from the device, a sync, on each forward),
# while the transients stay bounded whatever the layer.
_CPU_BLOCK_BYTES = 1 << 22
_GPU_BLOCK_BYTES = 1 << 28
_MIN_LINES = 256
_MAX_BLOCK_BYTES = 1 << 25  # widening (a cpu matter) stops at the mmap threshold

# On a CPU, W0 + Delta from the mmap threshold on is rebuilt whole into a buffer kept
# between calls (:class:`_Workspace`) rather than in blocks: rebuilding each block between
# the products of the others makes both slower (they evict each other from the caches),
# and a fresh buffer that size is new pages on every call. Measured (4096 x 4096, float32,
# R = 16, 512 tokens): a training step 2.0-2.1x a frozen layer's in blocks, 1.8x whole.
_WORKSPACE_MIN_BYTES = _MAX_BLOCK_BYTES


class _Workspace:
    """One CPU buffer for ``W0 + Delta`` (then ``dy^T x``), shared by every layer of
    the process, grown to the largest: layers run one after another, so it costs one
    layer's weight (180 MB for LLaMA-7B's MLP in float32), never one per layer.

    :meth:`take` lends it, or gives ``None`` where the blocks apply: below
    ``_WORKSPACE_MIN_BYTES``; off the CPU (a GPU's caching allocator reuses freed
    memory, and its block budget holds a 7B model's layers whole anyway); while torch
    traces (torch.compile, or a dispatch mode such as FakeTensorMode, which would make
    and keep a traced buffer); and to a thread that has it already. Another thread
    waits for it, so that a result never depends on which thread came first (the
    blocks round differently). A lent buffer goes back with :meth:`give_back`.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.owner: int | None = None  # the thread it is lent to
        self.buffer: Any = None  # bytes, viewed as the dtype asked for

    def take(self, layout: Layout, dtype: Any, device: Any) -> Any:
        nbytes = layout.out_features * layout.in_features * dtype.itemsize
        if (
            device.type != "cpu"
            or nbytes < _WORKSPACE_MIN_BYTES
            or torch.compiler.is_compiling()
            or torch._C._len_torch_dispatch_stack() > 0
            or self.owner == threading.get_ident()
        ):
            return None
        self.lock.acquire()
        self.owner = threading.get_ident()
        try:
            if self.buffer is None or self.buffer.numel() < nbytes:
                self.buffer = None  # the old one goes before the new one comes
                # a normal tensor even when first asked for under inference_mode, so that
                # later calls outside it can write into it
                with torch.inference_mode(False):
                    self.buffer = torch.empty(nbytes, dtype=torch.uint8, device="cpu")
        except BaseException:  # out of memory, say: not lent, so not kept either
            self.give_back()
            raise
        return self.buffer[:nbytes].view(dtype)

    def give_back(self) -> None:
        self.owner = None
        self.lock.release()


_workspace = _Workspace()


def _blocks(
    size: int, unit_bytes: int, device: Any, *, unit_lines: int | None = None, rows: int = 0
) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges over ``size`` units of ``unit_bytes`` each, one block each.

    With ``unit_lines`` (the weight's rows or columns in a unit), a block is also at
    least ``max(_MIN_LINES, rows / 2)`` lines wide for a batch of ``rows`` rows: its
    product with the batch-sized operand, which is read and packed once per block,
    must stay wide to be cheap, the more so once that operand outgrows the caches.
    Measured steps over a frozen layer's: 11008 x 4096 at 4096 tokens, 2.4x with
    64-column blocks, 1.5x with 256; 4096 x 4096 at 4096 tokens, 1.7x with 256-line
    blocks, 1.4x with 2048. Widening stops at ``_MAX_BLOCK_BYTES``.
    """
    budget = _CPU_BLOCK_BYTES if device.type == "cpu" else _GPU_BLOCK_BYTES
    step = max(1, budget // max(1, unit_bytes))
    if unit_lines is not None:
        wide = -(-max(_MIN_LINES, rows // 2) // unit_lines)
        step = max(step, min(wide, _MAX_BLOCK_BYTES // max(1, unit_bytes)))
    return [(start, min(start + step, size)) for start in range(0, size, step)]


def _oriented(weight: Any, layout: Layout) -> Any:
    """The ``(out, in)`` matrix as a view (a ``Conv1D`` weight is stored ``(in, out)``);
    ``None`` (``W0 = 0``) stays ``None``."""
    return weight.T if layout.transposed and weight is not None else weight


def _merged(weight: Any, a: Any, b: Any, layout: Layout, out: Any = None) -> Any:
    """``W0 + Delta`` in the weight's layout, built one block at a time into ``out`` (a
    buffer of the weight's size, any float dtype) or a new tensor of the weight's dtype.

    ``weight`` is ``None`` for ``W0 = 0``: then ``Delta`` alone, in ``A``'s dtype. A
    ``Linear`` weight viewed as ``(I_L, I_R, J_L, J_R)`` is blocked along ``I_L``; a
    ``Conv1D`` weight, ``(J_L, J_R, I_L, I_R)``, along ``J_L``.
    """
    i_l, j_l, i_r, j_r = layout.blocks
    k = a.shape[1]
    if out is not None:
        merged = out
    elif weight is not None:
        merged = torch.empty_like(weight)
    else:
        merged = a.new_empty(layout.out_features * layout.in_features)
    rows = a.view(i_l, j_l, k)
    if layout.transposed:
        view = (j_l, j_r, i_l, i_r)
        blocks = _blocks(j_l, i_l * i_r * j_r * a.element_size(), a.device)
    else:
        view = (i_l, i_r, j_l, j_r)
        blocks = _blocks(i_l, j_l * i_r * j_r * a.element_size(), a.device)
    target = merged.view(view)
    # one buffer for every block's product: still in the caches when the next one comes
    first, last = blocks[0]
    products = a.new_empty((last - first) * (i_l if layout.transposed else j_l), b.shape[1])
    for start, stop in blocks:
        part = rows[:, start:stop] if layout.transposed else rows[start:stop]
        block = products[: part.shape[0] * part.shape[1]]
        torch.mm(part.reshape(-1, k), b, out=block)
        block = block.view(*part.shape[:2], i_r, j_r)
        # (I_L, c, I_R, J_R) -> (c, J_R, I_L, I_R), or (c, J_L, I_R, J_R) -> (c, I_R, J_L, J_R)
        block = block.permute(1, 3, 0, 2) if layout.transposed else block.permute(0, 2, 1, 3)
        if weight is None:
            target[start:stop].copy_(block)
        else:
            source = weight.view(view)[start:stop]
            torch.add(source, block.to(weight.dtype), out=target[start:stop])
    shape = (layout.out_features, layout.in_features)
    return merged.view(shape[::-1] if layout.transposed else shape)


def _plus(source: Any, update: Any) -> Any:
    """``source + update`` (``source`` None: zero) into a new contiguous block in
    ``update``'s dtype, rounded once."""
    block = update.new_empty(update.shape)
    if source is None:
        return block.copy_(update)
    return torch.add(source, update, out=block)


def _row_block(matrix: Any, a: Any, b: Any, start: int, stop: int, layout: Layout) -> Any:
    """Rows ``(i_L, i_R)``, ``start <= i_L < stop``, of ``W0 + Delta``: ``(c I_R, J)``.

    ``matrix`` is ``W0`` as ``(out, in)`` (:func:`_oriented`), or ``None`` for zero;
    ``Delta``'s block is ``A @ B`` in their dtype, the sum is rounded once, to that
    dtype too.
    """
    i_l, j_l, i_r, j_r = layout.blocks
    product = (a.view(i_l, j_l, -1)[start:stop].flatten(0, 1) @ b).view(-1, j_l, i_r, j_r)
    source = None if matrix is None else matrix.view(i_l, i_r, j_l, j_r)[start:stop]
    return _plus(source, product.permute(0, 2, 1, 3)).view(-1, layout.in_features)


def _column_block(matrix: Any, a: Any, b: Any, start: int, stop: int, layout: Layout) -> Any:
    """Columns ``(j_L, j_R)``, ``start <= j_L < stop``, of ``W0 + Delta``: ``(I, c J_R)``."""
    i_l, j_l, i_r, j_r = layout.blocks
    product = (a.view(i_l, j_l, -1)[:, start:stop].flatten(0, 1) @ b).view(i_l, -1, i_r, j_r)
    source = None if matrix is None else matrix.view(i_l, i_r, j_l, j_r)[:, :, start:stop]
    return _plus(source, product.permute(0, 2, 1, 3)).view(layout.out_features, -1)


def _compute_dtype(a: Any, dtype: Any) -> Any:
    """The dtype blocks are rebuilt in for products in ``dtype``: bfloat16 products (the
    matrix units' dtype, with fp32's exponent range) stay in bfloat16, since the block
    is rounded to it anyway; anything else in the wider of the cores' dtype and
    ``dtype`` (fp16 could underflow, and float32 products must not see ``W0`` rounded
    to bfloat16 cores)."""
    return torch.bfloat16 if dtype == torch.bfloat16 else torch.promote_types(a.dtype, dtype)


@torch.no_grad()
def delta_weight(cores: list[Any], init: list[Any] | None, layout: Layout) -> Any:
    """``Delta = MPO(T) - MPO(T0)`` in the layout of the layer's weight, cores' dtype (no grad)."""
    # merging may run inside autocast, whose dtype would round every product
    with torch.autocast(cores[0].device.type, enabled=False):
        return _merged(None, *pair(cores, init, layout), layout)


def _linear(x: Any, weight: Any, bias: Any, transposed: bool) -> Any:
    """The frozen layer's own arithmetic (``F.linear``, or ``Conv1D``'s ``addmm``), so that
    with ``Delta == 0`` the result is the base layer's bit for bit."""
    if not transposed:
        return torch.nn.functional.linear(x, weight, bias)
    rows = x.reshape(-1, x.shape[-1])
    y = rows @ weight if bias is None else torch.addmm(bias, rows, weight)
    return y.view(*x.shape[:-1], weight.shape[-1])


def _row_blocks(rows: int, dtype: Any, layout: Layout, device: Any) -> list[tuple[int, int]]:
    """The forward's blocks: ranges of ``i_L``, each ``I_R`` rows of ``W0 + Delta`` in ``dtype``."""
    i_l, _, i_r, _ = layout.blocks
    unit = i_r * layout.in_features * dtype.itemsize
    return _blocks(i_l, unit, device, unit_lines=i_r, rows=rows)


def _blocked_forward(x: Any, weight: Any, bias: Any, a: Any, b: Any, layout: Layout) -> Any:
    """``x (W0 + Delta)^T + b``, each block of output columns from a block of rows of
    ``W0 + Delta`` rebuilt just before its product (so ``W0 + Delta`` is never whole)."""
    i_r = layout.blocks[2]
    matrix = _oriented(weight, layout)
    rows = x.reshape(-1, layout.in_features)
    y = rows.new_empty(rows.shape[0], layout.out_features)
    dtype = _compute_dtype(a, x.dtype)
    a, b = a.to(dtype), b.to(dtype)
    for start, stop in _row_blocks(rows.shape[0], dtype, layout, x.device):
        block = _row_block(matrix, a, b, start, stop, layout).to(x.dtype)
        columns = slice(start * i_r, stop * i_r)
        if bias is None:
            torch.mm(rows, block.T, out=y[:, columns])
        else:
            torch.addmm(bias[columns], rows, block.T, out=y[:, columns])
    return y.view(*x.shape[:-1], layout.out_features)


class _DenseDelta(torch.autograd.Function):
    """``x (W0 + MPO(T) - MPO(T0))^T + b`` with ``W0 + Delta`` rebuilt block by block in
    the forward and again in the backward, and saved never.

    It saves only ``x``, ``W0`` and the cores: the backward contracts the halves
    again (a few small products; saving ``L``, ``R``, ``A`` and ``B`` would cost 16 MB
    for an 11008 x 4096 layer at R = 16 in float32) and
    takes the cores' gradients from theirs itself (:func:`_chain_gradients`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, layout, n, *cores_and_init):  # type: ignore[override]
        cores, init = list(cores_and_init[:n]), list(cores_and_init[n:]) or None
        device = x.device.type
        # Under autocast the products run in its dtype, as the base layer's would (autocast
        # leaves float64 alone); the update is rebuilt under our control (_compute_dtype).
        if torch.is_autocast_enabled(device) and x.dtype in _AUTOCAST_CASTS:
            rows = x.to(torch.get_autocast_dtype(device))
        else:
            rows = x
        with torch.no_grad(), torch.autocast(device, enabled=False):
            bias = None if bias is None else bias.to(rows.dtype)
            dtype = _compute_dtype(cores[0], rows.dtype)
            term = _halves_of(cores, layout)[1]
            initial = None if init is None else halves(init, layout)
            blocks = _row_blocks(prod(x.shape[:-1]), dtype, layout, x.device)
            workspace = _workspace.take(layout, rows.dtype, x.device)
            try:
                if workspace is not None or len(blocks) == 1:
                    # W0 + Delta is W0 exactly when Delta is zero: the base layer's result
                    a, b = (t.to(dtype) for t in _join(term, initial))
                    merged = _merged(weight, a, b, layout, out=workspace)
                    y = _linear(rows, merged.to(rows.dtype), bias, layout.transposed)
                elif weight is not None and _is_zero(term, initial):
                    # a blocked product may round differently from the base layer's one
                    y = _linear(rows, weight.to(rows.dtype), bias, layout.transposed)
                else:
                    y = _blocked_forward(rows, weight, bias, *_join(term, initial), layout)
            finally:
                if workspace is not None:
                    _workspace.give_back()
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
        with_cores = any(needs[5 : 5 + n])
        # autocast may be on around loss.backward(), which runs this on the same thread
        with torch.no_grad(), torch.autocast(dy.device.type, enabled=False):
            chains, term = _halves_of(cores, layout)
            product = _join(term, None if init is None else halves(init, layout))
            grad_x, grad_left, grad_right = _dense_backward(
                dy, x, weight, product, term, layout, with_x=needs[0], with_cores=with_cores
            )
            grad_bias = None
            if ctx.has_bias and needs[2]:
                grad_bias = dy.reshape(-1, layout.out_features).sum(0)
            core_grads = [None] * n
            if with_cores:
                if chains is None:  # one core: L is the core, R a constant
                    core_grads = [grad_left.reshape(cores[0].shape)]
                else:
                    core_grads = _chain_gradients(chains, grad_left, grad_right)
        grad_x = None if grad_x is None else grad_x.view(x.shape).to(x.dtype)
        return (grad_x, None, grad_bias, None, None, *core_grads, *([None] * len(init or [])))


def _dense_backward(
    dy, x, weight, product: tuple, term: tuple, layout: Layout, *, with_x: bool, with_cores: bool
) -> tuple:
    """``dL/dx = dy (W0 + Delta)`` and the gradients of the halves ``L`` and ``R``
    (``None`` unless ``with_x``, resp. ``with_cores``: frozen cores skip ``dy^T x``), from
    ``product = (A, B)`` (:func:`pair`) and ``term = (L, R)``, the halves of ``T``.

    One pass over blocks of input columns ``(j_L, j_R)``: rebuild the block of
    ``W0 + Delta`` and take its share of ``dL/dx`` (when wanted), form the same columns of
    ``G = dy^T x`` (``dL/dDelta``) and, regrouped as ``G[(i_L, j_L), (i_R, j_R)]``,
    add their share of ``dL/dL = G R^T`` and ``dL/dR = L^T G``. Neither
    ``W0 + Delta`` nor ``G`` is ever whole in memory.
    """
    (a, b), (left, right) = product, term
    i_l, j_l, i_r, j_r = layout.blocks
    rank = left.shape[1]
    matrix = _oriented(weight, layout)
    rows_dy = dy.reshape(-1, layout.out_features)
    rows_x = x.reshape(-1, layout.in_features).to(dy.dtype)
    # G and its products with the halves in the compute dtype
    dtype = _compute_dtype(left, dy.dtype)
    a, b, lefts, right_t = a.to(dtype), b.to(dtype), left.to(dtype), right.T.to(dtype)
    lefts = lefts.view(i_l, j_l, rank)
    grad_x = None
    grad_left = torch.empty_like(left)
    # summed over blocks: in float32 at least, rounded to the halves' dtype once
    accumulated = torch.promote_types(right.dtype, torch.float32)
    grad_right = torch.zeros(right.shape, dtype=accumulated, device=right.device)
    grad_lefts = grad_left.view(i_l, j_l, rank)
    unit = j_r * layout.out_features * dtype.itemsize
    workspace = _workspace.take(layout, dy.dtype, dy.device) if with_x or with_cores else None
    try:
        if workspace is not None:  # W0 + Delta whole, then G whole, in one buffer
            if with_x:
                merged = _merged(weight, a, b, layout, out=workspace)
                grad_x = rows_dy @ _oriented(merged, layout)
            full = workspace.view(layout.out_features, -1)
            if with_cores:
                torch.mm(rows_dy.T, rows_x, out=full)
            blocks = _blocks(j_l, unit, dy.device)
        else:
            grad_x = rows_dy.new_empty(rows_x.shape) if with_x else None
            blocks = _blocks(j_l, unit, dy.device, unit_lines=j_r, rows=rows_dy.shape[0])
        for start, stop in blocks:
            columns = slice(start * j_r, stop * j_r)
            if workspace is None and grad_x is not None:
                block = _column_block(matrix, a, b, start, stop, layout).to(dy.dtype)
                torch.mm(rows_dy, block, out=grad_x[:, columns])
            if not with_cores:
                continue
            g = full[:, columns] if workspace is not None else rows_dy.T @ rows_x[:, columns]
            g = g.reshape(i_l, i_r, stop - start, j_r).permute(0, 2, 1, 3)
            g = g.reshape(-1, i_r * j_r).to(dtype)
            grad_lefts[:, start:stop] = (g @ right_t).view(i_l, -1, rank)
            grad_right += lefts[:, start:stop].flatten(0, 1).T @ g
    finally:
        if workspace is not None:
            _workspace.give_back()
    if not with_cores:
        return grad_x, None, None
    return grad_x, grad_left, grad_right.to(right.dtype)


def dense_forward(
    x: Any, weight: Any, bias: Any, cores: list[Any], init: list[Any] | None, layout: Layout
) -> Any:
    """``x (W0 + Delta)^T + b`` by the dense strategy (autograd: cores and ``x``).

    ``weight`` is ``W0`` in the layer's layout, or ``None`` for ``W0 = 0`` (QDoTA, whose
    residual is applied apart).
    """
    return _DenseDelta.apply(x, weight, bias, layout, len(cores), *cores, *(init or []))


def factored_delta(x: Any, a: Any, b: Any, layout: Layout) -> Any:
    """``x Delta^T`` through ``Delta = A @ B`` (:func:`pair`), no full-size matrix.

    For ``x`` viewed as ``(rows, J_L, J_R)``: first
    ``Z[n, j_L, k, i_R] = sum_{j_R} x[n, j_L, j_R] B[k, i_R, j_R]``, then
    ``y[n, i_L, i_R] = sum_{j_L, k} A[i_L, j_L, k] Z[n, j_L, k, i_R]``. Computed with
    autocast off, in bfloat16 for a bfloat16 ``x`` (no term of ``A @ B`` is larger
    than ``Delta``, so its rounding is relative to the update, which is then rounded
    to bfloat16 anyway), else in the cores' dtype; returned in that dtype.
    """
    return apply_factored(x, factored_operands(a, b, x.dtype, layout), layout)


def factored_operands(a: Any, b: Any, input_dtype: Any, layout: Layout) -> tuple[Any, Any, Any]:
    """``A`` and ``B`` of :func:`pair` as :func:`apply_factored` multiplies them by
    inputs of ``input_dtype``, in the dtype it computes in (see :func:`factored_delta`):
    ``A`` as ``(I_L, J_L k)``, its transpose as a copy for bfloat16 (else ``None``),
    and ``B^T`` as ``(J_R, k I_R)``.

    Separate from the products so that generation, which multiplies the same factors
    once per token, prepares them once (:meth:`mpo.adapt.DoTALinear.forward`): the
    conversions and copies here cost a bfloat16 16-token forward as much as half a
    frozen layer's on a CPU.
    """
    i_l, j_l, i_r, j_r = layout.blocks
    k = a.shape[1]
    dtype = _compute_dtype(a, input_dtype)
    rows = a.to(dtype).view(i_l, j_l * k)
    columns = b.to(dtype).view(k, i_r, j_r).permute(2, 0, 1).reshape(j_r, k * i_r)
    # bfloat16 matrix units do one product z^T A^T far better than a batch of A z (A
    # broadcast): at 16 rows of 11008 x 4096, 0.4x a frozen layer's forward against 7x;
    # the transposes must be copies, as views they cost more
    rows_t = rows.T.contiguous() if dtype == torch.bfloat16 else None
    return rows, rows_t, columns


def apply_factored(x: Any, operands: tuple[Any, Any, Any], layout: Layout) -> Any:
    """:func:`factored_delta` with its factors prepared by :func:`factored_operands`."""
    _, j_l, i_r, j_r = layout.blocks
    rows_a, rows_a_t, columns_b = operands
    k = columns_b.shape[1] // i_r
    rows = x.reshape(-1, j_l, j_r).to(rows_a.dtype)
    with torch.autocast(x.device.type, enabled=False):
        z = (rows.reshape(-1, j_r) @ columns_b).view(-1, j_l * k, i_r)
        if rows_a_t is not None and z.shape[0] > 1:
            z_t = z.transpose(1, 2).contiguous()
            out = (z_t @ rows_a_t).transpose(1, 2)
        else:
            out = rows_a @ z
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

    Over a frozen layer, in units of large-matmul flops, with ``k`` the inner size
    of :func:`pair` (``2r`` with ``T0``, ``r`` without):

    * factored: ``p B 2 k (J I_R + I J_L)`` per pass, one pass in the forward
      and two more in the backward;
    * dense: per rebuild ``2 I J k`` plus ``c I J`` of memory traffic, one
      rebuild in the forward and one in the backward; training adds the
      ``2 B I J`` of ``dy^T x``.
    """
    if len(layout.shapes) == 1:
        return "dense"
    _, j_l, i_r, _ = layout.blocks
    size = layout.out_features * layout.in_features
    k = layout.rank * (2 if with_init else 1)
    per_row = 2 * k * (layout.in_features * i_r + layout.out_features * j_l)
    factored = _FACTORED_PENALTY * rows * per_row * (3 if training else 1)
    rebuild = 2 * size * k + _REBUILD_FLOPS_PER_ENTRY * size
    dense = rebuild * (2 if training else 1) + (2 * rows * size if training else 0)
    return "factored" if factored < dense else "dense"
