"""Reproduce the paper's initialisation ablation (Figure 2) and rank study (Figure 6).

``ablation``: DoTA (cores from the TT-SVD of the pretrained weights) against
the same cores initialised at random (the last one at zero), full
fine-tuning, LoRA and PiSSA. ``ranks``: DoTA at R = 8, 16 and 32 (the paper:
rank 8 underperforms, 16 and 32 differ little). Each arm runs once per seed;
the output is the validation loss over training (mean and standard deviation
over seeds) and accuracy on held-out tasks.

By default both use the small model shipped with mpo and the demo's generated
tasks, a size a 2-core CPU runs in minutes per arm. Point ``--model``,
``--data`` and ``--test`` at a local checkpoint and data to run them at full
scale on a GPU:

    python examples/reproduce.py ablation
    python examples/reproduce.py ranks --seeds 0 1 2
    python examples/reproduce.py ablation --model path/to/llama-2-7b \\
        --data commonsense_170k.json --test boolq.json piqa.json \\
        --steps 6000 --lr 3e-4 --eval-every 200 --dtype auto

Writes ``results.json``, ``results.csv``, ``summary.csv`` and ``val_loss.png``
to ``--out`` (default ``out/ablation`` or ``out/ranks``).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from mpo.demo.run import DEMO_RECIPE, MAX_LENGTH, MODEL, VAL_RECORDS, demo_data
from mpo.finetune.compare import Arm, compare
from mpo.finetune.evaluate import load_tasks
from mpo.finetune.pipeline import FinetuneSpec

STUDIES = {
    "ablation": "Initialisation ablation (the paper's Figure 2)",
    "ranks": "DoTA rank study (the paper's Figure 6)",
}


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=list(STUDIES))
    parser.add_argument("--model", default=str(MODEL), help="a local causal LM folder")
    parser.add_argument("--data", help="training records (default: the demo's tasks)")
    parser.add_argument("--test", nargs="+", default=[], help="test task files")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=["dota", "dota-random", "full", "lora", "pissa"],
        help="ablation: the methods compared",
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32], help="ranks: R")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=DEMO_RECIPE.max_steps)
    parser.add_argument("--lr", type=float, default=DEMO_RECIPE.learning_rate)
    parser.add_argument("--eval-every", type=int, default=DEMO_RECIPE.eval_every)
    parser.add_argument("--val-size", type=int, default=VAL_RECORDS, help="validation records")
    parser.add_argument("--max-length", type=int, default=MAX_LENGTH, help="tokens per example")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16 or auto")
    parser.add_argument("--out", type=Path, help="output folder (default: out/STUDY)")
    return parser.parse_args()


def main() -> None:
    args = arguments()
    out = args.out or Path("out") / args.study
    if args.data is None:
        train, tests = demo_data(out / "data")
    else:
        train, tests = Path(args.data), load_tasks(args.test)
    recipe = dataclasses.replace(
        DEMO_RECIPE, max_steps=args.steps, learning_rate=args.lr, eval_every=args.eval_every
    )

    def spec(method: str, rank: int | None = None) -> FinetuneSpec:
        return FinetuneSpec(
            args.model,
            str(train),
            method,
            rank=rank,
            dtype=args.dtype,
            val_size=args.val_size,
            max_length=args.max_length,
            train=recipe,
        )

    if args.study == "ablation":
        arms = [Arm(method, spec(method)) for method in args.methods]
    else:
        arms = [Arm(f"R={rank}", spec("dota", rank)) for rank in args.ranks]
    comparison = compare(arms, tests, out, seeds=args.seeds)
    print("\n" + comparison.table())
    written = comparison.write(out, STUDIES[args.study])
    print("\nwrote " + ", ".join(str(p) for p in written))


if __name__ == "__main__":
    main()
