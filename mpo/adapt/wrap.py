"""Putting DoTA adapters into a model and taking them out again.

``wrap`` replaces each target linear layer in place by a
:class:`~mpo.adapt.layer.DoTALinear` holding the original layer (with
``quantize="nf4"``, by a :class:`~mpo.adapt.quant.QDoTALinear` holding the
4-bit residual instead), freezes every other parameter, and decomposes the
layers one at a time on their own device (nothing else of the model is
copied). ``unwrap`` puts the original layers back; ``merge_and_unload`` puts
back layers whose weights include the update.

A model loaded in 4 bits (transformers' ``BitsAndBytesConfig(load_in_4bit=True)``)
can be wrapped with ``quantize="nf4"`` only: each target ``Linear4bit`` is
dequantized, decomposed and its residual quantized again, with one warning
that ``W0`` already carries quantization error. 8-bit layers are refused.
transformers' ``Trainer`` refuses to fine-tune a model loaded through a
quantization config that carries no adapters; :func:`mark_adapted` tells it
this one does (see there how), and ``unwrap`` and ``merge_and_unload`` undo that.
"""

from __future__ import annotations

import contextlib
import itertools
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mpo import report
from mpo.adapt.config import DoTAConfig, check_adapter_name, floating_dtype, resolve_config
from mpo.adapt.layer import DoTALinear
from mpo.adapt.quant import (
    QDoTALinear,
    check_quantizable,
    is_4bit,
    keep_differentiable,
    release,
    require_bitsandbytes,
)
from mpo.adapt.saved import TrainedModule, trained_modules
from mpo.adapt.targets import find_saved, find_targets, task_heads, weight_shape, within
from mpo.count import param_count
from mpo.errors import MPOError

__all__ = [
    "delete_adapter",
    "dota_layers",
    "merge_and_unload",
    "print_trainable_parameters",
    "set_adapter",
    "trainable_parameters",
    "unwrap",
    "wrap",
]

# bitsandbytes' 8-bit layer, recognised without importing it: before it is moved to a
# device its weight is still floating point, and the type is all that tells
_INT8_LAYERS = ("Linear8bitLt",)


def dota_layers(model: nn.Module) -> list[tuple[str, DoTALinear | QDoTALinear]]:
    """Every DoTA (and QDoTA) layer of ``model`` with its qualified name, in model order."""
    return [
        (name, m) for name, m in model.named_modules() if isinstance(m, (DoTALinear, QDoTALinear))
    ]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` where the submodule ``name`` (a qualified name) is."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def freeze_base(model: nn.Module) -> None:
    """Freeze every parameter, remembering by name which were trainable (for ``unwrap``)."""
    model._dota_trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def install(
    model: nn.Module,
    targets: Iterable[tuple[str, nn.Module]],
    build: Callable[[str, nn.Module], nn.Module],
    adapter_name: str,
    config: DoTAConfig,
) -> None:
    """Put ``build(name, module)`` in place of each target, record the adapter
    (:func:`mark_adapted`) and make it the active one (:func:`set_adapter`); all or
    nothing.

    On a model without adapters every parameter is frozen first. A target that is
    already a DoTA layer gets the new adapter in place (``build`` returns it).
    If anything fails (a layer that cannot be decomposed, a corrupt tensor, an
    interrupt), every replaced module is put back, every adapter added in place
    deleted, and the parameters get back their ``requires_grad``, so the model is
    exactly as it was; then the error propagates. The originals are kept until
    then, so this holds for QDoTA layers too, which keep no ``W0`` of their own.
    """
    first = not dota_layers(model)
    if first:
        freeze_base(model)
    else:  # what a rollback restores besides the layers
        trainable = [(p, p.requires_grad) for p in model.parameters()]
        active = {name: layer.active_adapter for name, layer in dota_layers(model)}
        active_copies = {name: m.active_adapter for name, m in trained_modules(model)}
    done: list[tuple[str, nn.Module, nn.Module]] = []
    try:
        for name, module in targets:
            # cores made under torch.inference_mode could never be trained or versioned
            with torch.inference_mode(False):
                layer = build(name, module)
            if layer is not module:
                replace_module(model, name, layer)
            done.append((name, module, layer))
        mark_adapted(model, adapter_name, config)
        set_adapter(model, adapter_name)
    except BaseException:
        for name, module, layer in reversed(done):
            if layer is module:  # an adapter added to a DoTA layer in place
                layer.delete_adapter(adapter_name)
            else:
                replace_module(model, name, module)
        if first:
            _restore_base(model)
        else:
            model.dota_config.pop(adapter_name, None)
            for name, layer in dota_layers(model):
                layer.active_adapter = active[name]
            for name, module in trained_modules(model):
                module.active_adapter = active_copies.get(name, module.active_adapter)
            for parameter, flag in trainable:
                parameter.requires_grad_(flag)
        raise


def _merged(layers: list[tuple[str, nn.Module]]) -> list[str]:
    """The names of the merged layers among ``layers`` (QDoTA layers never merge in place)."""
    return [name for name, layer in layers if getattr(layer, "merged", False)]


def _check_known(model: nn.Module, adapter_name: str) -> None:
    adapters = sorted(getattr(model, "dota_config", {}))
    if adapter_name not in adapters:
        raise MPOError(f"the model has no adapter named {adapter_name!r}; it has {adapters}")


def set_adapter(model: nn.Module, adapter_name: str) -> None:
    """Make ``adapter_name`` the active adapter of the model and its cores the only
    trainable ones (PEFT's ``set_adapter``).

    Layers the adapter does not target compute their base layer's output while
    it is active.

    Raises:
        MPOError: the model has no adapter of that name (the message lists those
            it has), or a layer is merged.
    """
    _check_known(model, adapter_name)
    layers = dota_layers(model)
    merged = _merged(layers)
    if merged:  # checked first: a switch stopped halfway would mix two adapters
        raise MPOError(f"{merged[0]} is merged; unmerge it before switching adapters")
    for _, layer in layers:
        layer.set_adapter(adapter_name, missing_ok=True)
    for _, module in trained_modules(model):
        module.set_adapter(adapter_name)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove the adapter ``adapter_name`` from every layer holding it; a layer left
    without adapters becomes its base layer again.

    Another adapter must be left, and the deleted one must not be the active one:
    :func:`set_adapter` another first, or :func:`unwrap` to drop them all.
    """
    _check_known(model, adapter_name)
    layers = dota_layers(model)
    merged = [n for n, layer in layers if adapter_name in getattr(layer, "merged_adapters", [])]
    if merged:  # checked first: a deletion stopped halfway would leave it in some layers
        raise MPOError(f"{merged[0]} has {adapter_name!r} merged; unmerge it before deleting")
    if any(layer.active_adapter == adapter_name for _, layer in layers):
        raise MPOError(
            f"{adapter_name!r} is the active adapter; mpo.adapt.set_adapter(model, name) another "
            "one first, or mpo.adapt.unwrap(model) to remove every adapter"
        )
    for name, layer in layers:
        if adapter_name in layer.dota_cores:
            layer.delete_adapter(adapter_name)
            if not layer.dota_cores:  # it held only this one: the plain layer again
                replace_module(model, name, layer.base_layer)
    for name, module in trained_modules(model):
        if adapter_name in module.copies:
            module.delete_adapter(adapter_name)
            if not module.copies:
                replace_module(model, name, module.original_module)
    del model.dota_config[adapter_name]


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the ``with`` block (PEFT's ``model.disable_adapter()``).

    Every DoTA layer gives its base layer's output and every module to save
    runs its original; on leaving, each gets back the state it had. Merged
    layers are refused: disabling would unmerge them, rounding ``W0``.

    >>> import torch, mpo.adapt
    >>> model = mpo.adapt.wrap(torch.nn.Sequential(torch.nn.Linear(8, 8)), target_modules=["0"],
    ...                        rank=2, num_cores=2, quiet=True)
    >>> with mpo.adapt.disable_adapter(model):
    ...     base_output = model(torch.ones(1, 8))
    """
    _require_layers(model, "disable_adapter")
    layers = dota_layers(model)
    merged = _merged(layers)
    if merged:
        raise MPOError(
            f"{merged[0]} is merged: disabling it would unmerge it, which rounds W0; unmerge "
            "first (mpo.adapt.unmerge_adapter(model))"
        )
    switched = [*(layer for _, layer in layers), *(m for _, m in trained_modules(model))]
    before = [module.disable_adapters for module in switched]
    try:
        for module in switched:
            module.enable_adapters(False)
        yield model
    finally:
        for module, disabled in zip(switched, before, strict=True):
            module.enable_adapters(not disabled)


def merge_adapter(model: nn.Module) -> None:
    """Fold the active adapter into every DoTA layer's weight, in place (PEFT's
    ``merge_adapter``): generation then costs what the base model's does.
    :func:`unmerge_adapter` undoes it up to the rounding of the weights' dtype.
    QDoTA layers cannot merge in place (:func:`merge_and_unload` does)."""
    _require_layers(model, "merge_adapter")
    _refuse_quantized(
        model,
        "whose 4-bit weight cannot take the update in place; use "
        "mpo.adapt.merge_and_unload(model) for a merged dense model",
    )
    for _, layer in dota_layers(model):
        layer.merge()


def unmerge_adapter(model: nn.Module) -> None:
    """Subtract what :func:`merge_adapter` folded in (PEFT's ``unmerge_adapter``)."""
    _require_layers(model, "unmerge_adapter")
    for _, layer in dota_layers(model):
        if isinstance(layer, DoTALinear):
            layer.unmerge()


def check_can_add(model: nn.Module, adapter_name: str, quantize: str | None) -> None:
    """Refuse to add an adapter to an adapted model where it cannot coexist."""
    configs = getattr(model, "dota_config", {})
    if adapter_name in configs:
        raise MPOError(
            f"the model already has an adapter named {adapter_name!r}; pass another "
            "adapter_name, or mpo.adapt.delete_adapter / unwrap first"
        )
    layers = dota_layers(model)
    quantized = [name for name, layer in layers if isinstance(layer, QDoTALinear)]
    if quantized or quantize is not None:
        where = quantized[0] if quantized else "the model"
        raise MPOError(
            f"{where} cannot take a second adapter with QDoTA: a 4-bit residual is "
            "W0 - MPO(T0) of one adapter's T0. Reload the base model for another QDoTA "
            "adapter, or add DoTA adapters to a model wrapped without quantize"
        )
    merged = _merged(layers)
    if merged:
        raise MPOError(f"{merged[0]} is merged; unmerge it before adding an adapter")


def mark_adapted(model: nn.Module, adapter_name: str, config: DoTAConfig) -> None:
    """Record the adapter on ``model``: ``model.dota_config``, and what transformers must see.

    transformers' ``Trainer`` refuses to fine-tune a model loaded through a
    quantization config (its ``is_quantized`` is True) unless it is a PEFT model
    or carries adapters loaded by transformers' own PEFT integration, which sets
    ``_hf_peft_config_loaded``: such a "purely quantized" model has nothing it
    could train. There is no public way to declare other adapters. Setting
    ``_hf_peft_config_loaded`` would also make ``save_pretrained`` save through
    PEFT's adapter API, which does not know these layers and fails. So the model
    stops claiming ``is_quantized`` while it holds adapters: outside ``Trainer``'s
    check, transformers (5.24) reads it only in ``.half()`` and ``.float()``,
    which refuse quantized models (the casts leave ``uint8`` 4-bit weights
    alone). ``hf_quantizer``, ``quantization_method`` and
    ``config.quantization_config``, which ``save_pretrained``, ``Trainer``'s
    device placement and reloading read, are untouched. :func:`unwrap` and
    :func:`merge_and_unload` set ``is_quantized`` back.

    The model's frozen ``Linear4bit`` layers are also kept off bitsandbytes' cpu
    inference kernel, which has no backward (:func:`mpo.adapt.quant.keep_differentiable`),
    until :func:`unwrap` or :func:`merge_and_unload`.
    """
    model.dota_config = {**getattr(model, "dota_config", {}), adapter_name: config}
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
        model._dota_quantized = True
    switched = keep_differentiable(model)
    if switched:
        model._dota_cpu_kernel_off = switched


def _restore_base(model: nn.Module) -> None:
    trainable = set(getattr(model, "_dota_trainable", ()))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    if getattr(model, "_dota_quantized", False):
        model.is_quantized = True
    release(getattr(model, "_dota_cpu_kernel_off", []))
    for attribute in ("_dota_trainable", "_dota_quantized", "_dota_cpu_kernel_off", "dota_config"):
        if hasattr(model, attribute):
            delattr(model, attribute)


def check_target(name: str, module: nn.Module, quantize: str | None) -> None:
    """Refuse layers without values (meta device), layers loaded in 8 bits, and in 4
    bits unless QDoTA will dequantize them."""
    if module.weight.device.type == "meta":
        raise MPOError(
            f"{name}'s weight is on the meta device, so it has no values to decompose: load "
            "the model with its weights first (e.g. from_pretrained); mpo.adapt.plan(model, "
            "...) gives the adapters' shapes and parameter counts without weights"
        )
    if is_4bit(module):
        if quantize == "nf4":
            return
        raise MPOError(
            f"{name} is a {type(module).__name__} (loaded in 4 bits): DoTA keeps W0 in full "
            "precision. Pass quantize='nf4' to wrap (QDoTA dequantizes W0, decomposes it and "
            "quantizes the residual), or better, load the model in bfloat16 and pass "
            "quantize='nf4'"
        )
    if not module.weight.is_floating_point() or type(module).__name__ in _INT8_LAYERS:
        raise MPOError(
            f"{name} is a {type(module).__name__}: adapting a model loaded in 8 bits is not "
            "supported. Load it in bfloat16 and pass quantize='nf4' to wrap: QDoTA "
            "decomposes the full-precision weight, then quantizes the residual"
        )


def check_untied(model: nn.Module, targets: list[tuple[str, nn.Module]]) -> None:
    """Refuse targets whose weight another module shares (tied embeddings): the adapter
    would compute the right thing, but merging would write its update into the other
    module too (or untie them, which ``from_pretrained`` would undo)."""
    owners: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(parameter), []).append(name)
    for name, module in targets:
        others = [n for n in owners.get(id(module.weight), []) if not n.startswith(f"{name}.")]
        if others:
            raise MPOError(
                f"{name}.weight is also {others[0]} (tied weights, e.g. tie_word_embeddings): "
                f"an adapter on {name} would be merged into {others[0]} too. Leave {name} out "
                "of target_modules (or add it to exclude_modules)"
            )


def _warn_4bit(names: list[str]) -> None:
    warnings.warn(
        f"{len(names)} target layers ({names[0]}, ...) were loaded in 4 bits, so their W0 "
        "already carries quantization error: QDoTA decomposes Dequant(Q(W0)) and quantizes "
        "the residual on top of it. Wrapping the model loaded in bfloat16 or float32 with "
        "quantize='nf4' starts closer to the pretrained weights",
        UserWarning,
        stacklevel=3,  # the caller of wrap
    )


def _warn_uncompressed(targets: list[tuple[str, nn.Module]], config: DoTAConfig) -> None:
    """Warn about adapters with at least as many parameters as their weight: dimensions
    that factor poorly (a prime is one factor and 1s) leave the MPO nothing to compress."""
    full = []
    for name, module in targets:
        out_features, in_features = weight_shape(module)
        params = param_count(*config.factor_shapes(out_features, in_features), config.rank)
        if params >= out_features * in_features:
            full.append(f"{name} ({out_features}x{in_features}: {params:,} parameters)")
    if full:
        warnings.warn(
            f"{len(full)} adapter(s) hold at least as many parameters as their weight, e.g. "
            f"{full[0]}: lower rank=, or exclude them (exclude_modules); a prime dimension "
            "(one factor padded with 1s) leaves the MPO nothing to compress at any rank",
            UserWarning,
            stacklevel=3,  # the caller of wrap
        )


def wrap(
    model: nn.Module,
    config: DoTAConfig | None = None,
    *,
    adapter_name: str = "default",
    progress: bool | None = None,
    quiet: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Add DoTA adapters to ``model`` in place and return it with only the cores trainable.

    On a model that already has DoTA adapters, this adds another one, under a
    new ``adapter_name``, next to them: target layers that are DoTA layers get
    it in place, other targets become DoTA layers holding only it. The new
    adapter becomes the active one and the only one trainable
    (:func:`set_adapter` switches; QDoTA layers hold one adapter only).

    A model loaded through a quantization config is marked so that
    transformers' ``Trainer`` trains it (:func:`mark_adapted`).

    Parameters:
        model: any ``torch.nn.Module``, e.g. a transformers model.
        config: a :class:`DoTAConfig`; its fields may also be given (or
            overridden) as keyword arguments: ``target_modules``,
            ``exclude_modules``, ``rank``, ``num_cores``, ``shapes``, ``init``,
            ``dtype``, ``quantize``, ``double_quant``.
        adapter_name: the name the adapter is saved and selected under.
        progress: show a progress bar while decomposing (default: on a terminal,
            unless ``quiet``).
        quiet: print nothing: no trainable-parameter report, no bar unless
            ``progress=True``.

    Raises:
        MPOError: the model already has an adapter of that name, or QDoTA
            layers (or ``quantize`` is given) while it has adapters; a target is
            loaded in 8 bits, or in 4 bits without
            ``quantize="nf4"``, or has no values (meta device), or cannot be
            decomposed (e.g. NaN in its weight; the message names the module); the
            adapter name is not a module key. The model is then left exactly as it
            was, also when a layer fails halfway through (:func:`install`).

    Warns:
        UserWarning: once, if targets are bitsandbytes ``Linear4bit`` layers: their
            ``W0`` already carries quantization error.

    >>> import torch
    >>> model = torch.nn.Sequential()
    >>> model.add_module("q_proj", torch.nn.Linear(64, 64))
    >>> model.add_module("out", torch.nn.Linear(64, 8))
    >>> model = wrap(model, rank=4, num_cores=3)
    trainable params: 384 || all params: 5,064 || trainable%: 7.5829
    >>> type(model.q_proj).__name__, model.out.weight.requires_grad
    ('DoTALinear', False)
    """
    resolved = resolve_config(config, overrides)
    check_adapter_name(adapter_name, "wrap")
    if dota_layers(model):
        check_can_add(model, adapter_name, resolved.quantize)
    saved = find_saved(model, resolved)
    targets = find_targets(model, resolved, saved)
    check_untied(model, targets)
    if not dota_layers(model):
        _warn_frozen_heads(model, targets, saved)
    if resolved.quantize is not None:
        require_bitsandbytes()
    for name, module in targets:  # fail before anything changes
        check_target(name, module, resolved.quantize)
        if resolved.quantize is not None:
            check_quantizable(module, name)
    four_bit = [name for name, module in targets if is_4bit(module)]
    if four_bit:
        _warn_4bit(four_bit)
    _warn_uncompressed(targets, resolved)
    kind, extra = (
        (QDoTALinear, {"double_quant": resolved.double_quant})
        if resolved.quantize == "nf4"
        else (DoTALinear, {})
    )

    def build(name: str, module: nn.Module) -> nn.Module:
        if name in saved_names:
            return add_copy(module, adapter_name)
        options = {
            "rank": resolved.rank,
            "shape": resolved.factor_shapes(*weight_shape(module)),
            "init": resolved.init,
            "dtype": resolved.dtype,
        }
        try:
            if isinstance(module, DoTALinear):  # a second adapter on the same layer
                module.update_layer(adapter_name, **options)
                return module
            return kind(module, adapter_name, **options, **extra)
        except MPOError as err:
            raise MPOError(f"{name}: {err}. The model was left as it was") from err

    saved_names = {name for name, _ in saved}
    shown = (False if quiet else None) if progress is None else progress
    bar = report.progress(targets, shown, "DoTA: decomposing", "layer")
    install(model, itertools.chain(bar, saved), build, adapter_name, resolved)
    if not quiet:
        print_trainable_parameters(model)
    return model


def add_copy(module: nn.Module, adapter_name: str) -> TrainedModule:
    """``module`` as a module to save with a trained copy for ``adapter_name``: a new
    :class:`TrainedModule`, or (for a second adapter) the one already there."""
    if isinstance(module, TrainedModule):
        module.add_copy(adapter_name)
        return module
    return TrainedModule(module, adapter_name)


def _warn_frozen_heads(
    model: nn.Module, targets: list[tuple[str, nn.Module]], saved: list[tuple[str, nn.Module]]
) -> None:
    """Warn about task heads left frozen: ``from_pretrained`` creates them at random when
    the checkpoint has none, and a frozen random head cannot learn the task."""
    covered = [name for name, _ in [*targets, *saved]]
    frozen = [
        name
        for name, head in task_heads(model).items()
        if not any(within(n, [name]) for n in covered)
    ]
    if frozen:
        warnings.warn(
            f"{type(model).__name__}'s task head {frozen[0]!r} stays frozen; if it was created "
            f"at random (from_pretrained warns so), it cannot learn: pass "
            f"modules_to_save={frozen!r} to train it and save it with the adapter",
            UserWarning,
            stacklevel=3,
        )


def _entries(parameter: nn.Parameter) -> int:
    # bitsandbytes packs two 4-bit entries per byte of its storage dtype
    if getattr(parameter, "quant_state", None) is not None:
        return 2 * parameter.numel() * parameter.element_size()
    return parameter.numel()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts; buffers such as ``T0`` are not parameters.

    A QDoTA layer's 4-bit residual counts as its ``out x in`` entries, as PEFT
    counts a 4-bit base weight; so does a weight bitsandbytes packed in 4 bits.
    """
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_entries(p) for p in model.parameters())
    total += sum(
        layer.out_features * layer.in_features
        for _, layer in dota_layers(model)
        if isinstance(layer, QDoTALinear)
    )
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """Print ``trainable params: X || all params: Y || trainable%: Z`` as PEFT does."""
    trainable, total = trainable_parameters(model)
    share = 100 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")


def _refuse_quantized(model: nn.Module, reason: str) -> None:
    """:class:`MPOError` naming the first QDoTA layer, ``reason`` after it, if there is one."""
    quantized = [name for name, layer in dota_layers(model) if isinstance(layer, QDoTALinear)]
    if quantized:
        raise MPOError(f"{quantized[0]} is a QDoTA layer, {reason}")


def _require_layers(model: nn.Module, action: str) -> None:
    if not dota_layers(model):
        raise MPOError(
            f"{type(model).__name__} has no DoTA layers, so there is nothing to {action}: it was "
            "never wrapped, or is unwrapped or merged already (its parameters are left as they are)"
        )


def unwrap(model: nn.Module) -> nn.Module:
    """Put the original layers back (unmerging first), and the original modules to
    save; every adapter is dropped.

    A model that was never merged gets its base layers back untouched, so it
    computes exactly what it did before ``wrap``, its parameters get back the
    ``requires_grad`` they had then, and a model loaded in 4 bits is marked
    quantized again for transformers (:func:`mark_adapted`).

    Raises:
        MPOError: the model has no DoTA layers; or it has QDoTA layers, which hold a
            4-bit residual instead of ``W0`` and cannot give it back; reload the
            base model instead, or keep the trained weights with
            :func:`merge_and_unload`.
    """
    _require_layers(model, "unwrap")
    _refuse_quantized(
        model,
        "which stores W0 - MPO(T0) in 4 bits, not W0, so unwrap cannot restore the original "
        "weights; reload the base model, or call mpo.adapt.merge_and_unload(model) for dense "
        "weights including the update",
    )
    for name, layer in dota_layers(model):
        layer.unmerge()
        replace_module(model, name, layer.base_layer)
    for name, module in trained_modules(model):
        replace_module(model, name, module.original_module)
    _restore_base(model)
    return model


def merge_and_unload(model: nn.Module, *, dtype: Any = None) -> nn.Module:
    """Fold the active adapter into each layer's weight and return the plain model
    (other adapters are dropped; a layer without the active one gets its base back;
    a module to save becomes the active adapter's trained copy).

    The result has the original module types (``nn.Linear`` / ``Conv1D``), so
    a transformers model can be saved with ``save_pretrained`` and loaded with
    ``from_pretrained`` without mpo. Parameters get back the ``requires_grad``
    they had before ``wrap``, and a model loaded in 4 bits is marked quantized
    again for transformers. A QDoTA layer becomes an ``nn.Linear`` (a ``Conv1D``
    if it adapted one) with weight ``Dequant(W_res) + MPO(T)`` in the original
    weight's dtype, a DoTA layer one with ``W0 + Delta`` in its weight's dtype.
    ``dtype`` (``"bfloat16"`` or a torch dtype) then casts every floating-point
    parameter and buffer of the returned model to it (4-bit weights left that
    are not adapted stay 4-bit), so that all of it computes in one dtype; a
    QDoTA layer's weight is rounded to it once. In a model loaded in 4 bits the
    merged layers are added to its quantization config's ``llm_int8_skip_modules``,
    so that ``save_pretrained`` and ``from_pretrained`` give the same model back
    (merged layers plain, the others in 4 bits).
    """
    _require_layers(model, "merge_and_unload")
    dtype = None if dtype is None else floating_dtype(dtype)
    merged_4bit = []
    for name, layer in dota_layers(model):
        quantized = isinstance(layer, QDoTALinear)
        if not quantized and layer.merged_adapters not in ([], [layer.active_adapter]):
            layer.unmerge()  # other adapters merged by hand: the active one alone is kept
        replace_module(model, name, layer.merge_and_unload(dtype) if quantized else layer.merge())
        if quantized:
            merged_4bit.append(name)
    for name, module in trained_modules(model):
        replace_module(model, name, module.active_module)
    if getattr(model, "_dota_quantized", False):
        _keep_unquantized(model, merged_4bit)
    _restore_base(model)
    if dtype is not None:
        _cast_floating(model, dtype)
    return model


def _cast_floating(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every floating-point parameter and buffer in place (``model.to(dtype)``
    would also touch bitsandbytes' packed 4-bit weights, which are not floats)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point() and tensor.dtype != dtype:
                tensor.data = tensor.data.to(dtype)
    if getattr(model, "config", None) is not None and hasattr(model.config, "torch_dtype"):
        model.config.torch_dtype = dtype


def _keep_unquantized(model: nn.Module, names: list[str]) -> None:
    """Add the merged layers of a model loaded in 4 bits to its quantization config's
    ``llm_int8_skip_modules``, so that ``from_pretrained`` of what ``save_pretrained``
    writes loads them as the plain layers they now are (and the rest in 4 bits).

    That list, once set, replaces the modules transformers skips by default (the
    output head), which the loaded model's quantizer recorded: those are kept.
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None:
        return
    quantizer = getattr(model, "hf_quantizer", None)
    read = config.get if isinstance(config, dict) else lambda key: getattr(config, key, None)
    skipped = read("llm_int8_skip_modules") or getattr(quantizer, "modules_to_not_convert", None)
    value = sorted({*(skipped or []), *names})
    if isinstance(config, dict):
        config["llm_int8_skip_modules"] = value
    else:
        config.llm_int8_skip_modules = value
