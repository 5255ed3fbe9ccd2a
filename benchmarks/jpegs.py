"""Photo-like JPEGs for benchmarks that must pay a real photo's decoding cost.

Each image is smooth colour gradients at three scales plus sensor-like noise, 400x300 to 500x375
px, saved at quality 90: about 80 KB and 3-4 ms to decode, close to the hymenoptera photos
(about 110 KB, 500 px wide). A flat or tiny image would decode in a fraction of that and flatter
a pipeline that decodes every epoch. The two classes differ in colour cast, so they can be
learnt, which the benchmarks do not need but which keeps the data honest.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("cool", "warm")
WIDTHS = (400, 500)  # px, inclusive; height is 3/4 of the width, as most camera photos
QUALITY = 90  # the JPEG quality cameras and phones save at, about
NOISE = 22.0  # standard deviation on 0..255: photo-like high-frequency content and file sizes
# (cells across the image, amplitude): coarse shading, mid-size shapes, fine texture
LAYERS = ((4, 1.0), (16, 0.35), (64, 0.15))
CAST = 20.0  # 0..255: added to red and taken from blue for "warm", the reverse for "cool"


def photo(rng: np.random.Generator, label: int) -> Image.Image:
    """One photo-like RGB image; `label` picks its colour cast."""
    width = int(rng.integers(WIDTHS[0], WIDTHS[1] + 1))
    height = width * 3 // 4
    out = np.zeros((height, width, 3), np.float32)
    for cells, amplitude in LAYERS:
        field = rng.integers(0, 256, (max(2, cells * 3 // 4), cells, 3), dtype=np.uint8)
        smooth = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
        out += amplitude * (np.asarray(smooth, np.float32) - 128)
    out = out / 1.5 + 128  # the layers' sum back to about the 0..255 range
    out += rng.normal(0, NOISE, out.shape).astype(np.float32)
    cast = CAST if label else -CAST
    out[..., 0] += cast
    out[..., 2] -= cast
    return Image.fromarray(np.clip(out, 0, 255).astype(np.uint8))


def write_jpegs(folder: Path, count: int, seed: int = 0) -> Path:
    """Write `count` JPEGs, alternately of each class, as `folder/<class>/<index>.jpg` (the
    ImageFolder layout) and return `folder`. Each image has its own seed, so the files do not
    depend on the order the threads write them in."""
    for name in CLASSES:
        (folder / name).mkdir(parents=True, exist_ok=True)

    def write(index: int) -> None:
        label = index % len(CLASSES)
        image = photo(np.random.default_rng([seed, index]), label)
        image.save(folder / CLASSES[label] / f"{index:05d}.jpg", quality=QUALITY)

    # PIL's resizing and encoding release the GIL, so threads use every core.
    with ThreadPoolExecutor() as pool:
        list(pool.map(write, range(count)))
    return folder
