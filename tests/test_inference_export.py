"""ONNX export (``cugan export --format onnx``): parity with PyTorch in ONNX Runtime, dynamic
sizes, z as an input, alpha baked in, metadata, one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from models.dni import blend_generators
from models.generator import Generator, GeneratorConfig
from models.registry import build_generator
from pipeline.checkpoint import TENSORS_NAME, file_sha256, save_generator
from pipeline.cli.main import main
from pipeline.condition import ConditionScale
from pipeline.degradation import to_uint8
from pipeline.inference import export_onnx
from pipeline.inference.export import read_onnx_metadata


def _trained_like(cfg: str | GeneratorConfig = "tiny", seed: int = 0) -> Generator:
    model = build_generator(cfg, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model.eval()


def _run(session: ort.InferenceSession, x: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    feeds = {"x": x.numpy()}
    if z is not None:
        feeds["z"] = z.numpy()
    return torch.from_numpy(session.run(None, feeds)[0])


def _assert_parity(model: Generator, session: ort.InferenceSession, h: int, w: int, z) -> None:
    x = torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(h * w))
    with torch.inference_mode():
        ref = model(x, z)
    out = _run(session, x, z)
    assert out.shape == ref.shape
    # float32 reassociation: relative to the output's magnitude (an unconditional model with
    # these weights reaches |y| ~ 60)
    assert float((out - ref).abs().max()) < 1e-4 * max(1.0, float(ref.abs().max()))
    assert np.abs(to_uint8(out).astype(int) - to_uint8(ref).astype(int)).max() <= 1


def test_export_matches_pytorch_at_dynamic_sizes_with_z_as_input(tmp_path: Path) -> None:
    model = _trained_like()
    report = export_onnx(model, tmp_path / "g.onnx", metadata={"alpha": None})
    assert report.max_abs_diff < 1e-4 and report.max_8bit_diff <= 1
    session = ort.InferenceSession(str(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x", "z"]
    for h, w in ((16, 16), (28, 44), (64, 36)):  # multiples of 4, none the export example's
        for z in ([[0.0, 0.0]], [[0.5, 0.6]], [[1.0, 0.2]]):
            _assert_parity(model, session, h, w, torch.tensor(z))
    # z really is an input: different z, different output
    x = torch.rand(1, 3, 16, 16)
    a = _run(session, x, torch.tensor([[0.0, 0.0]]))
    b = _run(session, x, torch.tensor([[1.0, 1.0]]))
    assert float((a - b).abs().max()) > 1e-3
    # batch is dynamic too
    xb = torch.rand(2, 3, 16, 20)
    zb = torch.tensor([[0.1, 0.9], [0.9, 0.1]])
    with torch.inference_mode():
        assert float((_run(session, xb, zb) - model(xb, zb)).abs().max()) < 1e-4


def test_unconditional_model_exports_without_z(tmp_path: Path) -> None:
    cfg = GeneratorConfig(blocks_per_scale=(1, 1), channels_per_scale=(4, 8), conditional=False)
    model = _trained_like(cfg)
    export_onnx(model, tmp_path / "u.onnx", metadata={})
    session = ort.InferenceSession(str(tmp_path / "u.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    _assert_parity(model, session, 14, 22, None)


@pytest.fixture
def checkpoints(tmp_path: Path) -> dict[str, Path]:
    scale = ConditionScale(blur_max=4.0, noise_max=50.0)
    return {
        "mse": save_generator(tmp_path / "mse", _trained_like(seed=1), metadata={}, scale=scale),
        "gan": save_generator(tmp_path / "gan", _trained_like(seed=2), metadata={}, scale=scale),
    }


def test_cli_export_of_one_model(capsys, tmp_path: Path, checkpoints) -> None:
    out = tmp_path / "m.onnx"
    assert main(["export", "--format", "onnx", str(out), "--model", str(checkpoints["mse"])]) == 0
    assert "verified the export" in capsys.readouterr().err
    meta = read_onnx_metadata(out)
    assert meta["config"] == build_generator("tiny").config.to_dict()
    assert meta["z_scale"] == {"blur_max": 4.0, "noise_max": 50.0}
    assert meta["alpha"] is None and meta["size_multiple"] == 4
    (source,) = meta["sources"]
    assert source["sha256"] == file_sha256(checkpoints["mse"] / TENSORS_NAME)
    assert meta["verification"]["max_8bit_diff"] <= 1


def test_cli_export_bakes_in_alpha(tmp_path: Path, checkpoints) -> None:
    out = tmp_path / "blend.onnx"
    argv = ["export", str(out), "--alpha", "0.3"]
    argv += ["--mse-model", str(checkpoints["mse"]), "--gan-model", str(checkpoints["gan"])]
    assert main(argv) == 0
    meta = read_onnx_metadata(out)
    assert meta["alpha"] == 0.3 and [s["role"] for s in meta["sources"]] == [
        "mse_model",
        "gan_model",
    ]
    blended = blend_generators(_trained_like(seed=1), _trained_like(seed=2), 0.3).eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    _assert_parity(blended, session, 20, 24, torch.tensor([[0.5, 0.6]]))


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["out.txt", "--model", "{mse}"], "must be an .onnx file"),
        (["nodir/out.onnx", "--model", "{mse}"], "existing directory"),
        (["out.onnx"], "no model given"),
        (["out.onnx", "--model", "{missing}"], "no such checkpoint"),
    ],
)
def test_cli_export_errors_are_one_line(capsys, tmp_path, checkpoints, argv, words) -> None:
    subs = {"mse": str(checkpoints["mse"]), "missing": str(tmp_path / "nope")}
    argv = [str(tmp_path / a) if a.startswith(("out", "nodir")) else a.format(**subs) for a in argv]
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cugan: error:") and words in err and err.count("\n") == 1
    assert not list(tmp_path.glob("*.onnx"))
