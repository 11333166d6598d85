"""pipeline.atomic: files and directories appear complete or not at all; ordered_map order."""

from __future__ import annotations

import json

import pytest

from pipeline.atomic import atomic_output, atomic_write_bytes, atomic_write_json, staging_dir
from pipeline.data.workers import ordered_map, resolve_workers


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    p = tmp_path / "f.bin"
    atomic_write_bytes(p, b"one")
    atomic_write_bytes(p, b"two")
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["f.bin"]


def test_atomic_json_is_stable(tmp_path):
    atomic_write_json(tmp_path / "a.json", {"b": 1, "a": [1.5, "x"]})
    text = (tmp_path / "a.json").read_text()
    assert text.endswith("\n") and json.loads(text) == {"b": 1, "a": [1.5, "x"]}


def test_staging_dir_success_replaces_old(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    with staging_dir(final) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.")
        (tmp / "new").write_text("new")
        assert (final / "old").exists()  # untouched until success
    assert [p.name for p in final.iterdir()] == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_staging_dir_failure_keeps_old_and_cleans_up(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt), staging_dir(final) as tmp:
        (tmp / "half").write_text("x")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def _square(x: int) -> int:
    return x * x


def test_ordered_map_keeps_order_with_processes(monkeypatch):
    monkeypatch.setattr("pipeline.data.workers.MIN_ITEMS_FOR_POOL", 1)
    items = list(range(9))
    assert list(ordered_map(_square, items, workers=2)) == [i * i for i in items]
    assert list(ordered_map(_square, items, workers=1)) == [i * i for i in items]
    assert resolve_workers(3) == 3 and 1 <= resolve_workers(0) <= 8


def test_atomic_output_streams_and_discards_on_error(tmp_path):
    from pathlib import Path

    from pipeline.atomic import atomic_output

    path = tmp_path / "big.bin"
    with atomic_output(path) as fp:
        for _ in range(3):
            fp.write(b"chunk")
        assert not path.exists() and Path(fp.name).parent == tmp_path  # a sibling temp file
    assert path.read_bytes() == b"chunk" * 3
    with pytest.raises(ValueError), atomic_output(path) as fp:
        fp.write(b"bad")
        raise ValueError("verification failed")
    assert path.read_bytes() == b"chunk" * 3  # the old file stays
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.bin"]  # no temp file left


def test_file_system_errors_name_the_target_not_the_temporary_path(tmp_path, monkeypatch):
    import errno
    import os

    from pipeline.atomic import naming_path

    final = tmp_path / "out"
    with pytest.raises(OSError) as err, staging_dir(final) as tmp:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # as a failed write() raises
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(final)
    with pytest.raises(PermissionError) as err, staging_dir(final) as tmp:
        raise PermissionError(errno.EACCES, "Permission denied", str(tmp / "a" / "b.png"))
    assert err.value.filename == str(final / "a" / "b.png")  # the type is kept, the path mapped
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as err, atomic_output(tmp_path / "f.bin") as fp:
        fp.write(b"x")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert err.value.filename == str(tmp_path / "f.bin") and list(tmp_path.iterdir()) == []
    plain = OSError("no errno: not a file-system error")
    assert naming_path(plain, final) is plain
    elsewhere = OSError(errno.EIO, "Input/output error", "/elsewhere/input.tar")
    assert naming_path(elsewhere, final, inside=tmp_path / "x") is elsewhere


def test_staging_dir_keeps_the_old_directory_when_the_rename_fails(tmp_path, monkeypatch):
    import os

    import pipeline.atomic as atomic_mod

    final = tmp_path / "out"
    final.mkdir()
    (final / "old").write_text("old")
    real = os.replace

    def failing(src, dst):
        if ".staging" in str(src):
            raise OSError(28, "No space left on device", str(src), None, str(dst))
        return real(src, dst)

    monkeypatch.setattr(atomic_mod.os, "replace", failing)
    with pytest.raises(OSError), staging_dir(final) as tmp:
        (tmp / "new").write_text("new")
    assert [p.name for p in final.iterdir()] == ["old"]  # put back as it was
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
