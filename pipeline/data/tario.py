"""Tar archives whose bytes depend only on their content (for DVC and byte-identical reruns).

webdataset's ``TarWriter`` stamps the current time into every header unless told otherwise
(webdataset PR #126); here the mtime, user and group names, mode (uid/gid stay 0) and format
(ustar) are fixed, and member order is the write order. Used for the extract stage's
sub-image tar and for the training shards.
"""

from __future__ import annotations

from typing import Any, BinaryIO

__all__ = ["TAR_MTIME", "deterministic_tar_writer", "tar_size"]

TAR_MTIME = 946_684_800  # 2000-01-01T00:00:00Z: fixed, and not "implausibly old" for GNU tar
TAR_USER = "cugan"
TAR_GROUP = "cugan"
TAR_MODE = 0o444
_BLOCK = 512
_RECORD = 20 * _BLOCK  # tarfile.RECORDSIZE


def deterministic_tar_writer(fileobj: BinaryIO) -> Any:
    """A webdataset ``TarWriter`` on an open binary file; samples map extensions to ``bytes``.

    No encoder runs: callers pass bytes they encoded reproducibly themselves. The caller
    closes ``fileobj`` after ``writer.close()``.
    """
    from webdataset import TarWriter  # imports torch: keep it out of module import time

    return TarWriter(
        fileobj,
        user=TAR_USER,
        group=TAR_GROUP,
        mode=TAR_MODE,
        compress=False,
        encoder=False,
        mtime=TAR_MTIME,
        format="USTAR_FORMAT",
    )


def tar_size(member_sizes: list[int]) -> int:
    """File size of an uncompressed tar holding members of these sizes (names < 100 chars):
    a 512-byte header plus data padded to 512 per member, 1024 bytes of end blocks, all padded
    to the 10240-byte record."""
    raw = sum(_BLOCK + -(-s // _BLOCK) * _BLOCK for s in member_sizes) + 2 * _BLOCK
    return -(-raw // _RECORD) * _RECORD
