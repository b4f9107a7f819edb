"""The fine-tuning methods the command line compares, behind one interface.

=============== ======================================================= ============
method          what trains                                             default rank
=============== ======================================================= ============
``dota``        MPO cores initialised by TT-SVD of ``W0`` (the paper)   R = 16
``dota-random`` the same cores, Gaussian init, last core zero           R = 16
``qdota``       DoTA cores over an NF4 residual ``W0 - MPO(T0)``        R = 16
``lora``        PEFT LoRA, ``alpha = 2r``                               r = 32
``pissa``       PEFT LoRA with PiSSA init (``alpha = r``)               r = 16
``qlora``       PEFT LoRA over an NF4 base (bitsandbytes)               r = 32
``full``        every parameter                                         --
=============== ======================================================= ============

The default ranks are the paper's comparisons (DoTA R = 16 against LoRA
r = 32 and PiSSA r = 16). The baselines are PEFT's own implementations, so a
comparison measures the methods, not our re-implementation of them.

A trained model is saved in its method's usual form: DoTA adapters with
:func:`mpo.adapt.save_adapter`; LoRA and QLoRA with PEFT's ``save_pretrained``;
PiSSA converted by PEFT to a plain LoRA adapter on the original base (rank
``2r``), since PiSSA changes the base weights; full fine-tuning as a whole
model. :func:`load_finetuned` reads any of them back onto the base model.

>>> sorted(METHODS)
['dota', 'dota-random', 'full', 'lora', 'pissa', 'qdota', 'qlora']
>>> METHODS["dota"].default_rank, METHODS["lora"].default_rank
(16, 32)
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import mpo.adapt
from mpo.adapt.config import PAPER_TARGETS
from mpo.atomic import staged_folder, write_json
from mpo.errors import MPOError

__all__ = [
    "METHODS",
    "Method",
    "count_parameters",
    "load_finetuned",
    "load_model",
    "load_tokenizer",
    "method",
    "prepare",
    "read_method",
    "resolve_dtype",
    "save_finetuned",
    "save_pissa_init",
]

#: The file in a saved checkpoint folder that says which method wrote it.
METHOD_FILE = "mpo_method.json"


@dataclass(frozen=True)
class Method:
    """A fine-tuning method: its name, what it needs installed, its default rank."""

    name: str
    description: str
    default_rank: int | None
    packages: tuple[str, ...] = ()
    quantized_base: bool = False


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("dota", "DoTA: MPO cores initialised from the pretrained weight", 16),
        Method("dota-random", "DoTA with random cores (the paper's ablation)", 16),
        Method("qdota", "DoTA over a 4-bit NF4 residual", 16, ("bitsandbytes",)),
        Method("lora", "LoRA (PEFT)", 32, ("peft",)),
        Method("pissa", "LoRA with PiSSA init (PEFT)", 16, ("peft",)),
        Method("qlora", "LoRA over a 4-bit NF4 base (PEFT)", 32, ("peft", "bitsandbytes"), True),
        Method("full", "full fine-tuning", None),
    )
}


def method(name: str) -> Method:
    """The :class:`Method` called ``name``; an error lists the known ones and missing packages."""
    if name not in METHODS:
        raise MPOError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    found = METHODS[name]
    missing = [p for p in found.packages if importlib.util.find_spec(p) is None]
    if missing:
        raise MPOError(
            f"method {name!r} needs {' and '.join(missing)}; install it with "
            f"pip install {' '.join(missing)}"
        )
    return found


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"auto"``/``None`` means bfloat16 on a GPU that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in names:
        raise MPOError(f"unknown dtype {dtype!r}; choose auto, {', '.join(names)}")
    return names[dtype]


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_causal_lm(path: str | os.PathLike) -> Any:
    """The transformers config at ``path``, after checking it describes a causal LM."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise MPOError(
            f"{folder} is not a transformers model folder (no config.json); pass the folder "
            "that save_pretrained wrote"
        )
    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise MPOError(f"{folder}/config.json cannot be read by transformers: {err}") from None
    architectures = getattr(config, "architectures", None) or []
    causal = config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and (
        not architectures or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)
    )
    if not causal:
        kind = ", ".join(architectures) or config.model_type
        raise MPOError(
            f"{folder} holds a {kind} model, which is not a causal language model; pass a "
            "decoder-only model such as LLaMA, Mistral, Qwen or GPT-2"
        )
    return config


def load_model(
    path: str | os.PathLike, method_name: str = "dota", *, dtype: str | torch.dtype | None = "auto"
) -> nn.Module:
    """Load the causal LM at ``path`` as ``method_name`` needs it, on the GPU if there is one.

    Local files only (nothing is downloaded). ``qlora`` loads the weights in
    NF4 through transformers' ``BitsAndBytesConfig``; every other method in
    ``dtype`` (see :func:`resolve_dtype`).
    """
    from transformers import AutoModelForCausalLM

    chosen = method(method_name)
    _check_causal_lm(path)
    torch_dtype = resolve_dtype(dtype)
    options: dict[str, Any] = {"dtype": torch_dtype, "local_files_only": True}
    if chosen.quantized_base:
        from transformers import BitsAndBytesConfig

        options["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_compute_dtype=torch_dtype,
        )
        options["device_map"] = _device()
    model = AutoModelForCausalLM.from_pretrained(path, **options)
    return model if chosen.quantized_base else model.to(_device())


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved at ``path``; one without a padding token pads with its end token."""
    from transformers import AutoTokenizer

    _check_causal_lm(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise MPOError(
            f"{path} has no usable tokenizer ({err}); save it there with "
            "tokenizer.save_pretrained(path)"
        ) from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def prepare(
    model: nn.Module,
    method_name: str,
    *,
    rank: int | None = None,
    num_cores: int = 5,
    targets: Sequence[str] | str = PAPER_TARGETS,
    seed: int = 0,
) -> nn.Module:
    """Make ``model`` trainable by ``method_name`` and return it (possibly a new wrapper).

    Only the method's parameters keep ``requires_grad``. ``rank`` defaults to
    the method's (table above); ``num_cores`` is DoTA's N; ``targets`` the
    adapted modules (names, a regex or ``"all-linear"``), the paper's by default.
    ``seed`` seeds random initialisations (``dota-random``).
    """
    chosen = method(method_name)
    rank = chosen.default_rank if rank is None else rank
    targets = list(targets) if not isinstance(targets, str) else targets
    torch.manual_seed(seed)
    if chosen.name in ("dota", "dota-random", "qdota"):
        return mpo.adapt.wrap(
            model,
            target_modules=targets,
            rank=rank,
            num_cores=num_cores,
            init="random" if chosen.name == "dota-random" else "dota",
            quantize="nf4" if chosen.name == "qdota" else None,
            progress=False,
            quiet=True,
        )
    if chosen.name == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model
    import peft

    if chosen.quantized_base:
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    pissa = chosen.name == "pissa"
    config = peft.LoraConfig(
        r=rank,
        lora_alpha=rank if pissa else 2 * rank,
        lora_dropout=0.0,
        target_modules=targets,
        init_lora_weights="pissa" if pissa else True,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)``; a 4-bit weight counts as its full number of entries, as PEFT does."""
    if hasattr(model, "get_nb_trainable_parameters"):  # a PEFT model knows its 4-bit layers
        return model.get_nb_trainable_parameters()
    return mpo.adapt.trainable_parameters(model)


def save_finetuned(
    model: nn.Module, method_name: str, folder: str | os.PathLike, *, pissa_init: Path | None = None
) -> None:
    """Write the trained part of ``model`` to ``folder`` in its method's usual format (atomic).

    ``pissa_init`` is the folder :func:`save_pissa_init` wrote before training;
    PEFT needs it to turn the trained PiSSA adapter into a LoRA adapter for the
    original base.
    """
    chosen = method(method_name)
    with staged_folder(folder) as staging:
        if chosen.name in ("dota", "dota-random", "qdota"):
            mpo.adapt.save_adapter(model, staging / "adapter")
        elif chosen.name == "full":
            model.save_pretrained(staging / "adapter", safe_serialization=True)
        else:
            options = {}
            if chosen.name == "pissa":
                if pissa_init is None:
                    raise MPOError("saving a PiSSA model needs the folder of its initial adapter")
                options["path_initial_model_for_weight_conversion"] = str(pissa_init)
            model.save_pretrained(staging / "adapter", safe_serialization=True, **options)
        write_json(staging / METHOD_FILE, {"method": chosen.name})


def save_pissa_init(model: nn.Module, folder: str | os.PathLike) -> Path:
    """Save a PiSSA model's untrained adapter, which :func:`save_finetuned` converts against."""
    config = model.peft_config["default"]
    # PEFT's own recipe: the initial adapter is stored as plain LoRA so that loading it
    # does not run the PiSSA SVD again on the already-modified base.
    init = config.init_lora_weights
    config.init_lora_weights = True
    try:
        with staged_folder(folder) as staging:
            model.save_pretrained(staging, safe_serialization=True)
    finally:
        config.init_lora_weights = init
    return Path(folder)


def read_method(folder: str | os.PathLike) -> str:
    """The method that wrote the checkpoint ``folder`` (from its ``mpo_method.json``)."""
    file = Path(folder) / METHOD_FILE
    if not file.is_file():
        raise MPOError(
            f"{folder} is not a checkpoint written by mpo finetune (no {METHOD_FILE}); pass the "
            "run's best/ folder, e.g. out/run/best"
        )
    try:
        name = json.loads(file.read_text(encoding="utf-8"))["method"]
    except (ValueError, KeyError, TypeError):
        raise MPOError(f"{file} is malformed; it should hold {{'method': NAME}}") from None
    method(name)
    return name


def load_finetuned(
    base: str | os.PathLike, checkpoint: str | os.PathLike, *, dtype: str | None = "auto"
) -> nn.Module:
    """The base model at ``base`` with the checkpoint folder ``checkpoint`` applied.

    For ``full`` the checkpoint holds the whole model and ``base`` is not read.
    """
    name = read_method(checkpoint)
    adapter = Path(checkpoint) / "adapter"
    if name == "full":
        return load_model(adapter, "full", dtype=dtype)
    model = load_model(base, name, dtype=dtype)
    if name in ("dota", "dota-random", "qdota"):
        return mpo.adapt.load_adapter(model, adapter)
    import peft

    return peft.PeftModel.from_pretrained(model, adapter)
