"""`build_model("resnet18", num_classes=2, in_channels=1, dropout=0.2)`: an architecture of the
catalog, adapted to the classes, the input channels and dropout."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from imgcls.errors import ConfigError
from imgcls.models import simplecnn as _simplecnn  # noqa: F401  (registers its builder)
from imgcls.models import torchvision_models as _torchvision  # noqa: F401  (registers theirs)
from imgcls.models.builders import BUILDERS, freeze_backbone
from imgcls.models.catalog import MODELS, check_image_size, weights_file


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

    Built under `with torch.device("meta"):` the model holds no memory and initialises nothing
    (what profiling an architecture needs).
    """
    MODELS.entry(name)  # an unknown name raises, listing the known ones
    builder = BUILDERS.get(name)
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
