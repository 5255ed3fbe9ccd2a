"""Where trials run: the GPUs this machine has, and the worker slots a search spreads trials over.

A slot is one trial at a time. `plan_slots` turns the study's placement settings (gpus,
trials_per_gpu, workers) into slots; each worker process calls `apply_slot` first, which pins
it to its GPU through CUDA_VISIBLE_DEVICES (so inside the worker that GPU is "cuda:0") and
gives it its share of the CPU cores as torch threads.

GPU numbering: `GpuInfo.index`, `Slot.gpu` and the ids of `--gpus 0,1,3` are the indices
torch.cuda gives in the search process: the physical index unless CUDA_VISIBLE_DEVICES already
narrows what that process sees, in which case the worker gets the matching entry of that list.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from imgcls.errors import ConfigError, first_line
from imgcls.train.runtime import available_cores

CPU = "cpu"


@dataclass(frozen=True)
class GpuInfo:
    index: int  # torch.cuda's index in this process
    name: str  # e.g. "NVIDIA H100 80GB HBM3"
    memory_bytes: int  # total memory of the device


def discover_gpus() -> list[GpuInfo]:
    """The CUDA devices this process sees; [] without CUDA.

    torch counts the devices through NVML where it can, without initialising CUDA; reading
    their names and memory initialises it, so worker processes must be started with the
    "spawn" method (a child forked after that cannot use CUDA).
    """
    count = torch.cuda.device_count()
    gpus = []
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        gpus.append(GpuInfo(index, props.name, props.total_memory))
    return gpus


@dataclass(frozen=True)
class Slot:
    """One worker's place: a GPU (shared with the other slots on it) or a share of the CPU."""

    worker: int  # 0..n-1, in the order trials are handed out
    # The GPU's index in the search process (see the module docstring); None on the CPU
    gpu: int | None
    # The worker's CUDA_VISIBLE_DEVICES: its one GPU's id, or "" on the CPU so that the worker
    # never touches a GPU (None: leave the variable as it is)
    cuda_visible_devices: str | None
    device: str  # the torch device inside the worker once pinned: "cuda:0" or "cpu"
    threads: int  # torch intra-op threads for the worker
    gpu_slot: int = 0  # the slot's number on its GPU, 0..trials_per_gpu-1 (0 on the CPU)

    @property
    def label(self) -> str:
        """Short name for tags and progress: "gpu1/slot0", "cpu/worker2"."""
        if self.gpu is None:
            return f"cpu/worker{self.worker}"
        return f"gpu{self.gpu}/slot{self.gpu_slot}"


def plan_slots(gpus: str = "all", trials_per_gpu: int = 1, workers: int = 1,
               cpu_count: int | None = None) -> list[Slot]:
    """The worker slots for the study's placement settings, in the order trials start.

    gpus: "all" (every visible GPU, else `workers` CPU slots), "none" (`workers` CPU slots) or
    GPU ids "0,1,3". Each GPU gets `trials_per_gpu` slots, listed round-robin (gpu0 slot0, gpu1
    slot0, gpu0 slot1, ...) so that the first trials spread over the GPUs.

    Threads: the cores (`cpu_count`, else those this process may use) are divided evenly between
    the slots, at least 1 each; the remainder stays idle so that every trial runs with the same
    number of threads and their durations compare. More CPU workers than cores is allowed (each
    then gets 1 thread and they share the cores), though rarely faster.
    """
    if trials_per_gpu < 1 or workers < 1:
        raise ConfigError(f"trials_per_gpu ({trials_per_gpu}) and workers ({workers}) must "
                          "be at least 1")
    cores = max(1, cpu_count if cpu_count is not None else available_cores())
    chosen = _chosen_gpus(gpus)
    if not chosen:
        if trials_per_gpu > 1:
            why = "gpus=none" if gpus == "none" else "no CUDA device is visible"
            raise ConfigError(f"--trials-per-gpu {trials_per_gpu} needs GPUs, but {why}; use "
                              f"--workers {trials_per_gpu} to run trials in parallel on the CPU")
        threads = max(1, cores // workers)
        return [Slot(worker=w, gpu=None, cuda_visible_devices="", device=CPU, threads=threads)
                for w in range(workers)]
    if workers > 1:
        ids = ",".join(str(g) for g in chosen)
        raise ConfigError(f"--workers {workers} is for CPU trials, but GPUs {ids} are used; use "
                          f"--trials-per-gpu {workers} to run {workers} trials on each GPU, or "
                          "--gpus none to run on the CPU")
    count = len(chosen) * trials_per_gpu
    threads = max(1, cores // count)
    return [Slot(worker=k * len(chosen) + i, gpu=gpu, cuda_visible_devices=_visible_id(gpu),
                 device="cuda:0", threads=threads, gpu_slot=k)
            for k in range(trials_per_gpu) for i, gpu in enumerate(chosen)]


def _chosen_gpus(gpus: str) -> list[int]:
    """The GPU indices `gpus` names, checked against those discovered."""
    if gpus == "none":
        return []
    if gpus == "all":
        return [g.index for g in discover_gpus()]
    try:
        asked = [int(part) for part in gpus.split(",")]
    except ValueError:
        raise ConfigError(f"gpus {gpus!r} is not valid; use all, none or GPU ids such as "
                          "0,1,3") from None
    twice = sorted({g for g in asked if asked.count(g) > 1})
    if twice:
        raise ConfigError(f"gpus {gpus!r} lists GPU {', '.join(map(str, twice))} more than "
                          "once; name each GPU once")
    found = discover_gpus()
    missing = [g for g in asked if g not in {info.index for info in found}]
    if missing:
        what = "GPU" if len(missing) == 1 else "GPUs"
        if found:
            have = ", ".join(f"{g.index} ({g.name})" for g in found)
            where = f"this machine has {len(found)}: {have}"
        else:
            where = "no CUDA device is visible"
        raise ConfigError(f"asked for {what} {', '.join(map(str, missing))}, but {where}; "
                          "use --gpus with ids from that list, all, or none")
    return asked


def _visible_id(index: int) -> str:
    """The CUDA_VISIBLE_DEVICES entry that shows a worker GPU `index` of this process: the
    index itself, or the entry at that position when this process's own CUDA_VISIBLE_DEVICES
    (ordinals, GPU-/MIG- UUIDs) narrows what it sees."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return str(index)
    ids = [part.strip() for part in visible.split(",") if part.strip()]
    return ids[index] if index < len(ids) else str(index)


def apply_slot(slot: Slot) -> torch.device:
    """Pin this process to `slot`; a worker calls it first, before anything touches CUDA.

    Sets CUDA_VISIBLE_DEVICES (CUDA reads it once, when it initialises) and torch's intra-op
    threads, and returns the device trials run on. Where CUDA was already initialised (a slot
    used in the search process itself), the variable would change nothing: the GPU is then
    picked by its index instead.
    """
    torch.set_num_threads(slot.threads)
    if torch.cuda.is_initialized():
        return torch.device(CPU) if slot.gpu is None else torch.device("cuda", slot.gpu)
    if slot.cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = slot.cuda_visible_devices
    return torch.device(slot.device)


def describe_slots(slots: list[Slot]) -> list[str]:
    """What trains on what, a line per device: for `init` and `init --device-check`."""
    if slots[0].gpu is None:
        if torch.version.cuda is None:
            why = f"torch {torch.__version__} is built without CUDA"
        elif (visible := os.environ.get("CUDA_VISIBLE_DEVICES")) is not None:
            why = f"no CUDA device visible (CUDA_VISIBLE_DEVICES={visible!r})"
        else:
            why = (f"torch is built for CUDA {torch.version.cuda} but sees no device (no GPU, "
                   "or no driver)")
        per = "one trial at a time" if len(slots) == 1 else f"{len(slots)} trials at a time"
        return [f"the CPU: {per}, {slots[0].threads} thread(s) each ({why})"]
    gpus = {info.index: info for info in discover_gpus()}
    lines = []
    for gpu in sorted({s.gpu for s in slots if s.gpu is not None}):
        info = gpus[gpu]
        share = sum(s.gpu == gpu for s in slots)
        lines.append(f"cuda:{gpu} {info.name} ({info.memory_bytes / 2**30:.0f} GiB): "
                     f"{share} trial(s) at a time")
    return lines


def check_device(device: str, arch: str = "resnet18", batch: int = 8, size: int = 64) -> str:
    """Train `arch` for a few steps on `device`: how long one step takes, or why it fails."""
    from imgcls.models import build_model

    try:
        model = build_model(arch, 2, 3, image_size=size).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        images = torch.rand(batch, 3, size, size, device=device)
        labels = torch.zeros(batch, dtype=torch.long, device=device)
        times = []
        for _ in range(3):  # the first step pays for allocation and kernel selection
            start = time.perf_counter()
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(images), labels).backward()
            optimizer.step()
            if device.startswith("cuda"):
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
    except Exception as exc:  # a driver, memory or kernel failure: said, not raised
        return f"{device}: training fails ({first_line(exc)})"
    return (f"{device}: a {arch} training step on {batch} images of {size} px takes "
            f"{min(times) * 1000:.0f} ms")
