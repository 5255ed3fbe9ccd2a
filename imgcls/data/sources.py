"""Data sources: where images and their labels come from.

A source is scanned once into a `Catalog` (ids, labels, class names, a fingerprint, and where the
source knows them the group and the given split of each image); images are then opened one at a
time by index through `Source.load`, always as a PIL image, so that one decode path (`cache`)
serves every source. New sources register by name in `SOURCES`; each is constructed as
`(path, classes=None)`, where `classes` picks and orders the classes to use.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import struct
import threading
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, ClassVar

import numpy as np
from PIL import Image

from imgcls.errors import ConfigError, DataError, first_line
from imgcls.registry import Registry

# Extensions PIL decodes that people keep training images in. Other files in a class folder
# (notes, .DS_Store, annotations) are ignored, as torchvision's ImageFolder does.
IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm",
)

# Names a source may give a split, as the index `Catalog.given` holds (that of split.SPLIT_NAMES:
# train, val, test). Datasets spell validation three ways.
GIVEN_SPLITS = {"train": 0, "val": 1, "valid": 1, "validation": 1, "test": 2}
NO_SPLIT = -1


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


class Source(ABC):
    name: ClassVar[str]
    # Whether the images are files that may be placeholders (scraped, exported, collected)
    # rather than a curated array: the digits are 8x8 by design, not tiny junk.
    may_hold_placeholders: ClassVar[bool] = True

    @abstractmethod
    def scan(self) -> Catalog:
        """List the images and labels; raise DataError naming what is missing or empty."""

    @abstractmethod
    def load(self, index: int) -> Image.Image:
        """Image `index` of the catalog (any PIL mode), opened but not necessarily decoded yet,
        so that the decoder can still pick a reduced JPEG scale; decoding raises on a bad file."""


SOURCES: Registry[type[Source]] = Registry("data source")


def open_source(name: str, path: str | Path | None = None,
                classes: Sequence[str] | None = None) -> Source:
    """The source registered as `name`, reading `path`, restricted to `classes` (in that order)."""
    return SOURCES.get(name)(path, classes)  # type: ignore[call-arg]


def listing(items: Sequence[str], limit: int = 3) -> str:
    """The first `limit` items joined by "; ", then how many more there are."""
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return "; ".join(items[:limit]) + more


def _digest(*parts: object) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()


def check_classes(classes: Sequence[str] | None) -> tuple[str, ...] | None:
    """The classes a study asks for, as a tuple, checked once for every source and setting: at
    least two distinct, non-empty names (None: every class the source finds)."""
    if classes is None:
        return None
    if isinstance(classes, str):  # a string is a sequence of one-letter names: never meant
        raise ConfigError(f"classes must be a list of names, not the string {classes!r}")
    names = tuple(classes)
    if len(set(names)) != len(names) or "" in names or len(names) < 2:
        raise ConfigError(f"classes {list(names)} must be at least two distinct, non-empty "
                          "names: a classifier needs two")
    return names


def _pick_classes(found: Sequence[str], wanted: tuple[str, ...] | None, where: object,
                  kind: str, *, in_order: bool = False) -> tuple[str, ...]:
    """`wanted` in its order, each checked to be among `found`; without it, all found: sorted,
    or in their order where `in_order` (an npz's class 10 stays after 9)."""
    if wanted is None:
        classes = tuple(dict.fromkeys(found)) if in_order else tuple(sorted(set(found)))
        if len(classes) < 2:
            raise DataError(
                f"{where} has {len(classes)} class(es) ({', '.join(classes) or 'none'}); "
                "a classifier needs at least two"
            )
        return classes
    for name in wanted:
        if name not in found:
            raise DataError(
                f"class {name!r} not found in {where} ({kind} found: "
                f"{', '.join(sorted(set(found)))}); check the classes setting"
            )
    return wanted


def _stat(path: Path, item_id: str) -> tuple[str, int, int]:
    # Size and modification time stand for the content, as make and rsync do: checking them
    # costs a stat per file instead of reading every byte.
    st = path.stat()
    return item_id, st.st_size, st.st_mtime_ns


@SOURCES.register("digits")
class DigitsSource(Source):
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images, 10 classes): no download."""

    name = "digits"
    may_hold_placeholders = False

    def __init__(self, path: str | Path | None = None,
                 classes: Sequence[str] | None = None) -> None:
        if path is not None:
            raise DataError("the digits source is bundled with scikit-learn and takes no --data")
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Pixel values are counts 0..16 of the original 32x32 bitmap's 4x4 blocks: scale to 0..255.
        self._images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
        self._labels = digits.target.astype(np.int64)
        self.classes = check_classes(classes)
        self._rows = np.arange(len(self._labels))

    def scan(self) -> Catalog:
        found = tuple(str(c) for c in range(10))
        classes = _pick_classes(found, self.classes, "the digits data", "classes")
        # Each image keeps its index in the full data as its id, so ids do not move when
        # `classes` leaves some digits out.
        new_label = {found.index(c): i for i, c in enumerate(classes)}
        self._rows = np.flatnonzero(np.isin(self._labels, list(new_label)))
        labels = np.array([new_label[int(v)] for v in self._labels[self._rows]], dtype=np.int64)
        ids = tuple(f"digits/{i:04d}" for i in self._rows)
        fingerprint = _digest("digits", hashlib.sha256(self._images.tobytes()).hexdigest(),
                              self._labels.tobytes(), classes)
        return Catalog(self.name, ids, labels, classes, fingerprint)

    def load(self, index: int) -> Image.Image:
        return Image.fromarray(self._images[self._rows[index]])


class FileSource(Source):
    """A source that reads what a path names: a folder, a manifest, an archive. It keeps the
    files of its last scan, so that `load` opens image `index` without another scan."""

    needs: ClassVar[str]  # what --data must name, in the message when it is missing

    def __init__(self, path: str | Path | None, classes: Sequence[str] | None = None) -> None:
        if path is None:
            raise DataError(f"the {self.name} source needs {self.needs}")
        self.path = Path(path).expanduser()
        self.classes = check_classes(classes)
        self._files: list[Path] = []

    def load(self, index: int) -> Image.Image:
        if not self._files:
            self.scan()
        return Image.open(self._files[index])


@SOURCES.register("folder")
class FolderSource(FileSource):
    """ImageFolder layout: one sub-folder per class, images anywhere below it.

    When the root's sub-folders are all split names (train, required; val/valid/validation and
    test, optional) that hold class folders, the data comes split: ids start with the split
    folder (`train/ants/x.jpg`), `Catalog.given` says each image's split, and the classes are the
    union over the splits.
    """

    name = "folder"
    needs = "a data folder: pass --data PATH"

    def _parts(self) -> list[tuple[Path, int]]:
        """(folder holding class folders, given split) pairs: the root alone, or its splits."""
        root = self.path
        if not root.exists():
            raise DataError(f"data folder not found: {root}")
        if not root.is_dir():
            raise DataError(f"data path is not a folder: {root}")
        subdirs = _subfolders(root)
        names = [d.name.lower() for d in subdirs]
        if not subdirs or not all(n in GIVEN_SPLITS for n in names):
            return [(root, NO_SPLIT)]
        if not any(_subfolders(d) for d in subdirs):  # e.g. classes that happen to be "train"...
            return [(root, NO_SPLIT)]
        if "train" not in names:
            raise DataError(
                f"data folder {root} has split folders ({', '.join(d.name for d in subdirs)}) "
                "but no train/; add train/<class>/ or use one folder per class"
            )
        return sorted(((d, GIVEN_SPLITS[d.name.lower()]) for d in subdirs),
                      key=lambda part: (part[1], part[0].name))

    def scan(self) -> Catalog:
        root = self.path
        parts = self._parts()
        split_layout = parts[0][1] != NO_SPLIT
        class_dirs = {part: {d.name: d for d in _subfolders(part)} for part, _ in parts}
        found = sorted({name for dirs in class_dirs.values() for name in dirs})
        if not found:
            raise DataError(
                f"data folder {root} has no class sub-folders "
                f"(expected one folder per class, e.g. {root}/<class>/image.png)"
            )
        where = f"{root} or its split folders" if split_layout else root
        classes = _pick_classes(found, self.classes, where, "folders")

        files: list[Path] = []
        labels: list[int] = []
        given: list[int] = []
        stats: list[tuple[str, int, int]] = []
        for part, split in parts:
            for label, name in enumerate(classes):
                class_dir = class_dirs[part].get(name)
                if class_dir is None:
                    continue  # a class may be absent from val/ or test/
                for p in images_below(class_dir, root):
                    files.append(p)
                    labels.append(label)
                    given.append(split)
                    stats.append(_stat(p, p.relative_to(root).as_posix()))
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
        for name, n in zip(classes, counts, strict=True):
            if n == 0:
                folders = [str(dirs[name]) for dirs in class_dirs.values() if name in dirs]
                raise DataError(
                    f"class folder '{name}' ({', '.join(folders)}) has no images "
                    f"(looked for {', '.join(IMAGE_EXTENSIONS)})"
                )
        self._files = files
        ids = tuple(s[0] for s in stats)
        return Catalog(
            self.name, ids, np.asarray(labels, dtype=np.int64), classes,
            _digest("folder", classes, stats), None,
            np.asarray(given, dtype=np.int8) if split_layout else None,
        )


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def images_below(folder: Path, root: Path) -> list[Path]:
    return sorted(
        p for p in folder.rglob("*")
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


@SOURCES.register("csv")
class CsvSource(FileSource):
    """A CSV manifest with a header: `path,label` and optionally `split` and `group`.

    Paths are relative to the CSV's folder, the data root, and must stay inside it. `split` is
    train, val (or valid, validation), test, or empty for none. `group` names the patient or
    subject of an image; an empty group makes the image a group of its own.
    """

    name = "csv"
    needs = "a manifest: pass --data PATH/TO/labels.csv"

    def _read(self) -> tuple[bytes, csv.DictReader[str]]:
        path = self.path
        if not path.exists():
            raise DataError(f"CSV manifest not found: {path}")
        if not path.is_file():
            raise DataError(f"CSV manifest is not a file: {path} (the csv source reads a .csv)")
        content = path.read_bytes()
        try:
            text = content.decode("utf-8-sig")  # spreadsheets often write a byte-order mark
        except UnicodeDecodeError as exc:
            raise DataError(f"CSV manifest {path} is not UTF-8 text ({exc.reason} at byte "
                            f"{exc.start}); save it as UTF-8") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        header = [name.strip().lower() for name in reader.fieldnames or []]
        missing = [c for c in ("path", "label") if c not in header]
        if missing:
            raise DataError(
                f"CSV manifest {path} has no {' or '.join(missing)} column (columns found: "
                f"{', '.join(header) or 'none'}); its header must be path,label[,split][,group]"
            )
        reader.fieldnames = header
        return content, reader

    def scan(self) -> Catalog:
        content, reader = self._read()
        root = self.path.parent.resolve()
        has_split, has_group = "split" in reader.fieldnames, "group" in reader.fieldnames
        problems: list[str] = []
        rows: list[tuple[Path, str, str, int, str]] = []  # file, id, label, given, group
        first_seen: dict[str, int] = {}
        labels_found: set[str] = set()
        for row in reader:
            line = reader.line_num
            value = {k: (v or "").strip() for k, v in row.items() if isinstance(k, str)}
            path, label = value.get("path", ""), value.get("label", "")
            if not path:
                problems.append(f"line {line}: empty path")
                continue
            if not label:
                problems.append(f"line {line}: empty label for {path}")
                continue
            labels_found.add(label)
            if self.classes is not None and label not in self.classes:
                continue  # a class not asked for: its rows are left out unchecked
            split_name = value.get("split", "").lower()
            if split_name and split_name not in GIVEN_SPLITS:
                problems.append(f"line {line}: unknown split {value['split']!r} "
                                "(use train, val, test or leave it empty)")
                continue
            file, item_id, problem = _inside(root, path)
            if problem:
                problems.append(f"line {line}: {problem}")
                continue
            if item_id in first_seen:
                problems.append(f"line {line}: {path} is listed again (first on line "
                                f"{first_seen[item_id]})")
                continue
            first_seen[item_id] = line
            given = GIVEN_SPLITS[split_name] if split_name else NO_SPLIT
            rows.append((file, item_id, label, given, value.get("group", "") or item_id))
        if problems:
            raise DataError(f"CSV manifest {self.path}: {len(problems)} bad row(s): "
                            f"{listing(problems)}")
        if not labels_found:
            raise DataError(f"CSV manifest {self.path} lists no images")
        classes = _pick_classes(sorted(labels_found), self.classes, self.path, "labels")
        self._files = [r[0] for r in rows]
        labels = np.array([classes.index(r[2]) for r in rows], dtype=np.int64)
        stats = [_stat(r[0], r[1]) for r in rows]
        return Catalog(
            self.name, tuple(r[1] for r in rows), labels, classes,
            _digest("csv", hashlib.sha256(content).hexdigest(), classes, stats),
            tuple(r[4] for r in rows) if has_group else None,
            np.array([r[3] for r in rows], dtype=np.int8) if has_split else None,
        )


def _inside(root: Path, written: str) -> tuple[Path, str, str]:
    """(file, id, "") for a manifest path that names a file inside `root` (resolved), else
    (_, _, the problem). The id is the path relative to the root as written, normalized."""
    given = Path(written)
    full = given if given.is_absolute() else root / given
    try:
        resolved = full.resolve()
        is_file = resolved.is_file()
    except (OSError, ValueError) as exc:  # a symlink loop, a NUL byte in the path
        return full, "", f"cannot use path {written!r} ({first_line(exc)})"
    if not resolved.is_relative_to(root):
        return full, "", f"{written} is outside the data folder {root}; keep images below it"
    if not is_file:
        return full, "", f"file not found: {written}"
    lexical = Path(os.path.normpath(full))
    base = lexical if lexical.is_relative_to(root) else resolved
    return resolved, base.relative_to(root).as_posix(), ""


@SOURCES.register("npz")
class NpzSource(FileSource):
    """A MedMNIST-style .npz: `train_images`, `train_labels` and optionally `val_*`, `test_*`.

    Images are (N, H, W) or (N, H, W, C) with C in 1, 3, 4, of any integer or float dtype; labels
    (N,) or (N, 1) class indices. Class names come from a `classes` or `label_names` string array
    in the file, else "0".."K-1". Arrays stored uncompressed (np.savez) are memory-mapped; a
    compressed one (np.savez_compressed) is read into memory the first time an image of its split
    is loaded.
    """

    name = "npz"
    may_hold_placeholders = False  # a curated array (MedMNIST: 28x28 by design)
    PREFIXES = ("train", "val", "test")  # in GIVEN_SPLITS order

    needs = "a file: pass --data PATH/TO/data.npz"

    def __init__(self, path: str | Path | None, classes: Sequence[str] | None = None) -> None:
        super().__init__(path, classes)
        self._where = np.zeros((0, 2), dtype=np.int64)  # (prefix index, row) per catalog index
        self._arrays: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()  # images are loaded from several threads

    def _open(self) -> np.lib.npyio.NpzFile:
        if not self.path.exists():
            raise DataError(f"npz file not found: {self.path}")
        try:
            return np.load(self.path, allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise DataError(f"{self.path} is not a readable .npz file ({first_line(exc)}); "
                            "save the arrays with numpy.savez") from None

    def scan(self) -> Catalog:
        path = self.path
        with self._open() as npz:
            keys = list(npz.files)
            if "train_images" not in keys or "train_labels" not in keys:
                raise DataError(
                    f"{path} has no train_images and train_labels arrays (keys found: "
                    f"{', '.join(keys) or 'none'}); expected MedMNIST-style train_images, "
                    "train_labels and optional val_*, test_*"
                )
            parts: list[tuple[int, np.ndarray]] = []  # (prefix index, labels)
            for k, prefix in enumerate(self.PREFIXES):
                if f"{prefix}_images" not in keys and f"{prefix}_labels" not in keys:
                    continue
                parts.append((k, self._labels(npz, prefix, keys)))
            names = self._class_names(npz, keys)
        top = max(int(labels.max(initial=-1)) for _, labels in parts)
        if names is None:
            names = tuple(str(c) for c in range(top + 1))
        elif top >= len(names):
            raise DataError(f"{path} has {len(names)} class names but a label {top}; "
                            "labels must index the names")
        # The file's order, not sorted: "10" must stay after "9".
        classes = _pick_classes(names, self.classes, path, "classes", in_order=True)
        new_label = np.full(len(names), -1, dtype=np.int64)
        new_label[[names.index(c) for c in classes]] = np.arange(len(classes))

        where, ids, labels, given = [], [], [], []
        for k, part_labels in parts:
            mapped = new_label[part_labels]
            rows = np.flatnonzero(mapped >= 0)
            where.append(np.stack([np.full(len(rows), k), rows], axis=1))
            ids.extend(f"{self.PREFIXES[k]}/{row:06d}" for row in rows)
            labels.append(mapped[rows])
            given.append(np.full(len(rows), k, dtype=np.int8))
        self._where = np.concatenate(where)
        st = path.stat()
        return Catalog(
            self.name, tuple(ids), np.concatenate(labels), classes,
            _digest("npz", str(path.resolve()), st.st_size, st.st_mtime_ns, classes),
            None, np.concatenate(given),
        )

    def _labels(self, npz: np.lib.npyio.NpzFile, prefix: str, keys: list[str]) -> np.ndarray:
        """The labels of one split, checked against its images' header (the pixels stay put)."""
        for key in (f"{prefix}_images", f"{prefix}_labels"):
            if key not in keys:
                raise DataError(f"{self.path} has {prefix}_* arrays but no {key}")
        labels = np.asarray(npz[f"{prefix}_labels"])
        if labels.ndim == 2 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 1:
            raise DataError(
                f"{self.path}: {prefix}_labels has shape {labels.shape}; expected (N,) or (N, 1) "
                "class indices (multi-label data is not supported)"
            )
        if labels.dtype.kind not in "iub":
            raise DataError(f"{self.path}: {prefix}_labels has dtype {labels.dtype}; labels must "
                            "be integer class indices")
        if len(labels) and labels.min() < 0:
            raise DataError(f"{self.path}: {prefix}_labels has a negative label "
                            f"{int(labels.min())}; labels must be class indices 0..K-1")
        shape, dtype = _member_header(self.path, f"{prefix}_images")
        if not (len(shape) == 3 or (len(shape) == 4 and shape[3] in (1, 3, 4))):
            raise DataError(f"{self.path}: {prefix}_images has shape {shape}; expected (N, H, W) "
                            "or (N, H, W, C) with C 1, 3 or 4")
        if dtype.kind not in "iufb":
            raise DataError(f"{self.path}: {prefix}_images has dtype {dtype}; expected numbers")
        if shape[0] != len(labels):
            raise DataError(f"{self.path}: {prefix}_images holds {shape[0]} images but "
                            f"{prefix}_labels {len(labels)} labels")
        return labels.astype(np.int64)

    def _class_names(self, npz: np.lib.npyio.NpzFile, keys: list[str]) -> tuple[str, ...] | None:
        for key in ("classes", "label_names"):
            if key in keys:
                try:
                    names = np.asarray(npz[key])
                except ValueError as exc:  # an object array, which allow_pickle=False refuses
                    raise DataError(f"{self.path}: {key} cannot be read without pickle "
                                    f"({first_line(exc)}); store it as a string array") from None
                if names.ndim != 1 or names.dtype.kind not in "US":
                    raise DataError(f"{self.path}: {key} must be a 1-D array of strings, not "
                                    f"{names.dtype} {names.shape}")
                return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)
        return None

    def _images(self, prefix: str) -> np.ndarray:
        with self._lock:
            if prefix not in self._arrays:
                self._arrays[prefix] = _member_array(self.path, f"{prefix}_images")
            return self._arrays[prefix]

    def load(self, index: int) -> Image.Image:
        if not len(self._where):
            self.scan()
        k, row = self._where[index]
        return array_to_image(np.asarray(self._images(self.PREFIXES[k])[row]))


def _read_npy_header(f: IO[bytes]) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy data starting at `f`'s position."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)  # 2.0; 3.0 differs only in the text encoding


def _member_header(path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape, _, dtype = _read_npy_header(f)
    return shape, dtype


def _member_array(path: Path, key: str) -> np.ndarray:
    """Array `key` of an .npz: memory-mapped when stored uncompressed, else read whole."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(f"{key}.npy")
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)  # the member's local header: its data follows name and extra
            if local[:4] == b"PK\x03\x04":
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                shape, fortran, dtype = _read_npy_header(f)
                offset = f.tell()
                if not dtype.hasobject:
                    return np.memmap(path, dtype=dtype, mode="r", shape=shape,
                                     order="F" if fortran else "C", offset=offset)
    with np.load(path, allow_pickle=False) as npz:
        return np.asarray(npz[key])


def array_to_image(pixels: np.ndarray) -> Image.Image:
    """(H, W) or (H, W, C) pixels as a PIL image that keeps their values: uint8 as L, RGB or
    RGBA; other single-channel integers as mode I and floats as mode F (the decoder scales them);
    other multi-channel data scaled to uint8 here, as PIL has no such modes."""
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(pixels))
    if pixels.ndim == 2 and pixels.dtype.kind == "f":
        return Image.fromarray(pixels.astype(np.float32))
    int32 = np.iinfo(np.int32)
    if (pixels.ndim == 2 and pixels.dtype.kind in "iu" and pixels.size
            and int32.min <= pixels.min() and pixels.max() <= int32.max):
        return Image.fromarray(pixels.astype(np.int32))
    return Image.fromarray(scale_to_uint8(pixels))


def scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """Pixel values of any integer or float dtype on the 0..255 scale, as uint8.

    Non-negative integers are divided by the smallest power-of-two range of at least 8 bits that
    holds their maximum, so that 12-bit data (0..4095) and 16-bit data (0..65535) keep their
    brightness and a dark 16-bit image stays dark. Floats in [0, 1] are multiplied by 255. Other
    floats, and integers with negative values (e.g. CT numbers), are stretched from their minimum
    to their maximum. NaN counts as 0.
    """
    if values.dtype == np.uint8:
        return values
    if values.dtype.kind == "b":
        return values.astype(np.uint8) * np.uint8(255)
    x = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(x.min()), float(x.max())) if x.size else (0.0, 0.0)
    if values.dtype.kind in "iu" and lo >= 0:
        x = x * (255 / (2 ** max(8, int(hi).bit_length()) - 1))
    elif values.dtype.kind == "f" and lo >= 0 and hi <= 1:
        x = x * 255
    elif hi > lo:
        x = (x - lo) * (255 / (hi - lo))
    else:
        x = np.zeros_like(x)  # a constant image outside the usual ranges: no contrast to keep
    return np.rint(x).clip(0, 255).astype(np.uint8)
