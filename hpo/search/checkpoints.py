"""A trial's checkpoint: where it lives, written whole or not at all, read back without
unpickling anything but tensors and plain values, and removed when the trial ends.

One file per running trial, `<store>/checkpoints/<study>/trial-<number>/state.pt`, holding the
trainer's state (imgcls.train.Trainer.state_dict: the model, optimizer, schedule, scaler, early
stopping, every random generator, the history and the best epoch's weights) and what the trial
is (its number, hyperparameters, seed, training settings, data, MLflow run), so that a trial
resumes only from its own state. A new checkpoint replaces the last one by a rename: a kill at
any moment leaves the previous checkpoint or the new one, never half of one. So at most two
copies exist for a moment, each with the current and the best weights.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from imgcls.errors import first_line

CHECKPOINT_FILE = "state.pt"


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
