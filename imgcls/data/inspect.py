"""What a data set holds, before a study is written for it: classes and counts, the split its
layout gives, image sizes and modes, and the files a search would refuse.

The unusable files are found the way a search finds them (`cache.decode`, with the same
placeholder and size checks), so that a study written from this summary does not stop on them
later. Nothing is written: no cache, no store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.data.cache import GRAY_MODES, MAX_PIXELS, Progress, bad_notes, decode, each_image
from imgcls.data.sources import Catalog, open_source
from imgcls.data.split import SPLIT_NAMES
from imgcls.errors import DataError, first_line


@dataclass(frozen=True)
class ImageFacts:
    """One image's header: its stored size and PIL mode."""

    width: int
    height: int
    mode: str


@dataclass(frozen=True)
class DataSummary:
    source: str  # the data source's name: folder, csv or npz
    path: Path
    catalog: Catalog
    facts: tuple[ImageFacts | None, ...]  # per catalog image; None: it could not be opened
    bad: dict[int, str]  # catalog index -> why a search could not use the image

    @property
    def classes(self) -> tuple[str, ...]:
        return self.catalog.classes

    @property
    def unusable(self) -> list[str]:
        """"id (reason)" of each unusable image, in catalog order."""
        return bad_notes(self.catalog, self.bad)

    @property
    def usable_catalog(self) -> Catalog:
        """The catalog without the unusable images: what `skip_bad_images` trains on."""
        return self.catalog.subset(np.setdiff1d(np.arange(len(self.catalog)),
                                                np.fromiter(self.bad, dtype=np.int64)))

    @property
    def counts(self) -> tuple[int, ...]:
        """Usable images per class."""
        labels = self.usable_catalog.labels
        return tuple(int(n) for n in np.bincount(labels, minlength=len(self.classes)))

    @property
    def usable(self) -> int:
        return len(self.catalog) - len(self.bad)

    @property
    def imbalance(self) -> float:
        """The largest class over the smallest (1: balanced)."""
        counts = [n for n in self.counts if n]
        return max(counts) / min(counts) if counts else 1.0

    @property
    def given_splits(self) -> dict[str, int] | None:
        """Images per split the layout gives (train/, val/, test/ folders), or None."""
        if self.catalog.given is None:
            return None
        found = Counter(int(g) for g in self.catalog.given)
        return {name: found[i] for i, name in enumerate(SPLIT_NAMES) if found[i]}

    @property
    def grouped(self) -> bool:
        """Whether the source names a group (patient, subject) per image."""
        return self.catalog.groups is not None

    @property
    def modes(self) -> Counter[str]:
        return Counter(f.mode for f in self.facts if f is not None)

    @property
    def grayscale(self) -> bool:
        modes = self.modes
        return bool(modes) and set(modes) <= GRAY_MODES  # one channel then loses nothing

    def side_quantiles(self, *qs: float) -> tuple[int, ...]:
        """Quantiles of each image's shorter side, in pixels."""
        sides = [min(f.width, f.height) for f in self.facts if f is not None]
        if not sides:
            return tuple(0 for _ in qs)
        return tuple(int(v) for v in np.quantile(sides, qs))


def guess_source(path: Path) -> str:
    """The data source that reads `path`: a folder, a CSV manifest or an .npz archive."""
    if path.is_dir():
        return "folder"
    if not path.exists():
        raise DataError(f"data not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return "csv"
    if suffix == ".npz":
        return "npz"
    raise DataError(f"{path} is neither a folder, a .csv manifest nor an .npz archive")


def inspect_data(path: str | Path, source: str | None = None,
                 classes: Sequence[str] | None = None, *, min_side: int = 16,
                 max_pixels: int = MAX_PIXELS, progress: Progress | None = None) -> DataSummary:
    """Scan `path` and open every image once: its header, and whether a search could use it."""
    path = Path(path).expanduser()
    name = source or guess_source(path)
    reader = open_source(name, path, classes)
    catalog = reader.scan()  # a missing class folder, an empty one, a bad CSV row: DataError
    check = min_side if reader.may_hold_placeholders else None

    def look(index: int) -> tuple[ImageFacts | None, str | None]:
        facts = None
        try:
            with reader.load(index) as image:
                facts = ImageFacts(image.width, image.height, image.mode)
                _, reason = decode(image, 64, 3, check, max_pixels)  # the search's checks
            return facts, reason
        except Exception as exc:  # any decoder error: not a usable image
            return facts, first_line(exc)

    facts: list[ImageFacts | None] = []
    bad: dict[int, str] = {}
    for index, (fact, reason) in each_image(len(catalog), look, progress):
        facts.append(fact)
        if reason is not None:
            bad[index] = reason
    return DataSummary(name, path, catalog, tuple(facts), bad)
