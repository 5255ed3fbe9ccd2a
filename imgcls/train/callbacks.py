"""Decisions taken between epochs. They decide; the training loop acts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from imgcls.metrics import Direction, is_better


@dataclass(frozen=True)
class Decision:
    improved: bool  # this epoch is the best so far: keep its weights
    stop: bool  # stop training after this epoch


@dataclass
class EarlyStopping:
    """Stop after `patience` epochs in a row without a better monitored value.

    patience=None never stops early. NaN never counts as better. The state round-trips through
    state_dict(), so that a resumed run decides as an uninterrupted one would.
    """

    direction: Direction
    patience: int | None = None
    min_delta: float = 0.0
    best: float | None = None
    best_epoch: int = 0
    bad_epochs: int = 0

    def update(self, epoch: int, value: float) -> Decision:
        if is_better(value, self.best, self.direction, self.min_delta):
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return Decision(improved=True, stop=False)
        self.bad_epochs += 1
        return Decision(improved=False,
                        stop=self.patience is not None and self.bad_epochs >= self.patience)

    def state_dict(self) -> dict[str, Any]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
