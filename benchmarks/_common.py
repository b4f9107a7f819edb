"""What every benchmark shares: the machine description, text tables, peak memory.

The scripts in this folder are run as ``python benchmarks/<name>.py``, which puts this
folder on ``sys.path``, so they ``import _common``; so do the fresh interpreters they
start for memory measurements (:func:`run_memory_worker`), which run the same script.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import re
import resource
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

import mpo

__all__ = [
    "PeakMeter",
    "load_average",
    "machine_info",
    "run_memory_worker",
    "synchronize",
    "table",
    "training_step_peak",
    "verdict",
]

_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


# --- machine details ------------------------------------------------------------------------


def _processor() -> str:
    return platform.processor() or platform.machine()


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return _processor()


def _numpy_blas_threads() -> int | None:
    """Threads numpy's BLAS uses; None where it cannot be asked (not an OpenBLAS build)."""
    try:
        from threadpoolctl import threadpool_info  # optional; knows every BLAS

        pools = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        # torch may bring a BLAS of its own; numpy's is the one shipped inside numpy.
        pools.sort(key=lambda p: "numpy" not in p.get("filepath", ""))
        return int(pools[0]["num_threads"]) if pools else None
    except ImportError:
        pass
    # Without threadpoolctl: numpy's wheels ship scipy-openblas, whose symbols are prefixed.
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    paths = {line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()}
    names = (
        "scipy_openblas_get_num_threads64_",
        "scipy_openblas_get_num_threads",
        "openblas_get_num_threads64_",
        "openblas_get_num_threads",
    )
    for path in sorted(paths):
        library = ctypes.CDLL(path)
        for name in names:
            if hasattr(library, name):
                return int(getattr(library, name)())
    return None


def _numpy_blas_name() -> str:
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas['version']}"
    except (TypeError, KeyError):  # numpy < 1.26 has no mode="dicts"
        return "unknown"


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages, or None where the system does not keep them."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info(
    device: torch.device | None = None, libraries: Iterable[ModuleType] = ()
) -> dict[str, Any]:
    """The machine, the thread settings and the versions of numpy, torch, mpo and ``libraries``.

    With a ``device``, also its name (the GPU's, or the CPU's model name); each of
    ``libraries`` adds ``{module.__name__: module.__version__}``.
    """
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": _processor(),
    }
    if device is not None:
        info["device"] = str(device)
        cuda = device.type == "cuda"
        info["device_name"] = torch.cuda.get_device_name(device) if cuda else _cpu_name()
    info |= {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity) if affinity is not None else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numpy_blas": _numpy_blas_name(),
        "numpy_blas_threads": _numpy_blas_threads(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        **{library.__name__: library.__version__ for library in libraries},
        "mpo": mpo.__version__,
        "commit": _commit(),
        "env": {name: os.environ.get(name, "unset") for name in _THREAD_VARIABLES},
        # Other jobs on the machine skew every time; the ratios less so, as the calls alternate.
        "load_average_at_start": load_average(),
    }
    return info


def _commit() -> str:
    """The repository's checked-out commit, ``+changes`` if tracked files differ from it,
    or ``"unknown"`` outside a git checkout (a copied tree, say): which code a figure is of."""
    root = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str:
        run = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True
        )
        return run.stdout

    try:
        head = git("rev-parse", "--short", "HEAD").strip()
        changed = git("status", "--porcelain", "--untracked-files=no").strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+changes" if changed else "")


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously; a CPU needs no wait)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- text tables ----------------------------------------------------------------------------


def verdict(ok: bool | None) -> str:
    """A bar's outcome in a table cell; "-" where the case has no bar."""
    return "-" if ok is None else "PASS" if ok else "FAIL"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with every column padded to its widest cell."""
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [header, ["-" * width for width in widths], *rows]
    return "\n".join(
        "| "
        + " | ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True))
        + " |"
        for line in lines
    )


# --- peak memory ----------------------------------------------------------------------------


def _proc_status_kib(key: str) -> int:
    match = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    if match is None:
        raise OSError(f"/proc/self/status has no {key}")
    return int(match.group(1))


def _release_free_memory() -> None:
    """Collect garbage and hand freed heap pages back, so the baseline is what is live."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMeter:
    """Peak memory above the level at ``start()``: CUDA allocator, else the process's RSS.

    On CPU it follows live tensors only in a process started by :func:`run_memory_worker`
    (see the allocator setting there).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = ""

    def start(self) -> None:
        _release_free_memory()
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated - memory_allocated before"
            return
        try:
            self.base = _proc_status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self.method = "VmHWM during the step - VmRSS before (malloc_trim'd)"
        except OSError:  # not Linux: the process-lifetime peak, which may hide the step's
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.method = "ru_maxrss after - ru_maxrss before (lower bound)"

    def peak(self) -> tuple[int, int]:
        """``(peak above the start level, absolute peak)`` in bytes."""
        if self.device.type == "cuda":
            synchronize(self.device)
            absolute = torch.cuda.max_memory_allocated(self.device)
        elif self.method.startswith("VmHWM"):
            absolute = _proc_status_kib("VmHWM") * 1024
        else:
            absolute = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return absolute - self.base, absolute


def training_step_peak(
    model: torch.nn.Module, batch_shape: tuple[int, int], device: torch.device | str
) -> dict[str, Any]:
    """One AdamW step (lr 1e-4) on seeded random token ids; its peak memory and loss.

    Only the step is metered: the model and the batch exist before the meter starts.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, model.config.vocab_size, batch_shape, generator=generator)
    batch = batch.to(device)
    meter = PeakMeter(torch.device(device))
    meter.start()
    loss = model(input_ids=batch, labels=batch).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    extra, absolute = meter.peak()
    return {
        "trainable_parameters": sum(p.numel() for p in trainable),
        "loss": float(loss.detach()),
        "peak_step_bytes": extra,
        "peak_absolute_bytes": absolute,
        "measured_as": meter.method,
    }


def run_memory_worker(script: str, method: str, options: list[str]) -> dict[str, Any]:
    """Run ``script --memory-worker method *options`` in a fresh interpreter; its result.

    A fresh process per method, so that no method's peak counts what another left
    allocated or cached. The worker prints its result as JSON on its last line.
    """
    root = str(Path(mpo.__file__).resolve().parents[1])  # so the child imports this mpo
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    # glibc keeps freed blocks up to 32 MiB for reuse, so the RSS peak would count what
    # happened to be cached (it moved LoRA's peak by a third between runs). A fixed mmap
    # threshold returns every block >= 64 KiB to the system on free: RSS follows live tensors.
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    command = [sys.executable, script, "--memory-worker", method, *options]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"memory worker {method!r} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])
