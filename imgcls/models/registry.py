"""Architectures by name: `build_model("resnet18", num_classes=2, in_channels=1, dropout=0.2)`.

Each registered builder carries what the rest of the library needs to know without building it:
the image sizes it takes, where its classifier head is (the only part that trains when the
backbone is frozen) and which torchvision ImageNet weights `pretrained=True` loads, from a local
file only.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import torch
from torch import nn
from torchvision.models import WeightsEnum

from imgcls.errors import ConfigError
from imgcls.registry import Registry


class Builder(Protocol):
    """Makes a model producing (N, num_classes) logits for (N, in_channels, H, W) images.

    `image_size` is the side of the images it will see (None: the architecture's default; only
    models whose shape depends on it use it). `weights` is a local ImageNet state-dict file to
    start from, None for a fresh initialisation.
    """

    def __call__(self, num_classes: int, in_channels: int, dropout: float, *,
                 image_size: int | None, weights: Path | None) -> nn.Module: ...


MODELS: Registry[Builder] = Registry("architecture")


def register_model(name: str, *, min_image_size: int, why: str, head: str,
                   multiple_of: int = 1, weights: WeightsEnum | None = None
                   ) -> Callable[[Builder], Builder]:
    """Register a builder.

    min_image_size: the smallest image side (px) the network's downsampling survives.
    multiple_of: the image side (px) must be a multiple of it (a ViT's patch size); 1 = any.
    why: the reason for these limits, quoted when a size is refused.
    head: dotted path of the classifier head (dropout + linear) in the built model.
    weights: torchvision's ImageNet weights whose file `pretrained=True` loads; None = none.
    """
    return MODELS.register(name, min_image_size=min_image_size, multiple_of=multiple_of,
                           why=why, head=head, weights=weights)


def check_image_size(name: str, image_size: int) -> None:
    """Raise ConfigError, with the reason, when `name` cannot take `image_size`px images."""
    meta = MODELS.entry(name).meta
    if image_size < meta["min_image_size"]:
        need = f"images of at least {meta['min_image_size']}px"
    elif image_size % meta["multiple_of"]:
        need = f"an image side that is a multiple of {meta['multiple_of']}px"
    else:
        return
    raise ConfigError(f"{name} needs {need} ({meta['why']}); the study uses {image_size}px")


def build_model(name: str, num_classes: int, in_channels: int = 3, dropout: float = 0.0,
                image_size: int | None = None, *, pretrained: bool = False,
                freeze: bool = False, weights_dir: str | Path | None = None) -> nn.Module:
    """`name` adapted to the classes, the input channels and dropout.

    pretrained: start from torchvision's ImageNet weights, read from `weights_file(name,
        weights_dir)`; nothing is downloaded. With one input channel the first convolution's
        weights are summed over RGB, so a grey image gives what its RGB replica gave.
    freeze: only the head trains; every other parameter gets requires_grad=False. BatchNorm
        layers still update their running statistics in train mode.
    image_size: checked against the architecture's limits; a ViT is built for it (224 if None).
    """
    builder = MODELS.get(name)
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least 2 classes, not {num_classes}")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be at least 1, not {in_channels}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"dropout must be in [0, 1), not {dropout}")
    if image_size is not None:
        check_image_size(name, image_size)
    weights = None
    if pretrained:
        if in_channels not in (1, 3):
            raise ConfigError(f"pretrained {name} takes 1 (grey) or 3 (RGB) input channels, "
                              f"not {in_channels}; turn pretrained off for other inputs")
        weights = weights_file(name, weights_dir)
    model = builder(num_classes, in_channels, dropout, image_size=image_size, weights=weights)
    if freeze:
        freeze_backbone(model, name)
    return model


def weights_file(name: str, weights_dir: str | Path | None = None) -> Path:
    """The local file of `name`'s ImageNet weights: `weights_dir` first, then torch hub's cache
    (`torch.hub.get_dir()/checkpoints`, which honours $TORCH_HOME). The file name is the one
    torchvision downloads, e.g. resnet18-f37072fd.pth."""
    weights: WeightsEnum | None = MODELS.entry(name).meta["weights"]
    if weights is None:
        raise ConfigError(f"{name} has no pretrained weights; train it from scratch "
                          f"(pretrained off) or pick a torchvision architecture")
    filename = Path(urlsplit(weights.url).path).name
    folders = [Path(weights_dir).expanduser()] if weights_dir is not None else []
    folders.append(Path(torch.hub.get_dir()) / "checkpoints")
    for folder in folders:
        if (folder / filename).is_file():
            return folder / filename
    where = " or ".join(str(folder) for folder in folders)
    raise ConfigError(f"pretrained {name} needs {filename}, not found in {where}; on a "
                      f"machine with internet download {weights.url} and copy it into "
                      f"{folders[0]}")


def head_module(model: nn.Module, name: str) -> nn.Module:
    """The classifier head (dropout + linear) of a model built as `name`."""
    return model.get_submodule(MODELS.entry(name).meta["head"])


def head_parameters(model: nn.Module, name: str) -> list[nn.Parameter]:
    """The parameters of the head: what trains when the backbone is frozen."""
    return list(head_module(model, name).parameters())


def freeze_backbone(model: nn.Module, name: str) -> None:
    """requires_grad=False on every parameter outside the head of a model built as `name`."""
    model.requires_grad_(False)
    head_module(model, name).requires_grad_(True)


def classifier_head(in_features: int, num_classes: int, dropout: float) -> nn.Sequential:
    """Dropout then a linear layer. Always the same two modules, so that state_dict keys do not
    depend on whether dropout is zero."""
    return nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, num_classes))


def with_in_channels(conv: nn.Conv2d, in_channels: int, *, from_rgb: bool = False) -> nn.Conv2d:
    """`conv`, or a copy of it that takes `in_channels` inputs.

    The copy is freshly initialised, unless `from_rgb`: then `conv` holds trained RGB weights and
    a 1-channel copy gets their sum over the input channels, so that a grey image gives exactly
    the output its RGB replica gave (the bias is kept).
    """
    if conv.in_channels == in_channels:
        return conv
    new = nn.Conv2d(in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
    if from_rgb:
        if in_channels != 1 or conv.in_channels != 3 or conv.groups != 1:
            raise ValueError(f"only a 3-channel convolution becomes a 1-channel one, not "
                             f"{conv.in_channels} -> {in_channels} channels")
        with torch.no_grad():
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
            if conv.bias is not None and new.bias is not None:
                new.bias.copy_(conv.bias)
    return new
