"""Pretrain the embedded demo's small causal LM on text every Python install has.

The demo fine-tunes a real pretrained model with DoTA adapters in minutes on a
CPU, so the package ships one: ``mpo/demo/tiny_lm``. This script is where its
weights come from. It reads top to bottom:

1. **Corpus.** English text that every CPython carries: the reference-manual
   topics of ``pydoc_data.topics`` (what ``help("if")`` prints) and the
   docstrings of the standard library's modules, classes and functions, one
   document per topic or module, in sorted order. Documents taken in
   sha256-of-name order are held out while they fit in 2% of the characters.
2. **Tokenizer.** A byte-level BPE (``tokenizers``) with 2048 entries trained
   on the training documents. Digits are split one per token, so numbers read
   digit by digit, which arithmetic tasks need. Encoding prepends ``<s>``;
   ``</s>`` ends a document and ``<pad>`` pads batches.
3. **Model.** A ``LlamaForCausalLM`` with hidden size 256, MLP size 768, four
   layers and grouped-query attention (4 query heads, 2 key/value heads, so
   ``k_proj``/``v_proj`` map 256 -> 128), tied embeddings: 3.7 M parameters,
   15 MB in float32.
4. **Training.** AdamW on random 256-token windows of the training stream,
   linear warm-up then cosine decay, gradient clipping, two CPU threads. The
   number of steps is planned at the end of warm-up from the speed so far, so
   that training fits in ``--minutes``; if the machine slows down later, the
   run stops at the deadline before the decay ends. ``--steps`` fixes the
   number instead, which is how a recorded run is replayed (``steps`` in
   ``pretraining.json``); the committed run used ``--steps 1300`` because the
   cores were shared with other jobs. The corpus is small (580 K tokens), so
   the held-out loss levels off after about 1000 steps while training loss
   keeps falling.
5. **Assets.** Weights (safetensors), config, tokenizer, ``pretraining.json``
   (corpus hash, token counts, steps, wall time, losses, versions, and a
   held-out paragraph with its loss so tests can check the weights without
   rebuilding the corpus) and a model card, written to a staged folder next
   to ``--out`` and renamed into place (``mpo.atomic``), so a failed run
   leaves the old assets intact.

Rerun it with::

    python -m mpo.demo.pretrain                  # about 13 minutes on two CPU cores
    python -m mpo.demo.pretrain --steps 1300     # replay the committed run (35 minutes)
    python -m mpo.demo.pretrain --minutes 1 --out /tmp/tiny_lm   # smoke test

The corpus, and hence the tokenizer and weights, depend on the Python
version (docstrings change between releases); ``pretraining.json`` records
the version and the corpus hash.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import inspect
import io
import json
import math
import pkgutil
import platform
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import ModuleType

import tokenizers
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mpo.atomic import staged_folder

__all__ = ["ASSETS", "build_corpus", "main"]

#: Where the committed assets live.
ASSETS = Path(__file__).parent / "tiny_lm"

VOCAB_SIZE = 2048
BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
MODEL = dict(
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=True,
)
SEQ_LEN = 256
BATCH_SIZE = 16
PEAK_LR = 2e-3
MIN_LR = 2e-4
WARMUP_STEPS = 50
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
# The committed run used two threads; fp32 sums depend on the thread count,
# so a replay with --steps matches it most closely with the same count.
THREADS = 2
HELDOUT_FRACTION = 0.02
# Guards the corpus size if a future Python grows its docstrings a lot
# (3.11 gives about 1.8 M characters).
MAX_CHARS = 4_000_000
# The run is planned at the end of warm-up from the speed of the steps since
# TIMING_START; the first steps are slow while kernels warm up. The schedule
# does not depend on the plan before the cosine starts.
TIMING_START = 5
LOG_EVERY = 50

# Not imported: modules that open windows or a browser, print or set up the
# terminal on import, install things, are deprecated, or hold tests or codec
# boilerplate; pydoc_data is read directly. The rest of the standard library
# imports without side effects.
SKIP_MODULES = frozenset(
    {
        "antigravity",
        "distutils",
        "encodings",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "readline",
        "rlcompleter",
        "test",
        "this",
        "tkinter",
        "turtle",
        "turtledemo",
        "venv",
        "webbrowser",
    }
)


# ---------------------------------------------------------------- corpus


def build_corpus() -> dict[str, str]:
    """The pretraining documents: name -> text, in a fixed order.

    ``pydoc_data.topics`` entries come first (named ``topic:<key>``), then one
    document per standard-library module (named by the module): its
    docstring followed by the docstrings of the public classes, methods and
    functions it defines, each under its qualified name.

    Example:
        >>> corpus = build_corpus()
        >>> corpus["json"].splitlines()[0]
        'json'
        >>> "topic:if" in corpus and 1_000_000 < sum(map(len, corpus.values())) <= MAX_CHARS
        True
    """
    from pydoc_data.topics import topics

    corpus = {f"topic:{key}": topics[key] for key in sorted(topics)}
    size = sum(map(len, corpus.values()))
    for name, module in _stdlib_modules():
        with _quiet():
            text = _module_text(name, module)
        if text and size + len(text) <= MAX_CHARS:
            corpus[name] = text
            size += len(text)
    return corpus


def _stdlib_modules() -> Iterator[tuple[str, ModuleType]]:
    for top in sorted(sys.stdlib_module_names):
        if top.startswith("_") or top in SKIP_MODULES:
            continue
        module = _quiet_import(top)
        if module is None:
            continue
        yield top, module
        subs = pkgutil.walk_packages(getattr(module, "__path__", []), f"{top}.", lambda _: None)
        # Private names include __main__ modules, which run programs when imported.
        for sub in sorted(info.name for info in subs):
            parts = sub.split(".")
            if any(p.startswith("_") or p in ("test", "tests") for p in parts):
                continue
            module = _quiet_import(sub)
            if module is not None:
                yield sub, module


def _quiet_import(name: str) -> ModuleType | None:
    """The module, or None where it cannot be imported here (other platforms)."""
    with _quiet():
        try:
            return importlib.import_module(name)
        except Exception:
            return None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # Deprecated modules warn on import and attribute access; a few print.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _module_text(name: str, module: ModuleType) -> str:
    parts = [name]
    if module.__doc__:
        parts.append(inspect.cleandoc(module.__doc__))
    for attr, obj in sorted(vars(module).items()):
        defined_here = getattr(obj, "__module__", None) == name
        if attr.startswith("_") or not defined_here:
            continue
        if not (inspect.isclass(obj) or inspect.isroutine(obj)):
            continue
        if obj.__doc__:
            parts.append(f"{name}.{attr}\n\n{inspect.cleandoc(obj.__doc__)}")
        if inspect.isclass(obj):
            for method, value in sorted(vars(obj).items()):
                doc = getattr(value, "__doc__", None)
                documented = inspect.isroutine(value) or isinstance(
                    value, (property, classmethod, staticmethod)
                )
                if not method.startswith("_") and documented and doc:
                    parts.append(f"{name}.{attr}.{method}\n\n{inspect.cleandoc(doc)}")
    return "\n\n".join(parts) if len(parts) > 1 else ""


def split_heldout(corpus: dict[str, str]) -> tuple[list[str], list[str]]:
    """(train names, held-out names) of the corpus.

    Documents are taken in sha256-of-name order and held out while they fit in
    ``HELDOUT_FRACTION`` of the characters; hashing names keeps the split
    stable when documents are added or removed elsewhere.
    """
    budget = HELDOUT_FRACTION * sum(map(len, corpus.values()))
    heldout, size = [], 0
    for name in sorted(corpus, key=lambda n: hashlib.sha256(n.encode()).hexdigest()):
        if size + len(corpus[name]) <= budget:
            heldout.append(name)
            size += len(corpus[name])
    train = [name for name in corpus if name not in heldout]
    return train, sorted(heldout)


def corpus_sha256(corpus: dict[str, str]) -> str:
    """sha256 of the documents joined by blank lines, in corpus order."""
    return hashlib.sha256("\n\n".join(corpus.values()).encode()).hexdigest()


# ------------------------------------------------------------- tokenizer


def train_tokenizer(texts: Sequence[str]) -> PreTrainedTokenizerFast:
    """A byte-level BPE of ``VOCAB_SIZE`` entries; every byte and digit is a token."""
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bpe.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=MODEL["max_position_embeddings"],
        # Cleaning would delete the space in " ." and break decode(encode(s)) == s.
        clean_up_tokenization_spaces=False,
    )


def token_stream(tokenizer: PreTrainedTokenizerFast, texts: Sequence[str]) -> torch.Tensor:
    """All documents as one id stream, each as ``<s> text </s>``."""
    # The backend tokenizer does not warn that documents exceed the model's length.
    docs = tokenizer.backend_tokenizer.encode_batch(list(texts))
    return torch.tensor([i for doc in docs for i in [*doc.ids, tokenizer.eos_token_id]])


# ----------------------------------------------------------------- model


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int) -> LlamaForCausalLM:
    """The freshly initialised model; the same seed gives the same weights."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, windows: torch.Tensor) -> float:
    """Mean next-token cross-entropy over the rows of ``windows`` (``n x length`` ids)."""
    model.eval()
    losses = [model(input_ids=b, labels=b).loss.item() * len(b) for b in windows.split(BATCH_SIZE)]
    model.train()
    return sum(losses) / len(windows)


def heldout_loss(model: LlamaForCausalLM, ids: torch.Tensor) -> float:
    """Mean loss over the consecutive ``SEQ_LEN`` windows of ``ids`` (the tail is dropped)."""
    return mean_loss(model, ids[: len(ids) // SEQ_LEN * SEQ_LEN].view(-1, SEQ_LEN))


def text_loss(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, text: str) -> float:
    """Mean loss of one text, encoded as ``<s> text``."""
    return mean_loss(model, tokenizer(text, return_tensors="pt").input_ids)


# -------------------------------------------------------------- training


def learning_rate(step: int, total_steps: int | None) -> float:
    """Linear warm-up over ``WARMUP_STEPS``, then cosine decay to ``MIN_LR`` at ``total_steps``.

    Before the run is planned (``total_steps`` None) only the warm-up is defined.

    Example:
        >>> [round(learning_rate(step, 1000), 6) for step in (0, 49, 525, 1000)]
        [4e-05, 0.002, 0.0011, 0.0002]
    """
    if step < WARMUP_STEPS or total_steps is None:
        return PEAK_LR * min(1.0, (step + 1) / WARMUP_STEPS)
    progress = min(1.0, (step - WARMUP_STEPS) / max(1, total_steps - WARMUP_STEPS))
    return MIN_LR + 0.5 * (PEAK_LR - MIN_LR) * (1 + math.cos(math.pi * progress))


def train(
    model: LlamaForCausalLM,
    train_ids: torch.Tensor,
    heldout_ids: torch.Tensor,
    seed: int,
    minutes: float,
    steps: int | None,
) -> tuple[dict, float]:
    """Train in place; returns the run's figures and the mean loss of the last steps."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0}],
        lr=PEAK_LR,
        betas=BETAS,
    )
    windows = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    deadline = start + 60 * minutes
    total_steps, losses, step = steps, [], 0
    while total_steps is None or step < total_steps:
        if steps is None and time.perf_counter() > deadline:
            print(f"time budget reached at step {step} of {total_steps}")
            break

        offsets = torch.randint(len(train_ids) - SEQ_LEN, (BATCH_SIZE,), generator=windows)
        batch = torch.stack([train_ids[o : o + SEQ_LEN] for o in offsets.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, total_steps)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        step += 1
        if step == TIMING_START:
            timing_start = time.perf_counter()
        if step == WARMUP_STEPS and total_steps is None:
            per_step = (time.perf_counter() - timing_start) / (WARMUP_STEPS - TIMING_START)
            # 5% slack: the cores are shared and the speed drifts.
            total_steps = step + int(0.95 * (deadline - time.perf_counter()) / per_step)
            print(f"{per_step:.2f} s/step: planning {total_steps} steps")

        if step % LOG_EVERY == 0:
            recent = sum(losses[-LOG_EVERY:]) / LOG_EVERY
            print(
                f"step {step:5d}/{total_steps}  train {recent:.3f}  "
                f"held-out {heldout_loss(model, heldout_ids):.3f}  "
                f"lr {learning_rate(step - 1, total_steps):.2e}  "
                f"{time.perf_counter() - start:6.0f} s",
                flush=True,
            )
    figures = {
        "steps": step,
        "planned_steps": total_steps,
        "tokens_seen": step * BATCH_SIZE * SEQ_LEN,
        "wall_time_s": round(time.perf_counter() - start, 1),
    }
    tail = losses[-LOG_EVERY:]
    return figures, sum(tail) / len(tail)


# ---------------------------------------------------------------- assets


def write_assets(
    out: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, record: dict
) -> None:
    """Save everything in a staged sibling folder that then replaces ``out`` as a whole."""
    with staged_folder(out) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        # transformers 5 names its new tokenizer class, which 4.x cannot resolve;
        # the old name loads in both.
        config_path = staging / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        (staging / "pretraining.json").write_text(json.dumps(record, indent=2) + "\n")
        (staging / "README.md").write_text(model_card(record))
        # The staging folder and the safetensors file are created private;
        # package data is for everyone to read.
        staging.chmod(0o755)
        for path in staging.iterdir():
            path.chmod(0o644)


def model_card(record: dict) -> str:
    """The README.md shipped with the weights, filled in from ``record``."""
    corpus, run, loss = record["corpus"], record["training"], record["loss"]
    tokens, python = record["tokenizer"], record["versions"]["python"]
    passes = run["tokens_seen"] / tokens["train_tokens"]
    return f"""# tiny_lm: the embedded demo's pretrained causal LM

A {record["model"]["parameters"] / 1e6:.1f} M-parameter LLaMA-architecture model:
hidden size 256, MLP size 768, 4 layers, 4 query and 2 key/value heads, tied embeddings.
Its tokenizer is a {tokens["vocab_size"]}-entry byte-level BPE in which every digit is a token.
It exists so that the DoTA demo can fine-tune a really pretrained model on a CPU in minutes;
it is far too small to be useful for anything else.

## Data

The reference-manual topics of `pydoc_data.topics` and the docstrings of the standard library
of Python {python}: {corpus["documents"]} documents, {corpus["characters"]:,} characters,
sha256 `{corpus["sha256"][:16]}...`. The {len(corpus["heldout_documents"])} documents listed
in `pretraining.json` ({corpus["heldout_characters"]:,} characters) are held out.

## Training

`python -m mpo.demo.pretrain --seed {run["seed"]} --steps {run["steps"]}` replays the run:
{run["steps"]} AdamW steps of {run["batch_size"]} x {run["seq_len"]} tokens
({run["tokens_seen"]:,} tokens, {passes:.1f} passes over the training text)
in {run["wall_time_s"] / 60:.0f} minutes on {run["threads"]} shared CPU threads.

| loss (nats/token)    | value |
|----------------------|-------|
| training, last steps | {loss["final_train"]:.3f} |
| held-out             | {loss["heldout"]:.3f} |
| held-out, fresh init | {loss["heldout_fresh"]:.3f} |

## Use

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from mpo.demo.pretrain import ASSETS

model = AutoModelForCausalLM.from_pretrained(ASSETS)
tokenizer = AutoTokenizer.from_pretrained(ASSETS)
```

Encoding prepends `<s>`; `</s>` ends a document; `<pad>` pads batches.
"""


# ------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ASSETS, help="assets folder (replaced)")
    parser.add_argument("--minutes", type=float, default=12.0, help="training time budget")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="fixed number of steps (ignores --minutes)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)

    corpus = build_corpus()
    train_names, heldout_names = split_heldout(corpus)
    tokenizer = train_tokenizer([corpus[n] for n in train_names])
    train_ids = token_stream(tokenizer, [corpus[n] for n in train_names])
    heldout_ids = token_stream(tokenizer, [corpus[n] for n in heldout_names])
    print(
        f"corpus: {len(corpus)} documents, {sum(map(len, corpus.values())):,} characters; "
        f"{len(train_ids):,} training and {len(heldout_ids):,} held-out tokens"
    )

    model = build_model(tokenizer, args.seed)
    # The start of the longest held-out document, stored with its losses so
    # that tests can check the weights without rebuilding the corpus.
    sample_name = max(heldout_names, key=lambda n: len(corpus[n]))
    sample = corpus[sample_name][:600].rsplit("\n", 1)[0]
    fresh = {
        "heldout": heldout_loss(model, heldout_ids),
        "sample": text_loss(model, tokenizer, sample),
    }
    print(f"fresh model: held-out loss {fresh['heldout']:.3f}")
    figures, final_train = train(model, train_ids, heldout_ids, args.seed, args.minutes, args.steps)
    trained = {
        "heldout": heldout_loss(model, heldout_ids),
        "sample": text_loss(model, tokenizer, sample),
    }
    print(f"trained model: held-out loss {trained['heldout']:.3f}")

    record = {
        "corpus": {
            "description": (
                "The reference-manual topics of pydoc_data.topics and the docstrings of the"
                " standard library's modules, classes and functions, as collected by"
                " mpo.demo.pretrain.build_corpus; it varies with the Python version."
            ),
            "documents": len(corpus),
            "characters": sum(map(len, corpus.values())),
            "sha256": corpus_sha256(corpus),
            "heldout_documents": heldout_names,
            "heldout_characters": sum(len(corpus[n]) for n in heldout_names),
        },
        "tokenizer": {
            "vocab_size": len(tokenizer),
            "train_tokens": len(train_ids),
            "heldout_tokens": len(heldout_ids),
        },
        "model": {"parameters": sum(p.numel() for p in model.parameters()), **MODEL},
        "training": {
            "seed": args.seed,
            "minutes": None if args.steps else args.minutes,
            **figures,
            "batch_size": BATCH_SIZE,
            "seq_len": SEQ_LEN,
            "peak_lr": PEAK_LR,
            "min_lr": MIN_LR,
            "warmup_steps": WARMUP_STEPS,
            "weight_decay": WEIGHT_DECAY,
            "betas": list(BETAS),
            "grad_clip": GRAD_CLIP,
            "threads": THREADS,
        },
        "loss": {
            "final_train": round(final_train, 4),
            "heldout": round(trained["heldout"], 4),
            "heldout_fresh": round(fresh["heldout"], 4),
        },
        "heldout_sample": {
            "document": sample_name,
            "text": sample,
            "loss": round(trained["sample"], 4),
            "loss_fresh": round(fresh["sample"], 4),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
    }
    write_assets(args.out, model, tokenizer, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
