"""Benchmark: how close QLoRA, QPiSSA and QDoTA start to the pretrained weights, and their memory.

The DoTA paper (section 3.3, Fig. 5) claims that QDoTA's 4-bit model is closer to the
pretrained one than QLoRA's and QPiSSA's. This script measures that on a causal LM with
trained weights: for every target matrix ``W0`` (``out x in``, float32) it computes the
relative error ``||W0 - W_eff||_F / ||W0||_F`` of the weight each method starts training from:

* **QLoRA**: ``W_eff = Dequant(Q(W0))``; the LoRA update starts at zero.
* **QPiSSA** at ``r`` = 16 and 32: ``W_eff = Dequant(Q(W0 - U_r S_r V_r^T)) + U_r S_r V_r^T``,
  the top ``r`` singular triplets of ``W0`` in float32, from the truncated split TT-SVD uses
  (``mpo.svd.split``: ``U_r (U_r^T W0)``).
* **QDoTA** at ``R`` = 16 and 32: ``W_eff = Dequant(Q(W0 - MPO(T0))) + MPO(T0)``, ``T0`` the
  TT-SVD at rank ``R`` with the paper's ``N = 5`` cores in bfloat16: exactly
  ``mpo.adapt.QDoTALinear(layer, rank=R).effective_weight()``.

``Q`` is NF4 with block size 64 (with ``--double-quant``, 8-bit block scales too) through
bitsandbytes, the quantizer of ``QDoTALinear`` (``mpo.adapt.quant.nf4_round_trip``). The
adapters' dtype does not matter: each residual subtracts the low-rank part as stored, so
the error is the NF4 error of that residual. The total over the targets is
``sqrt(sum ||W0 - W_eff||^2) / sqrt(sum ||W0||^2)``. Trainable parameters: ``r (out + in)``
per matrix for LoRA and PiSSA (QLoRA at r = 32, the rank of the memory comparison), the
cores' entries ``sum_k R_{k-1} I_k J_k R_k`` for DoTA (``mpo.adapt.plan``).

**Memory**, QDoTA at each ``R`` against QLoRA (PEFT LoRA r = 32), each in a fresh
subprocess, on the same 4-bit base: the model loaded through transformers'
``BitsAndBytesConfig(load_in_4bit=True)`` (NF4, bfloat16 compute and storage), every linear
layer but the head in 4 bits. For QDoTA the targets are skipped at loading
(``llm_int8_skip_modules``) and wrapped with ``quantize="nf4"``, so their residual is
quantized after decomposing the bfloat16 weight; LoRA's adapters are PEFT's default float32,
DoTA's cores bfloat16 (the paper's). Reported:

* **weights**: the bytes of the model's ``state_dict`` (each tensor once): the 4-bit weights
  with their quantization statistics, the bfloat16 embeddings and norms, the frozen ``T0``
  and the adapters (trainable, also reported alone);
* **training step**: the peak memory of one forward + backward + AdamW step on a fixed
  batch of 4 x 128 token ids, above the memory before it (the weights), measured as in
  ``benchmarks/layer_vs_lora.py`` (``PeakMeter`` in ``benchmarks/_common.py``): on CUDA
  ``torch.cuda.max_memory_allocated``; on CPU the peak resident set size of the process
  (``VmHWM``, reset through ``/proc/self/clear_refs``) over the resident size before the
  step, after ``malloc_trim`` and with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed blocks
  go back to the system at once. That counts whole pages and everything the process
  allocates (bitsandbytes' CPU kernels dequantize each 4-bit weight into a temporary during
  the step), not torch's tensors alone; elsewhere than Linux it falls back to
  ``ru_maxrss``, a lower bound.

Outputs under ``--out`` (default ``out/quant_error``): ``quant_error.json`` (everything, with
the machine; written atomically), ``quant_error.csv`` (one row per matrix and method, plus
totals) and ``quant_error.png`` (grouped bars of the relative errors); ``--docs`` also writes
the plot to ``docs/images/quant_error.png``. The tables print as Markdown.

Run it from the repository root with torch, transformers, peft, bitsandbytes >= 0.46 and
matplotlib installed (on the tiny demo model, about a minute on two CPU cores)::

    python benchmarks/quant_error.py                      # the demo's mpo/demo/tiny_lm
    python benchmarks/quant_error.py --model path/to/a/causal/lm --double-quant
    python benchmarks/quant_error.py --targets q_proj v_proj --ranks 8 16 32 --no-memory
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import bitsandbytes
import matplotlib
import peft
import torch
import transformers
from _common import machine_info, run_memory_worker, table, training_step_peak
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import mpo
import mpo.adapt
from mpo.adapt import PAPER_TARGETS, ModulePlan, QDoTALinear
from mpo.adapt.quant import nf4_round_trip
from mpo.atomic import write_bytes, write_csv, write_json
from mpo.backend import backend_of
from mpo.svd import split

matplotlib.use("Agg")  # files only, no display
from matplotlib import pyplot as plt

DEFAULT_MODEL = Path(mpo.__file__).parent / "demo" / "tiny_lm"
DOCS_IMAGE = Path(__file__).resolve().parents[1] / "docs" / "images" / "quant_error.png"
LORA_RANK = 32  # QLoRA's rank in the parameter counts and the memory comparison
QLORA = f"QLoRA r={LORA_RANK}"
MEMORY_BATCH = (4, 128)


# --- quantization error ---------------------------------------------------------------------


def method_labels(ranks: list[int]) -> list[str]:
    return [
        QLORA,
        *(f"QPiSSA r={r}" for r in ranks),
        *(f"QDoTA R={r}" for r in ranks),
    ]


def _error(weight: torch.Tensor, effective: torch.Tensor) -> float:
    """``||W0 - W_eff||_F`` in float64 (a float32 norm of a large matrix is off by ~1e-4)."""
    return float((weight.double() - effective.double()).norm())


def matrix_errors(
    name: str, module: torch.nn.Module, plans: dict[int, ModulePlan], double_quant: bool
) -> dict[str, Any]:
    """The absolute errors and trainable parameters of every method on one target matrix."""
    weight = module.weight.detach().to(torch.float32)
    out_features, in_features = weight.shape
    errors = {QLORA: _error(weight, nf4_round_trip(weight, double_quant=double_quant))}
    params = {QLORA: LORA_RANK * (out_features + in_features)}
    for r in plans:
        principal = split(weight, backend_of(weight), r)  # U_r and U_r^T W0 = S_r V_r^T
        low_rank = principal.left @ principal.right
        residual = nf4_round_trip(weight - low_rank, double_quant=double_quant)
        errors[f"QPiSSA r={r}"] = _error(weight, residual + low_rank)
        params[f"QPiSSA r={r}"] = r * (out_features + in_features)
    for rank, module_plan in plans.items():
        shape = (module_plan.row_factors, module_plan.col_factors)
        layer = QDoTALinear(module, rank=rank, shape=shape, double_quant=double_quant)
        errors[f"QDoTA R={rank}"] = _error(weight, layer.effective_weight())
        params[f"QDoTA R={rank}"] = module_plan.params
    return {
        "module": name,
        "shape": [out_features, in_features],
        "norm": float(weight.double().norm()),
        "errors": errors,
        "relative_errors": {k: v / float(weight.double().norm()) for k, v in errors.items()},
        "trainable_parameters": params,
    }


def measure_errors(
    model_path: Path, targets: list[str], ranks: list[int], double_quant: bool, device: str
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-matrix results and totals over the targets of the float32 model at ``model_path``."""
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to(device)
    plans = {r: mpo.adapt.plan(model, target_modules=targets, rank=r).modules for r in ranks}
    names = [module_plan.name for module_plan in plans[ranks[0]]]
    rows = [
        matrix_errors(
            name, model.get_submodule(name), {r: plans[r][k] for r in ranks}, double_quant
        )
        for k, name in enumerate(names)
    ]
    norm = math.sqrt(sum(row["norm"] ** 2 for row in rows))
    totals = {
        label: {
            "relative_error": math.sqrt(sum(row["errors"][label] ** 2 for row in rows)) / norm,
            "trainable_parameters": sum(row["trainable_parameters"][label] for row in rows),
        }
        for label in method_labels(ranks)
    }
    return rows, totals


# --- memory (each method in a fresh subprocess) ---------------------------------------------


def load_4bit(
    model_path: Path, skip: list[str], double_quant: bool, device: str
) -> torch.nn.Module:
    """The model with every linear layer but ``skip`` in NF4, the rest in bfloat16."""
    config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
        llm_int8_skip_modules=skip,
    )
    return AutoModelForCausalLM.from_pretrained(
        model_path, quantization_config=config, dtype=torch.bfloat16, device_map=device
    )


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the ``state_dict`` (each tensor once) and of the trainable parameters."""
    tensors = {(t.data_ptr(), t.nbytes): t.nbytes for t in model.state_dict().values()}
    trainable = sum(p.nbytes for p in model.parameters() if p.requires_grad)
    return {"weights_bytes": sum(tensors.values()), "trainable_bytes": trainable}


def memory_worker(
    method: str, model_path: Path, targets: list[str], double_quant: bool, device: str
) -> dict[str, Any]:
    """One AdamW step of ``method`` ("qdota-R" or "qlora") on the 4-bit model; its memory."""
    torch.manual_seed(0)
    if method == "qlora":
        model = load_4bit(model_path, ["lm_head"], double_quant, device)
        lora = peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0, target_modules=targets
        )
        model = peft.get_peft_model(model, lora)
        label = f"QLoRA r={LORA_RANK} (PEFT, float32 adapters)"
    else:
        rank = int(method.removeprefix("qdota-"))
        model = load_4bit(model_path, [*targets, "lm_head"], double_quant, device)
        mpo.adapt.wrap(
            model,
            target_modules=targets,
            rank=rank,
            quantize="nf4",
            double_quant=double_quant,
            dtype="bfloat16",
            quiet=True,
        )
        label = f"QDoTA R={rank} (bfloat16 cores)"
    # train mode also keeps bitsandbytes' cpu inference kernel (and its repacking) out
    model.train()
    sizes = weight_bytes(model)
    step = training_step_peak(model, MEMORY_BATCH, device)
    return {"method": method, "label": label, **sizes, **step}


def measure_memory(args: argparse.Namespace) -> dict[str, Any]:
    """Run :func:`memory_worker` for QDoTA at each rank and for QLoRA, each in a fresh process."""
    results = {}
    for method in [*(f"qdota-{r}" for r in args.ranks), "qlora"]:
        options = ["--model", str(args.model), "--device", args.device, "--targets"]
        options += args.targets + (["--double-quant"] if args.double_quant else [])
        results[method] = run_memory_worker(__file__, method, options)
    return {"batch": list(MEMORY_BATCH), "methods": results}


# --- reporting ------------------------------------------------------------------------------


def _short(name: str) -> str:
    """``model.layers.0.self_attn.q_proj`` -> ``0.q_proj`` (other names stay as they are)."""
    for part in ("model.layers.", "self_attn.", "mlp."):
        name = name.replace(part, "")
    return name


def error_table(rows: list[dict[str, Any]], totals: dict[str, Any], labels: list[str]) -> str:
    body = [
        [_short(row["module"]), "x".join(map(str, row["shape"]))]
        + [f"{row['relative_errors'][label]:.4f}" for label in labels]
        for row in rows
    ]
    body.append(["total", ""] + [f"{totals[label]['relative_error']:.4f}" for label in labels])
    body.append(
        ["trainable params", ""]
        + [f"{totals[label]['trainable_parameters']:,}" for label in labels]
    )
    return table(["module", "out x in", *labels], body)


def memory_table(memory: dict[str, Any]) -> str:
    mib = 2**20
    body = [
        [
            result["label"],
            f"{result['trainable_parameters']:,}",
            f"{result['weights_bytes'] / mib:.2f}",
            f"{result['trainable_bytes'] / mib:.2f}",
            f"{result['peak_step_bytes'] / mib:.1f}",
        ]
        for result in memory["methods"].values()
    ]
    header = ["method", "trainable params", "weights MiB", "of which trainable MiB"]
    return table([*header, "step peak MiB"], body)


def plot(rows: list[dict[str, Any]], totals: dict[str, Any], labels: list[str], title: str):
    groups = [_short(row["module"]) for row in rows] + ["total"]
    width = 0.8 / len(labels)
    figure, axes = plt.subplots(figsize=(max(8.0, 0.55 * len(groups) + 2), 4.5))
    highest = 0.0
    for k, label in enumerate(labels):
        values = [row["relative_errors"][label] for row in rows]
        values.append(totals[label]["relative_error"])
        params = totals[label]["trainable_parameters"]
        positions = [g + (k - (len(labels) - 1) / 2) * width for g in range(len(groups))]
        axes.bar(positions, values, width, label=f"{label} ({params:,} params)")
        highest = max(highest, *values)
    axes.set_xticks(range(len(groups)), groups, rotation=60, ha="right", fontsize=8)
    axes.set_ylabel("||W0 - W_eff||_F / ||W0||_F")
    axes.set_title(title, fontsize=10)
    axes.set_ylim(0, 1.35 * highest)  # room for the legend above the bars
    axes.legend(fontsize=8, ncol=3, loc="upper center")
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    return figure


def csv_rows(
    rows: list[dict[str, Any]], totals: dict[str, Any], labels: list[str]
) -> list[dict[str, Any]]:
    """One row per matrix and method, then one ``total`` row per method."""
    flat = [
        {
            "module": row["module"],
            "out": row["shape"][0],
            "in": row["shape"][1],
            "method": label,
            "relative_error": f"{row['relative_errors'][label]:.6g}",
            "trainable_parameters": row["trainable_parameters"][label],
        }
        for row in rows
        for label in labels
    ]
    flat += [
        {
            "module": "total",
            "out": "",
            "in": "",
            "method": label,
            "relative_error": f"{totals[label]['relative_error']:.6g}",
            "trainable_parameters": totals[label]["trainable_parameters"],
        }
        for label in labels
    ]
    return flat


# --- command line ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help="a local transformers causal LM folder (default: the demo's tiny_lm)",
    )
    parser.add_argument(
        "--targets", nargs="+", default=list(PAPER_TARGETS), help="module names to adapt"
    )
    parser.add_argument("--ranks", nargs="+", type=int, default=[16, 32], help="r and R")
    parser.add_argument("--out", type=Path, default=Path("out/quant_error"), help="folder")
    parser.add_argument(
        "--double-quant", action="store_true", help="quantize the NF4 block scales too"
    )
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also compare the memory of QDoTA and QLoRA",
    )
    parser.add_argument("--docs", action="store_true", help=f"also write the plot to {DOCS_IMAGE}")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda"
    )
    parser.add_argument("--memory-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if min(args.ranks) < 1:
        parser.error("--ranks must be positive")
    if not (args.model / "config.json").is_file():
        hint = (
            "build it with python -m mpo.demo.pretrain, or " if args.model == DEFAULT_MODEL else ""
        )
        parser.error(
            f"{args.model} holds no config.json; {hint}pass --model with a local "
            "transformers causal LM folder"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_worker is not None:
        result = memory_worker(
            args.memory_worker, args.model, args.targets, args.double_quant, args.device
        )
        print(json.dumps(result))
        return 0
    start = time.perf_counter()
    info = machine_info(torch.device(args.device), libraries=(bitsandbytes, peft, transformers))
    labels = method_labels(args.ranks)
    quantizer = "NF4, block size 64" + (", double quantization" if args.double_quant else "")
    print(f"# Quantization error at initialisation: {args.model}\n")
    print(f"- {info['date']}, {info['device']} ({info['device_name']}), {info['platform']}")
    print(
        f"- torch {info['torch']}, bitsandbytes {info['bitsandbytes']}, "
        f"transformers {info['transformers']}, peft {info['peft']}, "
        f"mpo {info['mpo']} at {info['commit']}"
    )
    print(f"- {quantizer}; targets {', '.join(args.targets)}\n")
    rows, totals = measure_errors(
        args.model, args.targets, args.ranks, args.double_quant, args.device
    )
    print("## Relative error ||W0 - W_eff||_F / ||W0||_F\n")
    print(error_table(rows, totals, labels))
    qlora = totals[QLORA]["relative_error"]
    for label in labels[1:]:
        print(f"- {label}: {totals[label]['relative_error'] / qlora:.3f} x QLoRA's total error")
    memory = None
    if args.memory:
        memory = measure_memory(args)
        print(f"\n## Memory: one AdamW step on {MEMORY_BATCH[0]} x {MEMORY_BATCH[1]} tokens\n")
        print(memory_table(memory))
        first = next(iter(memory["methods"].values()))
        print(f"\nstep peak measured as: {first['measured_as']}")

    args.out.mkdir(parents=True, exist_ok=True)
    figure = plot(rows, totals, labels, f"{args.model.name}: {quantizer}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    write_bytes(args.out / "quant_error.png", buffer.getvalue())
    if args.docs:
        write_bytes(DOCS_IMAGE, buffer.getvalue())
    write_csv(args.out / "quant_error.csv", csv_rows(rows, totals, labels))
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    payload = {
        "machine": info,
        "arguments": arguments,
        "quantizer": quantizer,
        "matrices": rows,
        "totals": totals,
        "memory": memory,
        "seconds": time.perf_counter() - start,
    }
    write_json(args.out / "quant_error.json", payload)
    print(f"\nwrote {args.out}/quant_error.{{json,csv,png}} in {payload['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
