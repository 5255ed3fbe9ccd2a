"""torchvision architectures, adapted to any number of classes and input channels.

Each is built as torchvision defines it (1000 classes, RGB), given its ImageNet weights when
asked for (from a local file: nothing is downloaded), and only then adapted: the first
convolution is rebuilt for other input channels and the classifier's tail becomes
`classifier_head` (dropout + linear), whose dropout replaces torchvision's own classifier dropout.
Where the first convolution and the head are, and which weights file is whose, the catalog says.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision import models as tvm
from torchvision.models.vision_transformer import VisionTransformer, interpolate_embeddings

from imgcls.errors import ConfigError, first_line
from imgcls.models.builders import builds, classifier_head, with_in_channels
from imgcls.models.catalog import MODELS

StateDict = dict[str, Tensor]
# (image_size or None, dropout) -> the unmodified torchvision model, freshly initialised
Factory = Callable[[int | None, float], nn.Module]
# Turns a checkpoint's state dict into one the unmodified model loads (renamed keys, ...).
Convert = Callable[[StateDict, nn.Module], StateDict]


@dataclass(frozen=True)
class TorchvisionBuilder:
    """How one torchvision architecture is built, loaded and adapted (a `Builder`)."""

    name: str
    factory: Factory
    convert: Convert | None = None

    def __call__(self, num_classes: int, in_channels: int, dropout: float, *,
                 image_size: int | None, weights: Path | None) -> nn.Module:
        arch = MODELS.get(self.name)
        model = self.factory(image_size, dropout)
        if weights is not None:
            load_checkpoint(model, weights, self)
        conv = model.get_submodule(arch.first_conv)
        assert isinstance(conv, nn.Conv2d), f"{self.name}.{arch.first_conv} is not a conv"
        model.set_submodule(arch.first_conv,
                            with_in_channels(conv, in_channels, from_rgb=weights is not None))
        replace_head(model, arch.head, num_classes, dropout)
        return model


def replace_head(model: nn.Module, path: str, num_classes: int, dropout: float) -> None:
    """Put classifier_head at `path`; its input width is that of the last linear layer it
    replaces."""
    parent_path, _, last = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    if isinstance(parent, nn.Sequential):
        kept, replaced = list(parent)[:int(last)], list(parent)[int(last):]
    else:
        kept, replaced = [], [parent.get_submodule(last)]
    linears = [m for part in replaced for m in part.modules() if isinstance(m, nn.Linear)]
    head = classifier_head(linears[-1].in_features, num_classes, dropout)
    if isinstance(parent, nn.Sequential):
        model.set_submodule(parent_path, nn.Sequential(*kept, head))
    else:
        model.set_submodule(path, head)


def load_checkpoint(model: nn.Module, path: Path, arch: TorchvisionBuilder) -> None:
    """Load the ImageNet state dict in `path` into the unmodified torchvision `model`."""
    fix = f"download it again from {MODELS.get(arch.name).weights_url}"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        raise ConfigError(f"{path} is not a readable PyTorch checkpoint "
                          f"({first_line(exc)}); {fix}") from None
    if not isinstance(state, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise ConfigError(f"{path} is not a state dict (names -> tensors); {fix}")
    try:
        state = arch.convert(dict(state), model) if arch.convert else dict(state)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"{path} does not hold {arch.name}'s ImageNet weights "
                          f"({first_line(exc)}); {fix}") from None
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise ConfigError(f"{path} does not hold {arch.name}'s ImageNet weights ({problem}); "
                          f"{fix}")
    model.load_state_dict(state)


def state_mismatch(expected: Mapping[str, Tensor], found: Mapping[str, Tensor]) -> str | None:
    """What keeps `found` from loading where `expected` is, in a few words; None if nothing.

    A missing `num_batches_tracked` is no mismatch: checkpoints saved before PyTorch 0.4.1 lack
    it and BatchNorm fills it in.
    """
    missing = [k for k in expected
               if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    reshaped = [k for k in expected if k in found and found[k].shape != expected[k].shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[0]!r}")
    if reshaped:
        key = reshaped[0]
        problems.append(f"{key!r} is {tuple(found[key].shape)}, "
                        f"not {tuple(expected[key].shape)}")
    return "; ".join(problems) or None


# DenseNet checkpoints name layers 'norm.1', 'conv.2', ... which are 'norm1', 'conv2' in the
# module (torchvision renames them the same way when it loads them).
_DENSENET_OLD_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$")


def _densenet_keys(state: StateDict, model: nn.Module) -> StateDict:
    return {_DENSENET_OLD_KEY.sub(r"\1\2", key): value for key, value in state.items()}


def _vit_positions(state: StateDict, model: nn.Module) -> StateDict:
    # The weights were trained on 224px images (14x14 patches): their position embedding is
    # interpolated (bicubic) to the grid of the size the model is built for.
    assert isinstance(model, VisionTransformer)
    return dict(interpolate_embeddings(model.image_size, model.patch_size, state))


def _plain(factory: Callable[..., nn.Module]) -> Factory:
    return lambda image_size, dropout: factory(weights=None)


def _with_dropout(factory: Callable[..., nn.Module]) -> Factory:
    # VGG's classifier has two dropout layers: the searched rate replaces its 0.5 in both.
    return lambda image_size, dropout: factory(weights=None, dropout=dropout)


def _for_size(factory: Callable[..., nn.Module]) -> Factory:
    # A ViT's position embedding has one entry per patch: it is built for one image size.
    return lambda image_size, dropout: factory(weights=None, image_size=image_size or 224)


def _register(name: str, factory: Factory, convert: Convert | None = None) -> None:
    builds(name)(TorchvisionBuilder(name, factory, convert))


_register("resnet18", _plain(tvm.resnet18))
_register("resnet34", _plain(tvm.resnet34))
_register("resnet50", _plain(tvm.resnet50))
_register("resnet101", _plain(tvm.resnet101))
_register("vgg11_bn", _with_dropout(tvm.vgg11_bn))
_register("vgg16_bn", _with_dropout(tvm.vgg16_bn))
_register("densenet121", _plain(tvm.densenet121), convert=_densenet_keys)
_register("efficientnet_b0", _plain(tvm.efficientnet_b0))
_register("mobilenet_v3_large", _plain(tvm.mobilenet_v3_large))
_register("convnext_tiny", _plain(tvm.convnext_tiny))
_register("vit_b_16", _for_size(tvm.vit_b_16), convert=_vit_positions)
