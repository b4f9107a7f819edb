"""QDoTA: the DoTA layer with its residual stored in 4 bits (NF4, bitsandbytes).

For a pretrained weight ``W0`` (``out x in``; transformers' ``Conv1D`` stores it
transposed, and is read as its transpose) the layer decomposes ``W0`` in
float32 first (TT-SVD at rank ``R``, cores ``T0``), then stores the residual

    W_res = W0 - MPO(T0)

as NF4 (``bitsandbytes.functional.quantize_4bit``, block size 64, optionally
with the block scales quantized again: ``double_quant``), and computes

    y = x Dequant(Q(W_res))^T + x MPO(T)^T + b

in the input's dtype, with ``T`` the trainable cores (paper, section 3.3). The update
``x MPO(T)^T`` is computed as a DoTA layer computes its own (:mod:`mpo.adapt.delta`):
through the two halves of the MPO for few rows, by a blocked rebuild for many.
The residual is quantized in the ``(out, in)`` orientation whatever the base
layer (as bitsandbytes' ``Linear4bit`` stores a weight, so its 64-entry blocks
run along a row of ``W0``); the MPO describes that same matrix.
Decomposing before quantizing matters: ``MPO(T0)`` carries the large singular
directions of ``W0`` exactly, so only the smaller residual is rounded, and
``Dequant(Q(W_res)) + MPO(T0)`` is closer to ``W0`` than QLoRA's
``Dequant(Q(W0))``. ``W0`` itself is not kept: at initialisation the layer
computes that approximation, not the base layer's output, and it cannot give
``W0`` back (:func:`~mpo.adapt.unwrap` refuses; merging gives dense weights).

The packed residual and its quantization statistics are ``uint8`` buffers, so
``state_dict`` holds plain tensors (safetensors can save it) and
``model.to(torch.bfloat16)`` leaves them alone. Adapter checkpoints
(:mod:`mpo.adapt.checkpoint`) hold only ``T`` and ``T0``: :meth:`QDoTALinear.from_cores`
computes and quantizes the residual again from the base weight, as the constructor does.

The base layer may also be bitsandbytes' ``Linear4bit`` (NF4 or FP4), as
transformers' ``BitsAndBytesConfig(load_in_4bit=True)`` loads it: ``W0`` is
then ``Dequant(Q(W0))``, dequantized to float32 and treated as above. Its
quantization error stays in the layer (the residual is quantized on top of
it), so decomposing the full-precision weight is the better start.
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

import mpo
from mpo.adapt.config import check_adapter_name, floating_dtype
from mpo.adapt.delta import Layout, choose, delta_weight, dense_forward, factored_delta, halves
from mpo.adapt.layer import _Cores, checked_operator, new_cores
from mpo.adapt.targets import _is_linear, weight_shape
from mpo.errors import MPOError

__all__ = [
    "QDoTALinear",
    "check_quantizable",
    "float_weight",
    "is_4bit",
    "nf4_round_trip",
    "require_bitsandbytes",
]

_BLOCKSIZE = 64
_NESTED_BLOCKSIZE = 256  # what quantize_4bit uses for the block scales with double_quant
_DEVICES = ("cpu", "cuda")


def require_bitsandbytes() -> tuple[Any, Any]:
    """``(bitsandbytes, bitsandbytes.functional)``, or an error saying how to install them."""
    try:
        bnb = importlib.import_module("bitsandbytes")
    except ImportError as err:
        raise MPOError(
            'QDoTA (quantize="nf4") needs bitsandbytes >= 0.46: pip install "mpo-dota[quant]"'
        ) from err
    return bnb, importlib.import_module("bitsandbytes.functional")


def is_4bit(module: nn.Module) -> bool:
    """Whether ``module`` is bitsandbytes' ``Linear4bit`` (``LinearNF4``, ``LinearFP4`` too).

    >>> is_4bit(torch.nn.Linear(4, 4))
    False
    """
    # A model holding a Linear4bit has imported bitsandbytes; other models need not import it.
    bnb = sys.modules.get("bitsandbytes")
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def _is_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (weight stored ``(in, out)``)."""
    return _is_linear(module) and not isinstance(module, nn.Linear)


def float_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a layer QDoTA adapts, in float32, detached.

    A ``Conv1D``'s weight, stored ``(in, out)``, is transposed.
    For a ``Linear4bit`` this is ``Dequant(Q(W0))``, or the weight as it is if
    bitsandbytes has not quantized it yet (it does so on the move to a device).
    A weight bitsandbytes repacked for its cpu kernel is first put back in its
    usual layout, in place, as bitsandbytes does before saving.

    >>> float_weight(torch.nn.Linear(3, 2).to(torch.bfloat16)).dtype
    torch.float32
    """
    weight = module.weight
    if is_4bit(module) and weight.quant_state is not None:
        _, functional = require_bitsandbytes()
        unpack_cpu_layout(module)  # dequantize_4bit reads the usual layout
        return functional.dequantize_4bit(weight.data, weight.quant_state).to(torch.float32)
    matrix = weight.detach().T if _is_conv1d(module) else weight.detach()
    return matrix.to(torch.float32)


def unpack_cpu_layout(module: nn.Module) -> None:
    """Put a ``Linear4bit`` weight that bitsandbytes repacked for its cpu kernel back in its
    usual layout, in place, as bitsandbytes itself does before saving or moving to a gpu.

    bitsandbytes (0.50) repacks on the first forward in eval mode without grad on an
    AVX512-BF16 cpu; the repacked kernel has no backward. The repacking stores the
    block scales (``absmax``) as a transposed ``(in / 64, out)`` bfloat16 matrix; its
    inverse restores them only for double quantization, so without it they are put
    back here as the flat float32 vector the other kernels read (the bfloat16
    rounding of the scales, up to 2^-9 relative, cannot be undone).
    """
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is not None and getattr(state, "packing_format_for_cpu", False):
        _, functional = require_bitsandbytes()
        weight.data, state = functional._convert_weight_packed_for_cpu_inverse(weight.data, state)
        if not state.nested and state.absmax.dim() == 2:
            state.absmax = state.absmax.T.reshape(-1).to(torch.float32).contiguous()
        weight.quant_state = state


def keep_differentiable(model: nn.Module) -> list[nn.Module]:
    """Keep the ``Linear4bit`` layers of ``model`` on the kernel with a backward; the ones
    switched off bitsandbytes' cpu inference kernel are returned (see :func:`release`).

    An adapted model trains through its frozen 4-bit layers too. If one of them were
    repacked for the cpu inference kernel (by an evaluation between training steps,
    say), every core before it would silently get no gradient: bitsandbytes never
    unpacks on ``train()``.
    """
    switched = []
    for module in model.modules():
        if is_4bit(module):
            unpack_cpu_layout(module)
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False
                switched.append(module)
    return switched


def release(modules: list[nn.Module]) -> None:
    """Give the layers :func:`keep_differentiable` switched off their cpu kernel back."""
    for module in modules:
        module.support_avx512bf16_for_cpu = True


def _original_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of the weight before bitsandbytes quantized it (its own dtype otherwise)."""
    state = getattr(module.weight, "quant_state", None) if is_4bit(module) else None
    return module.weight.dtype if state is None else state.dtype


def check_quantizable(module: nn.Module, name: str = "the layer") -> None:
    """Raise :class:`MPOError` unless QDoTA can adapt ``module``.

    That is an ``nn.Linear``, transformers' ``Conv1D`` or a bitsandbytes
    ``Linear4bit``, on cpu or cuda.
    """
    if type(module) is not nn.Linear and not _is_conv1d(module) and not is_4bit(module):
        raise MPOError(
            f"{name} is a {type(module).__name__}; QDoTA adapts torch.nn.Linear, transformers' "
            "Conv1D and bitsandbytes' Linear4bit layers"
        )
    device = module.weight.device
    if device.type not in _DEVICES:
        raise MPOError(
            f"{name}'s weight is on {device}; QDoTA quantizes on {' or '.join(_DEVICES)}: "
            "load the model with real weights on one of those devices"
        )


def _copy(core: torch.Tensor) -> torch.Tensor:
    return core.detach().clone(memory_format=torch.contiguous_format)


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).clone()


class _NF4(nn.Module):
    """An ``(out, in)`` float32 matrix quantized to NF4; every buffer is raw ``uint8``.

    ``weight`` holds the packed 4-bit codes; ``absmax``, ``quant_map`` (and, with
    double quantization, ``nested_absmax``, ``nested_quant_map``, ``offset``)
    are the bytes of bitsandbytes' ``QuantState`` tensors, viewed back on use.
    """

    def __init__(self, matrix: torch.Tensor, double_quant: bool) -> None:
        super().__init__()
        _, functional = require_bitsandbytes()
        packed, state = functional.quantize_4bit(
            matrix.detach().to(torch.float32).contiguous(),
            blocksize=_BLOCKSIZE,
            compress_statistics=double_quant,
            quant_type="nf4",
        )
        self.shape = tuple(matrix.shape)
        self.double_quant = double_quant
        self.register_buffer("weight", packed)
        self.register_buffer("absmax", _bytes(state.absmax))
        self.register_buffer("quant_map", _bytes(state.code))
        if double_quant:
            self.register_buffer("nested_absmax", _bytes(state.state2.absmax))
            self.register_buffer("nested_quant_map", _bytes(state.state2.code))
            self.register_buffer(
                "offset", _bytes(torch.as_tensor(state.offset, dtype=torch.float32))
            )

    def state(self) -> Any:
        """bitsandbytes' ``QuantState`` of the stored matrix (cheap: views of the buffers)."""
        _, functional = require_bitsandbytes()
        nested = {}
        if self.double_quant:
            nested = {
                "offset": self.offset.view(torch.float32).reshape(()),
                "state2": functional.QuantState(
                    absmax=self.nested_absmax.view(torch.float32),
                    code=self.nested_quant_map.view(torch.float32),
                    blocksize=_NESTED_BLOCKSIZE,
                    dtype=torch.float32,
                ),
            }
        return functional.QuantState(
            absmax=self.absmax.view(torch.uint8 if self.double_quant else torch.float32),
            shape=torch.Size(self.shape),
            code=self.quant_map.view(torch.float32),
            blocksize=_BLOCKSIZE,
            quant_type="nf4",
            dtype=torch.float32,
            **nested,
        )

    def dequantize(self) -> torch.Tensor:
        """The stored matrix in float32 (``out x in``)."""
        _, functional = require_bitsandbytes()
        return functional.dequantize_4bit(self.weight, self.state())

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x Dequant^T + b`` in ``x``'s dtype; the backward dequantizes again, saving nothing."""
        bnb, _ = require_bitsandbytes()
        bias = None if bias is None else bias.to(x.dtype)
        return bnb.matmul_4bit(x, self.weight.t(), self.state(), bias=bias)


def _matrix(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``MPO(cores)`` as the ``(out, in)`` matrix in float32 (also for a ``Conv1D`` layer),
    by the core's own contraction, so that ``W_res`` is exactly ``W0 - MPO(T0).to_dense()``
    (with autocast off, which would round its products)."""
    with torch.autocast(cores[0].device.type, enabled=False):
        return mpo.MPO([c.detach().to(torch.float32) for c in cores]).to_dense()


def nf4_round_trip(matrix: torch.Tensor, *, double_quant: bool = False) -> torch.Tensor:
    """``Dequant(Q(matrix))`` in float32: a matrix as a QDoTA layer stores its residual.

    NF4 with block size 64 (and, with ``double_quant``, 8-bit block scales), the
    quantizer of :class:`QDoTALinear`; for comparing QDoTA with QLoRA and QPiSSA.

    >>> matrix = torch.randn(64, 64)
    >>> error = (nf4_round_trip(matrix) - matrix).norm() / matrix.norm()
    >>> 0.05 < float(error) < 0.15
    True
    """
    return _NF4(matrix, double_quant).dequantize()


class QDoTALinear(nn.Module):
    """A linear layer replaced by an NF4 residual plus trainable MPO cores (one adapter).

    Args:
        base_layer: the ``nn.Linear``, ``Conv1D`` (read as the transpose of its
            ``(in, out)`` weight) or bitsandbytes ``Linear4bit`` (dequantized
            first) to adapt; its weight is decomposed and quantized, then
            dropped (the layer keeps the bias, frozen).
        adapter_name: name of the adapter.
        rank: rank threshold ``R``.
        shape: ``(row_factors, col_factors)`` of the ``(out, in)`` weight.
        init: ``"dota"`` or ``"random"`` (then ``MPO(T0) = 0`` and the residual is ``W0``).
        dtype: dtype of the cores (bfloat16, as in the paper).
        double_quant: quantize the block scales too (QLoRA's double quantization).

    >>> import torch
    >>> base = torch.nn.Linear(64, 48)
    >>> layer = QDoTALinear(base, rank=4, shape=((4, 3, 4), (4, 4, 4)))
    >>> layer(torch.randn(2, 64)).shape
    torch.Size([2, 48])
    >>> sum(p.numel() for p in layer.parameters() if p.requires_grad)
    320
    """

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
        dtype: torch.dtype | str = torch.bfloat16,
        double_quant: bool = False,
    ) -> None:
        super().__init__()
        require_bitsandbytes()
        check_quantizable(base_layer)
        matrix = float_weight(base_layer)
        cores, initial = new_cores(matrix, shape, rank, init, dtype)
        self._build(base_layer, matrix, adapter_name, cores, initial, rank, init, double_quant)

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
        double_quant: bool = False,
    ) -> QDoTALinear:
        """A layer with the given ``T`` and ``T0``, without decomposing (checkpoint loading).

        The residual ``W0 - MPO(T0)`` (``W0`` if ``initial_cores`` is ``None``) is
        computed and quantized exactly as the constructor does, so the same base
        weight and ``T0`` give the same bytes on the same device.
        """
        require_bitsandbytes()
        check_quantizable(base_layer)
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        matrix = float_weight(base_layer)
        layer._build(
            base_layer, matrix, adapter_name, cores, initial_cores, rank, init, double_quant
        )
        return layer

    def _build(
        self,
        base_layer: nn.Module,
        matrix: torch.Tensor,
        adapter_name: str,
        cores: Sequence[torch.Tensor],
        initial: Sequence[torch.Tensor] | None,
        rank: int,
        init: str,
        double_quant: bool,
    ) -> None:
        check_adapter_name(adapter_name, "QDoTALinear")
        self.out_features, self.in_features = weight_shape(base_layer)
        #: True for a ``Conv1D`` base: merging gives a ``Conv1D`` back and ``get_delta_weight``
        #: is ``(in, out)``; the residual, the cores and the forward are ``(out, in)`` either way
        self._transposed = _is_conv1d(base_layer)
        operator = checked_operator(cores, self.out_features, self.in_features)
        shapes = tuple(tuple(int(d) for d in c.shape) for c in cores)
        self._update_layout = Layout(shapes, False)
        #: dtype of the original weight (before any 4-bit loading): what merging returns by default
        self.base_dtype = _original_dtype(base_layer)
        self.bias = base_layer.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)
        residual = matrix
        if initial is not None:
            # the residual subtracts the cores as stored (in their dtype), so that
            # Dequant(W_res) + MPO(T0) approximates W0 with only the NF4 rounding
            residual = residual - _matrix(initial)
        self.residual = _NF4(residual, double_quant)
        self.dota_cores = nn.ModuleDict(
            {adapter_name: nn.ParameterList([nn.Parameter(_copy(c)) for c in cores])}
        )
        self.dota_init = nn.ModuleDict()
        if initial is not None:
            self.dota_init[adapter_name] = _Cores([_copy(c) for c in initial])
        self.adapter_settings = {
            adapter_name: {
                "rank": rank,
                "shape": [[int(c.shape[1]) for c in cores], [int(c.shape[2]) for c in cores]],
                "ranks": list(operator.ranks),
                "init": init,
                "dtype": str(operator.dtype).removeprefix("torch."),
                "quantize": "nf4",
                "double_quant": double_quant,
            }
        }
        self.active_adapter = adapter_name
        self.disable_adapters = False

    # -- adapter ---------------------------------------------------------------------

    def cores(self, adapter_name: str | None = None) -> list[torch.Tensor]:
        """The trainable cores ``T``."""
        return list(self.dota_cores[adapter_name or self.active_adapter])

    def initial_cores(self, adapter_name: str | None = None) -> list[torch.Tensor] | None:
        """The frozen initial cores ``T0`` (``None`` for random init)."""
        name = adapter_name or self.active_adapter
        return self.dota_init[name].tensors() if name in self.dota_init else None

    def layout(self, adapter_name: str | None = None) -> Layout:
        """The cores' shapes and the base weight's orientation (transposed for a ``Conv1D``);
        ``adapter_name``, if given, is the layer's one adapter (as ``DoTALinear`` takes it)."""
        return Layout(self._update_layout.shapes, self._transposed)

    @property
    def active_adapters(self) -> list[str]:
        """The layer's one adapter as a list, as PEFT's tuner layers report it."""
        return [self.active_adapter]

    def set_adapter(self, adapter_name: str, *, missing_ok: bool = False) -> None:
        """Accept the layer's one adapter (its residual belongs to that adapter's ``T0``)
        and make its cores trainable; ``missing_ok`` changes nothing here."""
        if adapter_name != self.active_adapter:
            raise MPOError(
                f"no adapter named {adapter_name!r}: a QDoTA layer holds one, "
                f"{self.active_adapter!r}"
            )
        self.dota_cores[adapter_name].requires_grad_(True)

    def enable_adapters(self, enabled: bool) -> None:
        """Off: the layer as at initialisation, ``x (Dequant(W_res) + MPO(T0))^T + b``."""
        self.disable_adapters = not enabled

    def get_delta_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """The trained update ``MPO(T) - MPO(T0)`` in the cores' dtype, detached.

        In the base weight's layout, as ``DoTALinear.get_delta_weight`` gives it:
        ``out x in``, ``in x out`` for a ``Conv1D``.
        """
        name = adapter_name or self.active_adapter
        return delta_weight(self.cores(name), self.initial_cores(name), self.layout())

    @torch.no_grad()
    def effective_weight(self) -> torch.Tensor:
        """``Dequant(W_res) + MPO(T)`` in float32 (``out x in``): the weight the layer applies."""
        return self.residual.dequantize() + _matrix(self.cores())

    def merge_and_unload(self, dtype: torch.dtype | str | None = None) -> nn.Module:
        """A plain layer with weight :meth:`effective_weight` (default: the base dtype).

        An ``nn.Linear``, or for a ``Conv1D`` base a ``Conv1D`` holding the
        transpose, ``(in, out)``, as transformers expects it.
        """
        dtype = self.base_dtype if dtype is None else floating_dtype(dtype)
        weight = self.effective_weight()
        if self._transposed:
            # transformers is imported: the base layer was one of its Conv1D
            from transformers.pytorch_utils import Conv1D

            layer = Conv1D(self.out_features, self.in_features).to(weight.device, dtype)
            weight = weight.T
        else:
            layer = nn.Linear(
                self.in_features,
                self.out_features,
                bias=self.bias is not None,
                device=weight.device,
                dtype=dtype,
            )
        with torch.no_grad():
            layer.weight.copy_(weight)
            if self.bias is not None:
                layer.bias.copy_(self.bias)
        return layer

    # -- forward ---------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.residual.matmul(x, self.bias)
        cores = self.initial_cores() if self.disable_adapters else self.cores()
        if cores is None:
            return y
        # the residual and the MPO are (out, in) whatever the base layer: the update is
        # computed as for an nn.Linear (a Conv1D's layout matters only to get_delta_weight,
        # merging and checkpoints)
        layout = self._update_layout
        rows = math.prod(x.shape[:-1])
        training = torch.is_grad_enabled() and cores[0].requires_grad
        if choose(rows, layout, training=training, with_init=False) == "factored":
            # in the cores' dtype: autocast would round the halves to bfloat16
            with torch.autocast(x.device.type, enabled=False):
                left, right = halves(cores, layout)
            update = factored_delta(x, left, right, layout)
            return y + update.to(y.dtype)
        # Many rows: DoTA's dense strategy with W0 = 0 (None) rebuilds MPO(T) in blocks and
        # saves nothing full-size; the factored path would keep an intermediate 16-48x the
        # size of x per layer for the backward.
        return y + dense_forward(x, None, None, cores, None, layout).to(y.dtype)

    def extra_repr(self) -> str:
        settings = self.adapter_settings[self.active_adapter]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"adapter={self.active_adapter!r}, shape={tuple(map(tuple, settings['shape']))}, "
            f"ranks={tuple(settings['ranks'])}, residual=nf4"
            + (" (double quant)" if settings["double_quant"] else "")
        )
