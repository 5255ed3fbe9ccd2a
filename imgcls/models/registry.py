"""Architectures by name: `build_model("resnet18", num_classes=2, in_channels=1, dropout=0.2)`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from imgcls.errors import ConfigError
from imgcls.registry import Registry

# builder(num_classes, in_channels, dropout) -> model producing (N, num_classes) logits
Builder = Callable[[int, int, float], nn.Module]

MODELS: Registry[Builder] = Registry("architecture")


def register_model(name: str, *, min_image_size: int, why: str) -> Callable[[Builder], Builder]:
    """Register a builder. `min_image_size` is the smallest side its downsampling survives."""
    return MODELS.register(name, min_image_size=min_image_size, why=why)


def check_image_size(name: str, image_size: int) -> None:
    entry = MODELS.entry(name)
    smallest = entry.meta["min_image_size"]
    if image_size < smallest:
        raise ConfigError(
            f"{name} needs images of at least {smallest}px ({entry.meta['why']}); "
            f"the study uses {image_size}px"
        )


def build_model(name: str, num_classes: int, in_channels: int = 3, dropout: float = 0.0,
                image_size: int | None = None) -> nn.Module:
    """A freshly initialised `name`, adapted to the classes, the input channels and dropout."""
    builder = MODELS.get(name)
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, not {num_classes}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), not {dropout}")
    if image_size is not None:
        check_image_size(name, image_size)
    return builder(num_classes, in_channels, dropout)


def classifier_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout then a linear layer. Always the same two modules, so that state_dict keys do not
    depend on whether dropout is zero."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


def with_in_channels(conv: nn.Conv2d, in_channels: int) -> nn.Conv2d:
    """`conv`, or a freshly initialised copy of it that takes `in_channels` inputs."""
    if conv.in_channels == in_channels:
        return conv
    return nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
