"""Fine-tune, evaluate and merge causal language models on instruction data (needs torch).

The library behind the ``mpo`` command (:mod:`mpo.cli`): instruction records
in the LLM-Adapters format and the Alpaca prompt (:mod:`~mpo.finetune.data`),
the methods compared (:mod:`~mpo.finetune.methods`: DoTA, its random-init
ablation, QDoTA, and PEFT's LoRA, PiSSA and QLoRA, and full fine-tuning), the
resumable training loop (:mod:`~mpo.finetune.train`), accuracy by greedy
generation (:mod:`~mpo.finetune.evaluate`, :mod:`~mpo.finetune.answers`) and
merging (:mod:`~mpo.finetune.merge`).

>>> from mpo.finetune import FinetuneSpec, TrainConfig
>>> spec = FinetuneSpec(model="path/to/model", data="train.json", method="dota",
...                     train=TrainConfig(max_steps=100))
>>> spec.effective_rank
16
"""

from mpo.finetune.answers import answer_format, extract, is_correct
from mpo.finetune.data import Example, Record, collate, encode, load_records, prompt, split
from mpo.finetune.evaluate import EvalReport, evaluate, generate, load_tasks
from mpo.finetune.merge import merge
from mpo.finetune.methods import METHODS, load_finetuned, load_model, load_tokenizer, prepare
from mpo.finetune.pipeline import FinetuneSpec, finetune
from mpo.finetune.train import RunResult, TrainConfig, train

__all__ = [
    "METHODS",
    "EvalReport",
    "Example",
    "FinetuneSpec",
    "Record",
    "RunResult",
    "TrainConfig",
    "answer_format",
    "collate",
    "encode",
    "evaluate",
    "extract",
    "finetune",
    "generate",
    "is_correct",
    "load_finetuned",
    "load_model",
    "load_records",
    "load_tasks",
    "load_tokenizer",
    "merge",
    "prepare",
    "prompt",
    "split",
    "train",
]
