"""Cores and weights sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``).

FSDP2 stores each parameter as a ``DTensor`` holding this rank's shard, and
swaps in the whole tensor only around a module's forward and backward. Outside
them (saving an adapter, merging), a core or a weight is a shard: these helpers
gather a whole one (a collective: every rank must call it) and cut a whole
tensor back to this rank's shard (local: every rank already holds it).
Without ``torch.distributed``, or on plain tensors, they change nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

__all__ = ["gathered", "is_sharded", "main_process", "sharded_like"]


def _dtensor() -> Any:
    """The ``torch.distributed.tensor`` module (``._tensor`` before torch 2.5), or None."""
    if not torch.distributed.is_available():
        return None
    for name in ("torch.distributed.tensor", "torch.distributed._tensor"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "DTensor"):
            return module
    return None


def is_sharded(tensor: Any) -> bool:
    """True for a ``DTensor`` (a parameter FSDP2 has sharded)."""
    module = _dtensor()
    return module is not None and isinstance(tensor, module.DTensor)


def gathered(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: a ``DTensor`` all-gathered (every rank must call this), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def sharded_like(whole: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``whole`` cut to ``reference``'s placement when that is a ``DTensor`` (each rank
    keeps its own part of what it holds entirely; no communication), else ``whole``."""
    if not is_sharded(reference):
        return whole
    distribute = _dtensor().distribute_tensor
    mesh, placements = reference.device_mesh, reference.placements
    try:
        return distribute(whole, mesh, placements, src_data_rank=None)
    except TypeError:  # torch before 2.6: rank 0's copy is scattered (all ranks hold the same)
        return distribute(whole, mesh, placements)


def main_process() -> bool:
    """False on every rank but 0 of an initialised process group."""
    distributed = torch.distributed
    return not (
        distributed.is_available() and distributed.is_initialized() and distributed.get_rank() != 0
    )
