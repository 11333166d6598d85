"""File-system errors in the DVC stages: one line naming the path, a non-zero exit, and nothing
half-written where the next stage reads.

Three faults -- no space left (ENOSPC), a read-only target (EROFS), permission denied
(EACCES) -- against the shards and extract stages on real data, and every stage's ``main()``
turning an OSError into one line (parametrised over the six stages).

How the faults are made, since the tests run as root (where ``chmod`` restricts nothing):

* ENOSPC: the tar writer's file is wrapped so that a ``write()`` past a byte budget fails as a
  full disk does (``OSError(ENOSPC)`` without a file name); and, where this machine lets the
  test mount one, a real 64 KiB tmpfs that fills up.
* EROFS / EACCES: ``os.mkdir`` refuses to create anything under the target's parent (the
  first write every staged stage makes), or ``os.open`` refuses to open the input; and, where
  mounting works, a real tmpfs remounted read-only.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import pipeline.data.extract as extract_mod
import pipeline.data.shards as shards_mod
from pipeline.config import ExtractParams
from pipeline.data.extract import extract_subimages
from pipeline.data.prepare import prepare_images
from pipeline.data.sources import folder_images
from stages import evalsets as evalsets_stage
from stages import evaluate as evaluate_stage
from stages import extract as extract_stage
from stages import prepare as prepare_stage
from stages import shards as shards_stage
from stages import train as train_stage
from tests.data_fixtures import image_folder, tree_bytes

CROP = 32
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def nothing_printed_later(monkeypatch):
    """The stage's one line stays its only output: no object left to fail again when it is
    collected (an unclosed tar stream would print "Exception ignored in ... Traceback")."""
    seen: list = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    yield
    gc.collect()
    assert not seen, [f"{u.exc_type.__name__}: {u.exc_value} ({u.object!r})" for u in seen]


# ---------------------------------------------------------------------------------------------
# data and fault helpers


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Prepared images, their sub-images and a params file (tiny)."""
    root = tmp_path_factory.mktemp("stage-errors")
    src = folder_images(image_folder(root / "raw", n=4, size=(64, 80)))
    prepare_images(
        src, root / "prepared", crop_size=CROP, holdout=1, holdout_seed=0, max_pixels=10**6
    )
    extract_subimages(root / "prepared", root / "subimages", ExtractParams(crop_size=CROP, step=16))
    params = {"extract": {"crop_size": CROP, "step": 16}, "shards": {"max_count": 5}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


class _FullDisk:
    """A binary file whose writes fail like a full disk once ``budget`` bytes are written."""

    def __init__(self, fp, budget: int) -> None:
        self._fp, self._budget = fp, budget

    def write(self, data) -> int:
        if len(data) > self._budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # write() names no file
        self._budget -= len(data)
        return self._fp.write(data)

    def __getattr__(self, name):
        return getattr(self._fp, name)


def _fill_up_after(monkeypatch, module, budget: int) -> None:
    real = module.deterministic_tar_writer
    monkeypatch.setattr(module, "deterministic_tar_writer", lambda fp: real(_FullDisk(fp, budget)))


def _refuse_mkdir_under(monkeypatch, parent: Path, code: int) -> None:
    """``os.mkdir`` fails with ``code`` for anything created directly in ``parent``."""
    real = os.mkdir

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == parent and not Path(path).exists():
            raise OSError(code, os.strerror(code), os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)


@pytest.fixture()
def tmpfs(tmp_path):
    """A real 64 KiB tmpfs (skipped where the test may not mount one)."""
    mount = shutil.which("mount")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if mount is None:
        pytest.skip("no mount(8) here; the simulated ENOSPC/EROFS tests cover the code")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); simulated tests cover it")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


def _one_line(caplog, *parts: str) -> str:
    lines = _errors(caplog)
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line and "Traceback" not in line, line
    for part in parts:
        assert part in line, line
    return line


def _leftovers(parent: Path, name: str) -> list[str]:
    """What a failed stage left beside its output: staging or temporary siblings."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def _shards(data: Path, out: Path, report: Path) -> int:
    return shards_stage.main(
        [
            "--params",
            str(data / "params.yaml"),
            "--subimages",
            str(data / "subimages"),
            "--out",
            str(out),
            "--report",
            str(report),
        ]
    )


def _extract(data: Path, out: Path, report: Path) -> int:
    return extract_stage.main(
        [
            "--params",
            str(data / "params.yaml"),
            "--prepared",
            str(data / "prepared"),
            "--out",
            str(out),
            "--report",
            str(report),
            "--workers",
            "1",
        ]
    )


# ---------------------------------------------------------------------------------------------
# the shards stage


def test_shards_stage_with_a_full_disk_ends_in_one_line(data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "shards"
    assert _shards(data, out, tmp_path / "r0.json") == 0  # a complete earlier run
    before = tree_bytes(out)
    _fill_up_after(monkeypatch, shards_mod, budget=12_000)  # fails in the second shard
    caplog.clear()
    assert _shards(data, out, tmp_path / "r1.json") == 1
    line = _one_line(caplog, f"{out}/shard-", ".tar: No space left on device")
    assert ".staging" not in line  # the path a user knows, not the temporary one
    assert tree_bytes(out) == before  # the earlier complete output stands, untouched
    assert _leftovers(tmp_path, "shards") == [] and not (tmp_path / "r1.json").exists()


def test_shards_stage_into_a_read_only_directory(data, tmp_path, monkeypatch, caplog):
    parent = tmp_path / "ro"
    parent.mkdir()
    _refuse_mkdir_under(monkeypatch, parent, errno.EROFS)
    assert _shards(data, parent / "shards", tmp_path / "r.json") == 1
    _one_line(caplog, f"{parent}/shards", "Read-only file system")
    assert list(parent.iterdir()) == []


def test_shards_stage_without_permission(data, tmp_path, monkeypatch, caplog):
    parent = tmp_path / "forbidden"
    parent.mkdir()
    _refuse_mkdir_under(monkeypatch, parent, errno.EACCES)
    assert _shards(data, parent / "shards", tmp_path / "r.json") == 1
    _one_line(caplog, f"{parent}/shards", "Permission denied")
    assert list(parent.iterdir()) == []


def test_shards_stage_cannot_read_its_input(data, tmp_path, monkeypatch, caplog):
    tar = data / "subimages" / "subimages.tar"
    assert tar.is_file()
    real = os.open

    def refuse(path, *args, **kwargs):
        if Path(path) == tar:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse)
    assert _shards(data, tmp_path / "shards", tmp_path / "r.json") == 1
    _one_line(caplog, str(tar), "Permission denied")
    assert not (tmp_path / "shards").exists() and _leftovers(tmp_path, "shards") == []


def _run_stage(stage: str, *args: str) -> subprocess.CompletedProcess:
    """The stage as DVC runs it: its own process, so that stderr is all a user sees."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", f"stages.{stage}", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_shards_stage_on_a_real_full_tmpfs(data, tmpfs):
    out = tmpfs / "shards"
    done = _run_stage(  # the shards need more than 64 KiB
        "shards",
        *("--params", str(data / "params.yaml"), "--subimages", str(data / "subimages")),
        *("--out", str(out), "--report", str(tmpfs / "r.json")),
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"{out}/shard-") and "No space left on device" in lines[0]
    assert list(tmpfs.iterdir()) == []  # nothing half-written, no staging directory


def test_shards_stage_on_a_real_read_only_tmpfs(data, tmpfs, caplog):
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    assert _shards(data, tmpfs / "shards", tmpfs.parent / "r.json") == 1
    _one_line(caplog, f"{tmpfs}/shards", "Read-only file system")
    assert list(tmpfs.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# the extract stage


def test_extract_stage_with_a_full_disk_ends_in_one_line(data, tmp_path, monkeypatch, caplog):
    out = tmp_path / "subimages"
    _fill_up_after(monkeypatch, extract_mod, budget=20_000)
    assert _extract(data, out, tmp_path / "r.json") == 1
    _one_line(caplog, str(out), "No space left on device")
    assert not out.exists() and _leftovers(tmp_path, "subimages") == []


def test_extract_stage_into_a_read_only_directory(data, tmp_path, monkeypatch, caplog):
    parent = tmp_path / "ro"
    parent.mkdir()
    _refuse_mkdir_under(monkeypatch, parent, errno.EROFS)
    assert _extract(data, parent / "subimages", tmp_path / "r.json") == 1
    _one_line(caplog, f"{parent}/subimages", "Read-only file system")
    assert list(parent.iterdir()) == []


def test_extract_stage_report_on_a_full_disk(data, tmp_path, monkeypatch, caplog):
    """The outputs are complete; the report cannot be written: one line, and no temp file."""
    import pipeline.atomic as atomic_mod

    report = tmp_path / "reports" / "extract.json"
    real = atomic_mod.atomic_output

    def full(path, **kwargs):
        if Path(path) == report:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fspath(path))
        return real(path, **kwargs)

    monkeypatch.setattr(atomic_mod, "atomic_output", full)
    assert _extract(data, tmp_path / "subimages", report) == 1
    _one_line(caplog, str(report), "No space left on device")
    assert not report.exists()


def test_extract_stage_on_a_real_full_tmpfs(data, tmpfs):
    out = tmpfs / "subimages"
    done = _run_stage(  # more than 64 KiB of crops
        "extract",
        *("--params", str(data / "params.yaml"), "--prepared", str(data / "prepared")),
        *("--out", str(out), "--report", str(tmpfs.parent / "r.json"), "--workers", "1"),
    )
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"{out}: No space left on device"], done.stderr
    assert list(tmpfs.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# every stage's main(): an OSError is one line naming the path, exit code 1

FAULTS = [
    OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/data/out/part-3"),
    OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/out"),
    PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/data/out"),
]


def _raise(err: OSError):
    def fail(*args, **kwargs):
        raise err

    return fail


STAGES = {
    "prepare": (
        prepare_stage,
        "prepare_images",
        ["--out", "{t}/o", "--report", "{t}/r.json", "--downloads", "{t}/dl"],
    ),
    "extract": (
        extract_stage,
        "extract_subimages",
        ["--prepared", "{t}/p", "--out", "{t}/o", "--report", "{t}/r.json"],
    ),
    "shards": (
        shards_stage,
        "shard_subimages",
        ["--subimages", "{t}/s", "--out", "{t}/o", "--report", "{t}/r.json"],
    ),
    "evalsets": (
        evalsets_stage,
        "build_evalsets",
        ["--prepared", "{t}/p", "--out", "{t}/o", "--report", "{t}/r.json"],
    ),
    "train": (
        train_stage,
        "pipeline.train.trainer.run_stage",
        ["--stage", "cunet", "--shards", "{t}/s", "--out", "{t}/o"],
    ),
    "evaluate": (
        evaluate_stage,
        "run_evaluation",
        ["--model", "m:mse:{t}/m", "--evalsets", "{t}/e", "--out", "{t}/o", "--no-mlflow"],
    ),
}


@pytest.mark.parametrize("fault", FAULTS, ids=["ENOSPC", "EROFS", "EACCES"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_stage_turns_an_os_error_into_one_line(
    stage, fault, tmp_path, monkeypatch, caplog, capsys
):
    module, target, argv = STAGES[stage]
    if "." in target:  # imported inside main(): patch where it lives
        module_name, attr = target.rsplit(".", 1)
        monkeypatch.setattr(f"{module_name}.{attr}", _raise(fault))
    else:
        monkeypatch.setattr(module, target, _raise(fault))
    params = tmp_path / "params.yaml"
    params.write_text("{}\n")
    args = ["--params", str(params), *(a.format(t=tmp_path) for a in argv)]
    code = module.main(args)
    assert code == 1
    printed = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    lines = _errors(caplog) + [line for line in printed if line.startswith("error:")]
    assert len(lines) == 1, lines
    assert "Traceback" not in "\n".join(printed)
    assert f"{fault.filename}: {fault.strerror}" in lines[0]


def test_the_stages_list_is_complete():
    on_disk = {p.stem for p in Path(shards_stage.__file__).parent.glob("*.py")} - {"__init__"}
    assert on_disk == set(STAGES)
