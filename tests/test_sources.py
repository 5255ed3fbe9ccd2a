"""Sources (folder, csv, npz, digits), class selection, and unusable files in prepare_data."""

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls.data import (
    CsvSource,
    DataConfig,
    FolderSource,
    NpzSource,
    load_images,
    open_source,
    prepare_data,
)
from imgcls.errors import ConfigError, DataError
from tests.conftest import make_image_folder, stripes


def save_image(path: Path, seed: int = 0, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gray = stripes("rows", size, np.random.default_rng(seed))
    Image.fromarray(np.stack([gray] * 3, axis=-1)).save(path)
    return path


# --- folder -----------------------------------------------------------------------------------

def test_folder_classes_pick_and_order_the_class_folders(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("health", "sick", "tb"), per_class=2)
    catalog = FolderSource(root, classes=["tb", "health"]).scan()
    assert catalog.classes == ("tb", "health")
    # sick/ is left out
    assert Counter(catalog.classes[k] for k in catalog.labels) == {"tb": 2, "health": 2}
    assert [catalog.ids[i].split("/")[0] for i in np.flatnonzero(catalog.labels == 0)] == [
        "tb", "tb"]
    assert catalog.fingerprint != FolderSource(root, classes=["health", "tb"]).scan().fingerprint


def test_a_listed_class_without_a_folder_is_named(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("health", "sick"), per_class=1)
    with pytest.raises(DataError, match=r"class 'tb' not found in .*\(folders found: health, "
                                        r"sick\)"):
        FolderSource(root, classes=["health", "tb"]).scan()


def test_data_config_checks_split_and_group_pattern() -> None:
    with pytest.raises(ValueError, match="unknown split method 'random'"):
        DataConfig(split="random")
    with pytest.raises(ValueError, match=r"group_pattern '\(P-' is not a valid regular "
                                         r"expression: missing \)"):
        DataConfig(split="group", group_pattern="(P-")
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        DataConfig(min_side=0)


def test_bad_class_lists_are_refused() -> None:
    with pytest.raises(ConfigError, match="at least two"):
        FolderSource("x", classes=["tb"])
    with pytest.raises(ConfigError, match="distinct"):
        FolderSource("x", classes=["tb", "tb"])
    with pytest.raises(ValueError, match="at least two distinct"):
        DataConfig(classes=("tb",))


def test_given_split_folders(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for split, name, n in (("train", "ants", 3), ("train", "bees", 2), ("val", "ants", 1),
                           ("val", "wasps", 1), ("test", "bees", 1)):
        for i in range(n):
            save_image(root / split / name / f"{i}.png", seed=i)
    (root / ".cache").mkdir()  # hidden: not a split, not a class
    catalog = FolderSource(root).scan()
    assert catalog.classes == ("ants", "bees", "wasps")  # wasps only in val is still a class
    assert "train/ants/0.png" in catalog.ids and "val/wasps/0.png" in catalog.ids
    by_split = {split: sorted(i for i, g in zip(catalog.ids, catalog.given, strict=True)
                              if g == k) for k, split in enumerate(("train", "val", "test"))}
    assert by_split == {"train": ["train/ants/0.png", "train/ants/1.png", "train/ants/2.png",
                                  "train/bees/0.png", "train/bees/1.png"],
                        "val": ["val/ants/0.png", "val/wasps/0.png"],
                        "test": ["test/bees/0.png"]}
    picked = FolderSource(root, classes=["bees", "ants"]).scan()
    assert picked.classes == ("bees", "ants") and len(picked) == 7


def test_split_folders_without_train_are_named(tmp_path: Path) -> None:
    save_image(tmp_path / "d" / "val" / "ants" / "0.png")
    save_image(tmp_path / "d" / "test" / "ants" / "0.png")
    with pytest.raises(DataError, match=r"split folders \(test, val\) but no train/"):
        FolderSource(tmp_path / "d").scan()


def test_valid_folder_is_the_validation_split(tmp_path: Path) -> None:
    for split in ("train", "valid"):
        for name in ("a", "b"):
            save_image(tmp_path / "d" / split / name / "0.png")
    catalog = FolderSource(tmp_path / "d").scan()
    assert catalog.given is not None and sorted(catalog.given.tolist()) == [0, 0, 1, 1]


def test_a_plain_folder_has_no_given_split(tmp_path: Path) -> None:
    assert FolderSource(make_image_folder(tmp_path / "d", per_class=1)).scan().given is None


# --- csv --------------------------------------------------------------------------------------

def write_csv(root: Path, text: str, name: str = "labels.csv") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / name
    path.write_text(text)
    return path


def test_csv_manifest_with_split_and_group(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for name in ("a.png", "b.png", "img/c.png", "img/d.png"):
        save_image(root / name)
    manifest = write_csv(root, "path,label,split,group\n"
                               "a.png,tb,train,p1\n"
                               "b.png,health,Validation,p1\n"
                               "./img/c.png, tb ,test,\n"
                               "img/d.png,health,,p2\n")
    catalog = CsvSource(manifest).scan()
    assert catalog.ids == ("a.png", "b.png", "img/c.png", "img/d.png")
    assert catalog.classes == ("health", "tb")
    assert catalog.labels.tolist() == [1, 0, 1, 0]
    assert catalog.given is not None and catalog.given.tolist() == [0, 1, 2, -1]
    assert catalog.groups == ("p1", "p1", "img/c.png", "p2")  # no group: a group of its own
    image = CsvSource(manifest).load(2)
    assert image.size == (16, 16)


def test_csv_without_split_or_group_columns(tmp_path: Path) -> None:
    save_image(tmp_path / "d" / "a.png")
    save_image(tmp_path / "d" / "b.png")
    catalog = CsvSource(write_csv(tmp_path / "d", "path,label\na.png,x\nb.png,y\n")).scan()
    assert catalog.given is None and catalog.groups is None and catalog.classes == ("x", "y")


def test_csv_classes_drop_the_other_labels(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for name in ("a.png", "b.png", "c.png"):
        save_image(root / name)
    text = "path,label\na.png,tb\nb.png,health\nc.png,sick\nmissing.png,sick\n"
    catalog = CsvSource(write_csv(root, text), classes=["tb", "health"]).scan()
    assert catalog.ids == ("a.png", "b.png") and catalog.labels.tolist() == [0, 1]
    with pytest.raises(DataError, match=r"class 'covid' not found in .*labels.csv \(labels found: "
                                        r"health, sick, tb\)"):
        CsvSource(root / "labels.csv", classes=["tb", "covid"]).scan()


@pytest.mark.parametrize(("row", "message"), [
    ("../outside.png,x", r"line 3: \.\./outside\.png is outside the data folder"),
    ("{outside},x", r"line 3: .*outside\.png is outside the data folder"),
    ("link.png,x", r"line 3: link\.png is outside the data folder"),
    ("nothere.png,x", r"line 3: file not found: nothere\.png"),
    ("a.png,", r"line 3: empty label for a\.png"),
    (",x", r"line 3: empty path"),
    ("a.png,x", r"line 3: a\.png is listed again \(first on line 2\)"),
])
def test_bad_csv_rows_are_named_by_line(tmp_path: Path, row: str, message: str) -> None:
    root = tmp_path / "d"
    save_image(root / "a.png")
    outside = save_image(tmp_path / "outside.png")
    os.symlink(outside, root / "link.png")
    manifest = write_csv(root, "path,label\na.png,y\n" + row.format(outside=outside) + "\n")
    with pytest.raises(DataError, match=r"labels\.csv: 1 bad row\(s\): " + message):
        CsvSource(manifest).scan()


def test_a_path_through_dotdot_that_stays_inside_is_fine(tmp_path: Path) -> None:
    save_image(tmp_path / "d" / "img" / "a.png")
    save_image(tmp_path / "d" / "b.png")
    catalog = CsvSource(write_csv(tmp_path / "d", "path,label\nimg/../img/a.png,x\nb.png,y\n"))
    assert catalog.scan().ids == ("img/a.png", "b.png")


def test_many_bad_rows_list_three_and_count_the_rest(tmp_path: Path) -> None:
    rows = "".join(f"f{i}.png,x,{'dev' if i == 0 else ''}\n" for i in range(6))
    manifest = write_csv(tmp_path / "d", "path,label,split\n" + rows)
    with pytest.raises(DataError, match=r"6 bad row\(s\): line 2: unknown split 'dev' \(use train, "
                                        r"val, test or leave it empty\); line 3: file not found: "
                                        r"f1\.png; line 4: .*; and 3 more$"):
        CsvSource(manifest).scan()


def test_csv_header_must_name_path_and_label(tmp_path: Path) -> None:
    manifest = write_csv(tmp_path / "d", "file,label\na.png,x\n")
    with pytest.raises(DataError, match=r"has no path column \(columns found: file, label\)"):
        CsvSource(manifest).scan()
    with pytest.raises(DataError, match="CSV manifest not found"):
        CsvSource(tmp_path / "none.csv").scan()


def test_csv_fingerprint_follows_the_manifest_and_the_files(tmp_path: Path) -> None:
    root = tmp_path / "d"
    save_image(root / "a.png")
    save_image(root / "b.png")
    manifest = write_csv(root, "path,label\na.png,x\nb.png,y\n")
    first = CsvSource(manifest).scan().fingerprint
    assert CsvSource(manifest).scan().fingerprint == first
    manifest.write_text("path,label\na.png,y\nb.png,x\n")
    relabelled = CsvSource(manifest).scan().fingerprint
    assert relabelled != first
    save_image(root / "a.png", seed=5, size=20)  # same name, other content
    assert CsvSource(manifest).scan().fingerprint != relabelled


# --- npz --------------------------------------------------------------------------------------

def medmnist(path: Path, compressed: bool = False, **extra: np.ndarray) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train_labels": np.array([[0], [1], [2], [0], [1], [2]], dtype=np.uint8),
        "val_images": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "val_labels": np.array([[2], [1], [0]], dtype=np.uint8),
        **extra,
    }
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_splits_ids_and_images(tmp_path: Path, compressed: bool) -> None:
    path = medmnist(tmp_path / "organ.npz", compressed)
    source = NpzSource(path)
    catalog = source.scan()
    assert catalog.classes == ("0", "1", "2")
    assert catalog.ids[:2] == ("train/000000", "train/000001") and catalog.ids[6] == "val/000000"
    assert catalog.given is not None and catalog.given.tolist() == [0] * 6 + [1] * 3
    assert catalog.labels.tolist() == [0, 1, 2, 0, 1, 2, 2, 1, 0]
    with np.load(path) as npz:
        expected = npz["val_images"][1]
    image = source.load(7)
    assert image.mode == "L" and (np.asarray(image) == expected).all()
    # np.savez stores arrays uncompressed: they are memory-mapped, not read whole
    assert isinstance(source._images("val"), np.memmap) is not compressed


def test_npz_class_names_and_class_filter(tmp_path: Path) -> None:
    names = np.array(["liver", "kidney", "lung"])
    path = medmnist(tmp_path / "organ.npz", label_names=names)
    assert NpzSource(path).scan().classes == ("liver", "kidney", "lung")
    source = NpzSource(path, classes=["lung", "liver"])
    catalog = source.scan()
    assert catalog.classes == ("lung", "liver")
    assert catalog.ids == ("train/000000", "train/000002", "train/000003", "train/000005",
                           "val/000000", "val/000002")
    assert catalog.labels.tolist() == [1, 0, 1, 0, 0, 1]
    with np.load(path) as npz:
        assert (np.asarray(source.load(1)) == npz["train_images"][2]).all()
    with pytest.raises(DataError, match=r"class 'heart' not found in .*\(classes found: kidney, "
                                        r"liver, lung\)"):
        NpzSource(path, classes=["heart", "lung"]).scan()


def test_npz_colour_and_sixteen_bit_images(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", train_images=rgb, train_labels=np.array([0, 1]))
    assert NpzSource(tmp_path / "rgb.npz").load(1).mode == "RGB"
    deep = np.full((4, 8, 8), 4095, dtype=np.uint16)
    np.savez(tmp_path / "deep.npz", train_images=deep, train_labels=np.array([0, 1, 0, 1]))
    data = prepare_data(DataConfig(source="npz", path=str(tmp_path / "deep.npz"), image_size=8,
                                   channels=1, split="given", val_fraction=0.5,
                                   test_fraction=0.0), seed=0)
    assert int(data.images.min()) == 255  # 12-bit white is white


def test_npz_without_train_arrays_lists_the_keys(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", images=np.zeros((2, 4, 4)), labels=np.zeros(2))
    with pytest.raises(DataError, match=r"no train_images and train_labels arrays \(keys found: "
                                        r"images, labels\)"):
        NpzSource(tmp_path / "x.npz").scan()


def test_npz_multi_label_data_is_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "chest.npz", train_images=np.zeros((2, 4, 4), np.uint8),
             train_labels=np.zeros((2, 14), np.uint8))
    with pytest.raises(DataError, match=r"train_labels has shape \(2, 14\).*multi-label"):
        NpzSource(tmp_path / "chest.npz").scan()


def test_npz_fingerprint_follows_the_file(tmp_path: Path) -> None:
    path = medmnist(tmp_path / "a.npz")
    first = NpzSource(path).scan().fingerprint
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert NpzSource(path).scan().fingerprint != first


# --- digits, open_source ----------------------------------------------------------------------

def test_digits_classes_pick_digits() -> None:
    source = open_source("digits", classes=["7", "1"])
    catalog = source.scan()
    assert catalog.classes == ("7", "1")
    assert set(catalog.classes) == {"7", "1"} and len(catalog) == 182 + 179
    with pytest.raises(DataError, match=r"class 'x' not found in the digits data"):
        open_source("digits", classes=["x", "1"]).scan()


def test_open_source_names_the_sources() -> None:
    with pytest.raises(ConfigError, match="unknown data source 'cvs'; did you mean 'csv'"):
        open_source("cvs", "x.csv")


# --- unusable files in prepare_data -----------------------------------------------------------

def folder_with_junk(root: Path) -> Path:
    make_image_folder(root, per_class=6)
    (root / "ants" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    Image.new("RGB", (40, 40), (200, 200, 200)).save(root / "bees" / "blank.png")
    return root


def test_unusable_files_stop_the_study_in_one_line(tmp_path: Path) -> None:
    config = DataConfig(path=str(folder_with_junk(tmp_path / "d")), image_size=16)
    with pytest.raises(DataError) as info:
        prepare_data(config, seed=0)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("2 of 14 files are not usable images: ants/broken.jpg (")
    assert "bees/blank.png (placeholder: uniform, luminance std 0.0)" in message
    assert message.endswith(". Pass --skip-bad-images to leave them out")


def test_skipped_files_are_left_out_before_the_split(tmp_path: Path) -> None:
    config = DataConfig(path=str(folder_with_junk(tmp_path / "d")), image_size=16,
                        skip_bad_images=True, val_fraction=0.2, test_fraction=0.2)
    data = prepare_data(config, seed=0, cache_dir=tmp_path / "cache")
    assert data.skipped[1] == "bees/blank.png (placeholder: uniform, luminance std 0.0)"
    assert data.skipped[0].startswith("ants/broken.jpg (")
    assert len(data.catalog) == 12 == len(data.images) == sum(data.split.counts().values())
    assert "bees/blank.png" not in data.catalog.ids


def test_placeholder_checks_can_be_turned_off(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=6)
    Image.new("RGB", (40, 40), (200, 200, 200)).save(root / "bees" / "blank.png")
    data = prepare_data(DataConfig(path=str(root), image_size=16, check_placeholders=False),
                        seed=0)
    assert data.skipped == () and len(data.catalog) == 13


def test_the_cache_remembers_bad_files_without_decoding_again(tmp_path: Path) -> None:
    root = folder_with_junk(tmp_path / "d")

    class Counting(FolderSource):
        loads = 0

        def load(self, index: int) -> Image.Image:
            Counting.loads += 1
            return super().load(index)

    catalog = FolderSource(root).scan()
    first = load_images(Counting(root), catalog, 16, 3, tmp_path / "cache", min_side=16)
    assert Counting.loads == 14 and len(first.bad) == 2
    again = load_images(Counting(root), catalog, 16, 3, tmp_path / "cache", min_side=16)
    assert Counting.loads == 14 and again.bad == first.bad
    # other placeholder settings give other bad lists, so they are other cache entries
    unchecked = load_images(Counting(root), catalog, 16, 3, tmp_path / "cache")
    assert Counting.loads == 28 and list(unchecked.bad) == list(first.bad)[:1]


def test_a_given_split_reaches_prepare_data(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for split, n in (("train", 4), ("val", 2)):
        for name in ("ants", "bees"):
            for i in range(n):
                save_image(root / split / name / f"{i}.png", seed=i)
    data = prepare_data(DataConfig(path=str(root), image_size=16, split="given",
                                   test_fraction=0.0), seed=0)
    val_ids = [data.catalog.ids[i] for i in data.split.indices("val")]
    assert sorted(val_ids) == ["val/ants/0.png", "val/ants/1.png", "val/bees/0.png",
                               "val/bees/1.png"]
