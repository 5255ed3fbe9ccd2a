import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as sk

from imgcls import metrics
from imgcls.errors import ConfigError
from imgcls.metrics import (
    OBJECTIVE_METRICS,
    check_objective,
    classification_metrics,
    is_better,
    metric_direction,
    objective_available,
)


def scored(n: int, k: int, seed: int = 0, signal: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels and softmax probabilities that lean towards the true class by `signal`. Logits
    rounded to one decimal, so scores tie as real model outputs sometimes do."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(np.round(logits, 1))
    return y, p / p.sum(1, keepdims=True)


def sklearn_scores(y: np.ndarray, p: np.ndarray, k: int, positive: int = 1) -> dict[str, float]:
    pred = p.argmax(1)
    labels = list(range(k))
    if k == 2:
        auc = sk.roc_auc_score(y == positive, p[:, positive])
    else:
        auc = sk.roc_auc_score(y, p, multi_class="ovr", average="macro")
    ref = {"acc": sk.accuracy_score(y, pred), "bal_acc": sk.balanced_accuracy_score(y, pred),
           "f1": sk.f1_score(y, pred, labels=labels, average="macro", zero_division=0),
           "kappa": sk.cohen_kappa_score(y, pred), "log_loss": sk.log_loss(y, p, labels=labels),
           "auc": auc}
    if k == 2:
        recall = sk.recall_score(y, pred, labels=labels, average=None)
        ref["sens"], ref["spec"] = recall[positive], recall[1 - positive]
    return ref


def test_nan_is_never_an_improvement() -> None:
    assert not is_better(math.nan, 0.1, "max")
    assert is_better(0.0, None, "min")


def test_macro_f1_weighs_every_class_the_same() -> None:
    y_true = np.array([0, 0, 0, 0, 1])
    probs = np.array([[0.9, 0.1]] * 5)  # never predicts the rare class
    scores = classification_metrics(y_true, probs, num_classes=2)
    assert scores["acc"] == 0.8
    assert scores["f1"] == pytest.approx((8 / 9 + 0) / 2)
    assert scores["bal_acc"] == 0.5
    assert (scores["sens"], scores["spec"]) == (0.0, 1.0)


def test_objective_names_are_checked() -> None:
    assert metric_direction("val_loss") == "min"
    assert metric_direction("val_auc") == "max"
    with pytest.raises(ConfigError, match="valid: val_loss, val_acc, val_bal_acc, val_f1, "
                                          "val_sens, val_spec, val_auc"):
        metric_direction("val_accuracy")


def test_binary_only_objectives_are_refused_for_more_classes() -> None:
    assert objective_available("val_sens", 2) and objective_available("val_auc", 3)
    assert not objective_available("val_spec", 3) and not objective_available("val_x", 2)
    assert check_objective("val_spec", 2) == "max"
    with pytest.raises(ConfigError, match="'val_sens' needs two classes but the data has 3; "
                                          r"use one of: val_loss, val_acc, val_bal_acc, val_f1, "
                                          r"val_auc$"):
        check_objective("val_sens", 3)


@pytest.mark.parametrize(("k", "positive"), [(2, 1), (2, 0), (3, 1), (5, 1)])
def test_epoch_metrics_match_sklearn(k: int, positive: int) -> None:
    y, p = scored(300, k)
    scores = classification_metrics(y, p.astype(np.float32), k, positive=positive)
    ref = sklearn_scores(y, p.astype(np.float32), k, positive)
    assert set(scores) == {"acc", "bal_acc", "f1", "auc"} | ({"sens", "spec"} if k == 2 else set())
    assert {f"val_{name}" for name in scores} <= set(OBJECTIVE_METRICS)
    for name, value in scores.items():
        assert value == pytest.approx(ref[name], abs=1e-12), name


def test_multiclass_auc_averages_the_classes_present() -> None:
    y, p = scored(200, 4, seed=3)
    y[y == 2] = 0  # class 2 never occurs: its one-vs-rest AUC is undefined, not zero
    per_class = [sk.roc_auc_score(y == c, p[:, c]) for c in (0, 1, 3)]
    assert classification_metrics(y, p, 4)["auc"] == pytest.approx(np.mean(per_class))


def test_undefined_values_are_nan_without_warnings() -> None:
    probs = np.array([[0.2, 0.8], [0.7, 0.3], [0.4, 0.6]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one_class = classification_metrics(np.array([1, 1, 1]), probs, 2)
        empty = metrics.test_metrics(np.zeros(0, int), np.zeros((0, 3)), 3, n_boot=10)
    assert one_class["acc"] == pytest.approx(2 / 3) and one_class["sens"] == pytest.approx(2 / 3)
    assert math.isnan(one_class["auc"]) and math.isnan(one_class["spec"])
    names = ("acc", "bal_acc", "f1", "kappa", "log_loss", "auc")
    assert set(empty) == {f"test_{m}{s}" for m in names for s in ("", "_ci_low", "_ci_high")}
    assert all(math.isnan(v) for v in empty.values())


def test_mismatched_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"probs has shape \(3, 2\); expected \(3, 3\)"):
        classification_metrics(np.array([0, 1, 2]), np.full((3, 2), 0.5), 3)


@pytest.mark.parametrize("k", [2, 4])
def test_test_metrics_point_estimates_match_sklearn(k: int) -> None:
    y, p = scored(400, k, seed=k)
    result = metrics.test_metrics(y, p, k, prefix="holdout", n_boot=0)
    ref = sklearn_scores(y, p, k)
    assert set(result) == {f"holdout_{name}" for name in ref}
    for name, value in ref.items():
        assert result[f"holdout_{name}"] == pytest.approx(value, abs=1e-12), name


def test_a_confident_mistake_costs_a_finite_log_loss() -> None:
    y, p = np.array([0, 1]), np.array([[0.0, 1.0], [0.0, 1.0]])
    loss = metrics.test_metrics(y, p, 2, n_boot=0)["test_log_loss"]
    assert loss == pytest.approx(sk.log_loss(y, p)) and math.isfinite(loss)


@pytest.mark.parametrize("k", [2, 3])
def test_bootstrap_equals_sklearn_on_each_resample(k: int) -> None:
    """The vectorised bootstrap against a plain loop over the documented resamples."""
    y, p = scored(60, k, seed=7)
    n_boot, seed = 40, 5
    result = metrics.test_metrics(y, p, k, n_boot=n_boot, confidence=0.8, seed=seed)
    picks = np.random.default_rng(seed).integers(0, len(y), (n_boot, len(y)))
    per_resample = [sklearn_scores(y[i], p[i], k) for i in picks]
    for name in per_resample[0]:
        values = [r[name] for r in per_resample]
        low, high = np.percentile(values, [10, 90])
        assert result[f"test_{name}_ci_low"] == pytest.approx(low, abs=1e-12), name
        assert result[f"test_{name}_ci_high"] == pytest.approx(high, abs=1e-12), name


def test_bootstrap_is_seeded() -> None:
    y, p = scored(100, 2)
    first = metrics.test_metrics(y, p, 2, n_boot=200, seed=1)
    assert metrics.test_metrics(y, p, 2, n_boot=200, seed=1) == first
    other = metrics.test_metrics(y, p, 2, n_boot=200, seed=2)
    assert other["test_auc_ci_low"] != first["test_auc_ci_low"]
    assert other["test_auc"] == first["test_auc"]


def test_intervals_contain_the_estimate_and_narrow_as_n_grows() -> None:
    widths = []
    for n in (200, 3000):
        y, p = scored(n, 2, seed=11)
        result = metrics.test_metrics(y, p, 2, n_boot=500)
        names = [m for m in result if not m.endswith(("_ci_low", "_ci_high"))]
        for name in names:
            assert result[f"{name}_ci_low"] <= result[name] <= result[f"{name}_ci_high"], name
        widths.append({m: result[f"{m}_ci_high"] - result[f"{m}_ci_low"] for m in names})
    for name, wide in widths[0].items():
        assert widths[1][name] < wide / 2, name  # ~1/sqrt(N): 15x the images, ~1/3.9 the width


def test_bootstrap_settings_are_checked() -> None:
    y, p = scored(10, 2)
    with pytest.raises(ConfigError, match="confidence 95 is not between 0 and 1"):
        metrics.test_metrics(y, p, 2, confidence=95)
    with pytest.raises(ConfigError, match="n_boot=-1 is negative"):
        metrics.test_metrics(y, p, 2, n_boot=-1)

