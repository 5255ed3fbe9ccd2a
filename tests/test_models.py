import pytest
import torch
from torch import nn

from imgcls.errors import ConfigError
from imgcls.models import MODELS, build_model
from imgcls.profile import count_flops, count_parameters, profile_architecture


@pytest.mark.parametrize("name", MODELS.names())
@pytest.mark.parametrize("channels", [1, 3])
def test_every_architecture_adapts_to_classes_and_channels(name: str, channels: int) -> None:
    size = MODELS.entry(name).meta["min_image_size"]
    model = build_model(name, num_classes=5, in_channels=channels, dropout=0.3).eval()
    assert model(torch.zeros(2, channels, size, size)).shape == (2, 5)
    assert any(isinstance(m, nn.Dropout) and m.p == 0.3 for m in model.modules())


@pytest.mark.parametrize("name", [e.name for e in MODELS if e.meta["min_image_size"] > 8])
def test_the_image_size_floor_is_real(name: str) -> None:
    # metadata is checked, not trusted: below the floor the network does break
    size = MODELS.entry(name).meta["min_image_size"] // 2
    model = build_model(name, num_classes=2).eval()
    with pytest.raises(RuntimeError):
        model(torch.zeros(1, 3, size, size))
    with pytest.raises(ConfigError, match=rf"{name} needs images of at least {size * 2}px"):
        build_model(name, num_classes=2, image_size=size)


def test_resnet50_matches_its_published_size() -> None:
    profile = profile_architecture("resnet50", num_classes=2, in_channels=3, image_size=224)
    assert profile.params == 23_512_130  # the published figure for a 2-class ResNet-50
    # torchvision documents 4.09 GFLOPS (counted as multiply-accumulates) at 224x224
    assert abs(profile.macs / 1e9 - 4.09) < 0.01
    assert profile.flops == 2 * profile.macs


def test_flops_are_counted_not_estimated() -> None:
    conv = nn.Conv2d(1, 4, 3, padding=1, bias=False)
    # 8x8 outputs x 4 channels x (3x3x1) multiply-accumulates, two FLOPs each
    assert count_flops(conv, (1, 1, 8, 8)) == 2 * 8 * 8 * 4 * 9
    assert count_parameters(conv) == 36


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"unknown architecture 'resnet'.*known: .*resnet18"):
        build_model("resnet", num_classes=2)
