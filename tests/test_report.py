import csv
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure
from sklearn.metrics import roc_auc_score

from imgcls.metrics import confusion_matrix
from imgcls.report import (
    classification_report,
    plot_confusion_matrix,
    plot_curves,
    plot_roc,
    roc_curves,
    write_predictions,
)


def scored(n: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities leaning towards the true class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += 1.0
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


HISTORY = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 10, "val_loss": 1.2 / e,
            "val_acc": 0.4 + e / 10} for e in (1, 2, 3)]


def test_curves_show_loss_and_accuracy_for_train_and_val() -> None:
    fig = plot_curves(HISTORY)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    loss, acc = fig.axes
    assert [line.get_label() for line in loss.lines] == ["train", "val"]
    assert list(acc.lines[1].get_ydata()) == [row["val_acc"] for row in HISTORY]
    assert list(acc.lines[1].get_xdata()) == [1, 2, 3]


def test_curves_mark_the_best_epoch() -> None:
    fig = plot_curves(HISTORY, best_epoch=2)
    for ax in fig.axes:
        assert len(ax.lines) == 3
        assert list(ax.lines[-1].get_xdata()) == [2, 2]


def test_curves_skip_metrics_the_history_lacks() -> None:
    fig = plot_curves([{"train_loss": 0.9, "train_acc": 0.6}, {"train_loss": 0.7}])
    loss, acc = fig.axes
    assert [line.get_label() for line in loss.lines] == ["train"]
    assert list(loss.lines[0].get_xdata()) == [1, 2]  # no `epoch` key: counted from 1
    assert np.isnan(acc.lines[0].get_ydata()[1])


def test_binary_roc_is_one_curve_of_the_positive_class() -> None:
    y, p = scored(80, 2)
    (curve,) = roc_curves(y, p, ["neg", "pos"])
    assert curve.label == "pos"
    assert curve.auc == pytest.approx(roc_auc_score(y, p[:, 1]))
    fig = plot_roc(y, p, ["neg", "pos"])
    (ax,) = fig.axes
    assert len(ax.lines) == 2  # the curve and the chance diagonal
    assert ax.lines[0].get_label() == f"pos (AUC {curve.auc:.3f})"


def test_multiclass_roc_has_a_curve_per_class_present() -> None:
    y, p = scored(90, 4, seed=1)
    y[y == 3] = 0  # class "d" has no images: no curve
    curves = roc_curves(y, p, ["a", "b", "c", "d"])
    assert [c.label for c in curves] == ["a", "b", "c"]
    for c, curve in enumerate(curves):
        assert curve.auc == pytest.approx(roc_auc_score(y == c, p[:, c]))
    assert len(plot_roc(y, p, ["a", "b", "c", "d"]).axes[0].lines) == 4


def test_confusion_matrix_plot_writes_every_count() -> None:
    y, p = scored(30, 3)
    matrix = confusion_matrix(y, p.argmax(1), 3)
    fig = plot_confusion_matrix(matrix, ["a", "b", "c"], title="val")
    ax = fig.axes[0]
    assert ax.get_title() == "val"
    assert sorted(int(t.get_text()) for t in ax.texts) == sorted(matrix.ravel().tolist())


def test_report_lists_every_class_and_is_json_able() -> None:
    y, p = scored(40, 3)
    y[y == 2] = 0  # "c" has no true images: still reported, with support 0
    text, table = classification_report(y, p, ("a", "b", "c"))
    assert json.loads(json.dumps(table)) == table
    assert {"a", "b", "c"} <= set(table) and table["c"]["support"] == 0
    assert table["a"]["support"] == int((y == 0).sum())
    assert table["accuracy"] == pytest.approx(np.mean(p.argmax(1) == y))
    assert all(name in text for name in ("a", "b", "c", "macro avg"))


def test_predictions_csv_round_trips(tmp_path: Path) -> None:
    y, p = scored(25, 3, seed=2)
    classes = ("cat", "dog", "eel")
    ids = [f"img/{i:03d}.png" for i in range(25)]
    path = write_predictions(tmp_path / "out" / "preds.csv", ids, p, classes, labels=y)
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["file", "label", "prediction", "probability", "p_cat", "p_dog",
                             "p_eel"]
    assert [r["file"] for r in rows] == ids
    assert [r["label"] for r in rows] == [classes[c] for c in y]
    read = np.array([[float(r[f"p_{c}"]) for c in classes] for r in rows])
    assert read == pytest.approx(p, abs=5e-7)  # 6 decimals
    assert read.sum(1) == pytest.approx(np.ones(25), abs=2e-6)
    assert [r["prediction"] for r in rows] == [classes[c] for c in read.argmax(1)]
    assert [float(r["probability"]) for r in rows] == pytest.approx(read.max(1), abs=5e-7)


def test_predictions_without_labels_have_no_label_column(tmp_path: Path) -> None:
    _, p = scored(3, 2)
    path = write_predictions(tmp_path / "p.csv", ["a", "b", "c"], p, ["x", "y"])
    with path.open(newline="") as f:
        assert "label" not in next(csv.DictReader(f))


def test_predictions_of_mismatched_lengths_are_refused(tmp_path: Path) -> None:
    _, p = scored(3, 2)
    with pytest.raises(ValueError, match=r"2 ids, 3 labels and probs of shape \(3, 2\)"):
        write_predictions(tmp_path / "p.csv", ["a", "b"], p, ["x", "y"], labels=np.zeros(3, int))


def _outside(fig: Figure) -> list[str]:
    """The texts drawn on `fig` (labels, ticks, titles, legends, counts) that reach past its
    edges, as a PNG of it would show them."""
    from typing import Any

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    renderer = canvas.get_renderer()
    drawn = []
    draw_text = renderer.draw_text

    def recording(*args: Any, mtext: Any = None, **kwargs: Any) -> None:
        drawn.append(mtext)
        draw_text(*args, mtext=mtext, **kwargs)

    renderer.draw_text = recording  # type: ignore[method-assign]
    fig.draw(renderer)
    width, height = canvas.get_width_height()
    out = []
    for text in filter(None, drawn):
        box = text.get_window_extent(renderer)
        if box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1:
            out.append(text.get_text())
    assert len(drawn) > 10  # the check saw what was drawn
    return out


@pytest.mark.parametrize("classes", [["a", "b"], [f"a long class name {i}" for i in range(12)]])
def test_figures_keep_every_text_inside_them(classes: list[str]) -> None:
    """The layout leaves legends and counts out of its measurement: they must stay inside."""
    k = len(classes)
    y, p = scored(20 * k, k)
    matrix = confusion_matrix(y, p.argmax(1), k)
    title = "validation, epoch 12: val_bal_acc = 0.9876"
    for fig in (plot_curves(HISTORY, best_epoch=2), plot_roc(y, p, classes, title=title),
                plot_confusion_matrix(matrix, classes, title)):
        assert _outside(fig) == []


def test_the_reliability_diagram_draws_a_line_per_curve_with_its_ece() -> None:
    from imgcls.metrics import reliability
    from imgcls.report import plot_reliability

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 200)
    p1 = np.clip(y * 0.7 + rng.random(200) * 0.3, 0, 1)
    probs = np.stack([1 - p1, p1], axis=1)
    curve = reliability(y, probs)
    figure = plot_reliability({"before": curve, "after": curve}, title="val")
    labels = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert labels == [f"before (ECE {curve.ece:.3f})", f"after (ECE {curve.ece:.3f})",
                      "calibrated"]
