"""Evaluation artifacts: learning curves, ROC curves, confusion matrix, per-class report and a
predictions CSV.

Plots are matplotlib `Figure` objects made without pyplot (no global state, no display needed);
the caller saves or logs them. Where a plot needs computed data (ROC curves), that step is a
separate function returning plain data, so it is tested without drawing.

Laying a figure out measures each artist's extent: about a third of its cost. Artists that
always sit inside their axes (legends, the confusion matrix's counts) are left out of that
measurement, since they cannot push a label off the figure.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from imgcls.metrics import Reliability

# (panel title, y label, history keys) of the learning-curve panels, left to right.
CURVE_PANELS = (
    ("loss", "cross-entropy (nats per image)", ("train_loss", "val_loss")),
    ("accuracy", "share of images correct", ("train_acc", "val_acc")),
)


@dataclass(frozen=True)
class RocCurve:
    """One ROC curve: false- and true-positive rates at each threshold, and the area under it."""

    label: str  # the class scored as positive
    fpr: np.ndarray
    tpr: np.ndarray
    auc: float


def plot_curves(history: Sequence[dict[str, float]], best_epoch: int | None = None) -> Figure:
    """Loss (left) and accuracy (right) per epoch, train and validation: one line per key of
    CURVE_PANELS present in `history`, and a dashed vertical line at `best_epoch` if given.

    `history` is one dict per epoch as the training engine records it; epochs are its `epoch`
    values, else 1, 2, ... A NaN (a diverged epoch) leaves a gap in its line.
    """
    from matplotlib.figure import Figure

    epochs = [row.get("epoch", i + 1) for i, row in enumerate(history)]
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, len(CURVE_PANELS))
    for ax, (title, ylabel, keys) in zip(axes, CURVE_PANELS, strict=True):
        for key in keys:
            if any(key in row for row in history):
                ax.plot(epochs, [row.get(key, np.nan) for row in history], marker=".",
                        label=key.split("_")[0])
        if best_epoch is not None:
            ax.axvline(best_epoch, color="gray", linestyle="--", label=f"best epoch {best_epoch}")
        ax.set(title=title, xlabel="epoch", ylabel=ylabel)
        if ax.lines:
            ax.legend().set_in_layout(False)  # inside the axes: nothing to make room for
    fig.tight_layout()
    return fig


def roc_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str],
               positive: int = 1) -> list[RocCurve]:
    """Two classes: the one curve of `probs[:, positive]`. More: one curve per class, one vs
    the rest. A class without both positive and negative images has no curve and is left out."""
    from sklearn.metrics import auc as _area
    from sklearn.metrics import roc_curve as _roc_curve

    y, p = np.asarray(y_true), np.asarray(probs)
    scored = [positive] if len(classes) == 2 else range(len(classes))
    curves = []
    for c in scored:
        hit = y == c
        if hit.all() or not hit.any():
            continue
        fpr, tpr, _ = _roc_curve(hit, p[:, c])
        curves.append(RocCurve(str(classes[c]), fpr, tpr, float(_area(fpr, tpr))))
    return curves


def plot_roc(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], positive: int = 1,
             title: str = "") -> Figure:
    """The curves of `roc_curves`, each labelled with its AUC, over the dotted chance diagonal."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for curve in roc_curves(y_true, probs, classes, positive):
        ax.plot(curve.fpr, curve.tpr, label=f"{curve.label} (AUC {curve.auc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="chance")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=title, aspect="equal")
    ax.legend(loc="lower right", fontsize=8).set_in_layout(False)
    fig.tight_layout()
    return fig


def plot_reliability(curves: Mapping[str, Reliability], title: str = "") -> Figure:
    """A reliability diagram: accuracy against mean confidence per bin (its data:
    imgcls.metrics.reliability), one line per labelled curve with its ECE, over the diagonal
    a calibrated model follows; empty bins are left out."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 5))
    ax = fig.add_subplot()
    for label, curve in curves.items():
        filled = curve.counts > 0
        ax.plot(curve.confidence[filled], curve.accuracy[filled], marker="o",
                label=f"{label} (ECE {curve.ece:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="calibrated")
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="mean top probability in the bin",
           ylabel="share correct in the bin", title=title, aspect="equal")
    ax.legend(loc="upper left", fontsize=8).set_in_layout(False)
    fig.tight_layout()
    return fig


def plot_confusion_matrix(matrix: np.ndarray, classes: tuple[str, ...] | list[str],
                          title: str = "") -> Figure:
    """Counts per (true, predicted) class, shaded by each true class's share."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    n = len(classes)
    size = min(3 + 0.45 * n, 14)
    # constrained, not tight_layout: with long class names tight_layout pushed the "true"
    # label off the figure (the equal-aspect image shrinks after it has measured)
    fig = Figure(figsize=(size + 1, size), layout="constrained")
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
                # in_layout=False: a count sits in its cell, so the layout need not measure
                # it (n*n counts: a tenth of the figure's cost for 10 classes)
                ax.text(j, i, str(matrix[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if share[i, j] > 0.5 else "black", in_layout=False)
    return fig


def classification_report(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]
                          ) -> tuple[str, dict[str, Any]]:
    """scikit-learn's per-class precision, recall, F1 and support of the most probable class,
    as text and as a JSON-able dict. Every class is listed, even one absent from `y_true`
    (its scores are 0, not an error)."""
    from sklearn.metrics import classification_report as _classification_report

    y_pred = np.asarray(probs).argmax(1)
    options: dict[str, Any] = dict(labels=list(range(len(classes))),
                                   target_names=[str(c) for c in classes], zero_division=0)
    text = _classification_report(y_true, y_pred, digits=4, **options)
    table = _classification_report(y_true, y_pred, output_dict=True, **options)
    return text, _plain(table)


def write_predictions(path: str | Path, files: Sequence[str | Path], probs: np.ndarray,
                      classes: Sequence[str], *, labels: np.ndarray | None = None,
                      predictions: Sequence[str | None] | None = None,
                      errors: Sequence[str | None] | None = None,
                      extra: Mapping[str, Sequence[float | int | None]] | None = None) -> Path:
    """One CSV row per image: `file`, `label` (the true class, with `labels`), `prediction` (the
    most probable class, unless `predictions` says otherwise: "unknown" below a threshold),
    `probability` (of the most probable class), `p_<class>` per class, to 6 decimals, a column
    per `extra` name (e.g. an uncertainty; None is an empty cell), and `error` (with `errors`).
    A row of NaN probabilities is an image that could not be read: its prediction and
    probability cells are empty."""
    p = np.asarray(probs, dtype=np.float64)
    n = len(files)
    if p.size == 0:  # no images: an empty table with its header
        p = p.reshape(0, len(classes))
    if p.shape != (n, len(classes)) or any(
            column is not None and len(column) != n
            for column in (labels, predictions, errors, *(extra or {}).values())):
        given = "no" if labels is None else len(labels)
        raise ValueError(f"{n} ids, {given} labels and probs of shape {np.shape(probs)} for "
                         f"{len(classes)} classes do not match")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = [str(c) for c in classes]
    header = ["file", *(["label"] if labels is not None else []), "prediction", "probability",
              *(f"p_{c}" for c in names), *(extra or {}),
              *(["error"] if errors is not None else [])]
    with path.open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(header)
        for i, row in enumerate(p):
            readable = not np.isnan(row).any()
            label = [] if labels is None else [names[int(labels[i])]]
            chosen = predictions[i] if predictions is not None else names[int(row.argmax())]
            cells = ([chosen or "", f"{row.max():.6f}", *(f"{v:.6f}" for v in row)] if readable
                     else ["", "", *([""] * len(names))])
            error = [] if errors is None else [errors[i] or ""]
            more = [_cell(column[i]) for column in (extra or {}).values()]
            out.writerow([str(files[i]), *label, *cells, *more, *error])
    return path


def _cell(value: float | int | None) -> str:
    """A CSV cell: empty for None, 6 decimals for a float, an integer as is."""
    if value is None:
        return ""
    return f"{value:.6f}" if isinstance(value, float) else str(value)


def _plain(value: Any) -> Any:
    """NumPy scalars in nested dicts as Python numbers, so `json.dumps` takes them."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    return value
