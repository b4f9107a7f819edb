"""The ``mpo`` command: plan, analyze, fine-tune, evaluate and merge, and the embedded demo.

Every subcommand has ``--help``. A mistake in the input (a missing file, a
malformed record, a folder that is not a causal LM, a method whose package is
not installed) ends with one line ``mpo <command>: error: ...`` and exit
status 2, never a traceback; an interrupted fine-tuning run saves its state
and exits with status 130 (run the same command again to resume).

>>> main(["plan", "--help"])  # doctest: +ELLIPSIS
usage: mpo plan [-h] ...
<BLANKLINE>
0
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mpo.errors import Interrupted, MPOError

__all__ = ["main"]


def _targets(text: str) -> tuple[str, ...] | str:
    """``"q_proj,v_proj"`` -> names; ``"all-linear"`` stays; ``"re:PATTERN"`` -> a regex."""
    if text == "all-linear":
        return text
    if text.startswith("re:"):
        return text[3:]
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("give module names separated by commas")
    return names


def _add_adapter_options(parser: argparse.ArgumentParser, *, rank_default: Any) -> None:
    parser.add_argument(
        "--targets",
        type=_targets,
        default=None,
        help="modules to adapt: names separated by commas (exact or suffix), 'all-linear', "
        "or 're:REGEX' (default: the paper's q_proj,k_proj,v_proj,up_proj,down_proj)",
    )
    parser.add_argument("--rank", type=int, default=rank_default, help="rank threshold R")
    parser.add_argument("--num-cores", type=int, default=5, help="number of MPO cores N")


def _adapter_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {"num_cores": args.num_cores}
    if args.targets is not None:
        options["target_modules"] = args.targets
    if args.rank is not None:
        options["rank"] = args.rank
    return options


def _progress(args: argparse.Namespace) -> bool | None:
    """Progress bars: off with --quiet, else on when stderr is a terminal."""
    return False if args.quiet else None


# -- plan ----------------------------------------------------------------------------


def _plan(args: argparse.Namespace) -> int:
    import mpo.adapt

    source = Path(args.model)
    if source.is_file() and source.name.endswith(".json"):
        source = source.parent
    if not (source / "config.json").is_file():
        raise MPOError(
            f"{args.model} has no config.json; pass a transformers model folder or its config.json"
        )
    report = mpo.adapt.plan(str(source), **_adapter_options(args))
    print(report)
    if args.json:
        from mpo.atomic import write_json

        write_json(args.json, report.to_json())
        print(f"wrote {args.json}")
    return 0


# -- analyze -------------------------------------------------------------------------


def _analyze(args: argparse.Namespace) -> int:
    import torch

    import mpo.adapt
    from mpo.finetune.methods import load_model

    model = load_model(args.model, "full", dtype="float32")
    with torch.no_grad():
        analysis = mpo.adapt.analyze(
            model, ranks=args.ranks, progress=_progress(args), **_adapter_options(args)
        )
    print(analysis.table())
    written = analysis.write(args.out)
    print("wrote " + ", ".join(str(path) for path in written))
    return 0


# -- finetune ------------------------------------------------------------------------


def _finetune(args: argparse.Namespace) -> int:
    from mpo.finetune.pipeline import FinetuneSpec, finetune
    from mpo.finetune.train import TrainConfig

    config = TrainConfig(
        learning_rate=args.lr,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size,
        epochs=args.epochs,
        max_steps=args.max_steps,
        warmup_ratio=args.warmup_ratio,
        weight_decay=args.weight_decay,
        eval_every=args.eval_every,
        seed=args.seed,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    spec_options: dict[str, Any] = {}
    if args.targets is not None:
        spec_options["targets"] = args.targets
    spec = FinetuneSpec(
        model=args.model,
        data=args.data,
        method=args.method,
        rank=args.rank,
        num_cores=args.num_cores,
        dtype=args.dtype,
        val_data=args.val_data,
        val_size=args.val_size,
        max_length=args.max_length,
        train=config,
        **spec_options,
    )
    out = args.out  # main fills in the default, out/finetune/METHOD
    result = finetune(spec, out, restart=args.restart, progress=_progress(args))
    print(
        f"{args.method}: {result.steps} steps, best validation loss {result.best_val_loss:.4f} "
        f"at step {result.best_step}; trainable params: {result.trainable_params:,d} || all "
        f"params: {result.total_params:,d} || trainable%: {100 * result.trainable_share:.4f}"
    )
    print(f"wrote {out}/best (checkpoint), metrics.json, metrics.csv, val_loss.png, run.json")
    return 0


# -- evaluate ------------------------------------------------------------------------


def _checkpoint(folder: str | None) -> Path | None:
    """A run folder or its ``best/``: the folder that holds ``mpo_method.json``."""
    if folder is None:
        return None
    from mpo.finetune.methods import METHOD_FILE

    path = Path(folder)
    if not (path / METHOD_FILE).is_file() and (path / "best" / METHOD_FILE).is_file():
        return path / "best"
    return path


def _load(args: argparse.Namespace) -> tuple[Any, Any]:
    from mpo.finetune.merge import load_merged
    from mpo.finetune.methods import load_finetuned, load_model, load_tokenizer

    tokenizer = load_tokenizer(args.model)
    checkpoint = _checkpoint(args.checkpoint)
    if checkpoint is None:
        return load_model(args.model, "full", dtype=args.dtype), tokenizer
    load = load_finetuned if args.unmerged else load_merged
    return load(args.model, checkpoint, dtype=args.dtype), tokenizer


def _evaluate(args: argparse.Namespace) -> int:
    from mpo.atomic import write_json
    from mpo.finetune.evaluate import evaluate, load_tasks

    tasks = load_tasks(args.data)
    model, tokenizer = _load(args)
    report = evaluate(
        model,
        tokenizer,
        tasks,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        progress=_progress(args),
    )
    print(report.table())
    if args.out:
        write_json(args.out, report.to_json())
        print(f"wrote {args.out}")
    return 0


# -- merge ---------------------------------------------------------------------------


def _merge(args: argparse.Namespace) -> int:
    from mpo.finetune.merge import merge

    merge(args.model, _checkpoint(args.checkpoint), args.out, dtype=args.dtype)
    print(f"wrote {args.out} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


# -- demo ----------------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from mpo.demo.run import run_demo

    run_demo(args.out, methods=args.methods, steps=args.steps, progress=_progress(args))
    return 0


# -- the parser ----------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from mpo.finetune.methods import METHODS

    parser = argparse.ArgumentParser(
        prog="mpo",
        description="DoTA tensor adapters: plan, analyze, fine-tune, evaluate, merge.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    plan = commands.add_parser(
        "plan",
        help="dry run: the adapters DoTA would add, per module, with parameter counts",
        description="List the DoTA adapters for every target module (shape, factor shapes, bond "
        "ranks, trainable parameters) and the totals, without loading any weight.",
    )
    plan.add_argument("model", help="a transformers model folder or its config.json")
    _add_adapter_options(plan, rank_default=None)
    plan.add_argument("--json", type=Path, help="also write the plan to this JSON file")
    plan.set_defaults(run=_plan)

    analyze = commands.add_parser(
        "analyze",
        help="compression analysis: MPO error per matrix and rank, bond spectra, plots",
        description="For every target matrix: the relative error of its MPO at several ranks, "
        "the parameter count, a truncated SVD with as many parameters, and the singular values "
        "of the bond unfoldings. Writes analysis.csv, analysis.json, errors.png, spectra.png.",
    )
    analyze.add_argument("model", help="a local transformers causal LM folder")
    _add_adapter_options(analyze, rank_default=None)
    analyze.add_argument("--ranks", type=int, nargs="+", default=[4, 8, 16, 32])
    analyze.add_argument("--out", type=Path, default=Path("out/analyze"))
    analyze.add_argument("--quiet", action="store_true", help="no progress bar")
    analyze.set_defaults(run=_analyze)

    ft = commands.add_parser(
        "finetune",
        help="fine-tune a local causal LM on instruction data (DoTA, LoRA, PiSSA, QLoRA, full)",
        description="Fine-tune with the paper's recipe (AdamW, cosine schedule, warmup 0.03, "
        "batch 16, 1 epoch), evaluate on a validation split, keep the best checkpoint. Data: "
        "JSON or JSONL records with instruction, optional input, and output or answer. Rerun "
        "the same command to resume an interrupted run.",
    )
    ft.add_argument("--model", required=True, help="a local transformers causal LM folder")
    ft.add_argument("--data", required=True, help="training records (.json or .jsonl)")
    ft.add_argument("--val-data", help="validation records (default: split off --data)")
    ft.add_argument("--method", choices=list(METHODS), default="dota")
    ft.add_argument("--out", type=Path, help="run folder (default: out/finetune/METHOD)")
    _add_adapter_options(ft, rank_default=None)
    ft.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    ft.add_argument("--batch-size", type=int, default=16, help="examples per optimizer step")
    ft.add_argument("--micro-batch-size", type=int, default=4, help="examples per forward pass")
    ft.add_argument("--epochs", type=float, default=1.0)
    ft.add_argument("--max-steps", type=int, help="optimizer steps (overrides --epochs)")
    ft.add_argument("--warmup-ratio", type=float, default=0.03)
    ft.add_argument("--weight-decay", type=float, default=0.0)
    ft.add_argument("--eval-every", type=int, default=50, help="validate every K steps")
    ft.add_argument("--val-size", type=int, default=1200, help="validation split size")
    ft.add_argument("--max-length", type=int, default=256, help="tokens per example")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it), float32")
    ft.add_argument("--gradient-checkpointing", action="store_true")
    ft.add_argument("--restart", action="store_true", help="delete a previous run in --out")
    ft.add_argument("--quiet", action="store_true", help="no progress bar")
    ft.set_defaults(run=_finetune)

    ev = commands.add_parser(
        "evaluate",
        help="accuracy by greedy generation on multiple-choice or math data",
        description="Generate greedily for every record of each data file (one task per file) "
        "and score the answer: true/false, answerN, optionN, solutionN, endingN (first "
        "occurrence) or a number (the last one). Prints per-task and average accuracy.",
    )
    ev.add_argument("--model", required=True, help="the base model folder")
    ev.add_argument(
        "--checkpoint", help="a run folder or its best/ (default: evaluate the base model)"
    )
    ev.add_argument("--data", required=True, nargs="+", help="task files (.json/.jsonl)")
    ev.add_argument(
        "--unmerged",
        action="store_true",
        help="evaluate the adapter layers as they are (default: fold the checkpoint into the "
        "weights first, in memory, so generation runs at the base model's speed)",
    )
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--max-new-tokens", type=int, default=32)
    ev.add_argument("--dtype", default="auto")
    ev.add_argument("--out", type=Path, help="write the report to this JSON file")
    ev.add_argument("--quiet", action="store_true", help="no progress bar")
    ev.set_defaults(run=_evaluate)

    merge = commands.add_parser(
        "merge",
        help="fold a fine-tuned checkpoint into the base weights and save the model",
        description="Write base + update as a plain transformers model (save_pretrained), "
        "loadable without mpo.",
    )
    merge.add_argument("--model", required=True, help="the base model folder")
    merge.add_argument("--checkpoint", required=True, help="a run folder or its best/")
    merge.add_argument("--out", required=True, type=Path, help="folder for the merged model")
    merge.add_argument("--dtype", default="auto", help="dtype of the merged weights")
    merge.set_defaults(run=_merge)

    demo = commands.add_parser(
        "demo",
        help="the embedded demo: fine-tune the shipped tiny LM with dota, dota-random and lora",
        description="Fine-tune the small pretrained model shipped with mpo on generated tasks "
        "with several methods, evaluate each, and write a table and the validation-loss curves.",
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument(
        "--methods",
        type=lambda text: tuple(m.strip() for m in text.split(",")),
        default=("dota", "dota-random", "lora"),
        help="methods separated by commas (default: dota,dota-random,lora)",
    )
    demo.add_argument("--steps", type=int, default=None, help="optimizer steps per method")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)
    return parser


# what each command writes, checked before it starts work: (command, option) -> kind
_OUTPUTS = {
    ("plan", "json"): "file",
    ("analyze", "out"): "folder",
    ("finetune", "out"): "folder",
    ("evaluate", "out"): "file",
    ("merge", "out"): "folder",
    ("demo", "out"): "folder",
}


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output path that cannot be written (a folder given for a file, a file
    for a folder, or a path below a file) before any work, not after it."""
    for (command, option), kind in _OUTPUTS.items():
        path = getattr(args, option, None) if args.command == command else None
        if path is None:
            continue
        path, flag = Path(path), f"--{option}"
        if kind == "file" and path.is_dir():
            raise MPOError(f"{flag} {path} is a folder; give the name of a file to write")
        if kind == "folder" and path.exists() and not path.is_dir():
            raise MPOError(f"{flag} {path} is a file; give a folder to write into")
        parent = next((p for p in path.parents if p.exists()), None)
        if parent is not None and not parent.is_dir():
            raise MPOError(f"{flag} {path} lies below {parent}, which is a file")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``mpo`` command line with ``argv`` (default: ``sys.argv[1:]``); return the status."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help and usage errors: argparse has printed them
        return int(exit_.code or 0)
    if getattr(args, "quiet", False):
        from transformers.utils import logging  # its loading bars too

        logging.disable_progress_bar()
    # raised inside peft's own calls into transformers 5; nothing a user of mpo can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
    if args.command == "finetune" and args.out is None:  # the default depends on --method
        args.out = Path("out") / "finetune" / args.method
    try:
        _check_outputs(args)
        return args.run(args)
    except MPOError as err:
        print(f"mpo {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        print(f"mpo {args.command}: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"mpo {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
