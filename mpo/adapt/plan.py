"""The dry run: which matrices DoTA would adapt, with what cores, at what cost.

:func:`plan` applies a :class:`~mpo.adapt.config.DoTAConfig` to a model
without decomposing anything: for each target weight of shape ``(I, J)`` it
reports the factor shapes ``I = I_1 ... I_N``, ``J = J_1 ... J_N``, the bond
ranks ``Rbar_k = min(R, R_k)`` (Eq. 1) and the number of trainable entries
``rho = sum_k Rbar_{k-1} I_k J_k Rbar_k``. Only shapes are read, so a model
on the meta device works, and a transformers config or a folder holding a
``config.json`` is instantiated on the meta device, allocating no weights.

The totals count like PEFT's ``print_trainable_parameters`` after the
adapters are added: "all params" is the base model plus the cores.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from mpo import report
from mpo.adapt.config import DoTAConfig, resolve_config
from mpo.adapt.targets import find_saved, find_targets, weight_shape
from mpo.count import bond_ranks, param_count
from mpo.errors import MPOError

if TYPE_CHECKING:
    from transformers import PretrainedConfig

__all__ = ["AdapterPlan", "ModulePlan", "plan"]

#: Above this many modules ``str(plan)`` groups rows by name and shape.
_MAX_TABLE_ROWS = 40


@dataclass(frozen=True)
class ModulePlan:
    """The adapter of one weight ``(out, in)``: rows split ``out``, columns split ``in``.

    ``ranks`` are the ``N - 1`` inner bond ranks and ``params`` the entries of
    the ``N`` cores ``(Rbar_{k-1}, I_k, J_k, Rbar_k)``.
    """

    name: str
    shape: tuple[int, int]
    row_factors: tuple[int, ...]
    col_factors: tuple[int, ...]
    ranks: tuple[int, ...]
    params: int


def _cells(module: ModulePlan) -> list[str]:
    return [
        f"{module.shape[0]}x{module.shape[1]}",
        report.join(module.row_factors),
        report.join(module.col_factors),
        report.join(module.ranks),
    ]


@dataclass(frozen=True)
class AdapterPlan:
    """What :func:`plan` found: one :class:`ModulePlan` per adapted matrix, and the totals.

    Attributes:
        modules: the adapted matrices, in model order.
        base_params: parameters of the model before adapters (shared ones once).
        config: the resolved config the plan was made with.
        saved: ``(name, parameters)`` of each module to save: trained in full,
            as a copy next to the frozen original.
    """

    modules: tuple[ModulePlan, ...]
    base_params: int
    config: DoTAConfig
    saved: tuple[tuple[str, int], ...] = ()

    @property
    def trainable_params(self) -> int:
        """Entries of all cores and of the modules to save's copies: what training updates."""
        return sum(m.params for m in self.modules) + sum(params for _, params in self.saved)

    @property
    def total_params(self) -> int:
        """Parameters of the adapted model: the base model plus the cores and the copies."""
        return self.base_params + self.trainable_params

    @property
    def trainable_share(self) -> float:
        """``trainable_params / total_params``, a fraction (``0.0015`` is 0.15 %)."""
        return self.trainable_params / self.total_params

    def to_json(self) -> dict[str, Any]:
        """The plan as JSON-ready data: the config, the totals and one entry per module."""
        return {
            "config": self.config.to_dict(),
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "trainable_share": self.trainable_share,
            "modules": [asdict(m) for m in self.modules],
            "modules_to_save": {name: params for name, params in self.saved},
        }

    def table(self) -> str:
        """One row per adapted matrix: name, shape, factors, bond ranks, parameters."""
        header = ["module", "shape", "row factors", "col factors", "bond ranks", "params"]
        rows = [[m.name, *_cells(m), f"{m.params:,}"] for m in self.modules]
        return report.table(header, rows, numeric_from=5)

    def summary(self) -> str:
        """One row per leaf name and shape (``q_proj``, 4096x4096), with how many share it."""
        groups: dict[tuple[str, tuple[int, int]], list[ModulePlan]] = {}
        for m in self.modules:
            groups.setdefault((m.name.rsplit(".", 1)[-1], m.shape), []).append(m)
        header = ["module", "shape", "row factors", "col factors", "bond ranks", "count"]
        header += ["params each", "params"]
        rows = []
        for (leaf, _), group in groups.items():
            each, total = group[0].params, sum(m.params for m in group)
            rows.append([leaf, *_cells(group[0]), str(len(group)), f"{each:,}", f"{total:,}"])
        return report.table(header, rows, numeric_from=5)

    def __str__(self) -> str:
        c = self.config
        heading = f"DoTA adapters: R = {c.rank}, N = {c.num_cores}, {len(self.modules)} modules"
        if len(self.modules) > _MAX_TABLE_ROWS:
            heading += " (grouped by name and shape; .table() lists each)"
            body = self.summary()
        else:
            body = self.table()
        totals = (
            f"trainable params: {self.trainable_params:,d} || all params: {self.total_params:,d}"
            f" || trainable%: {100 * self.trainable_share:.4f}"
        )
        saved = [f"modules to save: {n} ({params:,d} params)" for n, params in self.saved]
        return "\n".join([heading, body, *saved, totals])


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as err:
        raise MPOError(
            "planning from a config needs transformers; pip install 'mpo-dota[adapt]', or "
            "build the model yourself and pass the module"
        ) from err
    return transformers


def _is_hf_config(obj: object) -> bool:
    # Only an imported transformers can have made a config object.
    configuration_utils = sys.modules.get("transformers.configuration_utils")
    config_class = getattr(configuration_utils, "PretrainedConfig", None)
    return config_class is not None and isinstance(obj, config_class)


def _meta_model(hf_config: Any) -> nn.Module:
    auto = _transformers().AutoModelForCausalLM
    try:
        with torch.device("meta"):
            return auto.from_config(hf_config)
    except ValueError as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise MPOError(
            f"cannot build a causal LM from {type(hf_config).__name__} ({first_line}); build the "
            "model yourself on the meta device and pass it: "
            "with torch.device('meta'): model = AutoModel.from_config(config)"
        ) from err


def _as_model(model_or_config: Any) -> nn.Module:
    if isinstance(model_or_config, nn.Module):
        return model_or_config
    if _is_hf_config(model_or_config):
        return _meta_model(model_or_config)
    if isinstance(model_or_config, str | os.PathLike):
        folder = Path(model_or_config)
        if not (folder / "config.json").is_file():
            raise MPOError(
                f"{str(folder)!r} is not a folder holding a config.json; pass a local model "
                "folder (for a hub model, download its config.json first), a transformers "
                "config, or a model"
            )
        auto_config = _transformers().AutoConfig
        try:
            hf_config = auto_config.from_pretrained(folder, local_files_only=True)
        except (OSError, ValueError, KeyError) as err:  # unreadable JSON, unknown model_type
            first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise MPOError(
                f"transformers cannot read {folder / 'config.json'} ({first_line}); check that "
                "it is a model's config.json with a known model_type"
            ) from err
        return _meta_model(hf_config)
    raise MPOError(
        f"plan() takes a torch module, a transformers config, or a folder holding a "
        f"config.json; got {type(model_or_config).__name__}"
    )


def plan(
    model_or_config: nn.Module | PretrainedConfig | str | os.PathLike[str],
    config: DoTAConfig | None = None,
    **overrides: Any,
) -> AdapterPlan:
    """Plan DoTA adapters for a model without building them.

    Parameters:
        model_or_config: a ``torch.nn.Module`` (meta tensors are fine), a
            transformers ``PretrainedConfig``, or the path of a local folder
            holding a ``config.json``. A config is built with
            ``AutoModelForCausalLM.from_config`` on the meta device.
        config: the adapter settings; default :class:`DoTAConfig()`.
        **overrides: :class:`DoTAConfig` fields replacing those of ``config``.

    Returns:
        An :class:`AdapterPlan`; ``print(plan(...))`` shows its table and a
        PEFT-style totals line.

    >>> from torch import nn
    >>> model = nn.ModuleDict({
    ...     name: nn.Linear(1024, 1024, device="meta") for name in ("q_proj", "v_proj", "o_proj")})
    >>> p = plan(model, rank=8)
    >>> p.modules[0]
    ModulePlan(name='q_proj', shape=(1024, 1024), row_factors=(4, 4, 4, 4, 4),
               col_factors=(4, 4, 4, 4, 4), ranks=(8, 8, 8, 8), params=3328)
    >>> print(p)
    DoTA adapters: R = 8, N = 5, 2 modules
    module  shape      row factors  col factors  bond ranks  params
    q_proj  1024x1024  4,4,4,4,4    4,4,4,4,4    8,8,8,8      3,328
    v_proj  1024x1024  4,4,4,4,4    4,4,4,4,4    8,8,8,8      3,328
    trainable params: 6,656 || all params: 3,155,456 || trainable%: 0.2109
    """
    resolved = resolve_config(config, overrides)
    model = _as_model(model_or_config)
    modules = []
    to_save = find_saved(model, resolved)
    for name, module in find_targets(model, resolved, to_save):
        out_features, in_features = weight_shape(module)
        rows, cols = resolved.factor_shapes(out_features, in_features)
        modules.append(
            ModulePlan(
                name=name,
                shape=(out_features, in_features),
                row_factors=rows,
                col_factors=cols,
                ranks=bond_ranks(rows, cols, resolved.rank),
                params=param_count(rows, cols, resolved.rank),
            )
        )
    base_params = sum(p.numel() for p in model.parameters())
    saved = tuple((name, sum(p.numel() for p in module.parameters())) for name, module in to_save)
    return AdapterPlan(tuple(modules), base_params, resolved, saved)
