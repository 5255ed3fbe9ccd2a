"""Models by name: a registry of builders, each adapted to classes, channels and dropout."""

from imgcls.models import simplecnn as _simplecnn  # noqa: F401  (registers its builder)
from imgcls.models import torchvision_models as _torchvision_models  # noqa: F401
from imgcls.models.registry import (
    MODELS,
    build_model,
    check_image_size,
    classifier_head,
    register_model,
    with_in_channels,
)
from imgcls.models.simplecnn import SimpleCNN

__all__ = [
    "MODELS", "SimpleCNN", "build_model", "check_image_size", "classifier_head",
    "register_model", "with_in_channels",
]
