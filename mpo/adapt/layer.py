"""The DoTA layer: a frozen linear layer plus trainable MPO cores.

For a pretrained weight ``W0`` (``out x in``; transformers' ``Conv1D`` stores
it transposed), the layer computes

    y = x (W0 + MPO(T) - MPO(T0))^T + b,

where ``T`` are the trainable cores, initialised by the TT-SVD of ``W0``
truncated at rank ``R`` (``init="dota"``, the paper's method), and ``T0`` is a
frozen copy of that initial value. This is the paper's
``W' = W_res + MPO(T)`` with ``W_res = W0 - MPO(T0)``, written so that ``W0``
is never overwritten: the update is exactly zero at initialisation in any
dtype, disabling the adapter gives the base layer bit for bit, and an
adapter-only checkpoint (``T`` and ``T0``) restores the layer exactly.
With ``init="random"`` (the paper's ablation) the cores are Gaussian and the
last one zero, so ``MPO(T)`` is zero at initialisation and no ``T0`` is kept.

The layer follows the contract of PEFT's tuner layers: named adapters,
``merge``/``unmerge``, ``get_delta_weight``, ``enable_adapters``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import mpo
from mpo.adapt.config import check_adapter_name, floating_dtype
from mpo.adapt.delta import (
    Layout,
    apply_factored,
    choose,
    delta_weight,
    dense_forward,
    factored_operands,
    pair,
)
from mpo.adapt.sharding import gathered, sharded_like
from mpo.adapt.targets import weight_shape
from mpo.errors import MPOError

__all__ = ["DoTALinear"]

_STRATEGIES = ("auto", "dense", "factored")


class _Cores(nn.Module):
    """Frozen initial cores ``T0`` as buffers: in ``state_dict``, moved by ``.to``, not trained."""

    def __init__(self, cores: Sequence[torch.Tensor]) -> None:
        super().__init__()
        for k, core in enumerate(cores):
            self.register_buffer(str(k), core)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.buffers())


def _dota_cores(weight: torch.Tensor, shape: tuple, rank: int, dtype: torch.dtype) -> list:
    """TT-SVD of the ``(out, in)`` weight in float32, cores cast to ``dtype``."""
    decomposition = mpo.decompose(weight, shape, rank, compute_dtype="float32", dtype=dtype)
    return list(decomposition.cores)


def _random_cores(shape: tuple, rank: int, dtype: torch.dtype, device: Any) -> list:
    """Gaussian cores with the DoTA shapes, the last one zero (the paper's ablation).

    Core ``k`` is drawn with variance ``1 / (R_{k-1} I_k J_k)``, so each of its
    unfolding's columns has unit expected norm, like the orthonormal DoTA cores.
    They are drawn by torch's cpu generator and then moved, so that a seed gives the
    same cores on every device.
    """
    rows, cols = shape
    ranks = (1, *mpo.bond_ranks(rows, cols, rank), 1)
    cores = []
    for k, (i, j) in enumerate(zip(rows, cols, strict=True)):
        size = (ranks[k], i, j, ranks[k + 1])
        if k == len(rows) - 1:
            cores.append(torch.zeros(size, dtype=dtype, device=device))
        else:
            std = 1.0 / math.sqrt(ranks[k] * i * j)
            core = torch.randn(size, dtype=torch.float32).mul_(std)
            cores.append(core.to(device=device, dtype=dtype))
    return cores


def new_cores(
    matrix: torch.Tensor,
    shape: tuple[Sequence[int], Sequence[int]] | None,
    rank: int,
    init: str,
    dtype: torch.dtype | str,
) -> tuple[list, list | None]:
    """``(T, T0)`` of a new adapter on the ``(out, in)`` weight ``matrix``.

    ``init="dota"``: both are the TT-SVD of ``matrix`` (decomposed in float32,
    cast to ``dtype``); ``init="random"``: Gaussian cores with a zero last one
    and no ``T0``. ``shape`` defaults to :func:`mpo.factorize` of both sizes.
    """
    if init not in ("dota", "random"):
        raise MPOError(f"init must be 'dota' or 'random', got {init!r}")
    dtype = floating_dtype(dtype)
    if shape is None:
        shape = (mpo.factorize(matrix.shape[0]), mpo.factorize(matrix.shape[1]))
    shape = (tuple(shape[0]), tuple(shape[1]))
    if init == "dota":
        cores = _dota_cores(matrix, shape, rank, dtype)
        return cores, cores
    return _random_cores(shape, rank, dtype, matrix.device), None


def checked_operator(cores: Sequence[torch.Tensor], out_features: int, in_features: int):
    """``mpo.MPO(cores)``, checked to describe an ``out_features x in_features`` weight."""
    operator = mpo.MPO([c.detach() for c in cores])  # validates the chain
    if operator.shape != (out_features, in_features):
        raise MPOError(
            f"cores describe a {operator.shape[0]} x {operator.shape[1]} matrix but the "
            f"layer's weight is {out_features} x {in_features} (out x in)"
        )
    return operator


# Optimizer steps taken in this process (any torch.optim optimizer), for the generation
# cache of DoTALinear._operands: a fused step changes the cores without a version bump.
_optimizer_steps = 0
_step_hook = None


def _count_optimizer_steps() -> None:
    """Count optimizer steps from now on (once per process; torch's global post-step hook)."""
    global _step_hook
    if _step_hook is None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook = register_optimizer_step_post_hook(_stepped)


def _stepped(optimizer: Any, args: Any, kwargs: Any) -> None:
    global _optimizer_steps
    _optimizer_steps += 1


class DoTALinear(nn.Module):
    """A frozen ``nn.Linear`` (or ``Conv1D``) with DoTA adapters.

    Args:
        base_layer: the layer to adapt; it is kept, frozen, as ``base_layer``.
        adapter_name: name of the first adapter.
        rank: rank threshold ``R``.
        shape: ``(row_factors, col_factors)`` of the ``(out, in)`` weight.
        init: ``"dota"`` or ``"random"``.
        dtype: dtype of the cores.

    >>> import torch
    >>> base = torch.nn.Linear(64, 48)
    >>> layer = DoTALinear(base, rank=4, shape=((4, 3, 4), (4, 4, 4)))
    >>> x = torch.randn(2, 64)
    >>> torch.equal(layer(x), base(x))
    True
    >>> sum(p.numel() for p in layer.parameters() if p.requires_grad)
    320
    """

    # PEFT's names for the attributes that hold adapter weights
    adapter_layer_names = ("dota_cores",)
    other_param_names = ("dota_init",)

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str = "default",
        *,
        rank: int = 16,
        shape: tuple[Sequence[int], Sequence[int]] | None = None,
        init: str = "dota",
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        super().__init__()
        self._attach(base_layer, adapter_name)
        self.update_layer(adapter_name, rank=rank, shape=shape, init=init, dtype=dtype)

    def _attach(self, base_layer: nn.Module, adapter_name: str) -> None:
        self.base_layer = base_layer
        self.out_features, self.in_features = weight_shape(base_layer)
        self._transposed = not isinstance(base_layer, nn.Linear)
        self.dota_cores = nn.ModuleDict()
        self.dota_init = nn.ModuleDict()
        self.adapter_settings: dict[str, dict[str, Any]] = {}
        self._layouts: dict[str, Layout] = {}
        self.active_adapter = adapter_name
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.strategy = "auto"
        self._operands_cache = None
        _count_optimizer_steps()
        for parameter in base_layer.parameters():
            parameter.requires_grad_(False)

    @classmethod
    def from_cores(
        cls,
        base_layer: nn.Module,
        cores: Sequence[torch.Tensor],
        initial_cores: Sequence[torch.Tensor] | None,
        *,
        adapter_name: str = "default",
        rank: int,
        init: str = "dota",
    ) -> DoTALinear:
        """A layer whose adapter has the given cores, without decomposing (checkpoint loading)."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._attach(base_layer, adapter_name)
        layer.add_cores(adapter_name, cores, initial_cores, rank=rank, init=init)
        return layer

    @property
    def strategy(self) -> str:
        """How the update is computed: ``"auto"`` (the cost rule of
        :func:`mpo.adapt.delta.choose`, per call), ``"dense"`` or ``"factored"``."""
        return self._strategy

    @strategy.setter
    def strategy(self, value: str) -> None:
        if value not in _STRATEGIES:
            raise MPOError(f"strategy must be one of {_STRATEGIES}, got {value!r}")
        self._strategy = value

    # -- adapters ------------------------------------------------------------------

    def update_layer(
        self,
        adapter_name: str,
        *,
        rank: int,
        shape: tuple[Sequence[int], Sequence[int]] | None = None,
        init: str = "dota",
        dtype: torch.dtype | str = torch.float32,
    ) -> None:
        """Add the adapter ``adapter_name``: cores from the TT-SVD of the frozen weight."""
        self._check_new(adapter_name, "update_layer")  # before decomposing
        weight = self.base_layer.weight.detach()
        matrix = weight.T if self._transposed else weight
        cores, initial = new_cores(matrix, shape, rank, init, dtype)
        self.add_cores(adapter_name, cores, initial, rank=rank, init=init)

    def add_cores(
        self,
        adapter_name: str,
        cores: Sequence[torch.Tensor],
        initial_cores: Sequence[torch.Tensor] | None,
        *,
        rank: int,
        init: str,
    ) -> None:
        """Add an adapter with trainable cores ``cores`` and frozen ``initial_cores`` (``T0``).

        The cores are copied; ``initial_cores`` is ``None`` when ``MPO(T0)`` is
        zero (random init). Shapes must describe this layer's ``(out, in)`` weight.
        """
        self._check_new(adapter_name, "add_cores")
        shape = (
            tuple(int(c.shape[1]) for c in cores),
            tuple(int(c.shape[2]) for c in cores),
        )
        operator = checked_operator(cores, self.out_features, self.in_features)
        # everything is built before anything is stored, so a failure adds nothing
        trained = nn.ParameterList(
            [
                nn.Parameter(core.detach().clone(memory_format=torch.contiguous_format))
                for core in cores
            ]
        )
        # trainable if active; another adapter is switched to with set_adapter, as in PEFT
        trained.requires_grad_(adapter_name == self.active_adapter)
        initial = None
        if initial_cores is not None:
            initial = _Cores(
                [c.detach().clone(memory_format=torch.contiguous_format) for c in initial_cores]
            )
        shapes = tuple(tuple(int(d) for d in core.shape) for core in cores)
        settings = {
            "rank": rank,
            "shape": [list(shape[0]), list(shape[1])],
            "ranks": list(operator.ranks),
            "init": init,
            "dtype": str(operator.dtype).removeprefix("torch."),
        }
        self.dota_cores[adapter_name] = trained
        if initial is not None:
            self.dota_init[adapter_name] = initial
        self._layouts[adapter_name] = Layout(shapes, self._transposed)
        self.adapter_settings[adapter_name] = settings

    def _check_new(self, adapter_name: str, where: str) -> None:
        check_adapter_name(adapter_name, where)
        if adapter_name in self.dota_cores:
            raise MPOError(f"this layer already has an adapter named {adapter_name!r}")

    def set_adapter(self, adapter_name: str, *, missing_ok: bool = False) -> None:
        """Make ``adapter_name`` the active adapter (one is active at a time) and its
        cores the only trainable ones, as PEFT's ``set_adapter`` does.

        With ``missing_ok``, a layer without that adapter accepts it too and computes
        its base layer's output while it is active: how
        :func:`mpo.adapt.set_adapter` treats the layers an adapter does not target.
        """
        if not missing_ok:
            self._held(adapter_name)
        if self.merged_adapters:
            raise MPOError("unmerge() before switching adapters")
        self.active_adapter = adapter_name
        for name, cores in self.dota_cores.items():
            cores.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter ``adapter_name`` (cores, ``T0`` and settings).

        Deleting the active adapter leaves the layer computing its base layer's
        output until another is set active.
        """
        self._held(adapter_name)
        if adapter_name in self.merged_adapters:
            raise MPOError(f"adapter {adapter_name!r} is merged; unmerge() before deleting it")
        del self.dota_cores[adapter_name]
        if adapter_name in self.dota_init:
            del self.dota_init[adapter_name]
        del self.adapter_settings[adapter_name]
        del self._layouts[adapter_name]
        self._operands_cache = None

    def enable_adapters(self, enabled: bool) -> None:
        """Turn the active adapter on or off; off gives the base layer's output bit for bit.

        Turning off a merged layer unmerges it first (as PEFT does), which restores
        ``W0`` up to the rounding of :meth:`unmerge`.
        """
        if not enabled and self.merged:
            self.unmerge()
        self.disable_adapters = not enabled

    def _held(self, adapter_name: str | None) -> str:
        """``adapter_name`` (default: the active one), which this layer must hold."""
        name = adapter_name or self.active_adapter
        if name not in self.dota_cores:
            raise MPOError(
                f"this layer has no adapter named {name!r}, only {sorted(self.dota_cores)} (the "
                "active adapter need not target every layer; pass one of those)"
            )
        return name

    def cores(self, adapter_name: str | None = None) -> list[torch.Tensor]:
        """The trainable cores ``T`` of an adapter (default: the active one)."""
        return list(self.dota_cores[self._held(adapter_name)])

    def initial_cores(self, adapter_name: str | None = None) -> list[torch.Tensor] | None:
        """The frozen initial cores ``T0`` (``None`` for random init, where ``MPO(T0) = 0``)."""
        name = self._held(adapter_name)
        return self.dota_init[name].tensors() if name in self.dota_init else None

    def layout(self, adapter_name: str | None = None) -> Layout:
        """How the adapter's cores sit in the weight (fixed when the adapter is added)."""
        return self._layouts[self._held(adapter_name)]

    # -- PEFT-style merging ------------------------------------------------------------

    def get_delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """``MPO(T) - MPO(T0)`` in the base weight's layout and the cores' dtype (detached)."""
        name = adapter_name or self.active_adapter
        return delta_weight(self.cores(name), self.initial_cores(name), self.layout(name))

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    @property
    def active_adapters(self) -> list[str]:
        """The active adapter as a list, as PEFT's tuner layers report it."""
        return [self.active_adapter]

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> nn.Module:
        """Fold adapters' updates into the base weight (PEFT's signature); return the base layer.

        ``adapter_names`` (default: the active one, if this layer holds it) are
        folded in once each; names this layer does not hold are skipped (an
        adapter need not target every layer), as PEFT does. The weight becomes
        ``W0 + Delta`` rounded to its dtype, and the layer's output is then that
        of the merged weight. :meth:`unmerge` subtracts them again, which
        restores ``W0`` up to that rounding. With ``safe_merge`` the merged
        weight is checked for NaN or Inf first, and left as it was if it has any.
        """
        if adapter_names is None:
            held = self.active_adapter in self.dota_cores
            adapter_names = [self.active_adapter] if held else []
        for name in adapter_names:
            if name in self.merged_adapters or name not in self.dota_cores:
                continue
            self._fold(name, 1, safe=safe_merge)
            self.merged_adapters.append(name)
        return self.base_layer

    def unmerge(self) -> None:
        """Subtract the merged update from the base weight again."""
        while self.merged_adapters:
            self._fold(self.merged_adapters.pop(), -1)

    @torch.no_grad()
    def _fold(self, adapter_name: str, sign: int, *, safe: bool = False) -> None:
        """``W <- W + sign * Delta``, computed in float32 at least (bfloat16 cores'
        products would round ``Delta``), rounded once to the weight's dtype; with
        ``safe``, refused if the result is not finite."""

        def wide(tensors: list | None) -> list | None:
            if tensors is None:
                return None
            # FSDP2 shards the cores: every rank gathers them and builds all of Delta
            return [gathered(t).to(torch.promote_types(t.dtype, torch.float32)) for t in tensors]

        name = self._held(adapter_name)
        cores, init = wide(self.cores(name)), wide(self.initial_cores(name))
        weight = self.base_layer.weight
        delta = sharded_like(delta_weight(cores, init, self.layout(name)), weight)
        total = (weight.to(torch.promote_types(weight.dtype, delta.dtype)) + sign * delta).to(
            weight.dtype
        )
        if safe and not torch.isfinite(total).all():
            raise MPOError(
                f"merging adapter {adapter_name!r} gives NaN or Inf in the weight, which is left "
                "as it was; the cores probably diverged: load an earlier checkpoint"
            )
        weight.copy_(total)

    # -- forward -------------------------------------------------------------------

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code that reads ``module.weight.dtype`` keeps working)."""
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        name = self.active_adapter
        if self.disable_adapters or self.merged or name not in self.dota_cores:
            return self.base_layer(x, *args, **kwargs)
        cores, init, layout = self.cores(name), self.initial_cores(name), self._layouts[name]
        strategy = self.strategy
        if strategy == "auto":
            rows = math.prod(x.shape[:-1])
            training = torch.is_grad_enabled() and any(core.requires_grad for core in cores)
            strategy = choose(rows, layout, training=training, with_init=init is not None)
        if strategy == "dense":
            return dense_forward(
                x, self.base_layer.weight, self.base_layer.bias, cores, init, layout
            )
        y = self.base_layer(x, *args, **kwargs)
        operands = self._operands(cores, init, layout, x.dtype)
        return y + apply_factored(x, operands, layout).to(y.dtype)

    def _operands(self, cores: list, init: list | None, layout: Layout, dtype: Any) -> tuple:
        """``A`` and ``B`` with ``Delta = A @ B`` (:func:`mpo.adapt.delta.pair`), laid
        out for inputs of ``dtype`` (:func:`mpo.adapt.delta.factored_operands`); kept
        between calls without autograd.

        Generation calls the layer once per token with unchanged cores. The cache
        is keyed by ``dtype`` and by the identities, storages, dtypes and version
        counters of ``T`` and ``T0``, which in-place updates (``load_state_dict``)
        bump and new data (``p.data = ...``, ``vector_to_parameters``) changes, and
        by the number of optimizer steps taken in this process: a fused step
        (``AdamW(fused=True)``, ``Trainer``'s default) bumps no version counter.
        In-place writes that bypass autograd's version counter go unseen: through
        ``.data`` (``p.data.mul_(...)``), or to FSDP2's sharded cores between
        forwards; :meth:`clear_cache` after such a write.
        """

        def compute() -> tuple:
            # in the cores' dtype: autocast would round the halves to bfloat16
            with torch.autocast(cores[0].device.type, enabled=False):
                return factored_operands(*pair(cores, init, layout), dtype, layout)

        if (
            torch.is_grad_enabled()
            or torch.compiler.is_compiling()
            # a dispatch mode (FakeTensorMode) or a torch.func transform: what it makes
            # must not serve later real calls, and its wrapped cores have no data_ptr
            or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._functorch.peek_interpreter_stack() is not None
        ):
            self._operands_cache = None
            return compute()
        tensors = [*cores, *(init or [])]
        versions = ((id(t), t.data_ptr(), t._version, t.device, t.dtype) for t in tensors)
        key = (self.active_adapter, dtype, _optimizer_steps, *versions)
        cached = self._operands_cache
        if cached is None or cached[0] != key:
            # the cores' storages are kept with the key, so that storage given to them
            # later (p.data = ...) cannot reuse a keyed address and pass for the old one
            cached = (key, compute(), [t.detach() for t in tensors])
            self._operands_cache = cached
        return cached[1]

    def clear_cache(self) -> None:
        """Forget the factors kept between calls without autograd (see :meth:`_operands`)."""
        self._operands_cache = None

    def extra_repr(self) -> str:
        settings = self.adapter_settings.get(self.active_adapter)
        if settings is None:
            return f"adapter={self.active_adapter!r} (not in this layer: base output)"
        return (
            f"adapter={self.active_adapter!r}, shape={tuple(map(tuple, settings['shape']))}, "
            f"ranks={tuple(settings['ranks'])}, init={settings['init']!r}"
        )
