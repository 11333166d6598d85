"""Write files and directories so that a reader sees them complete or not at all.

A later stage (or DVC hashing an output) must never read half-written data. Files are written
to a temporary name in the same directory and moved into place with ``os.replace`` (atomic on
POSIX within one file system); a directory is built under a temporary sibling name and renamed
into place when everything in it is written, and removed if anything fails.

A file-system error on the way (no space left, read-only target, permission denied) is raised
as the same ``OSError`` naming the path the caller asked for: a failed ``write()`` names no
file at all, and a temporary name (``.shards.1a2b3c4d.staging/...``) means nothing to a user.
The stages turn it into one line (:func:`pipeline.errors.os_error_line`).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

__all__ = [
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "naming_errors",
    "naming_path",
    "staging_dir",
]


def _temp_sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.{suffix}")


def naming_path(
    err: OSError, path: str | os.PathLike[str], *, inside: str | os.PathLike[str] | None = None
) -> OSError:
    """``err`` naming ``path``: as its file name when it names none (a failed ``write()``), or,
    with ``inside`` (a temporary directory standing for ``path``), with that prefix replaced.

    Returns ``err`` itself when there is nothing to change (no errno: not a file-system error;
    a file name elsewhere); otherwise a new exception of the same type (``PermissionError``
    stays one) that the caller raises ``from err``.
    """
    if err.errno is None:
        return err
    if err.filename is None:
        filename: Any = os.fspath(path)
    elif inside is not None and str(err.filename).startswith(os.fspath(inside)):
        filename = os.fspath(path) + str(err.filename)[len(os.fspath(inside)) :]
    else:
        return err
    try:
        return type(err)(err.errno, err.strerror, filename, None, err.filename2)
    except TypeError:  # a subclass with a constructor of its own: keep the error as it is
        return err


def _raise_naming(err: OSError, path: Path, inside: Path | None) -> NoReturn:
    renamed = naming_path(err, path, inside=inside)
    if renamed is err:
        raise err
    raise renamed from err


@contextlib.contextmanager
def naming_errors(
    path: str | os.PathLike[str], *, inside: str | os.PathLike[str] | None = None
) -> Iterator[None]:
    """Raise a file-system error of the block as :func:`naming_path` gives it."""
    try:
        yield
    except OSError as err:
        _raise_naming(err, Path(path), Path(inside) if inside is not None else None)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], *, fsync: bool = True) -> Iterator[BinaryIO]:
    """Yield a binary file that becomes ``path`` when the block ends without an exception.

    For data too large to hold in memory (a downloaded backbone): write it in chunks, check it
    inside the block (``fp.name`` is the temporary file's path), and raise to discard it. On
    an exception the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    tmp = _temp_sibling(path, "tmp")
    try:
        fp = tmp.open("xb")  # "x" = O_EXCL: never someone else's file; closed before the rename
    except OSError as err:
        _raise_naming(err, path, tmp)
    try:
        with fp:
            yield fp
            if fsync:
                fp.flush()
                os.fsync(fp.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        _raise_naming(err, path, tmp)
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
    ``final`` already exists it is renamed aside just before the rename and deleted after it
    (deleting it first could fail halfway and leave a partial directory), so at every instant
    it is either the old complete directory, absent, or the new complete directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(final, "staging")
    try:
        tmp.mkdir()
    except OSError as err:
        _raise_naming(err, final, tmp)
    try:
        yield tmp
        old = None
        if final.is_dir() and not final.is_symlink():
            old = _temp_sibling(final, "old")
            os.replace(final, old)
        elif final.exists() or final.is_symlink():
            final.unlink()
        try:
            os.replace(tmp, final)
        except BaseException:
            if old is not None:
                os.replace(old, final)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _raise_naming(err, final, tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
