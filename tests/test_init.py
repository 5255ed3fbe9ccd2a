"""`imgcls-hpo init`: a user's own images inspected, and a study written that `search` runs as
it is, with choices that follow the data."""

import csv
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from hpo.cli import app
from hpo.config.study import load_study
from tests.conftest import make_image_folder

runner = CliRunner()


def init(*args: str) -> str:
    result = runner.invoke(app, ["init", *args])
    assert result.exit_code == 0, result.output
    return result.output


def one_line_error(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") and message in lines[-1], result.output
    assert "Traceback" not in result.output


def grayscale_folder(root: Path, counts: dict[str, int], size: int = 40) -> Path:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size), dtype=np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{i:03d}.png")
    return root


def test_a_folder_gets_a_study_that_search_runs_as_it_is(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "My Insects", per_class=12, size=40)
    output = init(str(data))
    path = Path("my-insects.yaml")  # in the current folder, named after the data
    assert path.is_file()
    assert "ants" in output and "bees" in output and "24 usable images" in output
    assert "imgcls-hpo search my-insects.yaml" in output
    assert "the CPU" in output  # what trains on what
    spec = load_study(str(path))
    assert spec.name == "my-insects"
    assert spec.data.path == str(data.resolve()) and spec.data.source == "folder"
    assert spec.data.classes == ("ants", "bees")
    assert spec.data.image_size == 40  # not above the images' own side (64 on the CPU)
    assert {str(a) for a in spec._possible("arch")} == {"simplecnn", "resnet18"}
    assert spec.data.val_fraction == spec.data.test_fraction == 0.2  # small data
    result = runner.invoke(app, ["search", str(path), "--trials", "2", "--max-epochs", "1",
                                 "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert "2 complete" in result.output


def test_small_data_is_offered_cross_validation_and_a_larger_set_is_not(tmp_path: Path) -> None:
    small = make_image_folder(tmp_path / "small", per_class=12, size=40)
    output = init(str(small))
    assert "folds: 5 offered" in output
    text = Path("small.yaml").read_text()
    assert "# folds: 5\n" in text and load_study("small.yaml").folds == 0  # offered, not set
    Path("small.yaml").write_text(text.replace("# folds: 5\n", "folds: 5\n"))
    assert load_study("small.yaml").folds == 5  # uncommented, it is a setting search takes

    from hpo.config.draft import SMALL_DATA

    large = grayscale_folder(tmp_path / "large", {"a": SMALL_DATA // 2, "b": SMALL_DATA // 2},
                             size=32)
    assert "folds" not in init(str(large), "--name", "large")
    assert "folds" not in Path("large.yaml").read_text()


def test_imbalanced_grayscale_images_get_one_channel_weights_and_a_threshold(
        tmp_path: Path) -> None:
    data = grayscale_folder(tmp_path / "xrays", {"health": 30, "tb": 6})
    init(str(data), "--out", "studies/tb-mine.yaml")
    raw = yaml.safe_load(Path("studies/tb-mine.yaml").read_text())
    assert raw["data"]["channels"] == 1
    assert raw["space"]["class_weighted"] is True
    assert raw["operating_point"] == "youden"
    spec = load_study("tb-mine")  # found by name under ./studies
    assert spec.name == "tb-mine" and spec.data.classes == ("health", "tb")


def test_unusable_files_are_listed_and_left_out(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=10, size=24)
    (data / "ants" / "broken.png").write_bytes(b"\x89PNG not really")
    Image.new("RGB", (40, 40), (200, 30, 30)).save(data / "bees" / "blank.png")  # a placeholder
    output = init(str(data))
    assert "2 files are not a usable image" in output
    text = Path("data.yaml").read_text()
    assert "skip_bad_images: true" in text
    assert "ants/broken.png" in text and "bees/blank.png (placeholder: uniform" in text
    assert load_study("data.yaml").data.skip_bad_images


def test_train_and_val_folders_keep_their_split(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "hym" / "train", per_class=12, size=24)
    make_image_folder(tmp_path / "hym" / "val", per_class=4, size=24)
    output = init(str(tmp_path / "hym"))
    assert "split given: train 24, val 8" in output
    assert load_study("hym.yaml").data.split == "given"


def test_a_csv_manifest_with_groups_is_split_by_group(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "scans", per_class=12, size=24)
    with (data / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "group"])
        for i, file in enumerate(sorted(data.rglob("*.png"))):
            writer.writerow([file.relative_to(data).as_posix(), file.parent.name, f"p{i // 2}"])
    output = init(str(data / "labels.csv"), "--name", "scans")
    assert "12 groups" in output
    spec = load_study("scans.yaml")
    assert spec.data.source == "csv" and spec.data.split == "group"


def test_an_npz_archive(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "organ.npz",
             train_images=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8),
             train_labels=np.arange(40) % 4,
             val_images=rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
             val_labels=np.arange(12) % 4)
    init(str(tmp_path / "organ.npz"))
    spec = load_study("organ.yaml")
    assert spec.data.source == "npz" and spec.data.channels == 1
    assert spec.data.image_size == 32 and spec.data.split == "given"


def test_pretrained_weights_on_the_machine_are_used(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from torchvision import models as tvm

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(tvm.resnet18(weights=None).state_dict(), hub / "resnet18-f37072fd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    data = make_image_folder(tmp_path / "data", per_class=12, size=24)
    init(str(data))
    spec = load_study("data.yaml")
    assert [str(a) for a in spec._possible("arch")] == ["resnet18"]
    assert spec._possible("pretrained") == [True] and spec.data.normalize == "imagenet"


def test_device_check_trains_a_step_on_each_device() -> None:
    output = init("--device-check")
    assert "Trials will train on the CPU" in output
    assert "cpu: a resnet18 training step on 8 images of 64 px takes" in output


def test_an_existing_study_file_is_not_overwritten(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "data", per_class=10, size=24)
    Path("data.yaml").write_text("mine\n")
    one_line_error(["init", str(data)], "data.yaml exists; pass --force")
    assert Path("data.yaml").read_text() == "mine\n"
    init(str(data), "--force")
    assert load_study("data.yaml").data.path == str(data.resolve())


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: root / "missing", "data not found"),
    (lambda root: (root / "notes.txt").write_text("x") and root / "notes.txt",
     "is neither a folder, a .csv manifest nor an .npz archive"),
    (lambda root: (root / "empty").mkdir() or root / "empty", "has no class sub-folders"),
    (lambda root: make_image_folder(root / "tiny", per_class=1, size=24),
     "no study can be written for"),
])
def test_data_no_study_can_be_made_of_is_one_line(tmp_path: Path, make, message: str) -> None:
    one_line_error(["init", str(make(tmp_path))], message)
    assert not list(Path.cwd().glob("*.yaml"))


def test_init_without_data_says_what_it_needs() -> None:
    one_line_error(["init"], "init needs your data")


def test_samples_by_class_make_a_folder_init_reads(tmp_path: Path) -> None:
    result = runner.invoke(app, ["samples", "digits", "--by-class", "--count", "30", "--out",
                                 "digits-folder", "--store", str(tmp_path / "s")])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in Path("digits-folder").iterdir()) == [str(d) for d in range(10)]
    init("digits-folder")
    spec = load_study("digits-folder.yaml")
    assert spec.data.classes == tuple(str(d) for d in range(10)) and spec.data.channels == 1


def test_a_gpu_machine_gets_resnets_at_up_to_224_px(tmp_path: Path) -> None:
    from hpo.config.draft import Machine, draft_study
    from imgcls.data.inspect import inspect_data

    summary = inspect_data(make_image_folder(tmp_path / "data", per_class=40, size=300))
    draft = draft_study(summary, Machine(("NVIDIA H200",), 16))
    raw = yaml.safe_load(draft.text)
    assert raw["space"]["arch"] == "resnet18,resnet50" and raw["space"]["pretrained"] is False
    assert raw["data"]["image_size"] == 224 and "1 GPU(s) (NVIDIA H200)" in draft.text
    assert raw["space"]["batch_size"] == 8  # 48 training images: batches of a quarter at most
    small = draft_study(inspect_data(make_image_folder(tmp_path / "small", size=100)),
                        Machine(("NVIDIA H200",), 16))
    assert yaml.safe_load(small.text)["data"]["image_size"] == 104  # not above the images
