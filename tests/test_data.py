from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data import (
    DataConfig,
    FolderSource,
    channel_stats,
    load_images,
    open_source,
    prepare_data,
    stratified_split,
    to_array,
)
from imgcls.data.sources import Catalog
from imgcls.errors import DataError
from tests.conftest import make_image_folder


def test_folder_source_reads_classes_in_sorted_order(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", classes=("tb", "health"), per_class=3)
    (root / "health" / "notes.txt").write_text("not an image, ignored like ImageFolder does")
    catalog = FolderSource(root).scan()
    assert catalog.classes == ("health", "tb")
    assert Counter(catalog.classes[k] for k in catalog.labels) == {"health": 3, "tb": 3}
    assert catalog.ids[0] == "health/000.png"


@pytest.mark.parametrize(("setup", "message"), [
    (lambda root: None, "data folder not found"),
    (lambda root: root.mkdir(), "has no class sub-folders"),
    (lambda root: (root / "only").mkdir(parents=True), "has 1 class(es) (only)"),
    (lambda root: [(root / c).mkdir(parents=True) for c in ("a", "b")],
     "class folder 'a'"),
])
def test_unusable_folders_are_named(tmp_path: Path, setup, message: str) -> None:  # type: ignore[no-untyped-def]
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match="^.*" + message.replace("(", r"\(").replace(")", r"\)")):
        FolderSource(root).scan()


def test_unreadable_images_are_listed_before_training(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=3)
    (root / "bees" / "broken.png").write_bytes(b"this is not a png")
    config = DataConfig(path=str(root), image_size=16, val_fraction=0.25, test_fraction=0.25)
    with pytest.raises(DataError, match=r"^1 of 7 files are not usable images: "
                                        r"bees/broken.png \(cannot identify image file.*\)\. "
                                        r"Pass --skip-bad-images to leave them out$"):
        prepare_data(config, seed=0, cache_dir=tmp_path / "cache")
    # the cache holds the good images and remembers the bad one, so a re-run decodes nothing
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    assert not list((tmp_path / "cache").glob("*tmp*"))


def test_split_is_stratified_and_fixed_by_the_seed() -> None:
    labels = np.repeat([0, 1, 2], [40, 20, 10])
    catalog = Catalog("t", tuple(map(str, range(70))), labels, ("a", "b", "c"), "x")
    split = stratified_split(catalog, 0.2, 0.1, seed=3)
    assert split.counts() == {"train": 49, "val": 14, "test": 7}
    for label, n in ((0, 40), (1, 20), (2, 10)):
        members = labels[split.indices("val")] == label
        assert members.sum() == round(n * 0.2)
    assert (stratified_split(catalog, 0.2, 0.1, seed=3).assignment == split.assignment).all()
    assert (stratified_split(catalog, 0.2, 0.1, seed=4).assignment != split.assignment).any()


def test_a_class_too_small_to_split_is_reported() -> None:
    catalog = Catalog("t", ("a", "b", "c", "d", "e"), np.array([0, 0, 0, 1, 1]), ("x", "y"), "f")
    with pytest.raises(DataError, match="class 'y' has 2 image"):
        stratified_split(catalog, 0.2, 0.2, seed=0)


def test_images_are_decoded_once_then_read_from_the_cache(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=4)
    source = FolderSource(root)
    catalog = source.scan()
    first = load_images(source, catalog, 16, 3, tmp_path / "cache").images
    assert first.shape == (8, 3, 16, 16)

    class Counting(FolderSource):
        loads = 0

        def load(self, index: int) -> Image.Image:
            Counting.loads += 1
            return super().load(index)

    again = load_images(Counting(root), catalog, 16, 3, tmp_path / "cache").images
    assert Counting.loads == 0
    assert np.array_equal(np.asarray(again), np.asarray(first))
    # other image settings, or changed data, are other cache entries
    load_images(Counting(root), catalog, 8, 3, tmp_path / "cache")
    assert Counting.loads == 8
    Image.new("RGB", (16, 16), "white").save(root / "ants" / "new.png")
    assert FolderSource(root).scan().fingerprint != catalog.fingerprint


def test_images_are_converted_to_the_study_channels() -> None:
    rgba = Image.new("RGBA", (20, 10), (255, 0, 0, 255))
    assert to_array(rgba, 8, 3).shape == (3, 8, 8)
    assert to_array(rgba, 8, 3)[0].min() == 255  # red stays red
    gray = to_array(Image.new("L", (10, 10), 77), 8, 3)
    assert (gray == 77).all()  # grayscale is replicated to RGB
    assert to_array(Image.new("RGB", (10, 10), (10, 200, 30)), 8, 1).shape == (1, 8, 8)


def test_photos_are_turned_upright_by_their_exif_orientation(tmp_path: Path) -> None:
    pixels = np.zeros((8, 16), np.uint8)
    pixels[:4] = 255  # top half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(pixels).save(tmp_path / "photo.jpg", exif=exif, quality=95)
    upright = to_array(Image.open(tmp_path / "photo.jpg"), 16, 1)[0]
    assert upright[:, 8:].mean() > 200 > 50 > upright[:, :8].mean()  # white is now on the right


def test_digits_need_no_download_and_are_one_channel() -> None:
    data = prepare_data(DataConfig(source="digits", image_size=16, channels=1), seed=0)
    assert data.images.shape == (1797, 1, 16, 16) and data.images.dtype == torch.uint8
    assert data.classes == tuple("0123456789")
    assert sum(data.split.counts().values()) == 1797
    with pytest.raises(DataError, match="takes no --data"):
        open_source("digits", "/somewhere")


def test_channel_stats_are_on_the_unit_scale() -> None:
    images = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1)
    mean, std = channel_stats(images)
    assert mean == (0.5,) and abs(std[0] - 0.7071) < 1e-3


def test_a_decoder_error_without_a_message_is_still_listed(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=3)

    class Silent(FolderSource):
        def load(self, index: int) -> Image.Image:
            if index == 0:
                raise OSError  # some decoders raise with no message at all
            return super().load(index)

    source = Silent(root)
    decoded = load_images(source, source.scan(), 16, 3)
    assert decoded.bad == {0: "OSError"}
    assert decoded.notes(source.scan()) == ["ants/000.png (OSError)"]
