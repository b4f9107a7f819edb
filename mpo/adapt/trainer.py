"""Adapter checkpoints from transformers' ``Trainer`` (imports transformers).

``Trainer`` saves a wrapped model as it saves any model: ``checkpoint-N/``
holds the whole of it, base weights included, which resumes training but is
not an adapter. :class:`SaveAdapterCallback` adds the adapter itself,
``checkpoint-N/adapter/`` (what :func:`mpo.adapt.save_adapter` writes), to
every checkpoint, and to ``output_dir/adapter`` when training ends::

    from mpo.adapt.trainer import SaveAdapterCallback

    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   callbacks=[SaveAdapterCallback()])
    trainer.train()
    mpo.adapt.load_adapter(base_model, "out/checkpoint-500/adapter")
"""

from __future__ import annotations

import os
import warnings
from typing import Any

from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from mpo.adapt.checkpoint import save_adapter
from mpo.adapt.sharding import is_sharded
from mpo.adapt.wrap import dota_layers

__all__ = ["SaveAdapterCallback"]


class SaveAdapterCallback(TrainerCallback):
    """Write the active adapter next to each ``Trainer`` checkpoint and at the end.

    Only the main process writes. Under FSDP every rank takes part in gathering
    the cores: FSDP2's shards through :func:`mpo.adapt.save_adapter`, FSDP1's
    flat parameters inside ``summon_full_params``. Under
    ``Trainer.hyperparameter_search`` (checkpoints in run folders) it warns and
    writes nothing.

    Parameters:
        folder: the adapter's folder name inside each checkpoint.
        at_end: also write ``output_dir/<folder>`` when training ends.
    """

    def __init__(self, folder: str = "adapter", *, at_end: bool = True) -> None:
        self.folder = folder
        self.at_end = at_end

    def _save(self, args: TrainingArguments, model: nn.Module | None, path: str) -> None:
        if model is None:
            return
        if isinstance(model, FullyShardedDataParallel):  # FSDP1: every rank gathers the cores
            with FullyShardedDataParallel.summon_full_params(model, writeback=False):
                if args.should_save:
                    save_adapter(model.module, path)
            return
        cores = (core for _, layer in dota_layers(model) for core in layer.dota_cores.parameters())
        if any(is_sharded(core) for core in cores) or args.should_save:  # FSDP2: every rank
            save_adapter(model, path)

    def on_save(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        checkpoint = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(checkpoint):  # hyperparameter search saves into a run folder
            warnings.warn(
                f"SaveAdapterCallback: no checkpoint folder {checkpoint}, so the adapter was not "
                "written there (under Trainer.hyperparameter_search checkpoints go to run "
                "folders; save the best run's adapter with mpo.adapt.save_adapter)",
                UserWarning,
                stacklevel=2,
            )
            return
        self._save(args, model, os.path.join(checkpoint, self.folder))

    def on_train_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self.at_end:
            self._save(args, model, os.path.join(args.output_dir, self.folder))
