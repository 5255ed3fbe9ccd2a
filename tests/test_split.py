"""Split methods: the sizes they promise, no group leakage, the source's own split, errors."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest

from imgcls.data.sources import Catalog
from imgcls.data.split import SPLIT_NAMES, SPLITS, make_split, natural_key, stratified_split
from imgcls.errors import ConfigError, DataError

TRAIN, VAL, TEST = 0, 1, 2


def catalog(ids: list[str], labels: list[int], classes: tuple[str, ...] = ("a", "b"),
            groups: list[str] | None = None, given: list[int] | None = None) -> Catalog:
    return Catalog("t", tuple(ids), np.asarray(labels, dtype=np.int64), classes, "fp",
                   None if groups is None else tuple(groups),
                   None if given is None else np.asarray(given, dtype=np.int8))


def patients(sizes: list[int], labels: list[int]) -> Catalog:
    """One group per patient; patient k has sizes[k] images, all of class labels[k]."""
    ids, image_labels, groups = [], [], []
    for k, (size, label) in enumerate(zip(sizes, labels, strict=True)):
        for i in range(size):
            ids.append(f"scans/patient{k:02d}_{i}.png")
            image_labels.append(label)
            groups.append(f"p{k}")
    return catalog(ids, image_labels, groups=groups)


def per_class(c: Catalog, assignment: np.ndarray, part: int) -> list[int]:
    return [int(((c.labels == label) & (assignment == part)).sum())
            for label in range(len(c.classes))]


def test_every_method_is_fixed_by_the_seed() -> None:
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 6, 40).tolist()
    c = patients(sizes, [k % 2 for k in range(40)])
    c = Catalog(c.source, c.ids, c.labels, c.classes, c.fingerprint, c.groups,
                np.zeros(len(c), dtype=np.int8))  # all train: 'given' carves val and test
    for method in SPLITS.names():
        first = make_split(c, method, 0.2, 0.1, seed=5).assignment
        assert (make_split(c, method, 0.2, 0.1, seed=5).assignment == first).all(), method
        assert (make_split(c, method, 0.2, 0.1, seed=6).assignment != first).any(), method


def test_make_split_stratified_is_stratified_split() -> None:
    c = catalog([f"x{i}" for i in range(30)], [i % 3 for i in range(30)], ("a", "b", "c"))
    expected = stratified_split(c, 0.2, 0.2, seed=1).assignment
    assert (make_split(c, "stratified", 0.2, 0.2, seed=1).assignment == expected).all()


def test_an_unknown_method_lists_the_known_ones() -> None:
    c = catalog(["x", "y"], [0, 1])
    with pytest.raises(ConfigError, match=r"unknown split method 'grup'; did you mean 'group'\?"):
        make_split(c, "grup", 0.2, 0.2, seed=0)


@pytest.mark.parametrize("method", ["stratified", "sorted", "group", "given"])
def test_fractions_that_leave_no_training_images_are_refused(method: str) -> None:
    c = catalog(["x", "y"], [0, 1])
    with pytest.raises(ConfigError, match=r"val_fraction 0\.5 and test_fraction 0\.5"):
        make_split(c, method, 0.5, 0.5, seed=0)


def test_natural_key_orders_numbers_by_value() -> None:
    names = ["img10.png", "img2.png", "Img11.png", "img1.png", "img02.png"]
    assert sorted(names, key=natural_key) == [
        "img1.png", "img02.png", "img2.png", "img10.png", "Img11.png"]


def test_sorted_holds_out_the_first_ids_in_natural_order() -> None:
    rng = np.random.default_rng(0)
    numbers = rng.permutation(np.arange(1, 25))  # catalog order is not id order
    ids = [f"tb/Tuberculosis-{n}.png" if n % 2 else f"normal/Normal-{n}.png" for n in numbers]
    labels = [int(n % 2) for n in numbers]
    c = catalog(ids, labels, ("normal", "tb"))
    tests, vals = set(), []
    for seed in range(5):
        split = make_split(c, "sorted", 0.25, 0.25, seed=seed)
        assert per_class(c, split.assignment, TEST) == [3, 3]  # round(12 * 0.25) per class
        assert per_class(c, split.assignment, VAL) == [3, 3]
        tests.add(frozenset(c.ids[i] for i in split.indices("test")))
        vals.append(frozenset(c.ids[i] for i in split.indices("val")))
    # The lowest numbers of each class, by value (a plain string sort would take 10 and 12).
    lowest = {f"normal/Normal-{n}.png" for n in (2, 4, 6)} | {
        f"tb/Tuberculosis-{n}.png" for n in (1, 3, 5)}
    assert tests == {frozenset(lowest)}  # the same hold-out for every seed
    assert len(set(vals)) > 1  # validation is drawn by the seed
    assert all(not (v & lowest) for v in vals)


def test_sorted_gives_a_small_class_one_test_image() -> None:
    c = catalog(["a3", "a1", "a2", "b1", "b2", "b3", "b4", "b5"], [0, 0, 0, 1, 1, 1, 1, 1])
    split = make_split(c, "sorted", 0.0, 0.1, seed=0)
    assert [c.ids[i] for i in split.indices("test")] == ["a1", "b1"]
    assert split.counts() == {"train": 6, "val": 0, "test": 2}


def test_sorted_names_a_class_too_small_to_split() -> None:
    c = catalog(["a1", "a2", "b1", "b2", "b3"], [0, 0, 1, 1, 1])
    with pytest.raises(DataError, match="class 'a' has 2 image"):
        make_split(c, "sorted", 0.2, 0.2, seed=0)


def test_group_split_never_puts_a_group_in_two_splits() -> None:
    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 9, 60).tolist()
    labels = rng.integers(0, 2, 60).tolist()
    c = patients(sizes, labels)
    assert c.groups is not None
    groups = np.asarray(c.groups)
    for seed in range(30):
        split = make_split(c, "group", 0.2, 0.1, seed=seed)
        for g in np.unique(groups):
            assert len(set(split.assignment[groups == g].tolist())) == 1, (seed, g)
        for part, fraction in ((VAL, 0.2), (TEST, 0.1)):
            counts = per_class(c, split.assignment, part)
            for label, n in enumerate(np.bincount(c.labels)):
                assert counts[label] >= 1  # every class is evaluated
                # Whole groups: within the largest group's size of the target.
                assert abs(counts[label] - fraction * n) <= max(sizes), (seed, part, label)


def test_a_class_with_just_enough_groups_reaches_every_split() -> None:
    # By the fractions alone all three groups of a class would go to train.
    c = patients([2] * 6 + [5] * 10, [0] * 3 + [1] * 3 + [2] * 10)
    c = Catalog(c.source, c.ids, c.labels, ("a", "b", "c"), c.fingerprint, c.groups)
    for seed in range(10):
        split = make_split(c, "group", 0.05, 0.05, seed=seed)
        for part in (TRAIN, VAL, TEST):
            assert per_class(c, split.assignment, part)[:2] == [2, 2], (seed, part)


def test_group_split_keeps_mixed_class_groups_whole() -> None:
    # A patient may have images of both classes (e.g. before and after a diagnosis).
    rng = np.random.default_rng(4)
    ids = [f"p{k}_{i}.png" for k in range(30) for i in range(4)]
    labels = rng.integers(0, 2, len(ids)).tolist()
    c = catalog(ids, labels, groups=[name.split("_")[0] for name in ids])
    for seed in range(10):
        split = make_split(c, "group", 0.3, 0.0, seed=seed)
        parts = split.assignment.reshape(30, 4)
        assert (parts == parts[:, :1]).all()
        assert split.counts()["test"] == 0
        assert min(per_class(c, split.assignment, VAL)) >= 1


def test_group_pattern_reads_the_group_from_the_file_name(tmp_path: Path) -> None:
    ids = [f"{cls}/patient{k}_scan{i}.png" for cls, ks in (("a", (1, 2, 3, 4)), ("b", (5, 6, 7)))
           for k in ks for i in range(3)]
    labels = [0 if item.startswith("a/") else 1 for item in ids]
    c = catalog(ids, labels)
    split = make_split(c, "group", 0.3, 0.3, seed=0, group_pattern=r"patient(\d+)_")
    assert split.groups == tuple(re.search(r"patient(\d+)_", i).group(1) for i in ids)  # type: ignore[union-attr]
    # Without a capture group the whole match is the group.
    whole = make_split(c, "group", 0.3, 0.3, seed=0, group_pattern=r"patient\d+")
    assert whole.groups == tuple(i.split("/")[1].split("_")[0] for i in ids)
    for k in range(1, 8):
        assert len({int(split.assignment[i]) for i, item in enumerate(ids)
                    if f"patient{k}_" in item}) == 1
    rows = list(csv.DictReader(split.write_csv(tmp_path / "split.csv", c).open()))
    assert [r["group"] for r in rows] == list(split.groups or ())
    assert [r["split"] for r in rows] == [SPLIT_NAMES[p] for p in split.assignment]


def test_the_catalog_groups_come_before_a_pattern() -> None:
    c = catalog(["x1", "x2", "x3", "y1", "y2", "y3"], [0, 0, 0, 1, 1, 1],
                groups=["g1", "g2", "g3", "g4", "g5", "g6"])
    split = make_split(c, "group", 0.3, 0.3, seed=0, group_pattern=r"[xy]")
    assert split.groups == c.groups


def test_a_file_name_the_pattern_misses_is_named() -> None:
    c = catalog(["a/patient1.png", "a/scan.png"], [0, 0])
    with pytest.raises(DataError, match=r"group_pattern 'patient\(\\\\d\+\)' finds no group in "
                                        r"the file name of 'a/scan.png'"):
        make_split(c, "group", 0.2, 0.2, seed=0, group_pattern=r"patient(\d+)")


def test_bad_group_settings_are_refused() -> None:
    c = catalog([f"p{i}.png" for i in range(6)], [0, 0, 0, 1, 1, 1])
    with pytest.raises(DataError, match=r"split 'group' needs the group .* group column .* "
                                        r"group_pattern"):
        make_split(c, "group", 0.2, 0.2, seed=0)
    with pytest.raises(ConfigError, match="group_pattern 'p' is only used by the 'group' split"):
        make_split(c, "stratified", 0.2, 0.2, seed=0, group_pattern="p")
    with pytest.raises(ConfigError, match=r"group_pattern 'p\(' is not a valid regular"):
        make_split(c, "group", 0.2, 0.2, seed=0, group_pattern="p(")


def test_too_few_groups_are_counted() -> None:
    c = catalog([f"p{i}.png" for i in range(6)], [0, 0, 0, 1, 1, 1],
                groups=["g1", "g1", "g1", "g2", "g2", "g2"])
    with pytest.raises(DataError, match="train/val/test group split needs at least 3 groups; "
                                        "found 2"):
        make_split(c, "group", 0.2, 0.2, seed=0)
    with pytest.raises(DataError, match="class 'a' has images from 1 group"):
        make_split(c, "group", 0.2, 0.0, seed=0)


def test_given_split_is_kept_as_the_source_assigns_it() -> None:
    given = [0, 0, 0, 1, 2, 0, 0, 0, 1, 2]
    c = catalog([f"x{i}" for i in range(10)], [0] * 5 + [1] * 5, given=given)
    for seed in range(3):
        assert make_split(c, "given", 0.4, 0.4, seed=seed).assignment.tolist() == given


def test_given_without_test_has_no_test_split_unless_asked() -> None:
    given = [0] * 8 + [1] * 2 + [0] * 8 + [1] * 2
    c = catalog([f"x{i}" for i in range(20)], [0] * 10 + [1] * 10, given=given)
    assert make_split(c, "given", 0.2, 0.0, seed=0).assignment.tolist() == given
    split = make_split(c, "given", 0.2, 0.3, seed=0)
    assert per_class(c, split.assignment, TEST) == [3, 3]  # round(10 * 0.3) of each class
    assert per_class(c, split.assignment, VAL) == [2, 2]  # the source's, untouched
    assert (split.assignment[np.asarray(given) == VAL] == VAL).all()


def test_given_without_validation_carves_it_from_train() -> None:
    given = [0] * 16 + [2] * 4 + [0] * 8 + [2] * 2
    c = catalog([f"x{i}" for i in range(30)], [0] * 20 + [1] * 10, given=given)
    split = make_split(c, "given", 0.2, 0.1, seed=0)
    assert per_class(c, split.assignment, VAL) == [4, 2]  # round(n * 0.2) per class
    assert per_class(c, split.assignment, TEST) == [4, 2]  # the source's test, kept
    assert (split.assignment[np.asarray(given) == TEST] == TEST).all()
    assert (np.asarray(given)[split.indices("val")] == TRAIN).all()
    carved = make_split(c, "given", 0.2, 0.1, seed=1).indices("val")
    assert set(carved.tolist()) != set(split.indices("val").tolist())


def test_given_errors_say_what_is_missing() -> None:
    c = catalog(["a/1.png", "a/2.png", "b/1.png", "b/2.png"], [0, 0, 1, 1])
    with pytest.raises(DataError, match=r"split 'given' needs train/ and val/ folders, a CSV "
                                        r"split column or an \.npz file"):
        make_split(c, "given", 0.2, 0.0, seed=0)
    unassigned = catalog(c.ids, c.labels.tolist(), given=[0, -1, 1, -1])
    with pytest.raises(DataError, match=r"2 image\(s\) have no split from the source "
                                        r"\(first: a/2.png, b/2.png\)"):
        make_split(unassigned, "given", 0.2, 0.0, seed=0)
    small = catalog(c.ids, c.labels.tolist(), given=[0, 0, 0, 2])
    with pytest.raises(DataError, match=r"class 'b' has 1 train image\(s\) in the source's split; "
                                        r"carving 1 val from them"):
        make_split(small, "given", 0.2, 0.0, seed=0)
    no_train = catalog(c.ids, c.labels.tolist(), given=[0, 1, 1, 1])
    with pytest.raises(DataError, match="class 'b' has no train images"):
        make_split(no_train, "given", 0.2, 0.0, seed=0)


def test_the_split_csv_has_a_group_column_only_with_groups(tmp_path: Path) -> None:
    plain = catalog(["x1", "x2", "x3", "y1", "y2", "y3"], [0, 0, 0, 1, 1, 1])
    grouped = catalog(plain.ids, plain.labels.tolist(), groups=["g1", "g2", "g3"] * 2)
    for c, header in ((plain, ["index", "id", "label", "class", "split"]),
                      (grouped, ["index", "id", "label", "class", "split", "group"])):
        split = make_split(c, "stratified", 0.3, 0.0, seed=0)
        with split.write_csv(tmp_path / "s.csv", c).open() as f:
            rows = list(csv.reader(f))
        assert rows[0] == header
        assert [r[4] for r in rows[1:]] == [SPLIT_NAMES[p] for p in split.assignment]
    assert [r[5] for r in rows[1:]] == ["g1", "g2", "g3"] * 2
