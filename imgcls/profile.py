"""How big and how costly a model is: parameters, FLOPs and MACs for one image."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from imgcls.models import build_model


@dataclass(frozen=True)
class ModelProfile:
    name: str
    params: int  # trainable and frozen parameters
    flops: int  # floating-point operations of one forward pass on one image
    macs: int  # multiply-accumulates: FLOPs / 2 for the convolutions and matmuls counted

    def as_dict(self) -> dict[str, int | str]:
        return asdict(self)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass in eval mode, as torch.utils.flop_counter counts them
    (convolutions, matmuls and attention; elementwise ops are not counted)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.zeros(input_shape, device=device))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def profile_model(model: nn.Module, name: str, in_channels: int, image_size: int) -> ModelProfile:
    flops = count_flops(model, (1, in_channels, image_size, image_size))
    return ModelProfile(name, count_parameters(model), flops, flops // 2)


def profile_architecture(name: str, num_classes: int, in_channels: int,
                         image_size: int) -> ModelProfile:
    model = build_model(name, num_classes, in_channels, image_size=image_size)
    return profile_model(model, name, in_channels, image_size)
