"""What every benchmark shares: where it ran, timing, and ratios printed against their targets.

A benchmark measures its baseline and its candidate in the same run and prints the ratio; it
never asserts, so that a missed target is reported rather than hidden behind a failure.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torchvision


def machine() -> str:
    """One line naming the machine and the versions that decide the figures."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info
                       if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{dt.date.today().isoformat()} · {cpu}, {os.cpu_count()} cores · {gpu} · "
            f"Python {platform.python_version()} · torch {torch.__version__} · "
            f"torchvision {torchvision.__version__} · {torch.get_num_threads()} threads")


def header(title: str) -> None:
    print(f"== {title}")
    print(f"   {machine()}")
    print(f"   command: {' '.join([os.path.basename(sys.executable), *sys.argv])}")


@dataclass(frozen=True)
class Target:
    """A ratio and the bound it should meet."""

    name: str
    value: float
    bound: float
    at_least: bool = True  # False: the value should be at most `bound`

    @property
    def met(self) -> bool:
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def line(self) -> str:
        sign = ">=" if self.at_least else "<="
        verdict = "met" if self.met else "MISSED"
        return f"   {self.name:<44} {self.value:>9.3f}   target {sign} {self.bound:<7g} {verdict}"


def report(targets: list[Target]) -> bool:
    """Print each ratio against its target; True when all are met."""
    print("   ratios:")
    for target in targets:
        print(target.line())
    return all(t.met for t in targets)


def timed(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> float:
    """Seconds one call of `fn` takes; `sync` waits for queued device work before each clock."""
    if sync:
        sync()
    start = time.perf_counter()
    fn()
    if sync:
        sync()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)
