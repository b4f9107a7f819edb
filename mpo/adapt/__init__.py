"""DoTA adapters for PyTorch and transformers models (needs torch).

>>> import torch, mpo.adapt
>>> model = torch.nn.Sequential()
>>> model.add_module("q_proj", torch.nn.Linear(64, 64))
>>> model = mpo.adapt.wrap(model, rank=4, num_cores=3, quiet=True)
>>> x = torch.randn(3, 64)
>>> y = model(x)   # equals the base model's output at initialisation
"""

from mpo.adapt.analyze import Analysis, AnalysisRow, analyze
from mpo.adapt.checkpoint import export_delta, load_adapter, save_adapter
from mpo.adapt.config import PAPER_TARGETS, DoTAConfig
from mpo.adapt.layer import DoTALinear
from mpo.adapt.plan import AdapterPlan, ModulePlan, plan
from mpo.adapt.quant import QDoTALinear
from mpo.adapt.saved import TrainedModule
from mpo.adapt.wrap import (
    delete_adapter,
    disable_adapter,
    dota_layers,
    merge_adapter,
    merge_and_unload,
    print_trainable_parameters,
    set_adapter,
    trainable_parameters,
    unmerge_adapter,
    unwrap,
    wrap,
)

__all__ = [
    "PAPER_TARGETS",
    "AdapterPlan",
    "Analysis",
    "AnalysisRow",
    "DoTAConfig",
    "DoTALinear",
    "ModulePlan",
    "QDoTALinear",
    "TrainedModule",
    "analyze",
    "delete_adapter",
    "disable_adapter",
    "dota_layers",
    "export_delta",
    "load_adapter",
    "merge_adapter",
    "merge_and_unload",
    "plan",
    "print_trainable_parameters",
    "save_adapter",
    "set_adapter",
    "trainable_parameters",
    "unmerge_adapter",
    "unwrap",
    "wrap",
]
