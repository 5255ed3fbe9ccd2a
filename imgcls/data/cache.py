"""Decode every image once into a uint8 array that all trials of a study share.

The array has shape (N, C, S, S). With a cache folder it is written there as a .npy file named by
a key over the catalog's fingerprint, the image settings and the placeholder checks, and
memory-mapped on later runs; a JSON sidecar next to it lists the images that were not usable and
why, so that a later run neither decodes them again nor forgets them. A change to the data or to
the settings gives a new name, so a stale cache is never read.

A cache file is checked before it is used. The sidecar records its size, modification time and
a BLAKE2b digest of its bytes, computed once when it is written; a file of another size, or one
modified since whose digest no longer matches (pixels overwritten in place), or one that cannot
be read, is decoded again, with one warning saying why. Temporary files left by a writer that
died (a search killed during its first decode) are removed by the next one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, ImageStat

from imgcls.data.sources import Catalog, Source, scale_to_uint8
from imgcls.errors import DataError, first_line

# Bump when the decoding below or the cache layout changes, so that caches written by older code
# are not reused. 2: every image mode, alpha onto black, placeholder checks, the bad-image sidecar.
CACHE_FORMAT = 2

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]  # (images done, images in all)
T = TypeVar("T")

# Modes whose pixels are gray levels: the colour-count check does not apply to them, as a
# bilevel scan or a grayscale image with few levels is still a picture.
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"})
# A file that decodes is still no picture when it is tiny, flat, or drawn with few colours (a
# "not found" graphic, an icon): a photo's noise alone gives it thousands of colours.
UNIFORM_STD = 2.0  # luminance standard deviation, on 0..255, below which an image is flat
MAX_PLACEHOLDER_COLOURS = 64
# An image with more pixels is refused before its pixels are read: a decompression bomb, or a
# whole-slide scan that needs tiling first. The default of a study's `data.max_pixels` and of
# predict, well below PIL's own threshold (89 Mpx, where it only warns) ...
MAX_PIXELS = 50_000_000
# ... so PIL's warning at opening one says nothing the refusal does not
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def to_array(image: Image.Image, image_size: int, channels: int) -> np.ndarray:
    """An image as a (channels, size, size) uint8 array: upright, converted, resized."""
    return decode(image, image_size, channels)[0]


def decode(image: Image.Image, image_size: int, channels: int, min_side: int | None = None,
           max_pixels: int | None = None) -> tuple[np.ndarray, str | None]:
    """An image as a (channels, size, size) uint8 array, and with `min_side` why it looks like a
    placeholder rather than a picture (None when it does not).

    Every PIL mode is brought to 8-bit luminance or RGB first (see `_to_8bit`); one channel is
    luminance, three channels replicate a grayscale image. Resizing goes straight to a square
    (no crop), so that nothing at the border of a scan or photo is lost; aspect distortion is the
    lesser evil for classification.
    """
    stored_size = image.size
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    if stored_size[0] * stored_size[1] > limit:
        raise DataError(f"{stored_size[0]}x{stored_size[1]} pixels, over the {limit:,} an "
                        "image may have (data.max_pixels; a decompression bomb, or a scan to "
                        "tile first)")
    if image.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale, and YCbCr straight to luminance. Only that
        # mode change is asked for: a CMYK or grayscale JPEG keeps its mode and only scales.
        # Works only before the pixels are loaded; sources hand over images not yet decoded.
        draft = "L" if channels == 1 and image.mode == "RGB" else image.mode
        image.draft(draft, (image_size, image_size))
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)  # an animated GIF or a TIFF stack: the first frame is the image
    image = ImageOps.exif_transpose(image)  # phones store rotation as a tag, not as pixels
    source_mode = image.mode
    image = _to_8bit(image)
    reason = None if min_side is None else _placeholder(image, source_mode, stored_size, min_side)
    target = "L" if channels == 1 else "RGB"
    if image.mode != target:
        image = image.convert(target)  # RGB -> L is ITU-R 601 luminance; L -> RGB replicates
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
    array = np.asarray(image, dtype=np.uint8)
    return (array[None] if channels == 1 else array.transpose(2, 0, 1)), reason


def _to_8bit(image: Image.Image) -> Image.Image:
    """Any PIL mode as L or RGB. Transparency is composited onto black (what a network sees
    as "nothing there"); 16-bit, 32-bit and float pixels are scaled by `scale_to_uint8`."""
    mode = image.mode
    if mode in ("L", "RGB"):
        return image
    if mode == "1":
        return image.convert("L")
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(scale_to_uint8(np.asarray(image)))
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = image.convert("LA" if mode in ("LA", "La") else "RGBA")
        flat = Image.new("L" if rgba.mode == "LA" else "RGB", rgba.size)  # black
        flat.paste(rgba.convert(flat.mode), mask=rgba.getchannel("A"))
        return flat
    # P, CMYK (PIL undoes the inverted Adobe encoding when it reads the file), YCbCr, ...
    return image.convert("RGB")


def _placeholder(image: Image.Image, source_mode: str, stored_size: tuple[int, int],
                 min_side: int) -> str | None:
    """Why an 8-bit L or RGB image looks like a placeholder, or None."""
    width, height = stored_size
    if min(width, height) < min_side:
        return f"placeholder: {width}x{height} px, under {min_side} px a side"
    luminance = image if image.mode == "L" else image.convert("L")
    std = ImageStat.Stat(luminance).stddev[0]
    if std < UNIFORM_STD:
        return f"placeholder: uniform, luminance std {std:.1f}"
    if source_mode not in GRAY_MODES:
        colours = image.getcolors(MAX_PLACEHOLDER_COLOURS)  # None when there are more
        if colours is not None:
            return f"placeholder: {len(colours)} colours"
    return None


def cache_key(catalog: Catalog, image_size: int, channels: int, min_side: int | None,
              max_pixels: int | None = None) -> str:
    limit = "" if max_pixels in (None, MAX_PIXELS) else f":{max_pixels}"  # the refusals differ
    text = f"{catalog.fingerprint}:{image_size}:{channels}:{min_side}{limit}:{CACHE_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Decoded:
    """The decoded images of a catalog, and which of them are not usable."""

    images: np.ndarray  # uint8 (N, C, S, S), mapped copy-on-write from the cache; zeros where bad
    bad: dict[int, str]  # catalog index -> why: the decoder's error, or "placeholder: ..."

    def notes(self, catalog: Catalog) -> list[str]:
        """"id (reason)" for each bad image, in catalog order."""
        return bad_notes(catalog, self.bad)


def bad_notes(catalog: Catalog, bad: dict[int, str]) -> list[str]:
    """"id (reason)" for each image of `bad` (catalog index -> why), in catalog order."""
    return [f"{catalog.ids[i]} ({reason})" for i, reason in sorted(bad.items())]


def each_image(count: int, work: Callable[[int], T], progress: Progress | None = None
               ) -> Iterator[tuple[int, T]]:
    """(index, work(index)) for every index below `count`, in order, computed over a thread
    pool: PIL releases the GIL while decoding and resizing, so threads use every core.
    `progress(done, count)` every 64 images and at the end."""
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for index, result in enumerate(pool.map(work, range(count))):
            yield index, result
            done = index + 1
            if progress and (done % 64 == 0 or done == count):
                progress(done, count)


def load_images(source: Source, catalog: Catalog, image_size: int, channels: int,
                cache_dir: Path | None = None, progress: Progress | None = None, *,
                min_side: int | None = None, max_pixels: int | None = None) -> Decoded:
    """The decoded images of `catalog`, from the cache when it holds them, else decoded now.

    A file that fails to decode, or (with a `min_side`) looks like a placeholder, is recorded in
    `Decoded.bad`; whether that stops the study is the caller's decision.
    """
    if channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, not {channels}")
    shape = (len(catalog), channels, image_size, image_size)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / (
            f"{catalog.source}-{cache_key(catalog, image_size, channels, min_side, max_pixels)}"
            f"-{image_size}px-{channels}ch.npy"
        )
        _remove_dead_writers(path.parent)
        cached, why_not = _read_cache(path, catalog, shape)
        if cached is not None:
            if progress:
                progress(len(catalog), len(catalog))
            return cached
        if why_not:
            log.warning("the image cache %s %s: decoding the images again", path, why_not)
        path.parent.mkdir(parents=True, exist_ok=True)

    tmp = path.with_suffix(f".tmp{os.getpid()}.npy") if path else None
    out = (np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=shape) if tmp
           else np.zeros(shape, dtype=np.uint8))
    bad: dict[int, str] = {}

    def work(index: int) -> tuple[np.ndarray | None, str | None]:
        try:
            with source.load(index) as image:  # closes the file, which a multi-frame TIFF keeps
                return decode(image, image_size, channels, min_side, max_pixels)
        except Exception as exc:  # any decoder error means the same thing: not a usable image
            return None, first_line(exc)

    try:
        for index, (pixels, reason) in each_image(len(catalog), work, progress):
            if pixels is not None:
                out[index] = pixels
            if reason is not None:
                bad[index] = reason
        if tmp is None or path is None:
            return Decoded(out, bad)
        out.flush()
        del out
        _write_sidecar(path, catalog, bad, _file_check(tmp))
        os.replace(tmp, path)  # atomic: a reader sees the old cache or the whole new one
        return Decoded(np.load(path, mmap_mode="c"), bad)
    finally:
        if tmp is not None and tmp.exists():
            tmp.unlink()


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _file_check(path: Path) -> dict[str, int | str]:
    """What the sidecar keeps to check the cache file: size, mtime and digest."""
    stat = path.stat()
    return {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "blake2b": _digest(path)}


def _verify(path: Path, check: dict[str, int | str]) -> str | None:
    """Why the cache file at `path` is not the one its sidecar describes; None when it is.
    Cheap when the file is untouched (a stat); a modified one is hashed again."""
    stat, written = path.stat(), check.get("bytes")
    if stat.st_size != written:
        return f"has {stat.st_size:,} bytes, not the {written:,} written" \
            if isinstance(written, int) else "has no size recorded"
    if stat.st_mtime_ns != check.get("mtime_ns") and _digest(path) != check.get("blake2b"):
        return "was changed since it was written (its checksum differs)"
    return None


def _remove_dead_writers(folder: Path) -> None:
    """Temporary cache files (`*.tmp<pid>.npy` / `.json`) whose writer on this machine is gone."""
    for tmp in [*folder.glob("*.tmp*.npy"), *folder.glob("*.tmp*.json")]:
        pid = tmp.suffixes[-2].removeprefix(".tmp") if len(tmp.suffixes) >= 2 else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except PermissionError:  # alive, someone else's
            pass


def _write_sidecar(path: Path, catalog: Catalog, bad: dict[int, str],
                   check: dict[str, int | str]) -> None:
    """The bad images of a cache entry, by id, and the `check` of its .npy, written before the
    .npy so that a reader that finds the .npy finds its sidecar too."""
    meta = {"format": CACHE_FORMAT, "images": len(catalog), "file": check,
            "bad": {catalog.ids[i]: reason for i, reason in sorted(bad.items())}}
    tmp = _sidecar(path).with_suffix(f".tmp{os.getpid()}.json")
    try:
        tmp.write_text(json.dumps(meta, indent=1))
        os.replace(tmp, _sidecar(path))
    finally:
        if tmp.exists():
            tmp.unlink()


def _read_cache(path: Path, catalog: Catalog, shape: tuple[int, ...]
                ) -> tuple[Decoded | None, str | None]:
    """The cache entry at `path` when it is whole and matches, else None (decode again) and,
    for a file that is there but fails its check, why."""
    if not (path.exists() and _sidecar(path).exists()):
        return None, None
    try:
        meta = json.loads(_sidecar(path).read_text())
        if not isinstance(meta.get("file"), dict):
            return None, "has no checksum (written by an older version)"
        why = _verify(path, meta["file"])
        if why:
            return None, why
        images = np.load(path, mmap_mode="c")
        index = {item: i for i, item in enumerate(catalog.ids)}
        bad = {index[item]: str(reason) for item, reason in meta["bad"].items()}
    except (OSError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return None, f"cannot be read ({first_line(exc)})"
    if images.shape != shape or images.dtype != np.uint8 or meta.get("images") != len(catalog):
        return None, f"holds images of shape {images.shape}, not {shape}"
    return Decoded(images, bad), None
