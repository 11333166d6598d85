"""Backbone weight resolution: modes, cache lookup, hash checks, atomic download (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import pytest
import torch

import pipeline.pretrained as pretrained
from pipeline.pretrained import (
    BACKBONES,
    PretrainedWeightsInvalid,
    PretrainedWeightsMissing,
    WeightsDownloadError,
    download_weights,
    resolve_backbone,
    weights_dir,
)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """No test may see the user's caches or reach the network."""
    hub = tmp_path / "hub" / "checkpoints"
    monkeypatch.setattr(pretrained, "_hub_checkpoints_dir", lambda: hub)
    monkeypatch.delenv(pretrained.ENV_WEIGHTS_DIR, raising=False)

    def no_network(*_, **__):
        raise AssertionError("tests must not open URLs")

    monkeypatch.setattr(pretrained.urllib.request, "urlopen", no_network)


@pytest.fixture
def failing_download(monkeypatch):
    calls = []

    def fail(spec, dest_dir, **_):
        calls.append((spec.name, dest_dir))
        raise WeightsDownloadError(f"download of {spec.url} failed: offline (test)")

    monkeypatch.setattr(pretrained, "download_weights", fail)
    return calls


def _fake_weights(path: Path, value: float = 1.0) -> dict[str, torch.Tensor]:
    state = {"features.0.weight": torch.full((2, 3), value), "features.0.bias": torch.zeros(2)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return state


def _expect(monkeypatch, name: str, path: Path) -> None:
    """Make ``path`` the expected file of ``name`` (its real sha256 and size)."""
    data = path.read_bytes()
    spec = dataclasses.replace(
        BACKBONES[name], sha256=hashlib.sha256(data).hexdigest(), size=len(data)
    )
    monkeypatch.setitem(BACKBONES, name, spec)


def test_specs_are_the_torchvision_files() -> None:
    for name, spec in BACKBONES.items():
        assert spec.url == f"https://download.pytorch.org/models/{spec.filename}"
        assert spec.filename.startswith(name)
        prefix = spec.filename.rsplit("-", 1)[1].removesuffix(".pth")
        assert spec.sha256.startswith(prefix) and len(spec.sha256) == 64


def test_random_mode_touches_nothing(monkeypatch, failing_download) -> None:
    monkeypatch.setattr(pretrained, "weights_dir", lambda *_: pytest.fail("looked for files"))
    for name in BACKBONES:
        w = resolve_backbone(name, "random")
        assert w.is_random and w.state_dict is None and w.path is None
        assert "RANDOM" in w.label and name in w.label
    assert failing_download == []


def test_auto_falls_back_with_warning(tmp_path, caplog, failing_download) -> None:
    with caplog.at_level(logging.WARNING, logger="pipeline.pretrained"):
        w = resolve_backbone("vgg19", "auto", cache_dir=tmp_path / "cache")
    assert w.is_random and w.state_dict is None
    assert failing_download == [("vgg19", tmp_path / "cache")]
    text = caplog.text
    assert "RANDOM VGG19 WEIGHTS" in text and "NOT comparable" in text
    assert BACKBONES["vgg19"].url in text and "vgg19-dcbb9e9d.pth" in text
    assert str(tmp_path / "cache") in text


def test_imagenet_mode_raises_one_line(tmp_path, failing_download) -> None:
    with pytest.raises(PretrainedWeightsMissing) as info:
        resolve_backbone("alexnet", "imagenet", cache_dir=tmp_path)
    message = str(info.value)
    assert "\n" not in message
    assert "alexnet-owt-7be5be79.pth" in message
    assert "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth" in message
    assert str(tmp_path) in message
    assert not isinstance(info.value, PretrainedWeightsInvalid)


def test_download_disabled(tmp_path, failing_download) -> None:
    with pytest.raises(PretrainedWeightsMissing, match="download disabled"):
        resolve_backbone("vgg16", "imagenet", cache_dir=tmp_path, download=False)
    assert failing_download == []


def test_verified_file_in_cache_is_used(monkeypatch, tmp_path, failing_download) -> None:
    path = tmp_path / BACKBONES["vgg19"].filename
    state = _fake_weights(path)
    _expect(monkeypatch, "vgg19", path)
    for mode in ("imagenet", "auto"):
        w = resolve_backbone("vgg19", mode, cache_dir=tmp_path)
        assert not w.is_random and w.path == path and "RANDOM" not in w.label
        assert w.state_dict.keys() == state.keys()
        assert all(torch.equal(w.state_dict[k], state[k]) for k in state)
    assert failing_download == []


def test_env_dir_and_hub_dir_are_searched(monkeypatch, tmp_path, failing_download) -> None:
    env_dir = tmp_path / "env"
    path = env_dir / BACKBONES["alexnet"].filename
    _fake_weights(path)
    _expect(monkeypatch, "alexnet", path)
    monkeypatch.setenv(pretrained.ENV_WEIGHTS_DIR, str(env_dir))
    assert resolve_backbone("alexnet", "imagenet").path == path

    hub_path = tmp_path / "hub" / "checkpoints" / BACKBONES["alexnet"].filename
    hub_path.parent.mkdir(parents=True)
    hub_path.write_bytes(path.read_bytes())
    assert resolve_backbone("alexnet", "imagenet", cache_dir=tmp_path / "empty").path == hub_path


def test_weights_dir_precedence(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert weights_dir() == tmp_path / "home" / ".cache" / "cugan" / "weights"
    monkeypatch.setenv(pretrained.ENV_WEIGHTS_DIR, str(tmp_path / "env"))
    assert weights_dir() == tmp_path / "env"
    assert weights_dir(tmp_path / "arg") == tmp_path / "arg"


def test_wrong_hash_is_rejected(monkeypatch, tmp_path, caplog, failing_download) -> None:
    good = tmp_path / "good.pth"
    _fake_weights(good, 1.0)
    _expect(monkeypatch, "vgg16", good)
    bad = tmp_path / "cache" / BACKBONES["vgg16"].filename
    bad.parent.mkdir()
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped: only the hash can tell
    bad.write_bytes(bytes(data))

    with pytest.raises(PretrainedWeightsInvalid) as info:
        resolve_backbone("vgg16", "imagenet", cache_dir=tmp_path / "cache")
    assert "sha256" in str(info.value) and "\n" not in str(info.value)
    with caplog.at_level(logging.WARNING, logger="pipeline.pretrained"):
        w = resolve_backbone("vgg16", "auto", cache_dir=tmp_path / "cache")
    assert w.is_random and "RANDOM VGG16 WEIGHTS" in caplog.text
    assert bad.exists()  # a user's file is reported, never deleted

    truncated = tmp_path / "trunc" / BACKBONES["vgg16"].filename
    truncated.parent.mkdir()
    truncated.write_bytes(good.read_bytes()[:-10])
    with pytest.raises(PretrainedWeightsInvalid, match="bytes"):
        resolve_backbone("vgg16", "imagenet", cache_dir=truncated.parent)


def test_hash_matching_non_state_dict_is_rejected(monkeypatch, tmp_path, failing_download) -> None:
    path = tmp_path / BACKBONES["vgg19"].filename
    torch.save({"note": "not weights"}, path)
    _expect(monkeypatch, "vgg19", path)
    with pytest.raises(PretrainedWeightsInvalid, match="state dict"):
        resolve_backbone("vgg19", "imagenet", cache_dir=tmp_path)


def test_download_is_atomic_and_verified(monkeypatch, tmp_path) -> None:
    """The real download function, fed from a file:// URL (urllib, no network)."""
    source = tmp_path / "server" / "weights.pth"
    state = _fake_weights(source)
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", _file_urlopen)
    good = dataclasses.replace(
        BACKBONES["alexnet"],
        url=source.as_uri(),
        sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
        size=source.stat().st_size,
    )
    dest = tmp_path / "cache"
    path = download_weights(good, dest)
    assert path == dest / good.filename
    assert sorted(p.name for p in dest.iterdir()) == [good.filename]
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["features.0.weight"], state["features.0.weight"])

    bad_dest = tmp_path / "bad"
    wrong = dataclasses.replace(good, sha256="0" * 64)
    with pytest.raises(WeightsDownloadError, match="sha256"):
        download_weights(wrong, bad_dest)
    assert list(bad_dest.iterdir()) == []  # no partial or unverified file left

    missing = dataclasses.replace(good, url=(tmp_path / "nowhere.pth").as_uri())
    with pytest.raises(WeightsDownloadError, match="failed"):
        download_weights(missing, bad_dest)
    assert list(bad_dest.iterdir()) == []


def test_auto_mode_downloads_into_cache(monkeypatch, tmp_path) -> None:
    source = tmp_path / "server" / "weights.pth"
    _fake_weights(source)
    spec = dataclasses.replace(
        BACKBONES["vgg19"],
        url=source.as_uri(),
        sha256=hashlib.sha256(source.read_bytes()).hexdigest(),
        size=source.stat().st_size,
    )
    monkeypatch.setitem(BACKBONES, "vgg19", spec)
    monkeypatch.setattr(pretrained.urllib.request, "urlopen", _file_urlopen)
    w = resolve_backbone("vgg19", "auto", cache_dir=tmp_path / "cache")
    assert not w.is_random and w.path == tmp_path / "cache" / spec.filename


def _file_urlopen(url, timeout=None):
    assert url.startswith("file://"), url
    import urllib.request as request

    return request.build_opener(request.FileHandler()).open(url, timeout=timeout)


@pytest.mark.parametrize(("name", "mode"), [("resnet50", "auto"), ("vgg19", "pretrained")])
def test_bad_arguments(name: str, mode: str) -> None:
    with pytest.raises(ValueError):
        resolve_backbone(name, mode)  # type: ignore[arg-type]
