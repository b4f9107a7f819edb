"""The few array operations the core needs, for numpy and torch alike.

The array library is picked from the type of the array the caller passes, as
einops does: there is no global switch, and torch is never imported unless
the caller already has a torch tensor in hand. Only what the algorithms need
lives here; everything else is written once against this small surface.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

import numpy as np

from mpo.errors import MPOError

__all__ = ["Backend", "backend_of"]


class Backend:
    """Array operations on numpy arrays; :class:`TorchBackend` overrides them for torch."""

    name = "numpy"

    def dtype(self, spec: Any) -> Any:
        """Resolve ``"float32"`` or a native dtype to this library's dtype object."""
        try:
            return np.dtype(spec)
        except TypeError as err:
            raise MPOError(f"unknown dtype {spec!r} for numpy arrays; use e.g. 'float32'") from err

    def is_floating(self, dtype: Any) -> bool:
        return np.issubdtype(dtype, np.floating)

    def working_dtype(self, dtype: Any) -> Any:
        """float64 and wider (long double) work in float64; every narrower float in float32."""
        return (
            np.dtype(np.float64)
            if self.eps(dtype) <= np.finfo(np.float64).eps
            else np.dtype(np.float32)
        )

    def eps(self, dtype: Any) -> float:
        """Machine epsilon of the float ``dtype``: twice its unit roundoff."""
        return float(np.finfo(dtype).eps)

    def cast(self, x: Any, dtype: Any) -> Any:
        return x.astype(dtype, copy=False)

    def promote(self, a: Any, b: Any) -> Any:
        """The dtype both ``a`` and ``b`` convert to without loss, as arithmetic promotes."""
        return np.promote_types(a, b)

    def all_finite(self, x: Any) -> bool:
        return bool(np.isfinite(x).all())

    def permute(self, x: Any, axes: tuple[int, ...]) -> Any:
        return x.transpose(axes)

    def contiguous(self, x: Any) -> Any:
        return np.ascontiguousarray(x)

    def concat(self, xs: list[Any], axis: int) -> Any:
        return np.concatenate(xs, axis=axis)

    def zeros(self, shape: tuple[int, ...], like: Any) -> Any:
        return np.zeros(shape, dtype=like.dtype)

    def eigh(self, x: Any) -> tuple[Any, Any]:
        return np.linalg.eigh(x)

    def qr(self, x: Any) -> tuple[Any, Any]:
        return np.linalg.qr(x)

    def svd(self, x: Any) -> tuple[Any, Any, Any]:
        return np.linalg.svd(x, full_matrices=False)

    def flip_columns(self, x: Any) -> Any:
        return x[:, ::-1]

    def canonical_signs(self, U: Any) -> Any:
        """Flip each column so that its entry of largest magnitude (the first on ties) is > 0."""
        pivots = np.abs(U).argmax(axis=0)
        signs = np.where(U[pivots, np.arange(U.shape[1])] < 0, -1.0, 1.0).astype(U.dtype)
        return U * signs

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def from_numpy(self, x: np.ndarray, like: Any) -> Any:
        return x

    def no_grad(self, x: Any) -> Any:
        return x


class TorchBackend(Backend):
    name = "torch"

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def dtype(self, spec: Any) -> Any:
        if isinstance(spec, self.torch.dtype):
            return spec
        name = np.dtype(spec).name if not isinstance(spec, str) else spec
        resolved = getattr(self.torch, name, None)
        if not isinstance(resolved, self.torch.dtype):
            raise MPOError(f"unknown dtype {spec!r} for torch tensors; use e.g. 'float32'")
        return resolved

    def is_floating(self, dtype: Any) -> bool:
        return dtype.is_floating_point

    def working_dtype(self, dtype: Any) -> Any:
        return self.torch.float64 if dtype == self.torch.float64 else self.torch.float32

    def eps(self, dtype: Any) -> float:
        return float(self.torch.finfo(dtype).eps)

    def cast(self, x: Any, dtype: Any) -> Any:
        return x.to(dtype)

    def promote(self, a: Any, b: Any) -> Any:
        return self.torch.promote_types(a, b)

    def all_finite(self, x: Any) -> bool:
        return bool(self.torch.isfinite(x).all())

    def permute(self, x: Any, axes: tuple[int, ...]) -> Any:
        return x.permute(axes)

    def contiguous(self, x: Any) -> Any:
        return x.contiguous()

    def concat(self, xs: list[Any], axis: int) -> Any:
        return self.torch.cat(xs, dim=axis)

    def zeros(self, shape: tuple[int, ...], like: Any) -> Any:
        return self.torch.zeros(shape, dtype=like.dtype, device=like.device)

    def eigh(self, x: Any) -> tuple[Any, Any]:
        return self.torch.linalg.eigh(x)

    def qr(self, x: Any) -> tuple[Any, Any]:
        return self.torch.linalg.qr(x)

    def svd(self, x: Any) -> tuple[Any, Any, Any]:
        return self.torch.linalg.svd(x, full_matrices=False)

    def flip_columns(self, x: Any) -> Any:
        return x.flip(-1)

    def canonical_signs(self, U: Any) -> Any:
        pivots = U.abs().argmax(dim=0)
        pivot_values = U[pivots, self.torch.arange(U.shape[1], device=U.device)]
        return U * self.torch.where(pivot_values < 0, -1.0, 1.0).to(U.dtype)

    def to_numpy(self, x: Any) -> np.ndarray:
        return x.detach().cpu().numpy()

    def from_numpy(self, x: np.ndarray, like: Any) -> Any:
        return self.torch.from_numpy(x).to(like.device)

    def no_grad(self, x: Any) -> Any:
        return x.detach()


_NUMPY = Backend()


@functools.cache
def _torch_backend() -> TorchBackend:
    return TorchBackend()


def backend_of(x: Any) -> Backend:
    """Return the backend for ``x``: numpy for an ndarray, torch for a ``torch.Tensor``.

    >>> backend_of(np.zeros(3)).name
    'numpy'
    """
    if isinstance(x, np.ndarray):
        return _NUMPY
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return _torch_backend()
    raise MPOError(
        f"expected a numpy array or a torch tensor, got {type(x).__name__}; "
        "convert it with numpy.asarray(...) first"
    )
