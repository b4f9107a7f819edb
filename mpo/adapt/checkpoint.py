"""Adapter-only checkpoints of DoTA and QDoTA models, and the update as an :class:`~mpo.MPO`.

A checkpoint is a folder holding two files, named as PEFT names them:

``adapter_config.json``
    ``method`` (``"dota"``), ``format_version`` (an integer, now 1), ``mpo_version``,
    ``adapter_name``, ``base_model_name_or_path`` (or ``null``), ``config`` (the
    :class:`~mpo.adapt.config.DoTAConfig` as ``to_dict()`` writes it; its ``quantize``
    and ``double_quant`` say whether the layers are QDoTA layers) and ``modules``:
    for each adapted module, by qualified name, its ``kind`` (``"Linear"`` or
    ``"Conv1D"``), ``weight_shape`` ``[out, in]``, ``row_factors`` ``[I_1..I_N]``,
    ``col_factors`` ``[J_1..J_N]``, bond ``ranks`` ``[R_1..R_{N-1}]``, rank threshold
    ``rank``, ``init`` and the cores' ``dtype``.
    With modules to save (:mod:`mpo.adapt.saved`; format version 2), also
    ``modules_to_save``: for each such module, by qualified name, its state's
    entries with their ``shape`` and ``dtype``.
``adapter_model.safetensors``
    the cores: ``<module>.dota_cores.<k>``, the trained ``T_k``, and
    (for ``init="dota"``) ``<module>.dota_init.<k>``, the frozen ``T0_k``, each of
    shape ``(R_{k-1}, I_k, J_k, R_k)`` and describing the ``(out, in)`` matrix (also
    for ``Conv1D``), in the cores' dtype; and each module to save's trained state,
    ``<module>.modules_to_save.<entry>``. No base weights, no 4-bit residual,
    nothing pickled. Without modules to save, the file is the cores' bytes (twice
    the trainable parameters for ``init="dota"``, once for ``"random"``) plus a JSON
    header.

A QDoTA layer (``quantize="nf4"``) is loaded by recomputing its residual
``W_res = W0 - MPO(T0)`` (``W0`` for ``init="random"``) from the base weight and
the stored ``T0``, in float32 as :class:`~mpo.adapt.quant.QDoTALinear` computes
it, and quantizing it to NF4 again; nothing is decomposed.

Guarantees:

* **Bit-identical.** :func:`load_adapter` restores every ``T_k`` and ``T0_k`` bit for
  bit and never writes a base weight, so on the same base weights, input and
  device the loaded model's output equals the saved model's (``torch.equal``).
  For QDoTA this holds on the same machine and versions of torch and
  bitsandbytes: ``T0`` is stored exactly and computing and quantizing the
  residual is deterministic, so the rebuilt NF4 bytes equal the saved model's.
  On another device or library version a few residual entries may round to
  a neighbouring NF4 level, so the outputs agree only closely.
* **Atomic.** :func:`save_adapter` writes both files into a hidden sibling folder
  and renames it into place; a folder already at the path is first renamed
  aside and deleted after. At any moment the path holds the old checkpoint,
  the new one, or (between the two renames) nothing: never a mix of both.
* **Validated before use.** :func:`load_adapter` checks the config, the model's
  modules and every tensor (keys, shapes, dtypes, finite values) before it
  changes the model; on any problem it raises :class:`~mpo.errors.MPOError`
  and the model is as it was.

>>> import tempfile, torch, mpo.adapt
>>> def base_model():
...     torch.manual_seed(0)
...     model = torch.nn.Sequential()
...     model.add_module("q_proj", torch.nn.Linear(64, 64))
...     return model
>>> model = mpo.adapt.wrap(base_model(), rank=4, num_cores=3, quiet=True)
>>> with tempfile.TemporaryDirectory() as folder:
...     save_adapter(model, folder + "/adapter")
...     restored = load_adapter(base_model(), folder + "/adapter")
>>> x = torch.randn(2, 64)
>>> torch.equal(restored(x), model(x))
True
>>> delta = export_delta(model)["q_proj"]
>>> delta.shape, delta.ranks
((64, 64), (8, 8))
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import nn

import mpo
from mpo.adapt.config import DoTAConfig, check_adapter_name
from mpo.adapt.layer import DoTALinear
from mpo.adapt.quant import QDoTALinear, check_quantizable, require_bitsandbytes
from mpo.adapt.saved import TrainedModule, trained_modules
from mpo.adapt.sharding import gathered, is_sharded, main_process
from mpo.adapt.targets import base_linear, linear_modules, unused_when_wrapped, weight_shape
from mpo.adapt.wrap import (
    add_copy,
    check_can_add,
    check_target,
    check_untied,
    dota_layers,
    install,
)
from mpo.atomic import staged_folder, write_json
from mpo.errors import MPOError
from mpo.operator import MPO

__all__ = [
    "CONFIG_NAME",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "export_delta",
    "load_adapter",
    "save_adapter",
]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
#: Version of the folder layout; :func:`load_adapter` reads this version and older.
#: Checkpoints without modules to save are written as version 1, which older mpo reads.
FORMAT_VERSION = 2
#: The infix of a module to save's tensors in the weights file.
SAVED = "modules_to_save"

_KINDS = ("Linear", "Conv1D")
_INITS = ("dota", "random")
_DTYPES = ("float32", "bfloat16", "float16", "float64")


# -- the module records of adapter_config.json -----------------------------------------


@dataclass(frozen=True)
class _Record:
    """What ``adapter_config.json`` says about one adapted module."""

    kind: str
    weight_shape: tuple[int, ...]
    row_factors: tuple[int, ...]
    col_factors: tuple[int, ...]
    ranks: tuple[int, ...]
    rank: int
    init: str
    dtype: str

    def tensor_shapes(self, module: str) -> dict[str, tuple[int, ...]]:
        """The file's keys for this module's cores, with their shapes."""
        bonds = (1, *self.ranks, 1)
        shapes = [
            (bonds[k], i, j, bonds[k + 1])
            for k, (i, j) in enumerate(zip(self.row_factors, self.col_factors, strict=True))
        ]
        groups = ("dota_cores", "dota_init") if self.init == "dota" else ("dota_cores",)
        return {f"{module}.{group}.{k}": s for group in groups for k, s in enumerate(shapes)}

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "weight_shape": list(self.weight_shape),
            "row_factors": list(self.row_factors),
            "col_factors": list(self.col_factors),
            "ranks": list(self.ranks),
            "rank": self.rank,
            "init": self.init,
            "dtype": self.dtype,
        }


def _ints(value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(type(v) is int and v > 0 for v in value):
        raise MPOError(f"{field} must be a list of positive integers, got {value!r}")
    return tuple(value)


def _record_from_json(data: Any) -> _Record:
    """Parse one entry of ``modules``; the message of any error names the field."""
    if not isinstance(data, dict):
        raise MPOError(f"the entry must be an object, got {data!r}")
    missing = [f for f in _Record.__dataclass_fields__ if f not in data]
    if missing:
        raise MPOError(f"fields {missing} are missing")
    rows = _ints(data["row_factors"], "row_factors")
    cols = _ints(data["col_factors"], "col_factors")
    record = _Record(
        kind=data["kind"],
        weight_shape=_ints(data["weight_shape"], "weight_shape"),
        row_factors=rows,
        col_factors=cols,
        ranks=_ints(data["ranks"], "ranks"),
        rank=_ints([data["rank"]], "rank")[0],
        init=data["init"],
        dtype=data["dtype"],
    )
    if record.kind not in _KINDS:
        raise MPOError(f"kind must be one of {_KINDS}, got {record.kind!r}")
    if record.init not in _INITS:
        raise MPOError(f"init must be one of {_INITS}, got {record.init!r}")
    if record.dtype not in _DTYPES:
        raise MPOError(f"dtype must be one of {_DTYPES}, got {record.dtype!r}")
    if len(record.weight_shape) != 2 or (math.prod(rows), math.prod(cols)) != record.weight_shape:
        raise MPOError(
            f"row_factors {rows} and col_factors {cols} do not multiply to weight_shape "
            f"{record.weight_shape}"
        )
    if len(rows) != len(cols) or len(record.ranks) != len(rows) - 1:
        raise MPOError(
            f"{len(rows)} row factors, {len(cols)} column factors and {len(record.ranks)} ranks "
            "do not describe one chain of cores (N, N and N - 1)"
        )
    return record


def _kind(module: nn.Module) -> str:
    """``"Linear"`` or ``"Conv1D"``: the layer's kind, or that of the one a DoTA layer adapts."""
    return "Linear" if isinstance(base_linear(module), nn.Linear) else "Conv1D"


def _record_of(layer: DoTALinear | QDoTALinear, adapter_name: str) -> _Record:
    settings = layer.adapter_settings[adapter_name]
    cores = layer.cores(adapter_name)
    return _Record(
        kind="Conv1D" if layer.layout(adapter_name).transposed else "Linear",
        weight_shape=(layer.out_features, layer.in_features),
        row_factors=tuple(int(c.shape[1]) for c in cores),
        col_factors=tuple(int(c.shape[2]) for c in cores),
        ranks=tuple(int(c.shape[3]) for c in cores[:-1]),
        rank=int(settings["rank"]),
        init="random" if layer.initial_cores(adapter_name) is None else "dota",
        dtype=str(cores[0].dtype).removeprefix("torch."),
    )


# -- the model side ------------------------------------------------------------------


def _adapted_layers(model: nn.Module, adapter_name: str | None) -> tuple[str, list]:
    """The adapter's name (default: the active one) and the DoTA layers holding it."""
    layers = dota_layers(model)
    if not layers:
        raise MPOError(
            f"{type(model).__name__} has no DoTA layers; add adapters with mpo.adapt.wrap(model) "
            "or mpo.adapt.load_adapter(model, path)"
        )
    name = adapter_name or layers[0][1].active_adapter
    holding = [(qualified, layer) for qualified, layer in layers if name in layer.dota_cores]
    if not holding:
        names = sorted({n for _, layer in layers for n in layer.dota_cores})
        raise MPOError(
            f"no DoTA layer has an adapter named {name!r}; the model's adapters are {names}: "
            "pass one of those as adapter_name"
        )
    return name, holding


def _warn_unsaved(model: nn.Module) -> None:
    """Warn about trainable parameters that are neither cores nor a module to save's:
    trained, they would be lost by saving the adapter alone."""
    kept = {id(p) for _, layer in dota_layers(model) for p in layer.dota_cores.parameters()}
    kept |= {id(p) for _, module in trained_modules(model) for p in module.copies.parameters()}
    stray = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in kept]
    if stray:
        modules = sorted({n.rpartition(".")[0] or n for n in stray})
        warnings.warn(
            f"{len(stray)} trainable parameter(s) outside the adapters are not saved, e.g. "
            f"{stray[:3]}; to keep them, wrap with modules_to_save={modules[:3]!r} (they are "
            "then trained and saved with the adapter), or freeze them",
            UserWarning,
            stacklevel=3,
        )


def _stored(tensor: torch.Tensor, label: str) -> torch.Tensor:
    """``tensor`` as the weights file stores it: whole (FSDP2 shards are gathered: every
    rank takes part, rank 0 writes), finite, and a contiguous cpu copy (safetensors
    refuses entries that share memory, such as a head tied inside a module to save)."""
    tensor = gathered(tensor)
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise MPOError(
            f"{label} holds NaN or Inf, so the checkpoint could not be loaded; "
            "training diverged: lower the learning rate or save an earlier state"
        )
    return tensor.detach().to("cpu", copy=True).contiguous()


def _saved_state(model: nn.Module, adapter_name: str) -> dict[str, dict[str, torch.Tensor]]:
    """The state of each module to save's copy for ``adapter_name``, by unwrapped name."""
    return {
        _unwrapped_name(qualified): module.copies[adapter_name].state_dict()
        for qualified, module in trained_modules(model)
        if adapter_name in module.copies
    }


# Attribute names that wrappers insert between a model's own module names: FSDP1's units,
# activation checkpointing's wrapper, torch.compile's module.
_WRAPPER_SEGMENTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _unwrapped_name(qualified: str) -> str:
    """``qualified`` as the unwrapped model names the module (what a checkpoint records)."""
    for segment in _WRAPPER_SEGMENTS:
        qualified = qualified.replace(segment, "")
    return qualified


def _base_model_name(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    return name if isinstance(name, str) and name else None


def _quantization(layer: DoTALinear | QDoTALinear) -> tuple[str | None, bool]:
    """``(quantize, double_quant)`` of a layer, as a :class:`DoTAConfig` names them."""
    if isinstance(layer, QDoTALinear):
        return "nf4", layer.residual.double_quant
    return None, False


def _check_quantization(
    qualified: str, layer: DoTALinear | QDoTALinear, config: DoTAConfig
) -> None:
    """Refuse a layer the config does not describe: the loader builds layers from the config."""
    found = _quantization(layer)
    if found != (config.quantize, config.double_quant):
        raise MPOError(
            f"{qualified} has quantize={found[0]!r}, double_quant={found[1]} but model.dota_config "
            f"says quantize={config.quantize!r}, double_quant={config.double_quant}; the "
            "checkpoint would load differently: save a model adapted by mpo.adapt.wrap or "
            "mpo.adapt.load_adapter, unchanged since"
        )


# -- saving --------------------------------------------------------------------------


def _check_target(target: Path) -> None:
    """Refuse a path whose current content a swap would delete, beyond an old checkpoint."""
    here = Path.cwd()
    if target.resolve() in (here, *here.parents):
        raise MPOError(
            f"{target} is the working directory or holds it, which saving cannot replace; "
            "save the adapter to its own folder, e.g. a subfolder 'adapter'"
        )
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise MPOError(
            f"{target} exists and is not a folder; save the adapter to a new or checkpoint folder"
        )
    if target.is_dir():
        others = sorted(
            p.name
            for p in target.iterdir()
            if p.name not in (CONFIG_NAME, WEIGHTS_NAME) or not p.is_file() or p.is_symlink()
        )
        if others:
            raise MPOError(
                f"{target} holds files that are not an adapter checkpoint ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); saving replaces the whole folder, so "
                "save the adapter to its own folder, e.g. a subfolder 'adapter'"
            )


def save_adapter(
    model: nn.Module, path: str | os.PathLike, adapter_name: str | None = None
) -> None:
    """Write the adapter ``adapter_name`` (default: the active one) of a wrapped model to ``path``
    (the layers holding it: an adapter need not target every DoTA layer).

    ``path`` becomes a folder with ``adapter_config.json`` and
    ``adapter_model.safetensors`` (format in the module docstring). It is
    written atomically: the files go to a hidden sibling folder that is then
    renamed to ``path``. An existing ``path`` may hold only an older checkpoint
    (those two files); it is replaced as a whole: renamed to a hidden sibling
    ``.<name>.<random>.old``, the new folder renamed to ``path``, the old one
    deleted. If saving raises, ``path`` is left as it was and no temporary
    folder remains; if the process dies between the two renames, ``path`` is
    absent (loading it fails) and the old checkpoint is in that sibling.

    For QDoTA layers the file holds ``T`` and ``T0`` only, not the 4-bit
    residual: :func:`load_adapter` rebuilds it from the base weights.

    Distributed: with DDP, call it on one process with the inner model. With
    FSDP2 (``fully_shard``), call it on every rank with the sharded model: the
    cores are gathered (a collective) and rank 0 writes. With FSDP1, call it on
    every rank inside ``FullyShardedDataParallel.summon_full_params(model)``
    with ``model.module``; rank 0 writes. Module names are recorded without the wrappers'
    segments (``_fsdp_wrapped_module``, ``_checkpoint_wrapped_module``,
    ``_orig_mod``), so the checkpoint loads into the plain model.

    Raises:
        MPOError: the model has no DoTA layers, no layer holds the adapter, the
            model has no ``dota_config`` for it or a layer's quantization
            disagrees with it, a core holds NaN or Inf (the checkpoint could not
            be loaded), or ``path`` holds other files.
    """
    name, layers = _adapted_layers(model, adapter_name)
    config = getattr(model, "dota_config", {}).get(name)
    if not isinstance(config, DoTAConfig):
        if hasattr(getattr(model, "module", None), "dota_config"):  # DDP, FSDP, accelerate
            raise MPOError(
                f"{type(model).__name__} wraps the adapted model; save the model inside it: "
                "mpo.adapt.save_adapter(model.module, path)"
            )
        raise MPOError(
            f"model.dota_config has no DoTAConfig for adapter {name!r}; save a model adapted by "
            "mpo.adapt.wrap or mpo.adapt.load_adapter"
        )
    for qualified, layer in layers:
        _check_quantization(qualified, layer, config)
    tensors: dict[str, torch.Tensor] = {}
    modules: dict[str, Any] = {}
    sharded = False
    for qualified, layer in layers:
        groups = {"dota_cores": layer.cores(name), "dota_init": layer.initial_cores(name) or []}
        if any(core.dim() != 4 for cores in groups.values() for core in cores):
            raise MPOError(
                f"the cores of {qualified} are flattened shards (FSDP with flat parameters); "
                "call save_adapter inside `with FullyShardedDataParallel.summon_full_params("
                "model):` on every rank (rank 0 writes)"
            )
        # FSDP2's DTensor shards, or FSDP1's units (gathered by summon_full_params): every
        # rank holds the whole cores, so one writes
        sharded = (
            sharded
            or any(is_sharded(core) for cores in groups.values() for core in cores)
            or "_fsdp_wrapped_module." in qualified
        )
        qualified = _unwrapped_name(qualified)
        modules[qualified] = _record_of(layer, name).to_json()
        for group, cores in groups.items():
            for k, core in enumerate(cores):
                key = f"{qualified}.{group}.{k}"
                tensors[key] = _stored(core, f"core {key}")
    header = {
        "method": "dota",
        "format_version": 1,
        "mpo_version": mpo.__version__,
        "adapter_name": name,
        "base_model_name_or_path": _base_model_name(model),
        "config": config.to_dict(),
        "modules": modules,
    }
    _warn_unsaved(model)
    saved = _saved_state(model, name)
    for qualified, state in saved.items():
        for key, tensor in state.items():
            sharded = sharded or is_sharded(tensor)
            tensors[f"{qualified}.{SAVED}.{key}"] = _stored(tensor, f"{qualified}.{key}")
    if saved:
        header["format_version"] = FORMAT_VERSION
        header[SAVED] = {
            qualified: {
                key: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                for key, t in state.items()
            }
            for qualified, state in saved.items()
        }
    if sharded and not main_process():
        return
    target = Path(path)
    _check_target(target)
    with staged_folder(target) as staging:
        metadata = {
            "format": "pt",
            "method": "dota",
            "format_version": str(header["format_version"]),
        }
        safetensors.torch.save_file(tensors, staging / WEIGHTS_NAME, metadata=metadata)
        write_json(staging / CONFIG_NAME, header)


# -- loading -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Header:
    adapter_name: str
    base_model: str | None
    config: DoTAConfig
    records: dict[str, _Record]
    #: modules to save: entry name -> (shape, dtype name), by module
    saved: dict[str, dict[str, tuple[tuple[int, ...], str]]]


def _saved_records(value: Any) -> dict[str, dict[str, tuple[tuple[int, ...], str]]]:
    """``modules_to_save`` of ``adapter_config.json`` (absent: none), checked."""
    if value is None:
        return {}
    records = {}
    for module, entries in value.items() if isinstance(value, dict) else [(None, None)]:
        if not isinstance(entries, dict) or not entries:
            raise MPOError(f"{SAVED}[{module!r}] must be a non-empty object, got {entries!r}")
        records[module] = {}
        for key, entry in entries.items():
            dtype = entry.get("dtype") if isinstance(entry, dict) else None
            if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
                raise MPOError(f"{SAVED}[{module!r}][{key!r}] has no valid dtype: {entry!r}")
            shape = entry.get("shape")
            if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
                raise MPOError(f"{SAVED}[{module!r}][{key!r}] has no valid shape: {entry!r}")
            records[module][key] = (tuple(shape), dtype)
    return records


def _read_header(file: Path) -> _Header:
    """Parse and check ``adapter_config.json``; errors name the file and the field."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MPOError(f"{file} cannot be read as JSON ({err}); save the adapter again") from err
    if not isinstance(data, dict) or data.get("method") != "dota":
        method = data.get("method") if isinstance(data, dict) else None
        raise MPOError(
            f"{file} describes method {method!r}, not 'dota': it is not a DoTA adapter "
            "checkpoint; load it with the library that wrote it"
        )
    version = data.get("format_version")
    if type(version) is not int or version < 1:
        raise MPOError(f"{file}: format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise MPOError(
            f"{file} has format_version {version}, newer than this mpo {mpo.__version__} reads "
            f"(up to {FORMAT_VERSION}; written by mpo {data.get('mpo_version')}); upgrade mpo"
        )
    name = check_adapter_name(data.get("adapter_name"), str(file))
    base_model = data.get("base_model_name_or_path")
    try:
        config = DoTAConfig.from_dict(data.get("config"))
    except (ValueError, TypeError, AttributeError) as err:
        raise MPOError(f"{file}: config is not a valid DoTAConfig ({err})") from err
    modules = data.get("modules")
    if not isinstance(modules, dict) or not modules:
        raise MPOError(f"{file}: modules must be a non-empty object, got {modules!r}")
    records = {}
    for module, entry in modules.items():
        try:
            records[module] = _record_from_json(entry)
        except MPOError as err:
            raise MPOError(
                f"{file}: modules[{module!r}]: {err}; the file is damaged or was edited, "
                "save the adapter again"
            ) from err
    try:
        saved = _saved_records(data.get(SAVED))
    except MPOError as err:
        raise MPOError(f"{file}: {err}; the file is damaged or was edited") from err
    base_model = base_model if isinstance(base_model, str) else None
    return _Header(name, base_model, config, records, saved)


def _find_modules(model: nn.Module, header: _Header, file: Path) -> dict[str, nn.Module]:
    """The model's modules named in the checkpoint, checked against their records."""
    linear = dict(linear_modules(model))
    origin = (
        f"the adapter was trained on {header.base_model!r}"
        if header.base_model
        else "load it into the model it was trained on"
    )
    unused = unused_when_wrapped(model)
    found = {}
    for name, record in header.records.items():
        if name in unused:
            raise MPOError(f"{file} adapts {name!r}, {unused[name]}: an adapter there never runs")
        module = linear.get(name)
        if module is None:
            kind = next((type(m).__name__ for n, m in model.named_modules() if n == name), None)
            problem = f"is a {kind}, not nn.Linear or Conv1D" if kind else "does not exist"
            raise MPOError(
                f"{file} adapts module {name!r}, which in this {type(model).__name__} {problem}; "
                f"{origin}"
            )
        shape = weight_shape(module)
        if _kind(module) != record.kind or shape != record.weight_shape:
            raise MPOError(
                f"{file} adapts {name!r} as a {record.kind} of weight (out, in) = "
                f"{record.weight_shape}, but in this model it is a {_kind(module)} of {shape}; "
                f"{origin}"
            )
        found[name] = module
    return found


def _find_saved(model: nn.Module, header: _Header, file: Path) -> dict[str, nn.Module]:
    """The model's modules to save named in the checkpoint, checked against their state."""
    named = dict(model.named_modules())
    found = {}
    for name, entries in header.saved.items():
        module = named.get(name)
        if module is None or name in header.records:
            problem = "does not exist" if module is None else "is adapted by the same checkpoint"
            raise MPOError(
                f"{file} saves module {name!r} whole, which in this {type(model).__name__} "
                f"{problem}; load it into the model it was trained on"
            )
        original = module.original_module if isinstance(module, TrainedModule) else module
        state = {key: tuple(t.shape) for key, t in original.state_dict().items()}
        recorded = {key: shape for key, (shape, _) in entries.items()}
        if state != recorded:
            raise MPOError(
                f"{file} saves {name!r} with entries {recorded}, but in this model it has "
                f"{state}; load it into the model it was trained on"
            )
        found[name] = module
    return found


def _read_tensors(file: Path, header: _Header, *, strict: bool) -> dict[str, torch.Tensor]:
    """The cores the header describes, read from ``file`` and checked, on the CPU."""
    expected = {
        key: (shape, record.dtype)
        for module, record in header.records.items()
        for key, shape in record.tensor_shapes(module).items()
    }
    expected.update(
        {
            f"{module}.{SAVED}.{key}": entry
            for module, entries in header.saved.items()
            for key, entry in entries.items()
        }
    )
    try:
        with safe_open(file, framework="pt") as handle:
            present = set(handle.keys())
            missing = [key for key in expected if key not in present]
            if missing:
                raise MPOError(
                    f"{file} lacks {len(missing)} core(s) that {CONFIG_NAME} describes, e.g. "
                    f"{missing[:3]}; the two files do not belong together: save the adapter again"
                )
            extra = sorted(present - expected.keys())
            if extra and strict:
                raise MPOError(
                    f"{file} holds {len(extra)} tensor(s) that are not cores of the modules in "
                    f"{CONFIG_NAME}, e.g. {extra[:3]}; pass strict=False to ignore them"
                )
            tensors = {key: handle.get_tensor(key) for key in expected}
    except (SafetensorError, OSError) as err:
        raise MPOError(
            f"{file} cannot be read as safetensors ({err}); it is truncated or damaged: "
            "save the adapter again"
        ) from err
    for key, tensor in tensors.items():
        shape, dtype = expected[key]
        if tuple(tensor.shape) != shape or tensor.dtype != getattr(torch, dtype):
            raise MPOError(
                f"{file}: tensor {key!r} is {tensor.dtype} of shape {tuple(tensor.shape)}, but "
                f"{CONFIG_NAME} makes it torch.{dtype} of shape {shape}; save the adapter again"
            )
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise MPOError(
                f"{file}: tensor {key!r} holds NaN or Inf; the adapter diverged in training or "
                "the file is damaged: load an earlier checkpoint"
            )
    return tensors


def _cores(
    tensors: dict[str, torch.Tensor], module: str, group: str, record: _Record, device: torch.device
) -> list[torch.Tensor]:
    """One module's ``T`` (``group="dota_cores"``) or ``T0``, copied to ``device``.

    Copied so that the layer does not share memory with the memory-mapped file.
    """
    count = len(record.row_factors)
    return [tensors[f"{module}.{group}.{k}"].to(device, copy=True) for k in range(count)]


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str | None = None,
    *,
    strict: bool = True,
) -> nn.Module:
    """Add the adapter saved at ``path`` to the base ``model``, in place, and return it.

    ``model`` is the untouched base model, or one that already has DoTA
    adapters (not QDoTA) of other names: the loaded adapter is added next to
    them and made the active one (:func:`~mpo.adapt.set_adapter`).

    Everything is checked before the model changes: the folder and both files
    exist; the config parses, its method is ``"dota"`` and its format version
    is at most :data:`FORMAT_VERSION`; every module it names is a
    ``nn.Linear``/``Conv1D`` of the recorded kind and ``(out, in)`` shape; the
    tensors file holds every core with the recorded shape and dtype, all
    finite; for a QDoTA checkpoint (config ``quantize="nf4"``) also that
    bitsandbytes is installed and every module is an ``nn.Linear``, ``Conv1D`` or
    ``Linear4bit`` on cpu or cuda. The layers are then built from the stored
    cores as they are (no decomposition), on the device of each base weight,
    and, as :func:`~mpo.adapt.wrap` does, every other parameter is frozen,
    ``model.dota_config`` is set and a model loaded in 4 bits is marked so that
    transformers' ``Trainer`` trains it. Base weights are never written. QDoTA
    layers get the residual ``W0 - MPO(T0)`` recomputed and quantized as
    :class:`~mpo.adapt.quant.QDoTALinear` does, and drop ``W0``, as ``wrap`` does.

    Parameters:
        model: the base model the adapter was trained on, possibly with other adapters.
        path: a folder written by :func:`save_adapter`.
        adapter_name: the name to load the adapter under (default: the saved one).
        strict: if False, tensors in the file that are not cores of the
            recorded modules are ignored instead of refused.

    Raises:
        MPOError: any of the checks fails (the message names the file, module
            or tensor and what to do); the model is then left exactly as it was.
    """
    folder = Path(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise MPOError(f"{folder} is not a folder; give the folder save_adapter wrote")
    for file in (config_file, weights_file):
        if not file.is_file():
            raise MPOError(
                f"{folder} has no {file.name}, so it is not a complete DoTA adapter checkpoint "
                "(save_adapter writes adapter_config.json and adapter_model.safetensors)"
            )
    header = _read_header(config_file)
    name = check_adapter_name(adapter_name or header.adapter_name, "adapter_name")
    if dota_layers(model):
        check_can_add(model, name, header.config.quantize)
    modules = _find_modules(model, header, config_file)
    check_untied(model, list(modules.items()))
    quantized = header.config.quantize == "nf4"
    if quantized:
        require_bitsandbytes()
    for module_name, module in modules.items():
        check_target(module_name, module, header.config.quantize)
        if quantized:
            check_quantizable(module, module_name)
    saved = _find_saved(model, header, config_file)
    tensors = _read_tensors(weights_file, header, strict=strict)

    def build(module_name: str, base: nn.Module) -> nn.Module:
        if module_name in saved:
            trained = add_copy(base, name)
            state = {
                key: tensors[f"{module_name}.{SAVED}.{key}"] for key in header.saved[module_name]
            }
            try:
                trained.copies[name].load_state_dict(state)
            except BaseException:
                if trained is base:  # a copy added in place: install has not recorded it yet
                    trained.delete_adapter(name)
                raise
            return trained
        record = header.records[module_name]
        cores = _cores(tensors, module_name, "dota_cores", record, base.weight.device)
        initial = (
            _cores(tensors, module_name, "dota_init", record, base.weight.device)
            if record.init == "dota"
            else None
        )
        init = "random" if initial is None else "dota"
        if isinstance(base, DoTALinear):  # a model with adapters: one more on this layer
            base.add_cores(name, cores, initial, rank=record.rank, init=init)
            return base
        if quantized:
            return QDoTALinear.from_cores(
                base,
                cores,
                initial,
                adapter_name=name,
                rank=record.rank,
                init=init,
                double_quant=header.config.double_quant,
            )
        return DoTALinear.from_cores(
            base, cores, initial, adapter_name=name, rank=record.rank, init=init
        )

    targets = [*((m, modules[m]) for m in header.records), *saved.items()]
    install(model, targets, build, name, header.config)
    return model


# -- the update as an MPO ------------------------------------------------------------


def export_delta(model: nn.Module, adapter_name: str | None = None) -> dict[str, MPO]:
    """The trained update ``MPO(T) - MPO(T0)`` of each DoTA layer, by qualified module name.

    Each :class:`~mpo.MPO` is the ``(out, in)`` matrix (for ``Conv1D`` the
    transpose of ``layer.get_delta_weight()``), built as the direct-sum
    difference, so its bond ranks are twice the adapter's; with
    ``init="random"`` it is ``MPO(T)`` itself, ranks unchanged. Round it down
    with ``.truncate(...)``. The cores are detached copies on the layer's
    device, in its dtype: later training does not change them.

    Raises:
        MPOError: the model has no DoTA layers, or none holds the adapter.
    """
    name, layers = _adapted_layers(model, adapter_name)
    deltas = {}
    for qualified, layer in layers:
        trained = [core.detach() for core in layer.cores(name)]
        initial = layer.initial_cores(name)
        deltas[qualified] = (
            MPO([core.clone() for core in trained])
            if initial is None
            else MPO(trained) - MPO(initial)
        )
    return deltas
