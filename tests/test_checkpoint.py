"""Generator checkpoints: round trip, atomic files, and every way a checkpoint can be wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

from models.generator import Generator, GeneratorConfig
from pipeline.checkpoint import (
    JSON_NAME,
    TENSORS_NAME,
    CheckpointError,
    load_generator,
    read_generator_document,
    save_generator,
)

TINY = GeneratorConfig(blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 8))


def _model(cfg: GeneratorConfig = TINY, seed: int = 0) -> Generator:
    model = Generator(cfg, generator=torch.Generator().manual_seed(seed)).eval()
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():  # make C_G's output non-zero so the round trip tests the modulation
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.fixture()
def saved(tmp_path: Path) -> tuple[Path, Generator]:
    model = _model()
    out = save_generator(tmp_path / "ckpt", model, metadata={"source": "test", "iteration": 7})
    return out, model


def _rewrite_json(ckpt: Path, edit) -> None:  # type: ignore[no-untyped-def]
    path = ckpt / JSON_NAME
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_round_trip_gives_same_outputs(saved: tuple[Path, Generator]) -> None:
    ckpt, model = saved
    assert sorted(p.name for p in ckpt.iterdir()) == [JSON_NAME, TENSORS_NAME]  # no temp files left
    loaded, metadata = load_generator(ckpt)
    assert metadata == {"source": "test", "iteration": 7}
    assert loaded.config == TINY and not loaded.training
    x, z = torch.rand(2, 3, 8, 8), torch.rand(2, 2)
    assert torch.equal(loaded(x, z), model(x, z))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


def test_json_document_layout(saved: tuple[Path, Generator]) -> None:
    ckpt, _ = saved
    doc = json.loads((ckpt / JSON_NAME).read_text())
    assert doc["format"] == "cugan-generator" and doc["version"] == 1
    assert doc["config"] == TINY.to_dict()
    assert doc["config"]["channels_per_scale"] == [4, 8, 8]
    assert len(doc["tensors_sha256"]) == 64
    assert "torch" in doc["software"]
    assert read_generator_document(ckpt)["metadata"]["iteration"] == 7


def test_load_safetensors_file_directly_and_without_sidecar(saved: tuple[Path, Generator]) -> None:
    ckpt, model = saved
    x, z = torch.rand(1, 3, 8, 8), torch.rand(1, 2)
    loaded, _ = load_generator(ckpt / TENSORS_NAME)
    assert torch.equal(loaded(x, z), model(x, z))
    (ckpt / JSON_NAME).unlink()  # the header carries a copy of the document
    loaded, metadata = load_generator(ckpt / TENSORS_NAME)
    assert metadata["iteration"] == 7
    assert torch.equal(loaded(x, z), model(x, z))


def test_unconditional_and_one_scale_round_trip(tmp_path: Path) -> None:
    for i, cfg in enumerate(
        [
            GeneratorConfig(
                blocks_per_scale=(1, 1, 1), channels_per_scale=(4, 8, 8), conditional=False
            ),
            GeneratorConfig(blocks_per_scale=(2,), channels_per_scale=(4,)),
        ]
    ):
        model = _model(cfg)
        loaded, _ = load_generator(save_generator(tmp_path / str(i), model, metadata={}))
        assert loaded.config == cfg
        x, z = torch.rand(1, 3, 4, 4), torch.rand(1, 2)
        assert torch.equal(loaded(x, z), model(x, z))


def test_overwrite_replaces_both_files(saved: tuple[Path, Generator]) -> None:
    ckpt, _ = saved
    other = _model(seed=5)
    save_generator(ckpt, other, metadata={"iteration": 8})
    loaded, metadata = load_generator(ckpt)
    assert metadata == {"iteration": 8}
    assert torch.equal(loaded.head.weight, other.head.weight)


def test_wrappers_are_unwrapped(tmp_path: Path) -> None:
    model = _model()
    loaded, _ = load_generator(save_generator(tmp_path, nn.DataParallel(model), metadata={}))
    assert torch.equal(loaded.tail.weight, model.tail.weight)
    with pytest.raises(CheckpointError, match="expects a Generator"):
        save_generator(tmp_path, nn.Linear(2, 2), metadata={})


def test_metadata_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="plain JSON"):
        save_generator(tmp_path, _model(), metadata={"t": torch.ones(1)})
    with pytest.raises(CheckpointError, match="plain JSON"):
        save_generator(tmp_path, _model(), metadata={"x": float("nan")})
    assert not list(tmp_path.iterdir())


def test_map_location(saved: tuple[Path, Generator]) -> None:
    loaded, _ = load_generator(saved[0], map_location=torch.device("cpu"))
    assert all(p.device.type == "cpu" for p in loaded.parameters())


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda d: d.update(format="something-else"), "format is 'something-else'"),
        (lambda d: d.update(version=2), "unsupported checkpoint version 2"),
        (lambda d: d["config"].update(channels=[4]), r"unknown \['channels'\]"),
        (lambda d: d["config"].pop("cond_dim"), r"missing \['cond_dim'\]"),
        (lambda d: d["config"].update(down_kernel=3), "invalid config: .*even"),
        (lambda d: d.pop("metadata"), r"missing \['metadata'\]"),
        (lambda d: d.update(tensors_sha256="0" * 64), "sha256 differs"),
    ],
    ids=[
        "format",
        "version",
        "unknown-key",
        "missing-key",
        "bad-value",
        "no-metadata",
        "wrong-hash",
    ],
)
def test_bad_json_rejected(saved: tuple[Path, Generator], edit, match: str) -> None:  # type: ignore[no-untyped-def]
    ckpt, _ = saved
    _rewrite_json(ckpt, edit)
    with pytest.raises(CheckpointError, match=match):
        load_generator(ckpt)


def test_config_not_matching_tensors_rejected(saved: tuple[Path, Generator]) -> None:
    ckpt, _ = saved

    def widen(doc: dict) -> None:
        doc["config"]["channels_per_scale"] = [4, 8, 16]

    _rewrite_json(ckpt, widen)  # the hash still matches: the tensors file is untouched
    with pytest.raises(CheckpointError, match=r"tensors do not match the config: .*shape mismatch"):
        load_generator(ckpt)


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "integer"])
def test_tensor_mismatch_rejected(tmp_path: Path, change: str) -> None:
    model = _model()
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    if change == "missing":
        del tensors["condition.output.bias"]
    elif change == "extra":
        tensors["bonus.weight"] = torch.zeros(1)
    elif change == "shape":
        tensors["head.weight"] = torch.zeros(4, 3, 5, 5)
    else:
        tensors["head.bias"] = torch.zeros(4, dtype=torch.int64)
    doc = {"format": "cugan-generator", "version": 1, "config": TINY.to_dict(), "metadata": {}}
    path = tmp_path / "g.safetensors"
    safetensors.torch.save_file(tensors, str(path), metadata={"cugan_generator": json.dumps(doc)})
    expected = {
        "missing": r"missing \[condition\.output\.bias\]",
        "extra": r"unexpected \[bonus\.weight\]",
        "shape": r"shape mismatch \[head\.weight \[4, 3, 5, 5\] != \[4, 3, 3, 3\]\]",
        "integer": r"not floating point \[head\.bias\]",
    }[change]
    with pytest.raises(CheckpointError, match=expected):
        load_generator(path)


def test_corrupted_files_rejected(saved: tuple[Path, Generator], tmp_path: Path) -> None:
    ckpt, _ = saved
    (ckpt / JSON_NAME).write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_generator(ckpt)
    (ckpt / JSON_NAME).unlink()
    data = (ckpt / TENSORS_NAME).read_bytes()
    (ckpt / TENSORS_NAME).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_generator(ckpt)
    (ckpt / TENSORS_NAME).write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_generator(ckpt)


def test_foreign_files_rejected(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        load_generator(tmp_path / "nope")
    with pytest.raises(CheckpointError, match=r"no generator\.safetensors"):
        load_generator(tmp_path)
    pth = tmp_path / "CUGAN.pth"
    pth.write_bytes(b"PK")
    with pytest.raises(CheckpointError, match="import-official"):
        load_generator(pth)
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"w": torch.ones(1)}, str(plain))
    with pytest.raises(CheckpointError, match="not a CUGAN generator checkpoint"):
        load_generator(plain)


def test_error_messages_are_one_line(saved: tuple[Path, Generator]) -> None:
    ckpt, _ = saved
    _rewrite_json(ckpt, lambda d: d.update(version=9))
    with pytest.raises(CheckpointError) as info:
        load_generator(ckpt)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# the z scale a checkpoint records (pipeline.condition)


def test_checkpoint_records_its_condition_scale(tmp_path):
    from pipeline.checkpoint import load_checkpoint
    from pipeline.condition import ConditionScale

    model = Generator(GeneratorConfig(blocks_per_scale=(1,), channels_per_scale=(4,)))
    scale = ConditionScale(blur_max=3.0, noise_max=75.0)
    save_generator(tmp_path, model, metadata={}, scale=scale)
    doc = json.loads((tmp_path / "generator.json").read_text())
    assert doc["condition_scale"] == {"blur_max": 3.0, "noise_max": 75.0}
    loaded = load_checkpoint(tmp_path)
    assert loaded.scale == scale and loaded.path == tmp_path
    # the safetensors header carries the same document: the file alone knows its scale
    assert load_checkpoint(tmp_path / "generator.safetensors").scale == scale


def test_checkpoint_without_a_scale_uses_the_method_default_with_a_note(tmp_path, caplog):
    import hashlib

    from pipeline.checkpoint import load_checkpoint
    from pipeline.condition import DEFAULT_SCALE

    model = Generator(GeneratorConfig(blocks_per_scale=(1,), channels_per_scale=(4,)))
    save_generator(tmp_path, model, metadata={})
    sidecar = tmp_path / "generator.json"
    doc = json.loads(sidecar.read_text())
    del doc["condition_scale"]  # as written before the key existed
    doc["tensors_sha256"] = hashlib.sha256(
        (tmp_path / "generator.safetensors").read_bytes()
    ).hexdigest()
    sidecar.write_text(json.dumps(doc))
    with caplog.at_level("INFO", logger="pipeline.checkpoint"):
        loaded = load_checkpoint(tmp_path)
    assert loaded.scale == DEFAULT_SCALE
    assert "no condition_scale recorded" in caplog.text


def test_checkpoint_with_a_bad_scale_is_one_error(tmp_path):
    import hashlib

    model = Generator(GeneratorConfig(blocks_per_scale=(1,), channels_per_scale=(4,)))
    save_generator(tmp_path, model, metadata={})
    sidecar = tmp_path / "generator.json"
    doc = json.loads(sidecar.read_text())
    doc["condition_scale"] = {"blur_max": -1.0, "noise_max": 50.0}
    doc["tensors_sha256"] = hashlib.sha256(
        (tmp_path / "generator.safetensors").read_bytes()
    ).hexdigest()
    sidecar.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="invalid condition_scale: blur_max"):
        load_generator(tmp_path)
