"""Which modules of a model get adapters: the rules of ``target_modules``.

DoTA adapts linear layers: ``torch.nn.Linear``, whose weight is
``(out_features, in_features)``, and transformers' GPT-2 style ``Conv1D``,
whose weight is stored transposed, ``(in_features, out_features)``.
:func:`weight_shape` reports both as ``(out, in)``, the shape the MPO
factorizes (rows split ``out``, columns split ``in``).

A name pattern is either

* a list of names: a module matches when its qualified name equals an entry
  or ends with ``"." + entry`` (so ``"q_proj"`` matches
  ``"model.layers.0.self_attn.q_proj"``),
* a string: a regular expression that must match the whole qualified name, or
* ``"all-linear"`` (targets only, any case): every linear layer except the
  output head, a task head (a model's ``score``, ``classifier`` or
  ``qa_outputs``, which ``from_pretrained`` may create at random: train it
  whole through ``modules_to_save``), the modules to save, and
  ``nn.MultiheadAttention``'s ``out_proj`` (whose weight that module reads
  directly, so that an adapter in its place would never run).

``exclude_modules`` uses the same rules and wins over ``target_modules``;
``modules_to_save`` (:func:`find_saved`) uses them too.
:func:`find_targets` is shared by :func:`mpo.adapt.plan` and
:func:`mpo.adapt.wrap`. A DoTA layer counts as the linear layer it adapts (its
``base_layer``), under its own name, so that a second adapter finds the same
targets.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Sequence

from torch import nn

from mpo.adapt.config import DoTAConfig
from mpo.adapt.saved import TrainedModule
from mpo.errors import MPOError

__all__ = [
    "base_linear",
    "find_saved",
    "find_targets",
    "linear_modules",
    "task_heads",
    "unused_when_wrapped",
    "weight_shape",
    "within",
]

#: Attributes under which transformers' task models keep a head of their own.
TASK_HEADS = ("score", "classifier", "qa_outputs")


def _linear_types() -> tuple[type[nn.Module], ...]:
    # Conv1D is looked up only if transformers already defined it: a model
    # holding a Conv1D has imported it, and a model without one needs neither
    # the import time nor the dependency.
    pytorch_utils = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(pytorch_utils, "Conv1D", None)
    return (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)


def base_linear(module: nn.Module) -> nn.Module:
    """The linear layer a DoTA layer adapts (its ``base_layer``); any other module itself.

    Only DoTA layers (which hold ``dota_cores`` next to a linear ``base_layer``) are
    seen through: another library's wrapper computes more than its base layer.
    """
    base = getattr(module, "base_layer", None)
    if hasattr(module, "dota_cores") and isinstance(base, _linear_types()):
        return base
    return module


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, _linear_types())


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every ``nn.Linear`` and ``Conv1D`` below ``model``, as ``(qualified name, module)``;
    a DoTA layer stands for the one it adapts.

    The model itself is not listed even if it is linear: an adapter replaces
    a module inside its parent, and the root has none.

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    >>> [name for name, _ in linear_modules(model)]
    ['0', '2']
    """
    modules = [(name, module) for name, module in model.named_modules() if name]
    wrapped = {
        f"{name}.base_layer" for name, module in modules if base_linear(module) is not module
    }
    return [
        (name, module)
        for name, module in _outside_trained(modules)
        if _is_linear(base_linear(module)) and name not in wrapped
    ]


def _outside_trained(modules: list[tuple[str, nn.Module]]) -> list[tuple[str, nn.Module]]:
    """``modules`` less those inside a :class:`TrainedModule` (its original and copies)."""
    inside = tuple(f"{name}." for name, module in modules if isinstance(module, TrainedModule))
    return [(name, module) for name, module in modules if not name.startswith(inside)]


def weight_shape(module: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a ``nn.Linear`` or a ``Conv1D``.

    >>> from torch import nn
    >>> weight_shape(nn.Linear(1024, 4096))
    (4096, 1024)
    """
    module = base_linear(module)
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if _is_linear(module):  # Conv1D: weight is (in, out)
        in_features, out_features = module.weight.shape
        return int(out_features), int(in_features)
    raise MPOError(
        f"{type(module).__name__} is not nn.Linear or transformers' Conv1D; "
        "DoTA adapts linear layers only"
    )


def _matches(name: str, pattern: Sequence[str] | str, field: str) -> bool:
    if isinstance(pattern, str):
        try:
            return re.fullmatch(pattern, name) is not None
        except re.error as err:
            raise MPOError(
                f"{field}={pattern!r} is not a valid regular expression ({err}); "
                "give a list of module names instead, or fix the pattern"
            ) from err
    return any(name == entry or name.endswith("." + entry) for entry in pattern)


def _output_head(model: nn.Module) -> nn.Module | None:
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    return head if isinstance(head, nn.Module) else None


def task_heads(model: nn.Module) -> dict[str, nn.Module]:
    """The model's task heads by name: ``score``, ``classifier`` or ``qa_outputs``
    attributes of the model itself (transformers' ``...ForSequenceClassification``,
    ``...ForTokenClassification``, ``...ForQuestionAnswering``)."""
    return {
        name: head
        for name in TASK_HEADS
        if isinstance(head := getattr(model, name, None), nn.Module)
    }


def within(name: str, roots: Sequence[str]) -> bool:
    """True if the module ``name`` is one of ``roots`` or lies inside one."""
    return any(name == root or name.startswith(root + ".") for root in roots)


def find_saved(model: nn.Module, config: DoTAConfig) -> list[tuple[str, nn.Module]]:
    """The modules ``config.modules_to_save`` selects, outermost matches only, model order.

    Raises:
        MPOError: the pattern matches nothing (the message lists the model's
            top-level modules and task heads), or a selected module is an
            adapter target or holds one.
    """
    pattern = config.modules_to_save
    if pattern is None:
        return []
    selected: list[tuple[str, nn.Module]] = []
    for name, module in _outside_trained(list(model.named_modules())):
        outermost = not within(name, [chosen for chosen, _ in selected])
        if name and outermost and _matches(name, pattern, "modules_to_save"):
            selected.append((name, module))
    for name, module in selected:
        _check_savable(name, module)
    if not selected:
        children = [name for name, _ in model.named_children()]
        heads = sorted(task_heads(model))
        shown = pattern if isinstance(pattern, str) else list(pattern)
        raise MPOError(
            f"no module of {type(model).__name__} matches modules_to_save={shown!r}; its "
            f"top-level modules are {', '.join(children) or 'none'}"
            + (f"; its task heads: {', '.join(heads)}" if heads else "")
        )
    return selected


def _check_savable(name: str, module: nn.Module) -> None:
    """Refuse a module to save that has no state, or that is or holds a DoTA layer or
    another module to save (a copy would train an adapter's cores or nest copies); an
    existing module to save is fine: it gets one more copy."""
    if isinstance(module, TrainedModule):
        return
    if not module.state_dict():
        raise MPOError(
            f"modules_to_save matches {name!r}, a {type(module).__name__} without parameters "
            "or buffers: there is nothing to train or save; drop it from modules_to_save"
        )
    inner = [
        f"{name}.{n}".rstrip(".")
        for n, m in module.named_modules()
        if hasattr(m, "dota_cores") or isinstance(m, TrainedModule)
    ]
    if inner:
        raise MPOError(
            f"modules_to_save matches {name!r}, which is or holds {inner[0]!r}, adapted or trained "
            "whole by another adapter of this model; a module is either adapted or trained "
            "whole: pick modules outside the other adapters"
        )


def unused_when_wrapped(model: nn.Module) -> dict[str, str]:
    """Linear layers whose parent reads their weight without calling them, so that an
    adapter in their place would never run: ``nn.MultiheadAttention``'s ``out_proj``.
    Maps each one's name to the reason."""
    return {
        f"{name}.out_proj" if name else "out_proj": (
            f"the out_proj of a torch.nn.MultiheadAttention ({name or 'the model'}), which "
            "reads its weight without calling it"
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.MultiheadAttention)
    }


def _leaf_names(modules: list[tuple[str, nn.Module]]) -> list[str]:
    return sorted({name.rsplit(".", 1)[-1] for name, _ in modules})


def find_targets(
    model: nn.Module, config: DoTAConfig, saved: list[tuple[str, nn.Module]] | None = None
) -> list[tuple[str, nn.Module]]:
    """The modules ``config`` selects for adapters, as ``(qualified name, module)``, model order.

    A module is selected when it matches ``config.target_modules`` and not
    ``config.exclude_modules`` (rules in the module docstring). The output
    head under ``"all-linear"`` is the module ``model.get_output_embeddings()``
    returns, or, for models without one, any module named ``lm_head``.
    ``saved`` is :func:`find_saved`'s answer for the same model and config, for a
    caller that has it already (found here otherwise).

    Raises:
        MPOError: a selected module is not linear (the message names it and
            its type), or nothing is selected (the message lists the leaf
            names of the model's linear layers to choose from).

    >>> from torch import nn
    >>> model = nn.ModuleDict({
    ...     "q_proj": nn.Linear(64, 64), "v_proj": nn.Linear(64, 64),
    ...     "o_proj": nn.Linear(64, 64), "lm_head": nn.Linear(64, 100)})
    >>> [name for name, _ in find_targets(model, DoTAConfig(target_modules=["q_proj", "v_proj"]))]
    ['q_proj', 'v_proj']
    >>> [name for name, _ in find_targets(model, DoTAConfig(target_modules="all-linear"))]
    ['q_proj', 'v_proj', 'o_proj']
    >>> config = DoTAConfig(target_modules=r".*_proj", exclude_modules=["o_proj"])
    >>> [name for name, _ in find_targets(model, config)]
    ['q_proj', 'v_proj']
    """
    targets, excludes = config.target_modules, config.exclude_modules
    unused = unused_when_wrapped(model)
    saved_names = [name for name, _ in (find_saved(model, config) if saved is None else saved)]
    if targets == "all-linear":
        head = _output_head(model)
        heads = [*saved_names, *task_heads(model)]
        candidates = [
            (name, module)
            for name, module in linear_modules(model)
            if module is not head
            and (head is not None or name.rsplit(".", 1)[-1] != "lm_head")
            and name not in unused
            and not within(name, heads)
        ]
    else:  # never inside a module to save: its original and copies are trained whole
        candidates = [
            (name, module)
            for name, module in _outside_trained(list(model.named_modules()))
            if name and _matches(name, targets, "target_modules")
        ]
    selected = [
        (name, module)
        for name, module in candidates
        if excludes is None or not _matches(name, excludes, "exclude_modules")
    ]
    for name, module in selected:
        clash = next(
            (root for root in saved_names if within(name, [root]) or within(root, [name])), None
        )
        if clash is not None:
            raise MPOError(
                f"{name!r} is matched by target_modules={targets!r} and {clash!r} by "
                f"modules_to_save={config.modules_to_save!r}: a module is either adapted or "
                "trained whole; drop it from one of them (or add it to exclude_modules)"
            )
        if isinstance(module, TrainedModule):
            raise MPOError(
                f"target_modules={targets!r} matches {name!r}, which an adapter of this model "
                "trains whole (modules_to_save); it cannot also be adapted: drop it from "
                "target_modules (or add it to exclude_modules)"
            )
        if name in unused:
            raise MPOError(
                f"target_modules={targets!r} matches {name!r}, {unused[name]}: an adapter there "
                "would never run. Add it to exclude_modules (attention written with nn.Linear "
                "projections, as in transformers models, can be adapted)"
            )
        if not _is_linear(base_linear(module)):
            inner = _leaf_names(linear_modules(module))
            hint = (
                f"target its linear layers ({', '.join(inner)}) instead"
                if inner
                else "remove it from target_modules"
            )
            raise MPOError(
                f"target_modules={targets!r} matches {name!r}, a {type(module).__name__}, but "
                f"DoTA adapts only nn.Linear and Conv1D layers; {hint}, or add it to "
                "exclude_modules"
            )
    if not selected:
        available = _leaf_names(linear_modules(model))
        found = (
            f"its linear layers are named {', '.join(available)}"
            if available
            else "it has no nn.Linear or Conv1D layers"
        )
        excluded = f" minus exclude_modules={excludes!r}" if excludes is not None else ""
        regex = (
            f" (a string is a regular expression over the whole qualified name: pass "
            f"[{targets!r}] to match it as a name or a name's ending)"
            if isinstance(targets, str)
            else ""
        )
        raise MPOError(
            f"no module of {type(model).__name__} matches target_modules={targets!r}{excluded}"
            f"{regex}; {found}"
        )
    return selected
