"""Write files and directories so that a reader sees them complete or not at all.

A later stage (or DVC hashing an output) must never read half-written data. Files are written
to a temporary name in the same directory and moved into place with ``os.replace`` (atomic on
POSIX within one file system); a directory is built under a temporary sibling name and renamed
into place when everything in it is written, and removed if anything fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "staging_dir",
]


def _temp_sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{suffix}")


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` when the block ends without an exception.

    For data too large to hold in memory (a downloaded backbone): write it in chunks, check it
    inside the block (``fp.name`` is the temporary file's path), and raise to discard it. On
    an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _temp_sibling(path, "tmp")
    fp = tmp.open("xb")  # "x" = O_EXCL: never someone else's file; closed before the rename
    try:
        with fp:
            yield fp
            if fsync:
                fp.flush()
                os.fsync(fp.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same directory."""
    with atomic_output(path, fsync=fsync) as fp:
        fp.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """JSON in a stable layout (2-space indent, trailing newline): equal data, equal bytes."""
    return atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextlib.contextmanager
def staging_dir(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield an empty temporary sibling of ``final``; on success it replaces ``final``.

    On an exception the temporary directory is removed and ``final`` is left as it was. When
    ``final`` already exists it is removed just before the rename, so at every instant it is
    either the old complete directory, absent, or the new complete directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "staging")
    tmp.mkdir()
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            shutil.rmtree(final)
        elif final.exists() or final.is_symlink():
            final.unlink()
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
