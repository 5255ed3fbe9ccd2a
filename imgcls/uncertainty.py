"""How sure a model is of each image: MC-dropout and flip test-time augmentation.

One deterministic eval-mode pass says what the model thinks, not how firmly. Two cheap ways to
ask again, each giving several probability vectors per image whose mean is the prediction and
whose spread is the doubt:
- MC-dropout: `passes` forward passes with the dropout layers sampling (train mode) and every
  other layer in eval mode, so BatchNorm keeps its running statistics and a batch's images do
  not influence each other. A model with no active dropout has nothing to sample.
- Flip TTA: the image as is and mirrored the ways the model was trained to see it (left-right
  with hflip > 0, upside down with vflip > 0, both with both).

The predictive entropy H(mean p) = -sum_k p_k log p_k (nats) is 0 for a one-hot mean and log K
for a uniform one; its rank (1 = least sure) orders a batch for review.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from imgcls.errors import ConfigError

__all__ = ["Sampling", "dropout_layers", "entropy_ranks", "flip_views", "mc_dropout",
           "predictive_entropy", "sample_probabilities"]


@dataclass(frozen=True)
class Sampling:
    """What to average per image: MC-dropout passes, flip views, and the seed of the dropout
    masks (the same seed and batches give the same probabilities)."""

    passes: int = 1  # forward passes per view; above 1 the dropout layers sample
    tta: bool = False  # also the flips the model trained with
    seed: int = 0

    def __post_init__(self) -> None:
        if self.passes < 1:
            raise ConfigError(f"MC-dropout passes must be at least 1, not {self.passes}")

    @property
    def stochastic(self) -> bool:
        return self.passes > 1 or self.tta


def dropout_layers(model: nn.Module) -> list[nn.Module]:
    """The dropout layers that would drop something (rate above 0)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0]


@contextlib.contextmanager
def mc_dropout(model: nn.Module) -> Iterator[None]:
    """Dropout layers in train mode inside the block, the rest as they were; restored after."""
    layers = dropout_layers(model)
    modes = [m.training for m in layers]
    for m in layers:
        m.train()
    try:
        yield
    finally:
        for m, mode in zip(layers, modes, strict=True):
            m.train(mode)


def flip_views(hflip: float, vflip: float) -> list[tuple[int, ...]]:
    """The tensor dims to flip per view: the identity first, then each flip trained with."""
    views: list[tuple[int, ...]] = [()]
    if hflip > 0:
        views.append((-1,))
    if vflip > 0:
        views.append((-2,))
    if hflip > 0 and vflip > 0:
        views.append((-2, -1))
    return views


def sample_probabilities(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                         passes: int, views: list[tuple[int, ...]]) -> torch.Tensor:
    """Softmax probabilities (S, N, K), S = passes x views, of `forward` on every view of `x`.
    The caller sets the modes (mc_dropout) and the seed."""
    out = [forward(x.flip(dims) if dims else x).float().softmax(dim=1)
           for dims in views for _ in range(passes)]
    return torch.stack(out)


def predictive_entropy(probs: np.ndarray) -> np.ndarray:
    """H(p) in nats per row of (N, K) probabilities, in [0, log K]; 0 log 0 counts as 0."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return np.clip(-terms.sum(axis=1), 0.0, np.log(p.shape[1]) if p.ndim == 2 else 0.0)


def entropy_ranks(entropy: np.ndarray) -> np.ndarray:
    """1 for the highest entropy (the least sure image), ties in input order."""
    order = np.argsort(-np.asarray(entropy), kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks
