"""Metric names, their directions, and how they are computed.

One name everywhere: `val_f1` is what a study optimizes, what MLflow logs, and what early
stopping and best-epoch selection watch. Epoch metrics are `<split>_<metric>`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import numpy as np
from sklearn.metrics import confusion_matrix as _confusion_matrix
from sklearn.metrics import f1_score

from imgcls.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

Direction = Literal["max", "min"]

# Every per-epoch metric the engine logs, and which way is better.
EPOCH_METRICS: dict[str, Direction] = {
    "train_loss": "min",
    "train_acc": "max",
    "val_loss": "min",
    "val_acc": "max",
    "val_f1": "max",
}
# What a study may optimize and early stopping may watch: validation metrics only, since the
# training metrics reward memorisation and the test split never drives selection.
OBJECTIVE_METRICS = tuple(m for m in EPOCH_METRICS if m.startswith("val_"))


def metric_direction(name: str) -> Direction:
    if name not in OBJECTIVE_METRICS:
        raise ConfigError(
            f"unknown objective metric {name!r} (valid: {', '.join(OBJECTIVE_METRICS)})"
        )
    return EPOCH_METRICS[name]


def is_better(value: float, best: float | None, direction: Direction, min_delta: float = 0.0
              ) -> bool:
    """Strictly better by more than `min_delta`; NaN is never better, anything beats None."""
    if value != value:  # NaN
        return False
    if best is None:
        return True
    return value > best + min_delta if direction == "max" else value < best - min_delta


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int
                           ) -> dict[str, float]:
    """Accuracy and macro-F1 (every class weighs the same, however rare; a class never
    predicted scores F1 = 0 rather than raising)."""
    labels = list(range(num_classes))
    return {
        "acc": float(np.mean(y_true == y_pred)) if len(y_true) else float("nan"),
        "f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
    }


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    return _confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))


def plot_confusion_matrix(matrix: np.ndarray, classes: tuple[str, ...] | list[str],
                          title: str = "") -> Figure:
    """Counts per (true, predicted) class, shaded by each true class's share."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    n = len(classes)
    size = min(3 + 0.45 * n, 14)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.add_subplot()
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    ax.set(xticks=range(n), yticks=range(n), xticklabels=classes, yticklabels=classes,
           xlabel="predicted", ylabel="true", title=title)
    ax.tick_params(axis="x", labelrotation=45 if n > 4 else 0)
    if n <= 30:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.tight_layout()
    return fig
