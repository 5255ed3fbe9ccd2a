"""Training images/s of one model through three input pipelines, on the same images.

(a) The reference projects' way: torchvision's ImageFolder, PIL transforms (Resize((S, S)),
    RandomHorizontalFlip, ToTensor, Normalize) and a shuffling DataLoader with --loader-workers
    processes (pin_memory on CUDA), float32, and the textbook `model.train(); for x, y in
    loader: ...` step loop. Every epoch decodes every JPEG again.
(b) imgcls: the images are decoded once into the uint8 cache (`load_images`, timed apart and
    printed as a once-per-study cost), then `Batches` (moved to the device once, flipped there
    with Augment(hflip=0.5)) and `train_one_epoch`: the code path a trial runs, with the
    device's `Acceleration` (bf16 autocast and channels_last on CUDA).
(c) The bound: the same model and step loop (`train_one_epoch`, same acceleration) fed one
    synthetic normalized batch already on the device, so data costs nothing.

All three train the same architecture (fresh, with the same seed), SGD (lr 0.01, momentum 0.9),
batch size and images: (b) and (c) drop the last incomplete batch, so (a) does too. Each variant
trains one warm-up epoch, then --epochs timed epochs, round-robin across the variants so that
load from other processes on the machine falls on all of them alike; images/s is images per
epoch over the median epoch's seconds (CUDA is synchronised before each clock). Ratios b/a
(target >= 1.8 on the CPU, >= 10 on CUDA) and b/c (>= 0.95) are printed, never asserted.

    python benchmarks/pipeline.py                      # ~400 generated photo-like JPEGs
    python benchmarks/pipeline.py --data /work/shared/datasets/hymenoptera
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

# `common` and `jpegs` live beside this script; the repository root gives `imgcls` when the
# package is not installed (the GPU machine runs from a bare checkout).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import numpy as np
import torch
from jpegs import write_jpegs
from torch import nn
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from imgcls.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Augment,
    Batches,
    DataConfig,
    FolderSource,
    load_images,
)
from imgcls.errors import DataError, ImgclsError
from imgcls.models import build_model, check_image_size
from imgcls.train import seed_everything, train_one_epoch
from imgcls.train.accel import Acceleration
from imgcls.train.runtime import available_cores

LR = 0.01  # SGD learning rate, as the reference projects train
MOMENTUM = 0.9
CPU_TARGET = 1.8  # b/a on the CPU: decoding once saves the per-epoch JPEG work, not the model's
CUDA_TARGET = 10.0  # b/a on CUDA: the GPU outruns a few decoding workers by far
BOUND_TARGET = 0.95  # b/c: the data path may cost at most 5% of a step



@dataclass
class Data:
    """The images both pipelines train on: the files ImageFolder lists and imgcls can use."""

    root: Path  # the class-per-folder tree
    keep: frozenset[str]  # their paths relative to `root`, POSIX style
    classes: tuple[str, ...]
    images: torch.Tensor  # uint8 (N, 3, S, S), decoded once, for (b)
    labels: torch.Tensor  # int64 (N,)
    decode_s: float  # seconds to scan, decode into the cache and load it into memory
    notes: list[str]  # files one pipeline reads and the other does not, and why


def class_tree(path: Path) -> Path:
    """The class-per-folder tree of --data: `train/` when the data comes split."""
    return path / "train" if (path / "train").is_dir() else path


def prepare(root: Path, image_size: int, cache_dir: Path) -> Data:
    """Decode `root` once through imgcls and keep the files ImageFolder would read as well.

    ImageFolder reads extensions imgcls does not (and the reverse: GIFs), and imgcls leaves out
    undecodable files and placeholders that ImageFolder would train on; both must see the same
    images for the ratio to mean anything, so each trains on the intersection.
    """
    start = time.perf_counter()
    source = FolderSource(root)
    catalog = source.scan()
    decoded = load_images(source, catalog, image_size, 3, cache_dir,
                          min_side=DataConfig().min_side)  # a study's placeholder checks
    listed = {Path(p).relative_to(root).as_posix() for p, _ in datasets.ImageFolder(root).samples}
    index = [i for i, item in enumerate(catalog.ids) if i not in decoded.bad and item in listed]
    images = torch.from_numpy(np.array(decoded.images[index]))  # into RAM, as prepare_data does
    decode_s = time.perf_counter() - start

    notes = [f"{catalog.ids[i]}: imgcls leaves it out ({reason}); ImageFolder "
             + ("would read it" if catalog.ids[i] in listed else "skips it too")
             for i, reason in sorted(decoded.bad.items())]
    only_folder = sorted(listed - set(catalog.ids))
    notes += [f"ImageFolder only (imgcls does not list it): {item}" for item in only_folder]
    only_imgcls = [item for i, item in enumerate(catalog.ids)
                   if item not in listed and i not in decoded.bad]
    notes += [f"imgcls only (ImageFolder skips it): {item}" for item in only_imgcls]
    keep = frozenset(catalog.ids[i] for i in index)
    labels = torch.from_numpy(catalog.labels[index])
    return Data(root, keep, catalog.classes, images, labels, decode_s, notes)


def reference_loader(data: Data, image_size: int, batch_size: int, workers: int, seed: int,
                     device: torch.device) -> DataLoader[tuple[torch.Tensor, int]]:
    """(a): ImageFolder + PIL transforms + DataLoader, as the reference projects build them."""
    transform = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    root = data.root
    dataset = datasets.ImageFolder(
        root, transform,
        is_valid_file=lambda p: Path(p).relative_to(root).as_posix() in data.keep)
    if tuple(dataset.classes) != data.classes:
        raise DataError(f"ImageFolder finds classes {dataset.classes}, imgcls "
                          f"{list(data.classes)}: the two would not train the same task")
    # drop_last: the same images per epoch as Batches, which drops the last incomplete batch.
    # No persistent_workers, as in the reference projects: workers restart every epoch.
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                      pin_memory=device.type == "cuda", drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def reference_epoch(model: nn.Module, loader: DataLoader[tuple[torch.Tensor, int]],
                    optimizer: torch.optim.Optimizer, loss_fn: nn.Module,
                    device: torch.device) -> None:
    """(a)'s training epoch: the textbook float32 loop."""
    model.train()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


class SameBatch(Batches):
    """(c): one batch of random uint8 images, normalized on the device once and yielded `steps`
    times per epoch with random labels: the input pipeline costs nothing."""

    def __init__(self, batch_size: int, image_size: int, num_classes: int, steps: int, *,
                 seed: int, device: torch.device) -> None:
        generator = torch.Generator().manual_seed(seed)
        images = torch.randint(0, 256, (batch_size, 3, image_size, image_size),
                               generator=generator, dtype=torch.uint8)
        labels = torch.randint(0, num_classes, (batch_size,), generator=generator)
        super().__init__(images, labels, batch_size, train=True, mean=IMAGENET_MEAN,
                         std=IMAGENET_STD, seed=seed, device=device)
        once = Batches(images, labels, batch_size, train=False, mean=IMAGENET_MEAN,
                       std=IMAGENET_STD, device=device)
        self.batch = next(iter(once))
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return itertools.repeat(self.batch, self.steps)


def fresh_model(args: argparse.Namespace, num_classes: int, device: torch.device,
                accel: Acceleration | None) -> nn.Module:
    """The architecture under test, initialised alike for every variant (same seed); with
    `accel`, prepared as a trial prepares it (memory format, compilation)."""
    seed_everything(args.seed)
    model = build_model(args.arch, num_classes, 3, 0.0, args.image_size)
    return accel.prepare(model) if accel is not None else model.to(device)


def sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="a class-per-folder tree, or one with train/ (used) and val/; "
                             "default: generate --images photo-like JPEGs in a temp folder")
    parser.add_argument("--images", type=int, default=400,
                        help="JPEGs to generate without --data (default 400)")
    parser.add_argument("--arch", default="resnet18", help="architecture (default resnet18)")
    parser.add_argument("--image-size", type=int, default=64, help="px a side (default 64)")
    parser.add_argument("--batch-size", type=int, default=32, help="default 32")
    parser.add_argument("--epochs", type=int, default=3,
                        help="timed epochs per variant, after one warm-up epoch (default 3)")
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default cuda when available, else cpu")
    parser.add_argument("--loader-workers", type=int, default=available_cores(),
                        help="DataLoader processes for (a) (default: the cores, "
                             f"{available_cores()})")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the model of (b) and (c) through Acceleration")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.header("input pipeline: images/s of training epochs, same model and images")
    if args.device == "cuda" and not torch.cuda.is_available():
        print("   --device cuda, but torch sees no CUDA device")
        return 2
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        if args.data is None:
            start = time.perf_counter()
            data_dir = write_jpegs(Path(tmp) / "jpegs", args.images, args.seed)
            print(f"   data: {args.images} generated photo-like JPEGs (400x300 to 500x375 px, "
                  f"quality 90) in {time.perf_counter() - start:.1f} s")
        else:
            data_dir = class_tree(args.data.expanduser())
            print(f"   data: {data_dir}")
        try:
            check_image_size(args.arch, args.image_size)  # an unknown name raises too
            data = prepare(data_dir, args.image_size, Path(tmp) / "cache")
            loader = reference_loader(data, args.image_size, args.batch_size,
                                      args.loader_workers, args.seed, device)
        except ImgclsError as exc:
            print(f"   error: {exc}")
            return 2
        print(f"   both pipelines train on the {len(data.labels)} files that ImageFolder lists "
              "and imgcls can use" + (", not on:" if data.notes else ""))
        for note in data.notes:
            print(f"     {note}")
        return run(args, data, loader, device, sync)


def run(args: argparse.Namespace, data: Data, loader: DataLoader[tuple[torch.Tensor, int]],
        device: torch.device, sync: Callable[[], None] | None) -> int:
    num_classes = len(data.classes)
    # (b) and (c) train as a trial does on this device: on CUDA bf16 autocast, channels_last,
    # cudnn.benchmark and TF32; on the CPU float32 as it is. (a) stays the textbook float32 and
    # NCHW; the last two are process-wide and reach it too, which matters little: on CUDA (a) is
    # bound by its JPEG decoding workers.
    accel = Acceleration.for_device(device, compile=args.compile)
    scaler = accel.grad_scaler()  # fp16 GPUs only; None with bf16 and on the CPU
    loss_fn = nn.CrossEntropyLoss()
    batches = Batches(data.images, data.labels, args.batch_size, train=True,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD, augment=Augment(hflip=0.5),
                      seed=args.seed, device=device)
    same = SameBatch(batches.batch_size, args.image_size, num_classes, len(batches),
                     seed=args.seed, device=device)
    per_epoch = len(batches) * batches.batch_size  # images each variant trains per epoch
    print(f"   {per_epoch} images trained per epoch ({len(batches)} batches of "
          f"{batches.batch_size}), {args.arch} at {args.image_size} px on {device}; (b), (c): "
          f"{accel.precision}, channels_last={accel.channels_last}, compile={accel.compile}")

    models = {name: fresh_model(args, num_classes, device, None if name == "a" else accel)
              for name in ("a", "b", "c")}
    optimizers = {name: sgd(model) for name, model in models.items()}
    last: dict[str, float] = {}  # (b)'s latest train_one_epoch metrics

    def epoch_b() -> None:
        last.update(train_one_epoch(models["b"], batches, optimizers["b"], loss_fn, accel=accel,
                                    scaler=scaler))

    epochs: dict[str, Callable[[], object]] = {
        "a": lambda: reference_epoch(models["a"], loader, optimizers["a"], loss_fn, device),
        "b": epoch_b,
        "c": lambda: train_one_epoch(models["c"], same, optimizers["c"], loss_fn, accel=accel,
                                     scaler=scaler),
    }
    seconds: dict[str, list[float]] = {name: [] for name in epochs}
    for round_ in range(args.epochs + 1):  # round 0 warms up: workers, allocator, kernels
        for name, epoch in epochs.items():
            took = common.timed(epoch, sync)
            if round_:
                seconds[name].append(took)

    labels = {
        "a": f"(a) ImageFolder + PIL + DataLoader ({args.loader_workers} workers)",
        "b": "(b) imgcls uint8 cache + Batches + train_one_epoch",
        "c": "(c) one synthetic batch on the device (bound)",
    }
    rate = {name: per_epoch / common.median(s) for name, s in seconds.items()}
    print(f"   {'variant':<56} {'images/s':>9} {'s/epoch':>8}   (median of {args.epochs}; "
          "min-max)")
    for name, s in seconds.items():
        print(f"   {labels[name]:<56} {rate[name]:>9.1f} {common.median(s):>8.3f}   "
              f"({min(s):.3f}-{max(s):.3f})")
    epoch_b_s = common.median(seconds["b"])
    print(f"   once per study: decode {len(data.labels)} images into the uint8 cache: "
          f"{data.decode_s:.2f} s (= {data.decode_s / epoch_b_s:.1f} epochs of (b))")
    if "data_wait_frac" in last:
        print(f"   (b) data_wait_frac: {last['data_wait_frac']:.3f} of its last epoch spent "
              "waiting for batches")
    target = CUDA_TARGET if device.type == "cuda" else CPU_TARGET
    common.report([
        common.Target("b/a: imgcls over the reference pipeline", rate["b"] / rate["a"], target),
        common.Target("b/c: imgcls over the synthetic bound", rate["b"] / rate["c"],
                      BOUND_TARGET),
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
