"""Import of the authors' .pth, checked against an independent re-statement of their layout.

``_OfficialLayout`` below is written from the description of the authors' ``CUGAN_arch.py`` key
names and forward order (docs/cugan-method.md and pipeline/official.py's docstring), not copied:
it has their attribute names, so its ``state_dict()`` has their keys, and a straightforward
three-stage forward that does not share any code with ``models.generator``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.generator import GeneratorConfig
from models.registry import GENERATOR_CONFIGS
from pipeline.checkpoint import CheckpointError, load_generator
from pipeline.official import (
    OfficialImportError,
    convert_official_state_dict,
    import_official,
    infer_official_config,
    load_official_state_dict,
)

BLOCKS = (2, 1, 1)
CHANNELS = (4, 8, 8)


class _RefBlock(nn.Module):
    def __init__(self, nf: int, cond_dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv2 = nn.Conv2d(nf, nf, 3, 1, 1)
        self.local_scale = nn.Linear(cond_dim, nf)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale = self.local_scale(cond).view(x.shape[0], -1, 1, 1)
        return x + self.conv2(F.relu(self.conv1(x))) * scale


class _OfficialLayout(nn.Module):
    """The authors' generator, restated with their attribute names (three stages)."""

    def __init__(
        self, nb: tuple[int, int, int], nf: tuple[int, int, int], cond_dim: int = 2
    ) -> None:
        super().__init__()
        self.conv_stage1_left = nn.Conv2d(3, nf[0], 3, 1, 1)
        self.conv_stage2_left = nn.Conv2d(nf[0], nf[1], 2, 2, 0)
        self.conv_stage3_left = nn.Conv2d(nf[1], nf[2], 2, 2, 0)
        self.conv_stage3_right = nn.ConvTranspose2d(nf[2], nf[1], 2, 2)
        self.conv_stage2_right = nn.ConvTranspose2d(nf[1], nf[0], 2, 2)
        self.conv_stage1_right = nn.Conv2d(nf[0], 3, 3, 1, 1)
        self.stage3_scale = nn.Linear(cond_dim, nf[1])
        self.stage2_scale = nn.Linear(cond_dim, nf[0])
        self.stage1_scale = nn.Linear(cond_dim, 3)
        for stage in range(3):
            for side in ("left", "right"):
                blocks = nn.ModuleList(_RefBlock(nf[stage], cond_dim) for _ in range(nb[stage]))
                setattr(self, f"CResBlocks_stage{stage + 1}_{side}", blocks)

    @staticmethod
    def _run(blocks: nn.ModuleList, x: Tensor, cond: Tensor) -> Tensor:
        for block in blocks:
            x = block(x, cond)
        return x

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        s1_left = self._run(self.CResBlocks_stage1_left, self.conv_stage1_left(x), cond)
        s2_left = self._run(self.CResBlocks_stage2_left, self.conv_stage2_left(s1_left), cond)
        s3_left = self._run(self.CResBlocks_stage3_left, self.conv_stage3_left(s2_left), cond)
        s3_up = self.conv_stage3_right(self._run(self.CResBlocks_stage3_right, s3_left, cond))
        s2_left = s2_left + self.stage3_scale(cond)[:, :, None, None] * s3_up
        s2_up = self.conv_stage2_right(self._run(self.CResBlocks_stage2_right, s2_left, cond))
        s1_left = s1_left + self.stage2_scale(cond)[:, :, None, None] * s2_up
        out = self.conv_stage1_right(self._run(self.CResBlocks_stage1_right, s1_left, cond))
        return x + self.stage1_scale(cond)[:, :, None, None] * out


@pytest.fixture()
def reference() -> _OfficialLayout:
    model = _OfficialLayout(BLOCKS, CHANNELS).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _save(sd: dict, path: Path) -> Path:
    torch.save(sd, path)
    return path


def test_import_matches_reference_outputs(reference: _OfficialLayout, tmp_path: Path) -> None:
    pth = _save(reference.state_dict(), tmp_path / "CUGAN.pth")
    out = import_official(pth, tmp_path / "converted")
    model, metadata = load_generator(out)
    assert model.config == GeneratorConfig(blocks_per_scale=BLOCKS, channels_per_scale=CHANNELS)
    assert metadata["source_file"] == "CUGAN.pth"
    assert metadata["source_sha256"] == hashlib.sha256(pth.read_bytes()).hexdigest()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 3, 12, 8, generator=g)
    zs = [
        torch.rand(4, 2, generator=g),
        torch.zeros(4, 2),
        torch.ones(4, 2),
        torch.tensor([[0.25, 0.6]] * 4),
    ]
    with torch.no_grad():
        for z in zs:
            expected = reference(x, z)
            got = model(x, z)
            assert (expected - x).abs().max() > 1e-3 or not z.any()  # the network does something
            torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_every_key_is_mapped_once(reference: _OfficialLayout) -> None:
    sd = reference.state_dict()
    converted = convert_official_state_dict(sd)
    assert len(converted) == len(sd)
    assert "condition.fusion.1.weight" in converted and "up.1.weight" in converted
    assert torch.equal(converted["condition.fusion.1.weight"], sd["stage3_scale.weight"])
    assert torch.equal(converted["up.0.weight"], sd["conv_stage2_right.weight"])
    assert torch.equal(converted["condition.output.bias"], sd["stage1_scale.bias"])
    assert torch.equal(
        converted["right.0.1.conv2.weight"], sd["CResBlocks_stage1_right.1.conv2.weight"]
    )


def test_module_prefix_is_stripped(reference: _OfficialLayout, tmp_path: Path) -> None:
    wrapped = {f"module.{k}": v for k, v in reference.state_dict().items()}
    pth = _save(wrapped, tmp_path / "dp.pth")
    model, _ = load_generator(import_official(pth, tmp_path / "out"))
    x, z = torch.rand(1, 3, 8, 8), torch.rand(1, 2)
    with torch.no_grad():
        torch.testing.assert_close(model(x, z), reference(x, z), atol=1e-6, rtol=1e-6)


def test_authors_config_is_inferred_from_real_layout() -> None:
    sd = _OfficialLayout((2, 2, 2), (64, 128, 256)).state_dict()
    assert infer_official_config(sd) == GENERATOR_CONFIGS["authors"]
    assert len(convert_official_state_dict(sd)) == len(sd) == 90


@pytest.mark.parametrize(
    "change,match",
    [
        ("missing", r"missing \[CResBlocks_stage2_right\.0\.conv2\.weight\]"),
        ("extra", r"unexpected \[CResBlocks_stage1_left\.0\.conv3\.weight, extra_layer\.bias\]"),
        ("shape", r"shape mismatch \[stage3_scale\.weight \[5, 2\] != \[8, 2\]\]"),
    ],
)
def test_key_problems_give_one_clear_error(
    reference: _OfficialLayout, tmp_path: Path, change: str, match: str
) -> None:
    sd = reference.state_dict()
    if change == "missing":
        del sd["CResBlocks_stage2_right.0.conv2.weight"]
    elif change == "extra":
        sd["extra_layer.bias"] = torch.zeros(3)
        sd["CResBlocks_stage1_left.0.conv3.weight"] = torch.zeros(4, 4, 3, 3)
    else:
        sd["stage3_scale.weight"] = torch.zeros(5, 2)
    with pytest.raises(OfficialImportError, match=match) as info:
        convert_official_state_dict(sd)
    assert "\n" not in str(info.value)
    pth = _save(sd, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError, match=match):  # OfficialImportError is a CheckpointError
        import_official(pth, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_key_needed_for_inference_still_listed(reference: _OfficialLayout) -> None:
    sd = reference.state_dict()
    del sd["conv_stage1_left.weight"]
    with pytest.raises(OfficialImportError, match=r"missing \[conv_stage1_left\.weight\]"):
        convert_official_state_dict(sd)


def test_all_problems_reported_together(reference: _OfficialLayout) -> None:
    sd = reference.state_dict()
    del sd["conv_stage1_right.bias"]
    sd["bogus"] = torch.zeros(1)
    sd["conv_stage2_left.bias"] = torch.zeros(9)
    cfg = GeneratorConfig(blocks_per_scale=BLOCKS, channels_per_scale=CHANNELS)
    with pytest.raises(OfficialImportError) as info:
        convert_official_state_dict(sd, cfg)
    message = str(info.value)
    assert "missing [conv_stage1_right.bias]" in message
    assert "unexpected [bogus]" in message
    assert "conv_stage2_left.bias [9] != [8]" in message


def test_explicit_config_must_match(reference: _OfficialLayout) -> None:
    wrong = GeneratorConfig(blocks_per_scale=(1, 1, 1), channels_per_scale=CHANNELS)
    with pytest.raises(
        OfficialImportError, match=r"unexpected \[CResBlocks_stage1_left\.1\.conv1\.bias"
    ):
        convert_official_state_dict(reference.state_dict(), wrong)
    with pytest.raises(OfficialImportError, match="3 scales"):
        convert_official_state_dict(reference.state_dict(), GENERATOR_CONFIGS["cugan-2"])


def test_non_flat_or_non_tensor_files_rejected(reference: _OfficialLayout, tmp_path: Path) -> None:
    nested = _save({"params": reference.state_dict()}, tmp_path / "nested.pth")
    with pytest.raises(
        OfficialImportError, match=r"not a flat str -> Tensor state dict.*nested under \['params'\]"
    ):
        load_official_state_dict(nested)
    mixed = _save({"iteration": 5, **reference.state_dict()}, tmp_path / "mixed.pth")
    with pytest.raises(OfficialImportError, match=r"offending keys \['iteration'\]"):
        load_official_state_dict(mixed)
    listed = _save([torch.ones(1)], tmp_path / "list.pth")
    with pytest.raises(OfficialImportError, match="got list"):
        load_official_state_dict(listed)


class _NotAllowed:
    """A pickled object of an arbitrary class: weights_only loading must refuse it."""

    def __init__(self) -> None:
        self.payload = 1


def test_arbitrary_pickles_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.pth"
    torch.save({"conv_stage1_left.weight": _NotAllowed()}, evil)
    with pytest.raises(OfficialImportError, match="not a loadable weights-only PyTorch file"):
        load_official_state_dict(evil)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(OfficialImportError, match="not a loadable weights-only PyTorch file"):
        load_official_state_dict(junk)
    with pytest.raises(OfficialImportError, match="no such file"):
        load_official_state_dict(tmp_path / "missing.pth")
