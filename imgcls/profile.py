"""How big and how costly a model is: parameters, FLOPs and MACs for one image."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

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



def _attention_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size,
                     *args: object, out_shape: object = None, **kwargs: object) -> int:
    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


# On CPU, scaled-dot-product attention runs a kernel the counter has no formula for; it does
# the same two matmuls as the GPU kernels the counter knows.
_CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass in eval mode, as torch.utils.flop_counter counts them
    (convolutions, matmuls and attention; elementwise ops are not counted)."""
    was_training = model.training
    # nn.MultiheadAttention's eval-mode fast path is one fused op the counter does not see into:
    # count the ordinary path, which does the same matmuls.
    fast_attention = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), FlopCounterMode(display=False,
                                              custom_mapping=_CPU_ATTENTION) as counter:
            model(torch.zeros(input_shape, device=device))
    finally:
        model.train(was_training)
        torch.backends.mha.set_fastpath_enabled(fast_attention)
    return int(counter.get_total_flops())


def profile_model(model: nn.Module, name: str, in_channels: int, image_size: int) -> ModelProfile:
    flops = count_flops(model, (1, in_channels, image_size, image_size))
    return ModelProfile(name, count_parameters(model), flops, flops // 2)


def profile_architecture(name: str, num_classes: int, in_channels: int,
                         image_size: int) -> ModelProfile:
    model = build_model(name, num_classes, in_channels, image_size=image_size)
    return profile_model(model, name, in_channels, image_size)
