"""A trial's checkpoint: where it lives, written whole or not at all, read back without
unpickling anything but tensors and plain values, and removed when the trial ends.

One file per running trial, `<store>/checkpoints/<study>/trial-<number>/state.pt`, holding the
trainer's state (imgcls.train.Trainer.state_dict: the model, optimizer, schedule, scaler, early
stopping, every random generator, the history and the best epoch's weights) and what the trial
is (its number, hyperparameters, seed, training settings, data, MLflow run), so that a trial
resumes only from its own state. A new checkpoint replaces the last one by a rename: a kill at
any moment leaves the previous checkpoint or the new one, never half of one. So at most two
copies exist for a moment, each with the current and (when they differ) the best weights.

When a trial writes one is the study's `checkpoint_every` (CheckpointPolicy): every N epochs, or
`auto`, as often as keeps the writing under 1% of the trial's training time.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from imgcls.errors import first_line

CHECKPOINT_FILE = "state.pt"
# checkpoint_every: auto. The most of a trial's training time its checkpoints may take: a
# checkpoint is due once the training since the last one is this many times the write's cost.
AUTO_SHARE = 0.01


def save_checkpoint(path: Path, state: Mapping[str, Any]) -> None:
    """Write `state` to `path` whole: into a temporary file beside it, flushed to the disk,
    then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            torch.save(dict(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def load_checkpoint(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """The state at `path`, or None and why not (None too when there is no checkpoint). Read
    with weights_only: a file that holds anything but tensors and plain values is refused."""
    if not path.is_file():
        return None, None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, corrupt, or holding objects weights_only refuses
        return None, f"its checkpoint {path} cannot be read ({first_line(exc)})"
    if not isinstance(state, dict):
        return None, f"its checkpoint {path} holds no trainer state"
    return state, None


class Checkpoints:
    """The checkpoints of one study's trials, by trial number."""

    def __init__(self, root: Path) -> None:
        self.root = root  # <store>/checkpoints/<study>

    def path(self, number: int) -> Path:
        return self.root / f"trial-{number:04d}" / CHECKPOINT_FILE

    def save(self, number: int, state: Mapping[str, Any]) -> None:
        save_checkpoint(self.path(number), state)

    def load(self, number: int) -> tuple[dict[str, Any] | None, str | None]:
        return load_checkpoint(self.path(number))

    def remove(self, number: int) -> None:
        """Drop trial `number`'s checkpoint: it has ended, and logged what it keeps."""
        shutil.rmtree(self.path(number).parent, ignore_errors=True)


def state_bytes(state: Any) -> int:
    """The bytes of the tensors in a (nested) state: what writing it costs, nearly."""
    if isinstance(state, torch.Tensor):
        return state.nelement() * state.element_size()
    if isinstance(state, Mapping):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(state_bytes(v) for v in state)
    return 0


class WriteSpeed:
    """Seconds per byte of the last checkpoint this process wrote: what the next one of any
    size will cost (None before the first)."""

    def __init__(self) -> None:
        self.seconds_per_byte: float | None = None

    def cost(self, nbytes: int) -> float | None:
        return None if self.seconds_per_byte is None else nbytes * self.seconds_per_byte

    def timed(self, nbytes: int, seconds: float) -> None:
        self.seconds_per_byte = seconds / max(nbytes, 1)


@dataclass
class CheckpointPolicy:
    """When a trial writes its checkpoint, after an epoch (the study's `checkpoint_every`).

    - N: after every N-th epoch; 0: never (an interrupted trial then starts over).
    - auto: once the training since the trial's last checkpoint (or its start) is at least 100
      times what writing this one will take, so that checkpoints cost at most 1% of the
      training; the first is due at once (it measures the write) and none after the last epoch
      (the trial ends then). A stopped trial loses at most the larger of one epoch and 100
      writes' time: every epoch for a model whose epoch is long beside its checkpoint, every 30 s
      of training or so for a resnet18 on 2 CPU cores (0.3 s a write).
    """

    every: int | Literal["auto"]
    speed: WriteSpeed
    since: float = 0.0  # the trial's training seconds at its last checkpoint

    def due(self, epoch: int, trained: float, last: bool, size: Callable[[], int]) -> bool:
        """Whether a checkpoint is due after `epoch`, `trained` seconds into the training;
        `size()`, the checkpoint's bytes, is asked only when the write's cost matters."""
        if self.every != "auto":
            return bool(self.every) and epoch % self.every == 0
        if last:
            return False
        cost = self.speed.cost(size()) if self.speed.seconds_per_byte is not None else None
        return cost is None or cost <= AUTO_SHARE * (trained - self.since)

    @contextlib.contextmanager
    def writing(self, state: Mapping[str, Any], trained: float) -> Iterator[None]:
        """Around the write of `state`, `trained` seconds into the training: it is timed."""
        started = time.perf_counter()
        yield
        self.speed.timed(state_bytes(state), time.perf_counter() - started)
        self.since = trained
