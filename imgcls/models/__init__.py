"""Models by name: a registry of builders, each adapted to classes, channels and dropout, with
pretrained ImageNet weights read from local files and an optionally frozen backbone."""

from imgcls.models import simplecnn as _simplecnn  # noqa: F401  (registers its builder)
from imgcls.models import torchvision_models as _torchvision_models  # noqa: F401
from imgcls.models.registry import (
    MODELS,
    Builder,
    build_model,
    check_image_size,
    classifier_head,
    freeze_backbone,
    head_module,
    head_parameters,
    register_model,
    weights_file,
    with_in_channels,
)
from imgcls.models.simplecnn import SimpleCNN

__all__ = [
    "MODELS", "Builder", "SimpleCNN", "build_model", "check_image_size", "classifier_head",
    "freeze_backbone", "head_module", "head_parameters", "register_model", "weights_file",
    "with_in_channels",
]
