"""Benchmark: a whole model's training step with DoTA adapters, against PEFT LoRA.

``layer_vs_lora.py`` times one layer alone. On a GPU that mostly times the host: a
layer's products take tens of microseconds there, its launches and Python about as
long, and alone nothing hides them. In a model the GPU runs one layer's kernels while
the host launches the next layer's, so what a user waits for is this script's figure:
forward + backward + optimizer step of a LLaMA built from its config (random weights,
nothing downloaded), adapted on the paper's targets (q, k, v, up and down projections).

Contenders, each its own copy of the same seeded model, on the same seeded batch:

* **frozen**: no adapter, every weight frozen, the input embeddings requiring grad
  (``enable_input_require_grads``), so that the backward runs through every layer as
  with an adapter: the floor of any adapter's step (no optimizer);
* **ours R=16**: ``mpo.adapt.wrap(model, rank=16)``, the layer's "auto" strategy;
* **LoRA r=16** and **LoRA r=32**: PEFT's ``get_peft_model`` (lora_alpha = r).

Adapters train with ``torch.optim.AdamW`` (lr 1e-5, torch's default implementation).
Sizes (``--size``):

* ``7b-layers`` (the default on CUDA): LLaMA-2-7B's layer (hidden 4096, intermediate
  11008, 32 heads), 4 layers, vocabulary 32000, bfloat16, a batch of 4 x 512 tokens;
* ``small`` (the default elsewhere): hidden 1024, intermediate 2752, 16 heads, 4
  layers, vocabulary 1000, float32, 4 x 256 tokens.

With ``--compile`` each model is ``torch.compile``'d (inductor, graph breaks allowed:
transformers' model has some; a DoTA layer compiles into one graph) before its warm-up.
Each contender is warmed up with 2 steps (3 compiled); then in each of ``--rounds`` rounds (default
5) the contenders take turns, each timing ``--steps`` steps (default 5) between device
synchronisations. Reported: the median time a step, its ratio to the frozen model's
and to LoRA r=32's (lower is better), and the spread of the rounds.

    python benchmarks/model_step.py                         # the device's default size
    python benchmarks/model_step.py --size small --rounds 3 --out step.json
    python benchmarks/model_step.py --batch 8 2048               # 16,384 tokens a step
    python benchmarks/model_step.py --compile                    # torch.compile'd models
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from _common import load_average, machine_info, synchronize, table
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import mpo.adapt
from mpo.atomic import write_json

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocabulary: int
    dtype: str
    batch: tuple[int, int]

    def config(self) -> LlamaConfig:
        return LlamaConfig(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_attention_heads=self.heads,
            num_key_value_heads=self.heads,
            num_hidden_layers=self.layers,
            vocab_size=self.vocabulary,
            max_position_embeddings=self.batch[1],
        )


SIZES = {
    "7b-layers": Size(4096, 11008, 32, 4, 32000, "bfloat16", (4, 512)),
    "small": Size(1024, 2752, 16, 4, 1000, "float32", (4, 256)),
}
CONTENDERS = ("frozen", "ours R=16", "LoRA r=16", "LoRA r=32")


def build(name: str, size: Size, device: torch.device) -> torch.nn.Module:
    """The seeded model with ``name``'s adapters (or none), in train mode."""
    torch.manual_seed(0)
    with device:  # initialised where it runs: 7b-layers is 4 GB in float32
        model = LlamaForCausalLM(size.config()).to(getattr(torch, size.dtype))
    if name == "frozen":
        model.requires_grad_(False)
        model.enable_input_require_grads()
    elif name.startswith("ours"):
        model = mpo.adapt.wrap(model, target_modules=TARGETS, rank=16, quiet=True)
    else:
        r = int(name.rsplit("=", 1)[1])
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=r, target_modules=TARGETS))
    return model.train()


def stepper(model: torch.nn.Module, batch: torch.Tensor) -> Callable[[], None]:
    """One training step of ``model`` on ``batch``: forward, backward, and an AdamW step
    of whatever trains (nothing for the frozen model)."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5) if trainable else None

    def step() -> None:
        model(input_ids=batch, labels=batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def measure(
    size: Size, device: torch.device, rounds: int, steps: int, compiled: bool = False
) -> dict[str, Any]:
    """Seconds a step for every contender, per round; and their trainable parameters."""
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, size.vocabulary, size.batch, generator=generator).to(device)
    models = {name: build(name, size, device) for name in CONTENDERS}
    steps_of = {
        name: stepper(torch.compile(model) if compiled else model, batch)
        for name, model in models.items()
    }
    for step in steps_of.values():
        # compiling (a recompile may follow the first call), plans, lazy initialisations,
        # the allocator's first blocks
        for _ in range(3 if compiled else 2):
            step()
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for _ in range(rounds):
        for name, step in steps_of.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                step()
            synchronize(device)
            times[name].append((time.perf_counter() - start) / steps)
    trainable = {
        name: sum(p.numel() for p in model.parameters() if p.requires_grad)
        for name, model in models.items()
    }
    return {"seconds": times, "trainable_parameters": trainable}


def report(result: dict[str, Any]) -> str:
    medians = {name: statistics.median(t) for name, t in result["seconds"].items()}
    header = ["contender", "trainable params", "ms a step", "/ frozen", "/ LoRA r=32", "spread"]
    rows = [
        [
            name,
            f"{result['trainable_parameters'][name]:,}",
            f"{medians[name] * 1e3:.1f}",
            f"{medians[name] / medians['frozen']:.2f}x",
            f"{medians[name] / medians['LoRA r=32']:.2f}x",
            f"{max(t) / min(t):.2f}x",
        ]
        for name, t in result["seconds"].items()
    ]
    return table(header, rows)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument("--size", choices=sorted(SIZES), help="model size (default: by device)")
    parser.add_argument(
        "--batch",
        nargs=2,
        type=int,
        metavar=("ROWS", "TOKENS"),
        help="batch shape instead of the size's (more tokens a step hide more host time)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile every model (inductor) first"
    )
    parser.add_argument("--rounds", type=int, default=5, help="rounds of turns (median)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per turn")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be at least 1")
    if args.batch is not None and min(args.batch) < 1:
        parser.error("--batch needs two positive numbers: rows and tokens")
    args.size = args.size or ("7b-layers" if args.device.startswith("cuda") else "small")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device, size = torch.device(args.device), SIZES[args.size]
    if args.batch is not None:
        size = replace(size, batch=tuple(args.batch))
    info = machine_info(device, libraries=(peft, transformers))
    print("# Training step of a LLaMA: DoTA vs PEFT LoRA vs the frozen model\n")
    print(f"- {info['date']}, {info['device']} ({info['device_name']}), {info['platform']}")
    print(
        f"- torch {info['torch']}, peft {info['peft']}, transformers {info['transformers']}, "
        f"mpo {info['mpo']} at {info['commit']}"
    )
    print(
        f"- size {args.size}: {size}; {args.rounds} rounds of {args.steps} steps a contender"
        + ("; every model torch.compile'd" if args.compile else "")
        + "\n",
        flush=True,
    )
    result = measure(size, device, args.rounds, args.steps, args.compile)
    print(report(result))
    print(f"\nload average at end: {load_average()}")
    if args.out is not None:
        payload = {"machine": info, "size": args.size, **vars(size), **result}
        payload["arguments"] = {k: str(v) for k, v in vars(args).items()}
        write_json(args.out, payload)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
