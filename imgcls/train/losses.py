"""The training loss: cross-entropy, optionally smoothed and class-weighted, plus an optional
explicit L2 penalty on the weights.

Only training uses these: validation loss is plain, unweighted, unsmoothed cross-entropy, so
that trials with different loss settings compare on one scale.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from imgcls.errors import DataError


def class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """n / (K * count_c) per class c, from the training labels: a class's total weight is then
    n / K whatever its size, so a rare class counts as much as a common one.

    A class with no training images would get an infinite weight (or, patched to 0, silently
    never be learned), so it is refused.
    """
    counts = torch.bincount(labels.flatten().long(), minlength=num_classes)[:num_classes]
    missing = (counts == 0).nonzero().flatten().tolist()
    if missing:
        listed = ", ".join(str(c) for c in missing)
        raise DataError(f"class_weighted: the training split has no images of class index "
                        f"{listed} (of 0..{num_classes - 1}); add some, or set class_weighted "
                        "to false")
    return labels.numel() / (num_classes * counts.to(torch.float32))


def build_loss(num_classes: int, train_labels: torch.Tensor, label_smoothing: float = 0.0,
               class_weighted: bool = False) -> nn.CrossEntropyLoss:
    """The training data loss. With class weights, torch's mean divides by the batch's summed
    weights, so the loss stays on the unweighted scale while a rare class's mistakes cost more.
    """
    weight = class_weights(train_labels, num_classes) if class_weighted else None
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=label_smoothing)


def penalized_weights(model: nn.Module) -> list[nn.Parameter]:
    """The trainable weight tensors of conv and linear layers (ndim > 1). Biases and
    normalization scales and shifts are 1-D and left out: shrinking them towards 0 does not
    reduce a model's capacity, it only shifts or rescales activations."""
    return [p for p in model.parameters() if p.requires_grad and p.ndim > 1]


def l2_penalty(weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """sum(w ** 2) over `weights`, to be scaled by `l2` and added to the training loss. Its
    gradient is 2 * l2 * w: for plain SGD, l2 = weight_decay / 2 is the same update."""
    squares = [w.pow(2).sum() for w in weights]
    return torch.stack(squares).sum() if squares else torch.zeros(())
