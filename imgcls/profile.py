"""How big and how costly a model is: parameters, FLOPs and MACs for one image.

FLOPs are what torch.utils.flop_counter counts in one forward pass (convolutions, matmuls and
attention; elementwise ops are not counted); MACs are half of them. An architecture's profile at
the catalog's reference size (224 px) is read from the catalog, adjusted for the classes and the
input channels (only the head and the first convolution depend on them), without importing
torch; at another size its model is built on the meta device (no memory, no initialisation) and
counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from imgcls.models.catalog import (
    MODELS,
    REFERENCE_CHANNELS,
    REFERENCE_CLASSES,
    REFERENCE_SIZE,
)

if TYPE_CHECKING:
    import torch
    from torch import nn


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
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query_shape, key_shape, value_shape))


def count_flops(model: nn.Module, input_shape: tuple[int, ...]) -> int:
    """FLOPs of one forward pass in eval mode, as torch.utils.flop_counter counts them
    (convolutions, matmuls and attention; elementwise ops are not counted)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    # On CPU, scaled-dot-product attention runs a kernel the counter has no formula for; it
    # does the same two matmuls as the GPU kernels the counter knows.
    cpu_attention = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention_flops}
    was_training = model.training
    # nn.MultiheadAttention's eval-mode fast path is one fused op the counter does not see into:
    # count the ordinary path, which does the same matmuls.
    fast_attention = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    torch.backends.mha.set_fastpath_enabled(False)
    device = next(model.parameters()).device
    try:
        with torch.no_grad(), FlopCounterMode(display=False,
                                              custom_mapping=cpu_attention) as counter:
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
    """`name`'s profile for these classes, channels and image size: from the catalog at the
    reference size, else counted on a model built on the meta device."""
    if image_size == REFERENCE_SIZE:
        return reference_profile(name, num_classes, in_channels)
    return measure_architecture(name, num_classes, in_channels, image_size)


def reference_profile(name: str, num_classes: int, in_channels: int) -> ModelProfile:
    """The catalog's profile of `name` at the reference size. The head's linear layer has
    head_features x classes weights and a bias per class, and costs 2 x head_features FLOPs per
    class; the first convolution's weights and FLOPs grow linearly with its input channels."""
    ref = MODELS.get(name).reference
    params = (ref.params + (ref.head_features + 1) * (num_classes - REFERENCE_CLASSES)
              + ref.stem_weights * (in_channels - REFERENCE_CHANNELS) // REFERENCE_CHANNELS)
    flops = (ref.flops + 2 * ref.head_features * (num_classes - REFERENCE_CLASSES)
             + ref.stem_flops * (in_channels - REFERENCE_CHANNELS) // REFERENCE_CHANNELS)
    return ModelProfile(name, params, flops, flops // 2)


def measure_architecture(name: str, num_classes: int, in_channels: int,
                         image_size: int) -> ModelProfile:
    """`name` built on the meta device and counted: no weights are allocated or initialised."""
    import torch

    from imgcls.models.build import build_model

    with torch.device("meta"):
        model = build_model(name, num_classes, in_channels, image_size=image_size)
    return profile_model(model, name, in_channels, image_size)
