"""Modules trained in full next to the adapters (PEFT's ``modules_to_save``).

Some modules must be trained whole, not adapted: a classification head that
``from_pretrained`` creates at random (``score``, ``classifier``), or an output
layer a recipe unfreezes. :class:`TrainedModule` takes such a module's place
and keeps the original frozen next to one trainable copy per adapter, so that
adapters stay separable as with PEFT: the active adapter's copy runs,
disabling adapters runs the original, :func:`mpo.adapt.unwrap` puts the
original back untouched, and :func:`mpo.adapt.merge_and_unload` puts the
active copy in its place. :func:`mpo.adapt.save_adapter` stores the copy's
state (``<module>.modules_to_save.<name>``) with the cores.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

__all__ = ["TrainedModule", "trained_modules"]


class TrainedModule(nn.Module):
    """``original_module`` frozen, and ``copies[adapter]``, each trained in full.

    Attribute reads the wrapper does not answer itself (``weight``,
    ``out_features``) go to the module that runs, so code written for the
    original keeps working.
    """

    def __init__(self, original_module: nn.Module, adapter_name: str) -> None:
        super().__init__()
        self.original_module = original_module
        self.copies = nn.ModuleDict()
        self.active_adapter = adapter_name
        self.disable_adapters = False
        self.add_copy(adapter_name)

    def add_copy(self, adapter_name: str) -> nn.Module:
        """A copy of the original for ``adapter_name``, trainable while that adapter is active."""
        duplicate = copy.deepcopy(self.original_module)
        duplicate.requires_grad_(adapter_name == self.active_adapter)
        self.copies[adapter_name] = duplicate
        return duplicate

    @property
    def active_module(self) -> nn.Module:
        """The module the forward runs: the active adapter's copy, or the original."""
        if self.disable_adapters or self.active_adapter not in self.copies:
            return self.original_module
        return self.copies[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.active_module(*args, **kwargs)

    def set_adapter(self, adapter_name: str) -> None:
        """Run (and train) ``adapter_name``'s copy; an adapter without one runs the original."""
        self.active_adapter = adapter_name
        for name, duplicate in self.copies.items():
            duplicate.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        del self.copies[adapter_name]

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            if name in ("original_module", "copies", "active_adapter", "disable_adapters"):
                raise  # not set yet (under construction): no recursion
            return getattr(self.active_module, name)

    def extra_repr(self) -> str:
        return f"active_adapter={self.active_adapter!r}, copies={list(self.copies)}"


def trained_modules(model: nn.Module) -> list[tuple[str, TrainedModule]]:
    """Every :class:`TrainedModule` of ``model`` with its qualified name, in model order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, TrainedModule)]
