"""Data: sources -> seeded split -> decode-once uint8 cache -> batches on the training device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imgcls.data.batches import IMAGENET_MEAN, IMAGENET_STD, Batches, channel_stats
from imgcls.data.cache import Progress, load_images, to_array
from imgcls.data.sources import (
    IMAGE_EXTENSIONS,
    SOURCES,
    Catalog,
    DigitsSource,
    FolderSource,
    Source,
    open_source,
)
from imgcls.data.split import SPLIT_NAMES, Split, stratified_split

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "SOURCES", "SPLIT_NAMES", "Batches",
    "Catalog", "DataConfig", "DigitsSource", "FolderSource", "PreparedData", "Source", "Split",
    "channel_stats", "load_images", "open_source", "prepare_data", "stratified_split", "to_array",
]


class DataConfig(BaseModel):
    """Where the images come from and how they are shaped and split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "folder"  # a name in SOURCES
    path: str | None = None  # the data folder, for sources that read files
    image_size: int = Field(64, ge=8, le=2048)  # pixels per side after resizing
    channels: Literal[1, 3] = 3  # 1 = grayscale, 3 = RGB (grayscale images are replicated)
    val_fraction: float = Field(0.15, gt=0, lt=1)  # > 0: validation picks the best epoch
    test_fraction: float = Field(0.15, ge=0, lt=1)
    # "train": mean/std of the training split; "imagenet": the statistics pretrained nets expect
    normalize: Literal["train", "imagenet"] = "train"

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        return SOURCES.check_name(value)


@dataclass
class PreparedData:
    """A study's images, decoded once and held in memory, with their split and statistics."""

    config: DataConfig
    catalog: Catalog
    split: Split
    images: torch.Tensor  # uint8 (N, C, S, S)
    labels: torch.Tensor  # int64 (N,)
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def classes(self) -> tuple[str, ...]:
        return self.catalog.classes

    @property
    def num_classes(self) -> int:
        return len(self.catalog.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    def batches(self, split: str, batch_size: int, *, hflip: float = 0.0, seed: int = 0,
                device: torch.device | str = "cpu") -> Batches:
        index = torch.from_numpy(self.split.indices(split))
        return Batches(self.images[index], self.labels[index], batch_size, train=split == "train",
                       mean=self.mean, std=self.std, hflip=hflip, seed=seed, device=device)


def prepare_data(config: DataConfig, seed: int, cache_dir: Path | None = None,
                 progress: Progress | None = None) -> PreparedData:
    """Scan the source, split it by `seed`, and decode its images (once per cache folder)."""
    source = open_source(config.source, config.path)
    catalog = source.scan()
    split = stratified_split(catalog, config.val_fraction, config.test_fraction, seed)
    array = load_images(source, catalog, config.image_size, config.channels, cache_dir, progress)
    images = torch.from_numpy(np.array(array))  # one copy from the memory map into RAM
    labels = torch.from_numpy(catalog.labels)
    if config.normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if config.channels == 1:  # the luminance of ImageNet's statistics
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    else:
        mean, std = channel_stats(images[torch.from_numpy(split.indices("train"))])
    return PreparedData(config, catalog, split, images, labels, tuple(mean), tuple(std))
