"""GPU discovery and slot planning, with the GPU list faked: this machine has no CUDA."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest
import torch

from hpo.search import devices
from hpo.search.devices import GpuInfo, Slot, apply_slot, discover_gpus, plan_slots
from imgcls.errors import ConfigError

H100 = "NVIDIA H100 80GB HBM3"


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], list[GpuInfo]]:
    """Make discovery report `n` GPUs."""

    def install(n: int) -> list[GpuInfo]:
        gpus = [GpuInfo(i, H100, 80 * 2**30) for i in range(n)]
        monkeypatch.setattr(devices, "discover_gpus", lambda: list(gpus))
        return gpus

    return install


@pytest.fixture
def restore_threads() -> Iterator[None]:
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_all_spreads_the_first_trials_over_the_gpus(fake_gpus: Callable) -> None:
    fake_gpus(2)
    slots = plan_slots("all", trials_per_gpu=3, cpu_count=12)
    assert [s.worker for s in slots] == list(range(6))
    assert [(s.gpu, s.gpu_slot) for s in slots] == [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2),
                                                    (1, 2)]
    assert [s.label for s in slots[:3]] == ["gpu0/slot0", "gpu1/slot0", "gpu0/slot1"]
    assert {s.device for s in slots} == {"cuda:0"}  # each worker sees its one GPU only
    assert {s.threads for s in slots} == {12 // 6}


def test_each_worker_is_pinned_to_its_gpu(fake_gpus: Callable,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    fake_gpus(4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    slots = plan_slots("1,3", trials_per_gpu=2, cpu_count=8)
    assert [(s.gpu, s.cuda_visible_devices) for s in slots] == [
        (1, "1"), (3, "3"), (1, "1"), (3, "3")]


def test_pinning_follows_the_visible_devices_of_the_search(fake_gpus: Callable,
                                                            monkeypatch: pytest.MonkeyPatch
                                                            ) -> None:
    """Launched with CUDA_VISIBLE_DEVICES=5,GPU-ab, the search's GPU 1 is physical "GPU-ab"."""
    fake_gpus(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5, GPU-ab")
    slots = plan_slots("all", cpu_count=2)
    assert [(s.gpu, s.cuda_visible_devices) for s in slots] == [(0, "5"), (1, "GPU-ab")]


def test_cpu_slots_without_gpus_or_with_none(fake_gpus: Callable) -> None:
    for gpus, found in (("all", 0), ("none", 2)):
        fake_gpus(found)
        slots = plan_slots(gpus, workers=3, cpu_count=8)
        assert [s.label for s in slots] == ["cpu/worker0", "cpu/worker1", "cpu/worker2"]
        # "" hides every GPU from a CPU worker, even on a machine that has some
        assert {(s.gpu, s.cuda_visible_devices, s.device) for s in slots} == {(None, "", "cpu")}
        assert {s.threads for s in slots} == {8 // 3}


@pytest.mark.parametrize(("cores", "workers", "threads"), [(8, 1, 8), (8, 4, 2), (7, 2, 3),
                                                           (4, 6, 1), (1, 1, 1)])
def test_cpu_cores_are_divided_between_workers(cores: int, workers: int, threads: int) -> None:
    slots = plan_slots("none", workers=workers, cpu_count=cores)
    assert len(slots) == workers
    assert {s.threads for s in slots} == {threads}
    assert threads * workers <= max(cores, workers)  # never more threads than cores, unless 1


def test_cores_default_to_the_process_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 4, 6, 8, 10}, raising=False)
    assert devices.available_cores() == 6
    assert [s.threads for s in plan_slots("none", workers=2)] == [3, 3]


def test_gpu_slots_share_the_cores(fake_gpus: Callable) -> None:
    fake_gpus(2)
    assert {s.threads for s in plan_slots("all", trials_per_gpu=2, cpu_count=16)} == {4}
    assert {s.threads for s in plan_slots("all", trials_per_gpu=8, cpu_count=4)} == {1}


def test_a_missing_gpu_names_what_the_machine_has(fake_gpus: Callable) -> None:
    fake_gpus(2)
    with pytest.raises(ConfigError) as err:
        plan_slots("0,3")
    message = str(err.value)
    assert message.startswith(f"asked for GPU 3, but this machine has 2: 0 ({H100}), 1 ({H100})")
    assert "\n" not in message
    fake_gpus(0)
    with pytest.raises(ConfigError, match=r"asked for GPUs 0, 1, but no CUDA device is visible"):
        plan_slots("0,1")


def test_a_gpu_listed_twice_is_refused(fake_gpus: Callable) -> None:
    fake_gpus(4)
    with pytest.raises(ConfigError, match=r"gpus '1,2,1' lists GPU 1 more than once"):
        plan_slots("1,2,1")


@pytest.mark.parametrize("gpus", ["", "0,", "first", "0;1"])
def test_an_unreadable_gpus_setting_is_refused(fake_gpus: Callable, gpus: str) -> None:
    fake_gpus(2)
    with pytest.raises(ConfigError, match=r"use all, none or GPU ids such as 0,1,3"):
        plan_slots(gpus)


def test_workers_are_for_cpu_trials(fake_gpus: Callable) -> None:
    fake_gpus(2)
    for gpus in ("all", "0"):
        with pytest.raises(ConfigError, match=r"--workers 4 is for CPU trials.*"
                                              r"use --trials-per-gpu 4"):
            plan_slots(gpus, workers=4)


def test_trials_per_gpu_needs_gpus(fake_gpus: Callable) -> None:
    fake_gpus(0)
    with pytest.raises(ConfigError, match=r"--trials-per-gpu 2 needs GPUs, but no CUDA device "
                                          r"is visible; use --workers 2"):
        plan_slots("all", trials_per_gpu=2)
    fake_gpus(1)
    with pytest.raises(ConfigError, match=r"needs GPUs, but gpus=none"):
        plan_slots("none", trials_per_gpu=2)


def test_counts_below_one_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"must be at least 1"):
        plan_slots("none", workers=0)


def test_apply_slot_pins_the_gpu_and_the_threads(monkeypatch: pytest.MonkeyPatch,
                                                 restore_threads: None) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")  # restored after the test
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    slot = Slot(worker=1, gpu=2, cuda_visible_devices="2", device="cuda:0", threads=3)
    assert apply_slot(slot) == torch.device("cuda", 0)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2"
    assert torch.get_num_threads() == 3


def test_apply_slot_hides_the_gpus_from_a_cpu_worker(monkeypatch: pytest.MonkeyPatch,
                                                     restore_threads: None) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    (slot,) = plan_slots("none", cpu_count=2)
    assert apply_slot(slot) == torch.device("cpu")
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert torch.get_num_threads() == 2


def test_apply_slot_after_cuda_started_picks_the_gpu_by_index(monkeypatch: pytest.MonkeyPatch,
                                                              restore_threads: None) -> None:
    """CUDA reads the variable once: in a process where it already started, the variable
    would change nothing, so the slot's GPU is addressed by its index instead."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    slot = Slot(worker=0, gpu=1, cuda_visible_devices="1", device="cuda:0", threads=2)
    assert apply_slot(slot) == torch.device("cuda", 1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert torch.get_num_threads() == 2


def test_discover_gpus_reads_torch_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    props = {0: SimpleNamespace(name="NVIDIA A100", total_memory=40 * 2**30),
             1: SimpleNamespace(name=H100, total_memory=80 * 2**30)}
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(props))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props[i])
    assert discover_gpus() == [GpuInfo(0, "NVIDIA A100", 40 * 2**30),
                               GpuInfo(1, H100, 80 * 2**30)]


def test_discover_gpus_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert discover_gpus() == []


def _pinned_worker(slot: Slot) -> tuple[int, str, str]:
    """What a spawned worker sees once pinned: GPUs visible, its device, and that GPU's name."""
    device = apply_slot(slot)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    return torch.cuda.device_count(), str(device), name


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_spawned_workers_see_only_their_gpu() -> None:
    gpus = discover_gpus()
    slots = plan_slots("all", trials_per_gpu=2)
    cpu = plan_slots("none", workers=1)
    with multiprocessing.get_context("spawn").Pool(len(slots) + 1) as pool:
        seen = pool.map(_pinned_worker, [*slots, *cpu])
    assert seen[:-1] == [(1, "cuda:0", gpus[s.gpu].name) for s in slots if s.gpu is not None]
    assert seen[-1] == (0, "cpu", "")
