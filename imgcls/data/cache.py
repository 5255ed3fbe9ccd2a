"""Decode every image once into a uint8 array that all trials of a study share.

The array has shape (N, C, S, S). With a cache folder it is written there as a .npy file named by
the catalog's fingerprint, the image size and the channels, and memory-mapped on later runs; a
change to the data or to the image settings gives a new name, so a stale cache is never read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from imgcls.data.sources import Catalog, Source
from imgcls.errors import DataError, first_line

# Bump when the decoding below changes, so that caches written by older code are not reused.
CACHE_FORMAT = 1

Progress = Callable[[int, int], None]  # (images done, images in all)


def to_array(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """An image as a (channels, size, size) uint8 array: upright, converted, resized.

    Resizing goes straight to a square (no crop), so that nothing at the border of a scan or
    photo is lost; aspect distortion is the lesser evil for classification.
    """
    mode = "L" if channels == 1 else "RGB"
    if image.format == "JPEG":
        image.draft(mode, (image_size, image_size))  # let libjpeg decode at a reduced scale
    image = ImageOps.exif_transpose(image)  # phones store rotation as a tag, not as pixels
    if image.mode != mode:
        image = image.convert(mode)
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def cache_key(catalog: Catalog, image_size: int, channels: int) -> str:
    text = f"{catalog.fingerprint}:{image_size}:{channels}:{CACHE_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_images(source: Source, catalog: Catalog, image_size: int, channels: int,
                cache_dir: Path | None = None, progress: Progress | None = None) -> np.ndarray:
    """The decoded images of `catalog`, from the cache when it holds them, else decoded now."""
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, not {channels}")
    shape = (len(catalog), channels, image_size, image_size)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / (
            f"{catalog.source}-{cache_key(catalog, image_size, channels)}"
            f"-{image_size}px-{channels}ch.npy"
        )
        if path.exists():
            cached = np.load(path, mmap_mode="r")
            if cached.shape == shape and cached.dtype == np.uint8:
                if progress:
                    progress(len(catalog), len(catalog))
                return cached
        path.parent.mkdir(parents=True, exist_ok=True)

    tmp = path.with_suffix(f".tmp{os.getpid()}.npy") if path else None
    out = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape) if tmp
           else np.empty(shape, dtype=np.uint8))
    bad: list[str] = []

    def decode(index: int) -> None:
        try:
            out[index] = to_array(source.load(index), image_size, channels)
        except Exception as exc:  # any decoder error means the same thing: not a usable image
            bad.append(f"{catalog.ids[index]} ({first_line(exc)})")

    try:
        # PIL releases the GIL while decoding and resizing, so threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for done, _ in enumerate(pool.map(decode, range(len(catalog))), start=1):
                if progress and (done % 64 == 0 or done == len(catalog)):
                    progress(done, len(catalog))
        if bad:
            bad.sort()
            listed = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
            raise DataError(
                f"{len(bad)} of {len(catalog)} files could not be read as images: {listed}. "
                "Remove or replace them and run again"
            )
        if tmp is not None and path is not None:
            out.flush()
            del out
            os.replace(tmp, path)  # atomic: a reader sees the old cache or the whole new one
            return np.load(path, mmap_mode="r")
        return out
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()
