"""How models are built: one builder per architecture of the catalog, and the parts they share.

A builder makes a model producing (N, num_classes) logits for (N, in_channels, H, W) images; it
registers under the catalog's name (`builds`), and `build_model` checks the arguments, finds
the weights file and calls it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from imgcls.models.catalog import MODELS
from imgcls.registry import Registry


class Builder(Protocol):
    """`image_size` is the side of the images the model will see (None: the architecture's
    default; only models whose shape depends on it use it). `weights` is a local ImageNet
    state-dict file to start from, None for a fresh initialisation."""

    def __call__(self, num_classes: int, in_channels: int, dropout: float, *,
                 image_size: int | None, weights: Path | None) -> nn.Module: ...


BUILDERS: Registry[Builder] = Registry("architecture builder")


def builds(name: str) -> Callable[[Builder], Builder]:
    """Register the builder of the catalog's architecture `name`."""
    MODELS.entry(name)  # a builder for an architecture the catalog does not describe: a bug
    return BUILDERS.register(name)


def head_module(model: nn.Module, name: str) -> nn.Module:
    """The classifier head (dropout + linear) of a model built as `name`."""
    return model.get_submodule(MODELS.get(name).head)


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
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    device=conv.weight.device)
    if from_rgb:
        if in_channels != 1 or conv.in_channels != 3 or conv.groups != 1:
            raise ValueError(f"only a 3-channel convolution becomes a 1-channel one, not "
                             f"{conv.in_channels} -> {in_channels} channels")
        with torch.no_grad():
            new.weight.copy_(conv.weight.sum(dim=1, keepdim=True))
            if conv.bias is not None and new.bias is not None:
                new.bias.copy_(conv.bias)
    return new
