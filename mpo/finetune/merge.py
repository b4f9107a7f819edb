"""Fold a fine-tuned checkpoint into its base model and save a plain transformers model.

The merged folder loads with ``AutoModelForCausalLM.from_pretrained`` and
needs neither mpo nor PEFT. Per method:

* DoTA: ``W0 + MPO(T) - MPO(T0)`` (:func:`mpo.adapt.merge_and_unload`);
* QDoTA: ``Dequant(W_res) + MPO(T)``, rounded once to ``dtype``;
* LoRA, PiSSA: PEFT's ``merge_and_unload`` on the base;
* QLoRA: the LoRA update folded into the full-precision base weights (not
  the 4-bit ones, so merging adds no second rounding);
* full: the checkpoint is already a whole model and is saved as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

import mpo.adapt
from mpo.atomic import staged_folder
from mpo.errors import MPOError
from mpo.finetune.methods import (
    load_finetuned,
    load_model,
    load_tokenizer,
    read_method,
    resolve_dtype,
)

__all__ = ["load_merged", "merge"]


def load_merged(
    base: str | os.PathLike, checkpoint: str | os.PathLike, *, dtype: str | None = "auto"
) -> nn.Module:
    """The base model at ``base`` with the checkpoint folded into its weights, in memory.

    The update is the same as the unmerged model's up to one rounding of each
    merged weight to ``dtype``; generation then runs at the base model's speed.
    """
    name = read_method(checkpoint)
    torch_dtype = resolve_dtype(dtype)
    if name == "qlora":
        import peft

        model = load_model(base, "lora", dtype=torch_dtype)
        model = peft.PeftModel.from_pretrained(model, Path(checkpoint) / "adapter")
    else:
        model = load_finetuned(base, checkpoint, dtype=torch_dtype)
    if name in ("dota", "dota-random", "qdota"):
        model = mpo.adapt.merge_and_unload(model, dtype=torch_dtype)
    elif name != "full":
        model = model.merge_and_unload()
    return model.to(torch_dtype)


def merge(
    base: str | os.PathLike,
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    *,
    dtype: str | None = "auto",
) -> Path:
    """Write ``base`` with the checkpoint folded in to the new folder ``out`` and return it.

    ``dtype`` is the merged weights' dtype (``"auto"``: bfloat16 on a GPU that
    has it, else float32). The tokenizer of ``base`` is saved alongside.

    Raises:
        MPOError: ``out`` exists and is not empty, or the checkpoint is not one
            that ``mpo finetune`` wrote.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MPOError(f"{out} exists and is not an empty folder; merge into a new folder")
    model = load_merged(base, checkpoint, dtype=dtype)
    tokenizer = load_tokenizer(base)
    with staged_folder(out) as staging:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
    return out
