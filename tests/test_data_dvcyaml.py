"""dvc.yaml stays honest: each stage depends on every project module it imports (found
statically, function-level imports included), and the data stages' params keys exist."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_params

REPO = Path(__file__).resolve().parents[1]
DATA_STAGES = ("prepare", "extract", "shards", "evalsets")


def _module_file(name: str) -> Path | None:
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def local_imports(path: Path, seen: set[Path] | None = None) -> set[Path]:
    """Files of ``pipeline``/``stages``/``models`` modules imported by ``path``, transitively."""
    seen = set() if seen is None else seen
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            if not name.startswith(("pipeline", "stages", "models")):
                continue
            found = _module_file(name)
            if found is not None and found not in seen:
                seen.add(found)
                local_imports(found, seen)
    return seen


def _dvc() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _script(stage: str) -> Path:
    """The stages/*.py a dvc.yaml stage runs (``python -m stages.<name> ...``)."""
    cmd = " ".join(_dvc()[stage]["cmd"].split())
    assert cmd.startswith("python -m stages."), f"{stage}: {cmd}"
    return REPO / "stages" / f"{cmd.split()[2].split('.', 1)[1]}.py"


@pytest.mark.parametrize("stage", sorted(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]))
def test_stage_depends_on_every_module_it_imports(stage):
    spec = _dvc()[stage]
    script = _script(stage)
    needed = {script, *local_imports(script)}
    needed = {p.relative_to(REPO).as_posix() for p in needed if p.name != "__init__.py"}
    missing = needed - set(spec["deps"])
    assert not missing, f"dvc.yaml stage {stage} lacks deps {sorted(missing)}"


@pytest.mark.parametrize("profile", ["params.yaml", "tests/profiles/tiny.yaml"])
def test_params_keys_of_data_stages_exist(profile):
    raw = yaml.safe_load((REPO / profile).read_text())
    load_params(REPO / profile)  # valid
    for stage in DATA_STAGES:
        for key in _dvc()[stage]["params"]:
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{profile}: {key} ({stage})"
                node = node[part]


def test_reports_are_uncached_metrics():
    for stage in DATA_STAGES:
        metrics = _dvc()[stage]["metrics"]
        assert all(next(iter(m.values())) == {"cache": False} for m in metrics)
