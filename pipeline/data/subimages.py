"""The extract stage's output format, read by the shards stage.

``<dir>/subimages.tar`` holds one PNG member ``<key>.png`` per sub-image, in image order;
``<dir>/index.json`` lists each sub-image's key, image, position and byte range in the tar, so
the shards stage reads them in shuffled order without scanning the tar. Kept apart from
:mod:`pipeline.data.extract` so that the shards stage does not depend on the extract code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = [
    "FORMAT",
    "INDEX",
    "TAR",
    "VERSION",
    "ExtractError",
    "read_subimage",
    "read_subimage_index",
]

TAR = "subimages.tar"
INDEX = "index.json"
FORMAT = "cugan-subimages"
VERSION = 1


class ExtractError(ValueError):
    """The prepared data or the sub-image index is not what is expected (one-line message)."""


def read_subimage_index(subimages_dir: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(subimages_dir) / INDEX
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExtractError(f"{path}: not found; run the extract stage first") from None
    except json.JSONDecodeError as err:
        raise ExtractError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("version") != VERSION:
        raise ExtractError(f"{path}: not a {FORMAT} v{VERSION} index")
    return data


def read_subimage(fd: int, record: dict[str, Any]) -> bytes:
    """The PNG bytes of one sub-image from an open ``subimages.tar`` file descriptor."""
    data = os.pread(fd, record["size"], record["offset"])
    if len(data) != record["size"]:
        raise ExtractError(f"{TAR}: short read for {record['key']}")
    return data
