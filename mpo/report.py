"""Plain-text reports: aligned tables and progress bars, shared by every printed summary.

>>> print(table(["module", "params"], [["q_proj", "3,328"], ["down_proj", "100,864"]]))
module      params
q_proj       3,328
down_proj  100,864
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["join", "progress", "table"]


def join(values: Iterable[int]) -> str:
    """``(4, 4, 8)`` -> ``"4,4,8"``: factor shapes and ranks in one table cell."""
    return ",".join(map(str, values))


def table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    """Columns padded to their widest cell: left-aligned text, then right-aligned numbers.

    Columns before ``numeric_from`` are text; the rest are numbers.
    """
    lines = [list(header), *map(list, rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]

    def render(line: list[str]) -> str:
        return "  ".join(
            cell.rjust(width) if i >= numeric_from else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ).rstrip()

    return "\n".join(render(line) for line in lines)


def progress(items: Sequence[Any], enabled: bool | None, description: str, unit: str) -> Any:
    """``items`` behind a tqdm bar; ``enabled=None`` shows it only on a terminal.

    Without tqdm (it comes with the ``adapt`` extra) there is just no bar.
    """
    if enabled is None:
        enabled = sys.stderr.isatty()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit=unit, disable=not enabled)
