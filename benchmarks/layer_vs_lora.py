"""Benchmark: the DoTA layer against a frozen ``nn.Linear`` and PEFT LoRA, in time and memory.

Every contender adapts the same frozen ``nn.Linear(in, out)`` (its weight and bias
have ``requires_grad=False``), so they differ only in what they add to it:

* **frozen**: the bare layer, the baseline of every ratio;
* **ours**: ``mpo.adapt.DoTALinear(base, rank=R)`` with ``layer.strategy`` "auto"
  (the cost rule ``mpo.adapt.delta.choose``) and, to check that rule, "dense" and
  "factored" forced;
* **LoRA**: PEFT's ``lora.Linear`` with r = 16 and r = 32 (``get_peft_model`` on a
  one-layer wrapper, ``target_modules=["proj"]``, lora_alpha = r).

Adapter weights are in each library's default dtype, float32, also when the base
layer is bfloat16 (PEFT upcasts them; ``DoTALinear`` keeps float32 cores).

What is measured, for weight shapes 4096x4096 and 11008x4096 (out x in), DoTA ranks
R = 16 and 32, 1, 16, 512 and 4096 tokens, float32 and bfloat16:

* **Training step**: forward + backward of ``loss = y.square().mean()`` with the
  input ``x`` requiring grad (as inside a network), i.e. ``torch.autograd.grad`` of
  the loss with respect to ``x`` and the trainable parameters. Bars: ours / frozen
  <= 1.8x at 512 tokens and <= 1.6x at 4096 tokens.
* **Forward** under ``torch.no_grad()`` at 1 and 16 tokens (generation). Bar:
  ours / frozen <= 1.5x.
* **Peak training memory** of a small LLaMA (hidden 1024, intermediate 2752, 4 layers,
  16 heads, vocabulary 1000, built from its config, nothing downloaded) wrapped by
  ``mpo.adapt.wrap(model, rank=16)`` against PEFT LoRA r = 32 on the same targets
  (q, k, v, up, down projections): one AdamW step on a fixed 4 x 256 batch, each in a
  fresh subprocess. On CUDA, ``torch.cuda.max_memory_allocated`` above what was
  allocated before the step; on CPU, the peak resident set size during the step
  (``VmHWM``, reset through ``/proc/self/clear_refs``) above the resident size before
  it, after ``malloc_trim``, with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc hands
  freed blocks back at once and the RSS follows the live tensors (repeatable to 0.1 MB,
  where glibc's default caching moved the peaks by up to a third between runs).
  Bar: ours <= LoRA r = 32.

A sample times enough back-to-back calls to last at least 50 ms and is divided by their
number. Every contender is warmed up once per case, untimed. In each of ``--repeats``
rounds (default 5, or 3 from 4096 tokens on) the contenders take turns, and each
contender's sample is bracketed by two samples of the frozen layer: its ratio in that
round is its time over the mean of those two, and the tables show the median of these
ratios (and the median time of the frozen layer). On a shared machine the load drifts
within seconds; the bracketed ratios follow it far better than ratios of medians taken
a whole round apart.

Thread counts are torch's defaults (``--threads`` sets them) and printed in the header
with the other machine details. With fewer cores than busy threads on the machine, every
parallel region may wait for a descheduled thread (a 1 x 512 by 512 x 1024 product took
8 ms instead of 60 us with 2 threads on 2 busy cores), which penalises many small
operations far more than one large one; ``--threads 1`` then gives steadier ratios.

Run it in the project's ``.venv`` (``python dev.py bench`` installs the ``bench``
extra, then runs another benchmark) or anywhere ``mpo``, torch, transformers and
peft import, e.g. from the repository root with ``PYTHONPATH=.``::

    python benchmarks/layer_vs_lora.py --quick      # 4096x4096, R = 16, float32, 1/16/512 tokens
    python benchmarks/layer_vs_lora.py --out results.json
    python benchmarks/layer_vs_lora.py --shapes 4096x4096 --dtype bfloat16 --tokens 16 512
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import peft
import torch
import transformers
from _common import (
    load_average,
    machine_info,
    run_memory_worker,
    synchronize,
    table,
    training_step_peak,
    verdict,
)
from peft import LoraConfig, get_peft_model
from torch import nn

import mpo.adapt
from mpo.adapt import DoTALinear
from mpo.adapt.delta import choose
from mpo.atomic import write_json

SHAPES: tuple[tuple[int, int], ...] = ((4096, 4096), (11008, 4096))  # (out, in)
RANKS: tuple[int, ...] = (16, 32)
LORA_RANKS: tuple[int, ...] = (16, 32)
TOKENS: tuple[int, ...] = (1, 16, 512, 4096)
DTYPES: tuple[str, ...] = ("float32", "bfloat16")
STRATEGIES: tuple[str, ...] = ("auto", "dense", "factored")
TRAIN_BARS: dict[int, float] = {512: 1.8, 4096: 1.6}  # tokens -> max ours / frozen
FORWARD_TOKENS: tuple[int, ...] = (1, 16)
FORWARD_BAR = 1.5
MEMORY_BAR = 1.0  # ours / LoRA r=32, peak training memory
MIN_SAMPLE_S = 0.05  # a timed sample repeats a call until it lasts at least this long
MAX_CALLS_PER_SAMPLE = 200
MEMORY_TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
MEMORY_BATCH = (4, 256)
MEMORY_METHODS = ("dota", "lora")


# --- the contenders -------------------------------------------------------------------------


class _Wrapper(nn.Module):
    """One named linear layer, so that PEFT can find it by ``target_modules=["proj"]``."""

    def __init__(self, proj: nn.Linear) -> None:
        super().__init__()
        self.proj = proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@dataclass
class Contender:
    """A layer to time; for ours, the strategy it is forced to (``None`` for the others)."""

    layer: nn.Module
    strategy: str | None = None

    def __post_init__(self) -> None:
        self.params = [p for p in self.layer.parameters() if p.requires_grad]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.strategy is not None:
            self.layer.strategy = self.strategy
        return self.layer(x)


def _lora(base: nn.Linear, r: int) -> nn.Module:
    model = get_peft_model(_Wrapper(base), LoraConfig(r=r, lora_alpha=r, target_modules=["proj"]))
    layer = model.base_model.model.proj
    assert layer.base_layer is base, "PEFT must wrap the shared base layer, not a copy"
    return layer


def make_contenders(
    out_features: int, in_features: int, dtype: torch.dtype, ranks: list[int], device: Any
) -> tuple[dict[str, Contender], dict[int, DoTALinear]]:
    """All contenders over one frozen ``nn.Linear(in_features, out_features)``."""
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, device=device, dtype=dtype)
    base.requires_grad_(False)
    contenders = {"frozen": Contender(base)}
    ours = {}
    for rank in ranks:
        ours[rank] = DoTALinear(base, rank=rank)
        # Move the cores off their initial values, as training does: an untrained
        # adapter's update is exactly zero and generation skips it.
        with torch.no_grad():
            for core in ours[rank].cores():
                core.add_(0.01 * torch.randn_like(core))
        for strategy in STRATEGIES:
            contenders[f"ours R={rank} {strategy}"] = Contender(ours[rank], strategy)
    for r in LORA_RANKS:
        contenders[f"LoRA r={r}"] = Contender(_lora(base, r))
    for name, contender in contenders.items():
        frozen = [p for p in contender.layer.parameters() if p is base.weight or p is base.bias]
        assert not any(p.requires_grad for p in frozen), f"{name}: the base layer must stay frozen"
    return contenders, ours


# --- timing ---------------------------------------------------------------------------------


def train_step(contender: Contender, x: torch.Tensor) -> None:
    loss = contender(x).square().mean()
    torch.autograd.grad(loss, [x, *contender.params])


def forward_only(contender: Contender, x: torch.Tensor) -> None:
    with torch.no_grad():
        contender(x)


def _timed(call: Callable[[], None], calls: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for _ in range(calls):
        call()
    synchronize(device)
    return (time.perf_counter() - start) / calls


@dataclass
class CaseResult:
    """Seconds per call of every contender on one shape, dtype, token count and mode."""

    out_features: int
    in_features: int
    dtype: str
    tokens: int
    mode: str  # "train" (forward + backward) or "forward" (no_grad)
    ranks: list[int]
    auto_choice: dict[int, str]  # rank -> the strategy "auto" takes here
    times: dict[str, list[float]] = field(default_factory=dict)
    # per round: a contender's time / the mean of the frozen samples just before and after it
    ratios: dict[str, list[float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.out_features}x{self.in_features}"

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def ratio(self, name: str) -> float:
        return 1.0 if name == "frozen" else statistics.median(self.ratios[name])

    @property
    def bar(self) -> float | None:
        if self.mode == "train":
            return TRAIN_BARS.get(self.tokens)
        return FORWARD_BAR if self.tokens in FORWARD_TOKENS else None

    def passes(self, rank: int) -> bool | None:
        bar = self.bar
        return None if bar is None else self.ratio(f"ours R={rank} auto") <= bar

    def best_strategy(self, rank: int) -> str:
        return min(("dense", "factored"), key=lambda s: self.ratio(f"ours R={rank} {s}"))

    @property
    def spread(self) -> float:
        """Largest slowest/fastest sample of any contender: well above 1, the machine was busy."""
        return max(max(samples) / min(samples) for samples in self.times.values())


def run_case(
    contenders: dict[str, Contender],
    ours: dict[int, DoTALinear],
    dtype: torch.dtype,
    tokens: int,
    mode: str,
    repeats: int,
    device: torch.device,
) -> CaseResult:
    base = contenders["frozen"].layer
    generator = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, base.in_features, generator=generator).to(device, dtype)
    if mode == "train":
        x.requires_grad_(True)
        step = train_step
    else:
        step = forward_only
    auto_choice = {
        rank: choose(tokens, layer.layout(), training=mode == "train", with_init=True)
        for rank, layer in ours.items()
    }
    result = CaseResult(
        base.out_features,
        base.in_features,
        str(dtype).removeprefix("torch."),
        tokens,
        mode,
        sorted(ours),
        auto_choice,
        {name: [] for name in contenders},
        {name: [] for name in contenders if name != "frozen"},
    )
    calls = {}
    for name, contender in contenders.items():

        def call(contender: Contender = contender) -> None:
            step(contender, x)

        warm = _timed(call, 1, device)  # first calls pay for plans, lazy inits, page faults
        count = max(1, min(MAX_CALLS_PER_SAMPLE, math.ceil(MIN_SAMPLE_S / max(warm, 1e-9))))
        calls[name] = (call, count)
    frozen, frozen_count = calls.pop("frozen")
    for _ in range(repeats):
        before = _timed(frozen, frozen_count, device)
        result.times["frozen"].append(before)
        for name, (call, count) in calls.items():  # take turns, each between two frozen samples
            sample = _timed(call, count, device)
            after = _timed(frozen, frozen_count, device)
            result.times[name].append(sample)
            result.times["frozen"].append(after)
            result.ratios[name].append(2 * sample / (before + after))
            before = after
    return result


# --- memory (each contender in a fresh subprocess) -------------------------------------------


def memory_worker(method: str, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """One AdamW step of the small LLaMA with ``method``'s adapters; its peak memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=1024,
        intermediate_size=2752,
        num_hidden_layers=4,
        num_attention_heads=16,
        num_key_value_heads=16,
        vocab_size=1000,
        max_position_embeddings=MEMORY_BATCH[1],
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    if method == "dota":
        model = mpo.adapt.wrap(model, target_modules=MEMORY_TARGETS, rank=16, quiet=True)
        rows = math.prod(MEMORY_BATCH)
        strategies = {
            choose(rows, layer.layout(), training=True, with_init=True)
            for _, layer in mpo.adapt.dota_layers(model)
        }
        label = f"ours R=16 (auto: {'/'.join(sorted(strategies))})"
    else:
        lora = LoraConfig(r=32, lora_alpha=32, target_modules=MEMORY_TARGETS)
        model = get_peft_model(model, lora)
        label = "LoRA r=32"
    model.train()
    return {"method": method, "label": label, **training_step_peak(model, MEMORY_BATCH, device)}


def measure_memory(device: torch.device, dtype: str) -> dict[str, Any]:
    """Run :func:`memory_worker` for each method in a fresh interpreter."""
    results: dict[str, Any] = {}
    for method in MEMORY_METHODS:
        options = ["--device", str(device), "--dtype", dtype]
        options += ["--threads", str(torch.get_num_threads())]
        results[method] = run_memory_worker(__file__, method, options)
    results["ratio"] = results["dota"]["peak_step_bytes"] / results["lora"]["peak_step_bytes"]
    results["passes"] = results["ratio"] <= MEMORY_BAR
    results["dtype"] = dtype
    return results


# --- reporting ------------------------------------------------------------------------------


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def ratio_table(results: list[CaseResult]) -> str:
    header = [
        "shape",
        "dtype",
        "tokens",
        "R",
        "frozen ms",
        "ours auto/frozen",
        "bar",
        "verdict",
        "auto chose",
        "dense/frozen",
        "factored/frozen",
        "auto = faster?",
        *(f"LoRA r={r}/frozen" for r in LORA_RANKS),
        "spread",
    ]
    rows = []
    for r in results:
        for rank in r.ranks:
            chose, best = r.auto_choice[rank], r.best_strategy(rank)
            cost = r.ratio(f"ours R={rank} {chose}") / r.ratio(f"ours R={rank} {best}")
            rows.append(
                [
                    r.label,
                    r.dtype,
                    str(r.tokens),
                    str(rank),
                    _ms(r.median("frozen")),
                    f"{r.ratio(f'ours R={rank} auto'):.2f}x",
                    "-" if r.bar is None else f"<= {r.bar:g}x",
                    verdict(r.passes(rank)),
                    chose,
                    f"{r.ratio(f'ours R={rank} dense'):.2f}x",
                    f"{r.ratio(f'ours R={rank} factored'):.2f}x",
                    "yes" if chose == best else f"no ({cost:.2f}x slower)",
                    *(f"{r.ratio(f'LoRA r={lr}'):.2f}x" for lr in LORA_RANKS),
                    f"{r.spread:.1f}x",
                ]
            )
    return table(header, rows)


def memory_table(memory: dict[str, Any]) -> str:
    header = ["model", "trainable params", "step peak MiB", "absolute peak MiB", "loss"]
    rows = [
        [
            memory[m]["label"],
            f"{memory[m]['trainable_parameters']:,}",
            f"{memory[m]['peak_step_bytes'] / 2**20:.0f}",
            f"{memory[m]['peak_absolute_bytes'] / 2**20:.0f}",
            f"{memory[m]['loss']:.4f}",
        ]
        for m in MEMORY_METHODS
    ]
    return table(header, rows)


def print_header(info: dict[str, Any], args: argparse.Namespace) -> None:
    print("# DoTALinear vs frozen nn.Linear vs PEFT LoRA\n")
    print(f"- date: {info['date']}, {info['platform']}")
    print(f"- device: {info['device']} ({info['device_name']}), CPU {info['cpu_capability']}")
    print(f"- CPUs: {info['cpu_count']} ({info['cpus_usable']} usable); thread env: {info['env']}")
    print(
        f"- torch {info['torch']} ({info['torch_threads']} threads, "
        f"{info['torch_interop_threads']} interop), peft {info['peft']}, "
        f"transformers {info['transformers']}, mpo {info['mpo']} at {info['commit']}, "
        f"Python {info['python']}"
    )
    shapes = ", ".join(f"{o}x{i}" for o, i in args.shapes)
    print(
        f"- shapes (out x in) {shapes}; ours R = {args.ranks}; LoRA r = {list(LORA_RANKS)}; "
        f"tokens {args.tokens}; dtypes {args.dtype}"
    )
    repeats = args.repeats or "5 (3 from 4096 tokens on)"
    print(
        f"- {repeats} rounds; samples of >= {MIN_SAMPLE_S * 1e3:g} ms of calls; each "
        "contender's sample between two of the frozen layer's"
    )
    print(f"- load average at start: {info['load_average_at_start']}", flush=True)
    load, cpus = info["load_average_at_start"], info["cpus_usable"] or info["cpu_count"]
    if load and cpus and info["device"] == "cpu" and info["torch_threads"] > 1 and load[0] >= cpus:
        print(
            "- WARNING: the CPUs are busy already; with more than one thread, every parallel "
            "operation may wait for a descheduled thread. Consider --threads 1.",
            flush=True,
        )
    print()


def print_report(train: list[CaseResult], forward: list[CaseResult], memory: Any) -> None:
    if train:
        print("\n## Training step (forward + backward, x requires grad)\n")
        print(ratio_table(train))
    if forward:
        print("\n## Forward under torch.no_grad()\n")
        print(ratio_table(forward))
    print(
        "\nratios: median over rounds of a contender's time / the frozen layer's just before "
        "and after it (lower is better); 'auto = faster?' "
        "compares auto's pick with the faster of dense and factored; spread = largest "
        "slowest/fastest sample of any contender (well above 1: the machine was busy)"
    )
    failed = [
        f"{r.mode} {r.label} {r.dtype} {r.tokens} tokens R={rank}"
        for r in [*train, *forward]
        for rank in r.ranks
        if r.passes(rank) is False
    ]
    if memory is not None:
        print(f"\n## Peak training memory (small LLaMA, {memory['dtype']}, one AdamW step)\n")
        print(memory_table(memory))
        print(
            f"\nours / LoRA r=32 (step peak): {memory['ratio']:.2f}x, bar <= {MEMORY_BAR:g}x: "
            f"{verdict(memory['passes'])}; measured as {memory['dota']['measured_as']}"
        )
        if not memory["passes"]:
            failed.append("memory")
    print(f"\nload average at end: {load_average()}")
    print(f"all bars: {'PASS' if not failed else 'FAIL (' + '; '.join(failed) + ')'}", flush=True)


def _case_json(r: CaseResult) -> dict[str, Any]:
    return {
        **asdict(r),
        "median_s": {name: r.median(name) for name in r.times},
        "ratio_to_frozen": {name: r.ratio(name) for name in r.times},
        "bar": r.bar,
        "passes": {rank: r.passes(rank) for rank in r.ranks},
        "spread": r.spread,
    }


# --- command line ---------------------------------------------------------------------------


def _shape(text: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"shape must be OUTxIN like 11008x4096, got {text!r}")
    return int(match.group(1)), int(match.group(2))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="4096x4096, R=16, float32, 1/16/512 tokens, 3 repeats"
    )
    parser.add_argument("--shapes", nargs="+", type=_shape, help="weight shapes OUTxIN")
    parser.add_argument("--ranks", nargs="+", type=int, help="DoTA rank thresholds R")
    parser.add_argument("--tokens", nargs="+", type=int, help="token counts (rows of x)")
    parser.add_argument("--dtype", nargs="+", choices=DTYPES, help="dtypes of layer and input")
    parser.add_argument("--repeats", type=int, help="timed samples per contender (median)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's own choice)"
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compare peak training memory on a small LLaMA (in the first --dtype)",
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    parser.add_argument("--memory-worker", choices=MEMORY_METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    quick = args.quick
    args.shapes = args.shapes or list(SHAPES[:1] if quick else SHAPES)
    args.ranks = args.ranks or list(RANKS[:1] if quick else RANKS)
    args.tokens = args.tokens or list(TOKENS[:3] if quick else TOKENS)
    args.dtype = args.dtype or list(DTYPES[:1] if quick else DTYPES)
    args.repeats = args.repeats or (3 if quick else None)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if min(args.tokens) < 1 or min(args.ranks) < 1:
        parser.error("--tokens and --ranks must be positive")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.memory_worker is not None:
        dtype = getattr(torch, args.dtype[0])
        print(json.dumps(memory_worker(args.memory_worker, device, dtype)))
        return 0
    info = machine_info(device, libraries=(peft, transformers))
    print_header(info, args)
    train: list[CaseResult] = []
    forward: list[CaseResult] = []
    memory = None

    def save() -> None:
        if args.out is not None:
            payload = {
                "machine": info,
                "load_average_at_end": load_average(),
                "arguments": {k: v for k, v in vars(args).items() if k != "out"},
                "bars": {
                    "train_max_ratio": TRAIN_BARS,
                    "forward_max_ratio": FORWARD_BAR,
                    "forward_tokens": FORWARD_TOKENS,
                    "memory_max_ratio": MEMORY_BAR,
                },
                "train": [_case_json(r) for r in train],
                "forward": [_case_json(r) for r in forward],
                "memory": memory,
            }
            write_json(args.out, payload)

    for dtype_name in args.dtype:
        dtype = getattr(torch, dtype_name)
        for out_features, in_features in args.shapes:
            contenders, ours = make_contenders(out_features, in_features, dtype, args.ranks, device)
            for tokens in args.tokens:
                modes = ("train", "forward") if tokens in FORWARD_TOKENS else ("train",)
                for mode in modes:
                    repeats = args.repeats or (5 if tokens < 4096 else 3)
                    start = time.perf_counter()
                    result = run_case(contenders, ours, dtype, tokens, mode, repeats, device)
                    (train if mode == "train" else forward).append(result)
                    ratios = ", ".join(
                        f"R={rank} {result.ratio(f'ours R={rank} auto'):.2f}x"
                        for rank in result.ranks
                    )
                    print(
                        f"{mode:7} {result.label} {dtype_name} {tokens:5} tokens: "
                        f"frozen {_ms(result.median('frozen'))} ms, ours/frozen {ratios} "
                        f"({time.perf_counter() - start:.0f} s)",
                        flush=True,
                    )
                    save()
            del contenders, ours
            gc.collect()
    if args.memory:
        print("measuring peak training memory ...", flush=True)
        memory = measure_memory(device, args.dtype[0])
        save()
    print_report(train, forward, memory)
    if args.out is not None:
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
