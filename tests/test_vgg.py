"""VGG19 feature extractor: layer index, shapes, frozen state, torchvision state-dict loading."""

from __future__ import annotations

import pytest
import torch
import torchvision

from models.vgg import BackboneStateDictError, VGGFeatureExtractor, vgg19_layer_names


@pytest.fixture(scope="module")
def extractor() -> VGGFeatureExtractor:
    return VGGFeatureExtractor(generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def torchvision_vgg() -> torch.nn.Module:
    """A random-weight torchvision VGG19 (built once: the full model takes seconds on a CPU)."""
    torch.manual_seed(123)
    return torchvision.models.vgg19(weights=None).eval()


@pytest.fixture(scope="module")
def torchvision_state_dict(torchvision_vgg: torch.nn.Module) -> dict[str, torch.Tensor]:
    return torchvision_vgg.state_dict()


def test_conv5_4_is_torchvision_index_34(extractor: VGGFeatureExtractor) -> None:
    assert extractor.layer_index == 34
    assert len(extractor.features) == 35
    last = extractor.features[-1]
    assert isinstance(last, torch.nn.Conv2d) and last.in_channels == last.out_channels == 512
    with torch.device("meta"):
        names = vgg19_layer_names(torchvision.models.vgg19(weights=None).features)
    assert names[34] == "conv5_4" and names[35] == "relu5_4"
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]


def test_output_is_before_relu(extractor: VGGFeatureExtractor) -> None:
    feats = extractor(torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    assert feats.shape == (2, 512, 4, 4)
    assert (feats < 0).any()  # a ReLU output would be non-negative


def test_other_layer_and_unknown_layer() -> None:
    small = VGGFeatureExtractor("relu2_2", use_input_norm=False)
    assert small.layer_index == 8
    assert small(torch.rand(1, 3, 32, 32)).shape == (1, 128, 16, 16)
    with pytest.raises(ValueError, match="unknown VGG19 layer 'conv6_1'"):
        VGGFeatureExtractor("conv6_1")


def test_frozen_but_passes_input_gradients(extractor: VGGFeatureExtractor) -> None:
    assert not any(p.requires_grad for p in extractor.parameters())
    extractor.train()
    assert not extractor.training
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    extractor(x).abs().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in extractor.parameters())


def test_input_normalisation() -> None:
    plain = VGGFeatureExtractor("conv1_1", use_input_norm=False)
    normed = VGGFeatureExtractor("conv1_1", use_input_norm=True)
    normed.features.load_state_dict(plain.features.state_dict())
    x = torch.rand(1, 3, 8, 8)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(normed(x), plain((x - mean) / std), atol=1e-6)
    assert "mean" not in normed.state_dict()  # not part of the backbone weights


def test_load_backbone_state_dict_round_trip(
    extractor: VGGFeatureExtractor,
    torchvision_vgg: torch.nn.Module,
    torchvision_state_dict: dict[str, torch.Tensor],
) -> None:
    extractor.load_backbone_state_dict(torchvision_state_dict)
    for key, value in extractor.features.state_dict().items():
        assert torch.equal(value, torchvision_state_dict[f"features.{key}"])
    assert not any(p.requires_grad for p in extractor.parameters())
    # Same output as torchvision's own network truncated at the same index.
    reference = torchvision_vgg
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = reference.features[:35]((x - mean) / std)
        assert torch.allclose(extractor(x), expected, atol=1e-5)


def test_load_rejects_missing_and_misshapen(
    extractor: VGGFeatureExtractor, torchvision_state_dict: dict[str, torch.Tensor]
) -> None:
    sd = dict(torchvision_state_dict)
    del sd["features.34.bias"]
    with pytest.raises(BackboneStateDictError, match=r"missing \[features\.34\.bias\]"):
        extractor.load_backbone_state_dict(sd)
    sd = dict(torchvision_state_dict)
    sd["features.0.weight"] = torch.zeros(64, 1, 3, 3)
    with pytest.raises(BackboneStateDictError, match="shape mismatch"):
        extractor.load_backbone_state_dict(sd)


def test_truncated_extractor_ignores_later_layers(
    torchvision_state_dict: dict[str, torch.Tensor],
) -> None:
    small = VGGFeatureExtractor("conv2_1")
    assert small.needed_keys() == [
        f"features.{i}.{p}" for i in (0, 2, 5) for p in ("weight", "bias")
    ]
    sd = {
        k: v
        for k, v in torchvision_state_dict.items()
        if k.startswith("features.") and int(k.split(".")[1]) <= 5
    }
    small.load_backbone_state_dict(sd)  # no conv5_4 needed
    assert torch.equal(small.features[5].weight, torchvision_state_dict["features.5.weight"])
