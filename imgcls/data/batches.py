"""Batches drawn from the decoded uint8 images, normalized and augmented on their device."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence

import torch

from imgcls.data.augment import Augment

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREFETCH = 2  # batches gathered ahead on the host when the images stay there


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), on the 0..1 scale."""
    x = images.to(torch.float64).div_(255).transpose(0, 1).reshape(images.shape[1], -1)
    std = x.std(dim=1).clamp_min(1e-6)  # a constant channel must not divide by zero
    return tuple(x.mean(dim=1).tolist()), tuple(std.tolist())


class Batches:
    """Iterate (images, labels) batches of a uint8 image tensor.

    With `resident` (the default) the images move to `device` once, as uint8 (a quarter of
    float32's size), and each batch is indexed there. Without it they stay in host memory and a
    thread gathers the next batches (into pinned memory when the device is a GPU, so that the
    copy runs asynchronously) while the device computes; for data sets larger than the share of
    GPU memory a study allows them. Either way each batch is then converted to float on the
    0..1 scale, augmented on the device by `augment` when training (never when evaluating), and
    normalized, and both ways give identical batches.

    Training batches are reshuffled every epoch by a CPU generator seeded once, which also makes
    every augmentation draw, so a seed fixes the order and the augmentation of every epoch on
    any device; the last incomplete training batch is dropped (a batch of one breaks batch
    normalization), and the batch size is capped at the number of images.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, *,
                 train: bool, mean: Sequence[float], std: Sequence[float],
                 augment: Augment | None = None, seed: int = 0,
                 device: torch.device | str = "cpu", resident: bool = True) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError("images must be a uint8 tensor of shape (N, C, H, W)")
        self.device = torch.device(device)
        self.resident = resident
        self.images = images.to(self.device) if resident else images.cpu()
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
        order = torch.randperm(n, generator=self.generator) if self.train else torch.arange(n)
        order = order[:len(self) * self.batch_size]
        source = self._on_device(order) if self.resident else self._from_host(order)
        for x, y in source:
            x = x.float().div_(255)
            if self.augment is not None:
                x = self.augment(x, self.generator)
            yield (x - self.mean) / self.std, y

    def _on_device(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # One copy of the epoch's order: a copy per batch would make the host wait each step.
        for index in order.to(self.device).split(self.batch_size):
            yield self.images[index], self.labels[index]

    def _from_host(self, order: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The uint8 batches gathered by a thread, PREFETCH ahead of the consumer. Index
        selection and pinning release the GIL, so the gathering overlaps the training step."""
        pin = self.device.type == "cuda"
        labels = self.labels.cpu()
        ready: queue.Queue[tuple[torch.Tensor, torch.Tensor] | BaseException | None] = \
            queue.Queue(maxsize=PREFETCH)
        stop = threading.Event()

        def offer(item: tuple[torch.Tensor, torch.Tensor] | BaseException | None) -> None:
            while not stop.is_set():  # a consumer that left early must not leave us blocked
                try:
                    ready.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def gather() -> None:
            try:
                for index in order.split(self.batch_size):
                    x, y = self.images.index_select(0, index), labels[index]
                    offer((x.pin_memory(), y.pin_memory()) if pin else (x, y))
                offer(None)
            except BaseException as exc:  # raised in the consumer instead
                offer(exc)

        thread = threading.Thread(target=gather, name="batches-prefetch", daemon=True)
        thread.start()
        try:
            while (item := ready.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                x, y = item
                # From pinned memory the copy is queued on the stream and the host goes on.
                yield x.to(self.device, non_blocking=pin), y.to(self.device, non_blocking=pin)
        finally:
            stop.set()
            thread.join()
