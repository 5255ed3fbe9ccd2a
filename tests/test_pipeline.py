"""The training data path: the decode-once cache, host-prefetched batches, and how training is
accelerated on its device (the CUDA parts run only where a GPU is)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.data import Augment, Batches, DataConfig, FolderSource, load_images, prepare_data
from imgcls.errors import DataError
from imgcls.models import build_model
from imgcls.train import Acceleration, TrainConfig, fit, fits_on_device, train_one_epoch
from tests.conftest import make_image_folder

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Counting(FolderSource):
    """A folder source that counts the images it decodes."""

    loads = 0

    def load(self, index: int) -> Image.Image:
        Counting.loads += 1
        return super().load(index)


def test_a_rerun_of_the_study_decodes_nothing_and_reads_the_same_pixels(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=6)
    config = DataConfig(path=str(root), image_size=16)
    first = prepare_data(config, seed=0, cache_dir=tmp_path / "cache")
    Counting.loads = 0
    catalog = Counting(root).scan()
    again = load_images(Counting(root), catalog, 16, 3, tmp_path / "cache",
                        min_side=config.min_side)
    assert Counting.loads == 0
    assert torch.equal(torch.from_numpy(np.asarray(again.images)), first.images)
    rerun = prepare_data(config, seed=0, cache_dir=tmp_path / "cache")
    assert torch.equal(rerun.images, first.images)
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 1


def test_the_cache_holds_exactly_what_a_fresh_decode_gives(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=5, size=24)
    source = FolderSource(root)
    catalog = source.scan()
    load_images(source, catalog, 16, 3, tmp_path / "cache")  # written
    cached = load_images(source, catalog, 16, 3, tmp_path / "cache")  # read back, mapped
    fresh = load_images(source, catalog, 16, 3, cache_dir=None)
    assert isinstance(cached.images, np.memmap)
    assert np.array_equal(np.asarray(cached.images), fresh.images)


def test_a_changed_file_rebuilds_the_cache_with_its_new_pixels(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "d", per_class=4)
    config = DataConfig(path=str(root), image_size=16)
    before = prepare_data(config, seed=0, cache_dir=tmp_path / "cache")
    changed = root / "ants" / "000.png"
    bright = np.linspace(200, 255, 16 * 16 * 3).reshape(16, 16, 3).astype(np.uint8)
    Image.fromarray(bright).save(changed)
    os.utime(changed, ns=(1, 1))  # a new mtime even on a coarse clock
    after = prepare_data(config, seed=0, cache_dir=tmp_path / "cache")
    index = after.catalog.ids.index("ants/000.png")
    assert (after.images[index] >= 199).all()
    assert not torch.equal(before.images[index], after.images[index])
    others = [i for i in range(len(after.catalog)) if i != index]
    assert torch.equal(before.images[others], after.images[others])


@pytest.mark.parametrize("damage", ["truncated", "emptied", "zeroed in place"])
def test_a_damaged_cache_is_decoded_again_with_one_warning(
        damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = make_image_folder(tmp_path / "d", per_class=5)
    source = Counting(root)
    catalog = source.scan()
    good = np.asarray(load_images(source, catalog, 16, 3, tmp_path / "cache").images).copy()
    (cache,) = (tmp_path / "cache").glob("*.npy")
    data = cache.read_bytes()
    if damage == "truncated":
        cache.write_bytes(data[: len(data) // 2])
    elif damage == "emptied":
        cache.write_bytes(b"")
    else:  # the same size, the pixels gone: only the checksum can tell
        header = len(data) - good.size
        cache.write_bytes(data[:header] + bytes(good.size))
    Counting.loads = 0
    with caplog.at_level("WARNING", logger="imgcls.data.cache"):
        again = load_images(source, catalog, 16, 3, tmp_path / "cache")
    assert Counting.loads == len(catalog)  # decoded again
    assert np.array_equal(np.asarray(again.images), good)
    (warning,) = [r.getMessage() for r in caplog.records]
    assert str(cache) in warning and "decoding the images again" in warning
    Counting.loads = 0  # and the rebuilt cache is trusted again, silently
    caplog.clear()
    with caplog.at_level("WARNING", logger="imgcls.data.cache"):
        load_images(source, catalog, 16, 3, tmp_path / "cache")
    assert Counting.loads == 0 and not caplog.records


def test_the_temporary_files_of_a_dead_writer_are_removed(tmp_path: Path) -> None:
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    cache = tmp_path / "cache"
    cache.mkdir()
    left = [cache / f"folder-abc-16px-3ch.tmp{pid}.npy", cache / f"folder-abc.tmp{pid}.json"]
    for path in left:
        path.write_bytes(b"x" * 100)
    alive = cache / f"folder-abc-16px-3ch.tmp{os.getppid()}.npy"  # a writer still running
    alive.write_bytes(b"x")
    root = make_image_folder(tmp_path / "d", per_class=3)
    source = FolderSource(root)
    load_images(source, source.scan(), 16, 3, cache)
    assert not any(path.exists() for path in left) and alive.exists()


def _batches(resident: bool, train: bool = True, batch_size: int = 5) -> Batches:
    images = torch.randint(0, 256, (23, 3, 8, 8), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    labels = torch.arange(23) % 3
    augment = Augment(hflip=0.5, brightness=0.2, crop_scale=0.5) if train else None
    return Batches(images, labels, batch_size, train=train, mean=(0.5,) * 3, std=(0.25,) * 3,
                   augment=augment, seed=7, resident=resident)


@pytest.mark.parametrize("train", [True, False])
def test_prefetched_batches_equal_resident_batches(train: bool) -> None:
    resident, prefetched = _batches(True, train), _batches(False, train)
    for _ in range(2):  # two epochs: the shuffling and augmentation draws stay in step
        a, b = list(resident), list(prefetched)
        assert len(a) == len(b) == len(resident)
        for (xa, ya), (xb, yb) in zip(a, b, strict=True):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_leaving_a_prefetched_epoch_early_stops_its_thread() -> None:
    batches = _batches(False, batch_size=1)
    for _ in batches:
        break
    assert not any(t.name == "batches-prefetch" for t in __import__("threading").enumerate())


def test_an_error_while_prefetching_reaches_the_training_loop() -> None:
    batches = _batches(False)
    batches.images = batches.images[:3]  # rows the order points past: index_select raises
    with pytest.raises(IndexError):
        list(batches)


def test_an_epoch_reports_its_throughput_and_data_wait() -> None:
    torch.manual_seed(0)
    model = build_model("simplecnn", 3, 3, 0.0, 8)
    batches = _batches(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    metrics = train_one_epoch(model, batches, optimizer, torch.nn.CrossEntropyLoss())
    assert metrics["train_images_per_s"] > 0
    assert 0 < metrics["data_wait_frac"] < 1


def test_on_the_cpu_training_stays_float32_and_unchanged() -> None:
    accel = Acceleration.for_device("cpu")
    assert (accel.precision, accel.channels_last, accel.compile) == ("float32", False, False)
    assert accel.grad_scaler() is None
    with accel.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    model = torch.nn.Linear(2, 2)
    assert accel.prepare(model) is model
    assert accel.peak_memory_mb() > 0  # the process's peak resident memory


def test_the_images_always_fit_on_the_cpu() -> None:
    assert fits_on_device(10**15, torch.device("cpu"), budget=0.0)


def _tiny_fit(accel: Acceleration, device: str) -> tuple[torch.nn.Module, list[dict[str, float]]]:
    torch.manual_seed(0)
    images = torch.randint(0, 256, (48, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(1))
    labels = torch.arange(48) % 2
    images[labels == 1, :, :8] = 255  # a class a small CNN tells apart at once
    kwargs = {"mean": (0.5,) * 3, "std": (0.25,) * 3, "device": device}
    train = Batches(images, labels, 16, train=True, seed=0, **kwargs)
    val = Batches(images, labels, 48, train=False, **kwargs)
    model = build_model("simplecnn", 2, 3, 0.0, 16)
    result = fit(model, train, val, TrainConfig(max_epochs=3, lr=0.05), 2, accel=accel)
    return model, result.history


@pytest.mark.slow
def test_a_compiled_model_trains_and_keeps_its_parameter_names() -> None:
    model, history = _tiny_fit(Acceleration(torch.device("cpu"), compile=True), "cpu")
    assert len(history) == 3 and all(np.isfinite(h["train_loss"]) for h in history)
    names = set(build_model("simplecnn", 2, 3, 0.0, 16).state_dict())
    assert set(model.state_dict()) == names  # no "_orig_mod." prefix in checkpoints


@pytest.mark.gpu
@cuda
def test_cuda_trains_in_bf16_channels_last_and_reports_its_peak_memory() -> None:
    accel = Acceleration.for_device("cuda")
    assert accel.precision == ("bfloat16" if torch.cuda.is_bf16_supported() else "float16")
    assert accel.channels_last and torch.backends.cudnn.benchmark
    assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    accel.reset_peak_memory()
    model, history = _tiny_fit(accel, "cuda")
    assert history[-1]["val_acc"] == 1.0
    weight = next(p for p in model.parameters() if p.ndim == 4)
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert weight.dtype == torch.float32  # autocast keeps float32 master weights
    assert 0 < accel.peak_memory_mb() < torch.cuda.get_device_properties(0).total_memory / 2**20


@pytest.mark.gpu
@cuda
def test_fp16_training_scales_its_loss() -> None:
    accel = Acceleration(torch.device("cuda"), "float16", channels_last=True)
    assert accel.grad_scaler() is not None
    _, history = _tiny_fit(accel, "cuda")
    assert history[-1]["val_acc"] == 1.0


@pytest.mark.gpu
@cuda
def test_prefetched_cuda_batches_equal_resident_ones() -> None:
    images = torch.randint(0, 256, (40, 3, 8, 8), dtype=torch.uint8)
    labels = torch.arange(40) % 4
    kwargs = {"train": True, "mean": (0.5,) * 3, "std": (0.25,) * 3,
              "augment": Augment(hflip=0.5, rotation=10), "seed": 3, "device": "cuda"}
    resident = list(Batches(images, labels, 8, resident=True, **kwargs))
    prefetched = list(Batches(images, labels, 8, resident=False, **kwargs))
    for (xa, ya), (xb, yb) in zip(resident, prefetched, strict=True):
        assert xb.is_cuda and torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.gpu
@cuda
def test_the_device_cache_budget_is_a_share_of_the_gpu() -> None:
    total = torch.cuda.get_device_properties(0).total_memory
    device = torch.device("cuda")
    assert fits_on_device(total // 4, device, budget=0.25)
    assert not fits_on_device(total // 4 + 1, device, budget=0.25)
    assert not fits_on_device(1, device, budget=0.0)


def test_an_image_over_the_pixel_limit_is_refused_before_its_pixels_are_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imgcls.data.cache as cache

    root = make_image_folder(tmp_path / "d", per_class=3, size=16)
    Image.new("RGB", (64, 48), "white").save(root / "ants" / "huge.png")
    source = FolderSource(root)
    catalog = source.scan()
    decoded = load_images(source, catalog, 16, 3, tmp_path / "cache", max_pixels=64 * 48 - 1)
    assert {catalog.ids[i]: reason for i, reason in decoded.bad.items()} == {
        "ants/huge.png": "64x48 pixels, over the 3,071 an image may have (data.max_pixels; a "
                         "decompression bomb, or a scan to tile first)"}  # 16x16 ones pass
    assert not load_images(source, catalog, 16, 3, tmp_path / "cache").bad  # the default: 50 Mpx
    monkeypatch.setattr(cache, "MAX_PIXELS", 64 * 48 - 1)  # predict's limit is the default
    with Image.open(root / "ants" / "huge.png") as image, pytest.raises(DataError,
                                                                         match="64x48 pixels"):
        cache.to_array(image, 16, 3)
