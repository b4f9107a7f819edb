"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Every file :mod:`mpo` writes (checkpoints, metrics, tables, plots) goes
through these functions. A file is written to a hidden temporary sibling,
flushed to disk, then renamed over the target (``os.replace`` is atomic on
POSIX and Windows); a folder is filled as a hidden sibling and renamed into
place. If anything raises, the temporary is deleted and the target is as it
was.

>>> import json, tempfile, pathlib
>>> folder = pathlib.Path(tempfile.mkdtemp())
>>> write_json(folder / "metrics.json", {"step": 3, "loss": 1.5})
>>> json.loads((folder / "metrics.json").read_text())
{'step': 3, 'loss': 1.5}
>>> with staged_folder(folder / "checkpoint") as staging:
...     _ = (staging / "a.txt").write_text("hello")
>>> sorted(p.name for p in (folder / "checkpoint").iterdir())
['a.txt']
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "fsync",
    "publish_folder",
    "recover_folder",
    "remove_folder",
    "staged_folder",
    "write_bytes",
    "write_csv",
    "write_json",
]


# random bytes in the names of staging and backup folders
_TOKEN_BYTES = 4


def fsync(path: str | os.PathLike) -> None:
    """Flush a file or folder to disk, so that a rename made after it publishes written data."""
    path = Path(path)
    if path.is_dir() and os.name == "nt":  # Windows cannot open a folder to flush it
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, creating the parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, 0o644)  # mkstemp makes the file private; results are for sharing
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented JSON (with a final newline) to ``path`` atomically."""
    write_bytes(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` (dicts; the columns are the union of their keys, in first-seen order)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(path, text.getvalue().encode("utf-8"))


def publish_folder(staging: str | os.PathLike, target: str | os.PathLike) -> None:
    """Rename the folder ``staging`` to ``target``, replacing an old ``target`` as a whole.

    An old ``target`` is renamed aside first and deleted after the new one is in
    place; if the second rename fails, the old one is put back. Between the two
    renames ``target`` is briefly absent, never a mix of old and new files.
    """
    staging, target = Path(staging), Path(target)
    for file in (*staging.rglob("*"), staging):
        if file.is_file() or file.is_dir():
            fsync(file)
    if not target.exists():
        os.rename(staging, target)
    else:
        backup = staging.with_suffix(".old")
        os.rename(target, backup)
        try:
            os.rename(staging, target)
        except BaseException:
            os.rename(backup, target)
            raise
        # the new folder is in place; a backup left behind would only cost disk space
        _delete(backup, ignore_errors=True)
    fsync(target.parent)


def _delete(path: Path, *, ignore_errors: bool = False) -> None:
    """Remove a folder with its content (with ``ignore_errors``, as much as can be), or
    a file or link (not what a link points to); nothing if there is nothing."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=ignore_errors)
    else:
        path.unlink(missing_ok=True)


def _siblings(target: Path, suffix: str) -> list[Path]:
    """The staging (``".tmp"``) or backup (``".old"``) folders of ``target`` that
    :func:`staged_folder` and :func:`publish_folder` name, oldest first."""
    pattern = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{{2 * _TOKEN_BYTES}}}\{suffix}")
    if not target.parent.is_dir():
        return []
    found = [p for p in target.parent.iterdir() if pattern.fullmatch(p.name)]
    return sorted(found, key=lambda p: p.lstat().st_mtime)


def recover_folder(target: str | os.PathLike) -> bool:
    """Put back the old ``target`` that :func:`publish_folder` had renamed aside, if the
    process died before the new one took its place (``target`` absent, a backup left);
    True if it did. The new one, unfinished or not, is lost either way."""
    target = Path(os.path.realpath(target))  # a link's folder is the one replaced
    if target.exists():
        return False
    backups = _siblings(target, ".old")
    if not backups:
        return False
    os.rename(backups[-1], target)
    return True


def remove_folder(target: str | os.PathLike) -> None:
    """Delete ``target`` and every staging or backup folder of it (a fresh start)."""
    target = Path(target)
    for path in (target, *_siblings(target, ".tmp"), *_siblings(target, ".old")):
        _delete(path)


@contextlib.contextmanager
def staged_folder(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden sibling folder of ``target``; publish it as ``target`` on success.

    Fill the yielded folder inside the ``with`` block; when the block ends
    without an exception the folder replaces ``target`` (see
    :func:`publish_folder`); when it raises, the folder is deleted and
    ``target`` is untouched.
    """
    target = Path(os.path.realpath(target))  # a link's folder is the one to replace
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:  # not mkdtemp, which makes the folder private (0700): mkdir applies the umask
        staging = target.parent / f".{target.name}.{secrets.token_hex(_TOKEN_BYTES)}.tmp"
        try:
            staging.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield staging
        publish_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
