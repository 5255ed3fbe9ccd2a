"""Data sources: where images and their labels come from.

A source is scanned once into a `Catalog` (ids, labels, class names, a fingerprint); images are
then decoded one at a time by index through `Source.load`. New sources register by name in
`SOURCES`.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

from imgcls.errors import DataError
from imgcls.registry import Registry

# Extensions PIL decodes that people keep training images in. Other files in a class folder
# (notes, .DS_Store, annotations) are ignored, as torchvision's ImageFolder does.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)


@dataclass(frozen=True)
class Catalog:
    """Every image of a source, in a fixed order: id, label index, and the class names."""

    source: str
    ids: tuple[str, ...]  # stable per image: path relative to the data root, or "digits/0017"
    labels: np.ndarray  # int64, indexes `classes`
    classes: tuple[str, ...]
    fingerprint: str  # changes when an image, a label or the class list changes
    # Optional per-image facts a split may use: the group (patient, subject) each image belongs
    # to, and the split the source itself assigns (an index into SPLIT_NAMES, -1 for none).
    groups: tuple[str, ...] | None = None
    given: np.ndarray | None = None  # int8

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: np.ndarray) -> Catalog:
        """The images at `indices`, in that order, with the same classes (e.g. without the files
        that could not be read). The fingerprint says which images were kept."""
        indices = np.asarray(indices, dtype=np.int64)
        ids = tuple(self.ids[i] for i in indices)
        return Catalog(
            self.source, ids, self.labels[indices], self.classes,
            _digest(self.fingerprint, "subset", ids),
            None if self.groups is None else tuple(self.groups[i] for i in indices),
            None if self.given is None else self.given[indices],
        )

    def class_counts(self) -> dict[str, int]:
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts, strict=True)}


class Source(ABC):
    name: ClassVar[str]

    @abstractmethod
    def scan(self) -> Catalog:
        """List the images and labels; raise DataError naming what is missing or empty."""

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """Decode image `index` of the catalog (any PIL mode); raise on an unreadable file."""


SOURCES: Registry[type[Source]] = Registry("data source")


def open_source(name: str, path: str | Path | None = None) -> Source:
    return SOURCES.get(name)(path)


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


@SOURCES.register("digits")
class DigitsSource(Source):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no download."""

    name = "digits"

    def __init__(self, path: str | Path | None = None) -> None:
        if path is not None:
            raise DataError("the digits source is bundled with scikit-learn and takes no --data")
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are counts 0..16 of the original 32x32 bitmap's 4x4 blocks: scale to 0..255.
        self._images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
        self._labels = digits.target.astype(np.int64)

    def scan(self) -> Catalog:
        ids = tuple(f"digits/{i:04d}" for i in range(len(self._labels)))
        classes = tuple(str(c) for c in range(10))
        fingerprint = _digest("digits", hashlib.sha256(self._images.tobytes()).hexdigest(),
                              self._labels.tobytes())
        return Catalog(self.name, ids, self._labels.copy(), classes, fingerprint)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self._images[index], mode="L")


@SOURCES.register("folder")
class FolderSource(Source):
    """ImageFolder layout: one sub-folder per class, images anywhere below it."""

    name = "folder"

    def __init__(self, path: str | Path | None) -> None:
        if path is None:
            raise DataError("the folder source needs a data folder: pass --data PATH")
        self.root = Path(path).expanduser()
        self._files: list[Path] = []

    def scan(self) -> Catalog:
        root = self.root
        if not root.exists():
            raise DataError(f"data folder not found: {root}")
        if not root.is_dir():
            raise DataError(f"data path is not a folder: {root}")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DataError(
                f"data folder {root} has no class sub-folders "
                f"(expected one folder per class, e.g. {root}/<class>/image.png)"
            )
        if len(class_dirs) < 2:
            raise DataError(
                f"data folder {root} has one class sub-folder ({class_dirs[0].name}); "
                "a classifier needs at least two"
            )
        files: list[Path] = []
        labels: list[int] = []
        stats: list[tuple[str, int, int]] = []
        for label, class_dir in enumerate(class_dirs):
            images = sorted(
                p for p in class_dir.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                and not any(part.startswith(".") for part in p.relative_to(root).parts)
            )
            if not images:
                raise DataError(
                    f"class folder '{class_dir.name}' ({class_dir}) has no images "
                    f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
                )
            for p in images:
                st = p.stat()
                files.append(p)
                labels.append(label)
                # Size and modification time stand for the content, as make and rsync do:
                # checking them costs a stat per file instead of reading every byte.
                stats.append((p.relative_to(root).as_posix(), st.st_size, st.st_mtime_ns))
        self._files = files
        classes = tuple(d.name for d in class_dirs)
        ids = tuple(s[0] for s in stats)
        return Catalog(self.name, ids, np.asarray(labels, dtype=np.int64), classes,
                       _digest("folder", classes, stats))

    def load(self, index: int) -> Image.Image:
        if not self._files:
            self.scan()
        image = Image.open(self._files[index])
        image.load()  # decode now, so that a truncated file fails here rather than later
        return image
