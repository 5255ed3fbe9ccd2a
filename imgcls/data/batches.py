"""Batches drawn from the decoded uint8 images, normalized and augmented on their device."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from imgcls.data.augment import Augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), on the 0..1 scale."""
    x = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    std = x.std(dim=1).clamp_min(1e-6)  # a constant channel must not divide by zero
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())


class Batches:
    """Iterate (images, labels) batches of a uint8 image tensor.

    The images move to `device` once, as uint8 (a quarter of float32's size); each batch is
    indexed there, converted to float on the 0..1 scale, augmented there by `augment` when
    training (never when evaluating), and normalized. Training batches are reshuffled every epoch
    by a CPU generator seeded once, which also makes every augmentation draw, so a seed fixes the
    order and the augmentation of every epoch on any device; the last incomplete training batch
    is dropped (a batch of one breaks batch normalization), and the batch size is capped at the
    number of images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 train: bool, mean: Sequence[float], std: Sequence[float],
                 augment: Augment | None = None, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.labels = labels.to(self.device, torch.long)
        self.batch_size = max(1, min(batch_size, len(labels)))
        self.train = train
        self.augment = augment if train else None  # evaluation sees the images as they are
        shape = (1, images.shape[1], 1, 1)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(shape)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(shape)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        n, b = len(self.labels), self.batch_size
        return n // b if self.train else -(-n // b)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = len(self.labels)
        if self.train:
            order = torch.randperm(n, generator=self.generator).to(self.device)
        else:
            order = torch.arange(n, device=self.device)
        for i in range(len(self)):
            index = order[i * self.batch_size:(i + 1) * self.batch_size]
            x = self.images[index].float().div_(255)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            yield (x - self.mean) / self.std, self.labels[index]
