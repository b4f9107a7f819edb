"""Configuration of DoTA adapters: which modules, which factor shapes, which rank.

The field names follow PEFT's ``LoraConfig`` where the concepts match
(``target_modules``, ``exclude_modules``), so that a PEFT user can read a
config without the docs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mpo.count import bond_ranks
from mpo.errors import MPOError, is_count
from mpo.tensorize import factorize

__all__ = [
    "PAPER_TARGETS",
    "DoTAConfig",
    "check_adapter_name",
    "floating_dtype",
    "resolve_config",
]

#: The modules the DoTA paper adapts in LLaMA models.
PAPER_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "up_proj", "down_proj")

_INITS = ("dota", "random")
_DTYPES = ("float32", "bfloat16", "float16", "float64")


@dataclass(frozen=True)
class DoTAConfig:
    """How :func:`mpo.adapt.wrap` and :func:`mpo.adapt.plan` adapt a model.

    Attributes:
        target_modules: module names to adapt. A list matches a module whose
            qualified name equals an entry or ends with ``"." + entry``; a
            string is a regular expression that must match the whole qualified
            name; ``"all-linear"`` takes every linear layer except the output
            head. Default: the paper's ``q_proj, k_proj, v_proj, up_proj, down_proj``.
        exclude_modules: names (same rules) never adapted, even if targeted.
        rank: the rank threshold ``R``; bond ``k`` gets ``min(R, R_k)`` (Eq. 1).
        num_cores: ``N``, the number of cores per matrix.
        shapes: factor shapes per dimension, e.g. ``{4096: (4, 4, 8, 8, 4)}``,
            overriding :func:`mpo.factorize` for that dimension.
        init: ``"dota"`` (cores from the TT-SVD of the pretrained weight) or
            ``"random"`` (the paper's ablation: Gaussian cores, the last zero).
        dtype: dtype of the trainable cores (a name, or the torch dtype).
        quantize: ``None``, or ``"nf4"`` to store the residual in 4 bits (QDoTA).
        double_quant: with ``quantize``, quantize the NF4 block scales too
            (QLoRA's double quantization: about 0.4 bits less per weight).
        modules_to_save: modules (same name rules) trained in full and saved
            with the adapter, as PEFT's ``modules_to_save``: e.g. ``["score"]``,
            the head ``from_pretrained`` creates at random for sequence
            classification (:mod:`mpo.adapt.saved`).

    >>> DoTAConfig(rank=8).factor_shapes(4096, 11008)
    ((4, 4, 8, 8, 4), (4, 4, 43, 4, 4))
    """

    target_modules: Sequence[str] | str = PAPER_TARGETS
    exclude_modules: Sequence[str] | str | None = None
    rank: int = 16
    num_cores: int = 5
    shapes: Mapping[int, Sequence[int]] = field(default_factory=dict)
    init: str = "dota"
    dtype: str = "float32"
    quantize: str | None = None
    double_quant: bool = False
    modules_to_save: Sequence[str] | str | None = None

    def __post_init__(self) -> None:
        for name in ("rank", "num_cores"):  # numpy integers too, stored as int
            value = getattr(self, name)
            if not is_count(value) or value < 1:
                raise MPOError(f"{name} must be a positive integer, got {value!r}")
            object.__setattr__(self, name, int(value))
        if self.init not in _INITS:
            raise MPOError(f"init must be one of {_INITS}, got {self.init!r}")
        if not isinstance(self.dtype, str):  # torch.bfloat16 is stored by name
            object.__setattr__(self, "dtype", str(self.dtype).removeprefix("torch."))
        if self.dtype not in _DTYPES:
            raise MPOError(
                f"dtype must be one of {_DTYPES} or their torch dtypes, got {self.dtype!r}"
            )
        if self.quantize not in (None, "nf4"):
            raise MPOError(f"quantize must be None or 'nf4', got {self.quantize!r}")
        if self.double_quant and self.quantize is None:
            raise MPOError('double_quant applies to a quantized residual; pass quantize="nf4" too')
        if isinstance(self.target_modules, str) and not self.target_modules:
            raise MPOError("target_modules is empty; name modules, give a regex, or 'all-linear'")
        if isinstance(self.target_modules, str) and self.target_modules.lower() == "all-linear":
            object.__setattr__(self, "target_modules", "all-linear")  # any case, as PEFT
        shapes = {int(dim): tuple(int(f) for f in factors) for dim, factors in self.shapes.items()}
        for dim, factors in shapes.items():
            product = 1
            for f in factors:
                product *= f
            if product != dim or len(factors) != self.num_cores:
                raise MPOError(
                    f"shapes[{dim}] = {factors} must be {self.num_cores} factors whose product is "
                    f"{dim}; mpo.factorize({dim}, {self.num_cores}) gives "
                    f"{factorize(dim, self.num_cores)}"
                )
        object.__setattr__(self, "shapes", shapes)
        if not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        for name in ("exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                object.__setattr__(self, name, tuple(value))

    def factors(self, dim: int) -> tuple[int, ...]:
        """Factor shape of one dimension: the configured one, else :func:`mpo.factorize`."""
        return self.shapes.get(dim) or factorize(dim, self.num_cores)

    def factor_shapes(self, out_features: int, in_features: int) -> tuple[tuple[int, ...], ...]:
        """``(row_factors, col_factors)`` of a weight of shape ``(out_features, in_features)``."""
        return self.factors(out_features), self.factors(in_features)

    def bond_ranks(self, out_features: int, in_features: int) -> tuple[int, ...]:
        """The bond ranks of the adapter of a ``(out_features, in_features)`` weight."""
        return bond_ranks(*self.factor_shapes(out_features, in_features), self.rank)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``adapter_config.json`` stores)."""
        data = dataclasses.asdict(self)
        data["target_modules"] = (
            self.target_modules
            if isinstance(self.target_modules, str)
            else list(self.target_modules)
        )
        for name in ("exclude_modules", "modules_to_save"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                data[name] = list(value)
        data["shapes"] = {str(dim): list(f) for dim, f in self.shapes.items()}
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DoTAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise MPOError(f"unknown DoTAConfig fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def check_adapter_name(name: Any, where: str) -> str:
    """``name`` if it can name an adapter (a module key: a non-empty string without
    ``"."``), else :class:`MPOError` saying so, ``where`` first."""
    if not isinstance(name, str) or not name or "." in name:
        raise MPOError(
            f"{where}: adapter name {name!r} must be a non-empty string without '.'; "
            "pass adapter_name='default' (or another such name)"
        )
    if hasattr(torch.nn.ModuleDict(), name):
        raise MPOError(
            f"{where}: adapter name {name!r} is an attribute of torch's ModuleDict, which holds "
            "the adapters; pick another name"
        )
    return name


def floating_dtype(dtype: Any) -> torch.dtype:
    """``dtype``, one of the float dtypes cores and merged weights may have, as a torch
    dtype: given as one (``torch.bfloat16``) or by name (``"bfloat16"``, ``"torch.bfloat16"``).

    >>> floating_dtype("bfloat16")
    torch.bfloat16
    """
    name = str(dtype).removeprefix("torch.") if isinstance(dtype, (str, torch.dtype)) else None
    if name not in _DTYPES:
        raise MPOError(
            f"dtype must be one of {', '.join(_DTYPES)} (a name or the torch dtype), got {dtype!r}"
        )
    return getattr(torch, name)


def resolve_config(config: DoTAConfig | None, overrides: Mapping[str, Any]) -> DoTAConfig:
    """A config from an optional base config plus keyword overrides (as ``wrap`` accepts)."""
    base = config if config is not None else DoTAConfig()
    if not isinstance(base, DoTAConfig):
        raise MPOError(f"config must be a DoTAConfig, got {type(base).__name__}")
    try:
        return dataclasses.replace(base, **overrides)
    except TypeError as err:
        known = sorted(f.name for f in dataclasses.fields(DoTAConfig))
        raise MPOError(f"{err}; DoTAConfig fields are {known}") from err
