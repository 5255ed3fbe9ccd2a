"""Aggregate training images/s of K trials sharing one GPU, for K = 1, 2, 4 (GPU only).

A small model leaves most of an H100 idle in one process (kernel launches and host work, not
arithmetic, bound each step), so a study may run several trials per GPU; this measures what
that gains. Each trial is a spawned process that trains as a search trial does: --arch at
--image-size px on --images random uint8 images, drawn through `Batches` (resident on the GPU,
flipped there with Augment(hflip=0.5)) into `train_one_epoch` with the device's `Acceleration`
(bf16 autocast, channels_last, cudnn.benchmark, TF32), SGD (lr 0.01, momentum 0.9). Every
process warms up for at least one epoch and --warmup seconds (CUDA context, cudnn.benchmark's
search, compilation), then all K wait at a barrier and each counts the images of the whole
epochs it trains until --seconds have passed (each epoch ends in a synchronising `.item()`).
Aggregate images/s = the sum over the K processes of images / seconds. Printed: images/s per K,
and the ratios 2/1 (target >= 1.5) and 4/1.

Without CUDA it prints one line and exits 0: the CPU has no idle device to share. `--device cpu`
runs the same code path there, as a check that it works (its figures mean nothing: the trials
share the same cores, each gets cores / K threads).

    python benchmarks/concurrency.py                       # K = 1, 2, 4; 30 s each
    python benchmarks/concurrency.py --device cpu --trials 1,2 --seconds 3 --warmup 1 \\
        --images 64 --batch-size 16 --arch simplecnn      # a quick check of the code path
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import sys
import time
from dataclasses import dataclass
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

# `common` lives beside this script; the repository root gives `imgcls` when the package is not
# installed (the GPU machine runs from a bare checkout). Spawned trials run this too.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
import torch
from torch import nn

from imgcls.data import IMAGENET_MEAN, IMAGENET_STD, Augment, Batches
from imgcls.errors import ImgclsError, first_line
from imgcls.models import build_model, check_image_size
from imgcls.train import seed_everything, train_one_epoch
from imgcls.train.accel import Acceleration
from imgcls.train.runtime import available_cores

LR = 0.01  # SGD learning rate, as a default trial
MOMENTUM = 0.9
NUM_CLASSES = 2
PAIR_TARGET = 1.5  # 2/1: two trials on one GPU should give at least 1.5x one trial's images/s
# Seconds a trial process may take to start, warm up and reach the barrier (spawned Python,
# torch import, CUDA context, cudnn.benchmark, compilation) before the measurement is given up.
START_LIMIT_S = 600.0


@dataclass(frozen=True)
class Settings:
    """What every trial process trains, and for how long (pickled to the spawned processes)."""

    device: str
    arch: str
    image_size: int  # px a side
    batch_size: int
    images: int  # random uint8 images per trial
    warmup: float  # seconds of training before the barrier, after at least one epoch
    seconds: float  # seconds of counted training after the barrier
    compile: bool
    threads: int  # torch CPU threads per process (matters with --device cpu only)
    seed: int


@dataclass(frozen=True)
class Outcome:
    """What one trial process reports: images trained in `seconds`, or why it failed."""

    rank: int
    images: int = 0
    seconds: float = 0.0
    error: str | None = None


def trial(rank: int, settings: Settings, barrier: Barrier,
          results: Queue[Outcome]) -> None:
    """One trial process: warm up, meet the others at `barrier`, train for `settings.seconds`,
    put an Outcome on `results`. A failure is reported, and breaks the barrier so that the
    other processes stop waiting."""
    try:
        results.put(Outcome(rank, *train_for(rank, settings, barrier)))
    except BaseException as exc:  # reported to the parent instead of a lone traceback
        barrier.abort()
        results.put(Outcome(rank, error=f"{type(exc).__name__}: {first_line(exc)}"))


def train_for(rank: int, settings: Settings, barrier: Barrier) -> tuple[int, float]:
    """(images, seconds) this process trains after the barrier."""
    torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    accel = Acceleration.for_device(device, compile=settings.compile)
    generator = torch.Generator().manual_seed(settings.seed + rank)
    shape = (settings.images, 3, settings.image_size, settings.image_size)
    images = torch.randint(0, 256, shape, generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, NUM_CLASSES, (settings.images,), generator=generator)
    batches = Batches(images, labels, settings.batch_size, train=True, mean=IMAGENET_MEAN,
                      std=IMAGENET_STD, augment=Augment(hflip=0.5), seed=settings.seed + rank,
                      device=device)
    seed_everything(settings.seed + rank)
    model = accel.prepare(build_model(settings.arch, NUM_CLASSES, 3, 0.0, settings.image_size))
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    scaler = accel.grad_scaler()  # fp16 GPUs only; None with bf16
    loss_fn = nn.CrossEntropyLoss()
    per_epoch = len(batches) * batches.batch_size  # the last incomplete batch is dropped

    def epoch() -> None:  # ends in .item(): the device has finished when it returns
        train_one_epoch(model, batches, optimizer, loss_fn, accel=accel, scaler=scaler)

    start = time.perf_counter()
    epoch()
    while time.perf_counter() - start < settings.warmup:
        epoch()
    barrier.wait(timeout=START_LIMIT_S)
    start = time.perf_counter()
    trained = 0
    while time.perf_counter() - start < settings.seconds:
        epoch()
        trained += per_epoch
    return trained, time.perf_counter() - start


def measure(k: int, settings: Settings) -> list[Outcome]:
    """Run `k` trial processes at once; their Outcomes, by rank. Raises RuntimeError naming
    the first failure, once every process has ended."""
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    barrier = ctx.Barrier(k)
    results: Queue[Outcome] = ctx.Queue()
    processes = [ctx.Process(target=trial, args=(rank, settings, barrier, results),
                             name=f"trial-{rank}") for rank in range(k)]
    for process in processes:
        process.start()
    limit = START_LIMIT_S + settings.seconds + 60  # seconds: start, warm-up, counted, slack
    deadline = time.monotonic() + limit
    outcomes: list[Outcome] = []
    problem = None
    try:
        while len(outcomes) < k and problem is None:
            try:
                outcomes.append(results.get(timeout=1.0))
            except queue.Empty:
                ended = [p for p in processes if p.exitcode not in (None, 0)]
                if ended:  # died without reporting: killed, out of memory
                    problem = f"{ended[0].name} exited with code {ended[0].exitcode}"
                elif time.monotonic() > deadline:
                    problem = f"no result within {limit:.0f} s"
    finally:
        if problem is not None:
            barrier.abort()
        for process in processes:
            process.join(timeout=60)
            if process.is_alive():
                process.terminate()
                process.join()
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        # The first failure is the cause; the others only saw the barrier break.
        cause = next((o for o in failed if "BrokenBarrierError" not in o.error), failed[0])
        problem = f"trial-{cause.rank}: {cause.error}"
    if problem is not None:
        raise RuntimeError(problem)
    return sorted(outcomes, key=lambda o: o.rank)



def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", default="1,2,4",
                        help="comma-separated numbers of concurrent trials (default 1,2,4)")
    parser.add_argument("--arch", default="resnet18", help="architecture (default resnet18)")
    parser.add_argument("--image-size", type=int, default=64, help="px a side (default 64)")
    parser.add_argument("--batch-size", type=int, default=128, help="default 128")
    parser.add_argument("--images", type=int, default=4096,
                        help="random uint8 images per trial (default 4096: 32 steps an epoch)")
    parser.add_argument("--seconds", type=float, default=30.0,
                        help="counted training seconds per trial (default 30)")
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="training seconds before counting, after one epoch (default 5)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="default cuda; cpu only checks the code path")
    parser.add_argument("--compile", action="store_true", help="torch.compile every trial")
    parser.add_argument("--seed", type=int, default=0, help="default 0")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("concurrency: no CUDA device, nothing to share; it is measured on a GPU machine "
              "(--device cpu checks the code path only)")
        return 0
    try:
        counts = sorted({int(k) for k in args.trials.split(",")})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1:
        print(f"   --trials {args.trials!r}: give positive whole numbers, e.g. 1,2,4")
        return 2
    try:
        check_image_size(args.arch, args.image_size)  # an unknown name raises too
    except ImgclsError as exc:
        print(f"   error: {exc}")
        return 2
    common.header("concurrent trials on one device: aggregate training images/s")
    print(f"   {args.arch} at {args.image_size} px, batch {args.batch_size}, {args.images} "
          f"random images per trial, {args.warmup:g} s warm-up, {args.seconds:g} s counted, "
          f"on {args.device}")
    rates: dict[int, float] = {}
    for k in counts:
        threads = (max(1, available_cores() // k) if args.device == "cpu"
                   else torch.get_num_threads())
        settings = Settings(args.device, args.arch, args.image_size, args.batch_size,
                            args.images, args.warmup, args.seconds, args.compile, threads,
                            args.seed)
        try:
            outcomes = measure(k, settings)
        except RuntimeError as exc:
            print(f"   K={k}: failed: {exc}")
            continue
        each = [o.images / o.seconds for o in outcomes]
        rates[k] = sum(each)
        print(f"   K={k}: {rates[k]:>9.1f} images/s in all   per trial: "
              + ", ".join(f"{r:.1f}" for r in each))
    targets = []
    if 1 in rates and 2 in rates:
        targets.append(common.Target("2/1: two trials over one", rates[2] / rates[1],
                                     PAIR_TARGET))
    if targets:
        common.report(targets)
    for k in sorted(rates):
        if k > 2 and 1 in rates:
            print(f"   {f'{k}/1: {k} trials over one':<44} {rates[k] / rates[1]:>9.3f}   "
                  "(no target)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
