"""Data: sources -> unusable files left out or reported -> seeded split -> decode-once uint8 cache
-> batches on the training device."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from imgcls.data.augment import Augment
from imgcls.data.batches import IMAGENET_MEAN, IMAGENET_STD, Batches, channel_stats
from imgcls.data.cache import Decoded, Progress, decode, load_images, to_array
from imgcls.data.sources import (
    GIVEN_SPLITS,
    IMAGE_EXTENSIONS,
    SOURCES,
    Catalog,
    CsvSource,
    DigitsSource,
    FolderSource,
    NpzSource,
    Source,
    listing,
    open_source,
    scale_to_uint8,
)
from imgcls.data.split import SPLIT_NAMES, SPLITS, Split, make_split, stratified_split
from imgcls.errors import DataError

__all__ = [
    "GIVEN_SPLITS", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "SOURCES", "SPLITS",
    "SPLIT_NAMES", "Augment", "Batches", "Catalog", "CsvSource", "DataConfig", "Decoded",
    "DigitsSource", "FolderSource", "NpzSource", "PreparedData", "Source", "Split",
    "channel_stats", "decode", "load_images", "make_split", "open_source", "prepare_data",
    "scale_to_uint8", "stratified_split", "to_array",
]


class DataConfig(BaseModel):
    """Where the images come from, which of them are used, and how they are shaped and split."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = "folder"  # a name in SOURCES
    path: str | None = None  # the data folder, CSV manifest or .npz, for sources that read files
    # The classes to use, in this order (label i = classes[i]); others are left out. None: all,
    # sorted by name. A TB collection may hold more classes than a study's health and tb.
    classes: tuple[str, ...] | None = None
    image_size: int = Field(64, ge=8, le=2048)  # pixels per side after resizing
    channels: Literal[1, 3] = 3  # 1 = grayscale, 3 = RGB (grayscale images are replicated)
    split: str = "stratified"  # a name in SPLITS: stratified, sorted, group, given
    # A regular expression whose first capture group (else whole match) in each file name is
    # its group (patient, subject), for the group split; a CSV group column takes precedence.
    group_pattern: str | None = None
    val_fraction: float = Field(0.15, gt=0, lt=1)  # > 0: validation picks the best epoch
    test_fraction: float = Field(0.15, ge=0, lt=1)
    # "train": mean/std of the training split; "imagenet": the statistics pretrained nets expect
    normalize: Literal["train", "imagenet"] = "train"
    # Unreadable files and placeholders stop the study before training unless this leaves them
    # out (listed in PreparedData.skipped): a silently shrunk data set would go unnoticed.
    skip_bad_images: bool = False
    # Treat as unusable a file that decodes but is tiny, uniform or drawn with few colours
    # (not applied to array sources such as digits and npz, which hold no such files).
    check_placeholders: bool = True
    min_side: int = Field(16, ge=1)  # pixels: an image with a shorter side is a placeholder

    @field_validator("source")
    @classmethod
    def _known_source(cls, value: str) -> str:
        return SOURCES.check_name(value)

    @field_validator("split")
    @classmethod
    def _known_split(cls, value: str) -> str:
        return SPLITS.check_name(value)

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if value is not None and (len(set(value)) != len(value) or "" in value or len(value) < 2):
            raise ValueError(f"classes {list(value)} must be at least two distinct, non-empty "
                             "names")
        return value

    @field_validator("group_pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"group_pattern {value!r} is not a valid regular expression: "
                                 f"{exc}") from None
        return value


@dataclass
class PreparedData:
    """A study's images, decoded once and held in memory, with their split and statistics."""

    config: DataConfig
    catalog: Catalog  # without the skipped images
    split: Split
    images: torch.Tensor  # uint8 (N, C, S, S)
    labels: torch.Tensor  # int64 (N,)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: tuple[str, ...] = ()  # "id (reason)" of each file left out by skip_bad_images

    @property
    def classes(self) -> tuple[str, ...]:
        return self.catalog.classes

    @property
    def num_classes(self) -> int:
        return len(self.catalog.classes)

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

    def batches(self, split: str, batch_size: int, *, augment: Augment | None = None,
                seed: int = 0, device: torch.device | str = "cpu",
                resident: bool = True) -> Batches:
        """Batches of one split on `device`; `resident`: see Batches."""
        index = torch.from_numpy(self.split.indices(split))
        return Batches(self.images[index], self.labels[index], batch_size, train=split == "train",
                       mean=self.mean, std=self.std, augment=augment, seed=seed, device=device,
                       resident=resident)


def prepare_data(config: DataConfig, seed: int, cache_dir: Path | None = None,
                 progress: Progress | None = None) -> PreparedData:
    """Scan the source, decode its images (once per cache folder), deal with the unusable ones,
    and split the rest by `seed`.

    Unusable files (undecodable, or placeholders unless `check_placeholders` is off) raise one
    DataError listing them, before any training; with `skip_bad_images` they are left out before
    the split is made, so that the split covers only images that train.
    """
    source = open_source(config.source, config.path, config.classes)
    catalog = source.scan()
    check = config.check_placeholders and source.may_hold_placeholders
    decoded = load_images(source, catalog, config.image_size, config.channels, cache_dir,
                          progress, min_side=config.min_side if check else None)
    array = decoded.images
    skipped: tuple[str, ...] = ()
    if decoded.bad:
        notes = decoded.notes(catalog)
        if not config.skip_bad_images:
            raise DataError(
                f"{len(notes)} of {len(catalog)} files are not usable images: {listing(notes)}. "
                "Pass --skip-bad-images to leave them out"
            )
        keep = np.setdiff1d(np.arange(len(catalog)), np.fromiter(decoded.bad, dtype=np.int64))
        catalog, array, skipped = catalog.subset(keep), array[keep], tuple(notes)
    split = make_split(catalog, config.split, config.val_fraction, config.test_fraction, seed,
                       config.group_pattern)
    # Mapped copy-on-write from the cache: the trial processes of a study share its pages in the
    # OS's page cache, and each split that a trial copies out is all it holds privately.
    images = torch.from_numpy(array)
    labels = torch.from_numpy(catalog.labels)
    if config.normalize == "imagenet":
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if config.channels == 1:  # the luminance of ImageNet's statistics
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    else:
        mean, std = channel_stats(images[torch.from_numpy(split.indices("train"))])
    return PreparedData(config, catalog, split, images, labels, tuple(mean), tuple(std), skipped)
