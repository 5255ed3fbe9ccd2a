"""A study's data made ready to train on: scanned, checked, decoded once, split and normalized."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgcls.data.augment import Augment
from imgcls.data.batches import IMAGENET_MEAN, IMAGENET_STD, Batches, channel_stats
from imgcls.data.cache import Progress, load_images
from imgcls.data.config import DataConfig
from imgcls.data.sources import Catalog, listing, open_source
from imgcls.data.split import Split, make_split
from imgcls.errors import DataError


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
                          progress, min_side=config.min_side if check else None,
                          max_pixels=config.max_pixels)
    array = decoded.images
    skipped: tuple[str, ...] = ()
    if decoded.bad:
        notes = decoded.notes(catalog)
        if not config.skip_bad_images:
            where = _write_unusable(cache_dir, notes)
            raise DataError(
                f"{len(notes)} of {len(catalog)} files are not usable images: {listing(notes)}"
                f"{f' (all listed in {where})' if where else ''}. "
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


UNUSABLE_LIST = "unusable_images.txt"


def _write_unusable(cache_dir: Path | None, notes: list[str]) -> Path | None:
    """The whole list of unusable files, one "file (reason)" a line, beside the cache (the
    message can name only a few); None without a cache or when it cannot be written."""
    if cache_dir is None:
        return None
    path = cache_dir / UNUSABLE_LIST
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{note}\n" for note in notes))
    except OSError:
        return None
    return path
