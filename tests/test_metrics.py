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



def _ranked_but_shifted(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A 1:9 imbalanced two-class set whose scores rank well (AUC ~0.98) but whose positives
    mostly score below 0.5: the argmax misses most of them."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.1).astype(np.int64)
    logit = np.where(y == 1, rng.normal(-1.0, 1.0, n), rng.normal(-4.0, 1.0, n))
    p1 = 1 / (1 + np.exp(-logit))
    return y, np.stack([1 - p1, p1], axis=1)


def test_a_sensitivity_target_chosen_on_validation_holds_on_test() -> None:
    y_val, p_val = _ranked_but_shifted(3000, seed=1)
    y_test, p_test = _ranked_but_shifted(3000, seed=2)
    threshold = metrics.choose_threshold(y_val, p_val, metrics.OperatingPoint.parse("sens=0.95"))
    assert threshold is not None and threshold < 0.5
    scores = metrics.test_metrics(y_test, p_test, 2, threshold=threshold, n_boot=300)
    assert scores["test_sens_ci_low"] <= 0.95 <= scores["test_sens_ci_high"]
    assert metrics.test_metrics(y_test, p_test, 2, n_boot=0)["test_sens"] < 0.5  # argmax: missed


def test_youden_improves_balanced_accuracy_over_argmax() -> None:
    y_val, p_val = _ranked_but_shifted(3000, seed=3)
    y_test, p_test = _ranked_but_shifted(3000, seed=4)
    threshold = metrics.choose_threshold(y_val, p_val, metrics.OperatingPoint.parse("youden"))
    at_point = metrics.test_metrics(y_test, p_test, 2, threshold=threshold, n_boot=0)
    at_argmax = metrics.test_metrics(y_test, p_test, 2, n_boot=0)
    assert at_point["test_bal_acc"] > at_argmax["test_bal_acc"] + 0.2
    assert at_point["test_auc"] == at_argmax["test_auc"]  # threshold-free


def test_a_threshold_meets_its_target_on_the_data_it_was_chosen_on() -> None:
    y, p = _ranked_but_shifted(500, seed=5)
    for text, name in (("sens=0.9", "sens"), ("spec=0.8", "spec")):
        point = metrics.OperatingPoint.parse(text)
        threshold = metrics.choose_threshold(y, p, point)
        reached = metrics.test_metrics(y, p, 2, threshold=threshold, n_boot=0)[f"test_{name}"]
        assert reached >= point.target
    assert metrics.choose_threshold(y, p, metrics.OperatingPoint.parse("argmax")) is None
    assert list(metrics.decide(p, 0.3)) == list((p[:, 1] >= 0.3).astype(int))


@pytest.mark.parametrize("text", ["sens", "sens=0", "spec=1.5", "sens=abc", "median"])
def test_a_bad_operating_point_is_a_one_line_config_error(text: str) -> None:
    with pytest.raises(ConfigError, match="operating point") as info:
        metrics.OperatingPoint.parse(text)
    assert "\n" not in str(info.value)


def test_a_threshold_operating_point_needs_two_classes() -> None:
    assert str(metrics.check_operating_point("sens=0.95", 2)) == "sens=0.95"
    assert metrics.check_operating_point("argmax", 5).kind == "argmax"
    with pytest.raises(ConfigError, match="needs two classes"):
        metrics.check_operating_point("youden", 3)


def _over_confident(n: int, seed: int, sharpen: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn from calibrated 3-class probabilities, reported with logits `sharpen`
    times too large: an over-confident model whose true temperature is `sharpen`."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 1.5, (n, 3))
    calibrated = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in calibrated])
    sharp = np.exp(logits * sharpen)
    return y, sharp / sharp.sum(1, keepdims=True)


def test_temperature_scaling_undoes_over_confidence() -> None:
    y, p = _over_confident(4000, seed=0)
    temperature = metrics.fit_temperature(y, p)
    assert temperature == pytest.approx(3.0, rel=0.1)
    scaled = metrics.apply_temperature(p, temperature)
    np.testing.assert_array_equal(scaled.argmax(1), p.argmax(1))  # no decision changes
    before = metrics.calibration_scores(y, p, "val")
    after = metrics.calibration_scores(y, scaled, "val")
    assert after["val_ece"] < before["val_ece"] / 3
    assert after["val_brier"] < before["val_brier"]
    assert sk.log_loss(y, scaled) < sk.log_loss(y, p)
    y_test, p_test = _over_confident(2000, seed=1)  # fitted on one set, better on another
    assert metrics.calibration_scores(y_test, metrics.apply_temperature(p_test, temperature),
                                      "test")["test_ece"] < \
        metrics.calibration_scores(y_test, p_test, "test")["test_ece"]
    assert metrics.fit_temperature(np.zeros(0, int), np.zeros((0, 3))) == 1.0


def test_calibration_scores_match_their_definitions() -> None:
    y, p = scored(300, 2, seed=4)
    scores = metrics.calibration_scores(y, p, "val")
    assert scores["val_brier"] == pytest.approx(2 * sk.brier_score_loss(y, p[:, 1]))
    curve = metrics.reliability(y, p, bins=10)
    assert curve.counts.sum() == 300 and len(curve.edges) == 11
    top, hit = p.max(1), p.argmax(1) == y
    which = np.minimum((top * 10).astype(int) - (top * 10 == (top * 10).astype(int)), 9)
    expected = sum(abs(hit[which == b].mean() - top[which == b].mean()) * (which == b).sum()
                   for b in range(10) if (which == b).any()) / 300
    assert curve.ece == pytest.approx(expected)
    assert metrics.metric_goal("test_ece") == "min"
    assert metrics.metric_goal("val_brier_uncalibrated") == "min"


def test_temperature_scaling_lowers_the_validation_ece_of_a_model_trained_to_over_fit() -> None:
    import torch

    torch.manual_seed(0)
    rng = np.random.default_rng(0)

    def noisy(n: int) -> tuple[torch.Tensor, np.ndarray]:
        """Two Gaussian classes with 25% of the labels flipped: no model can be sure."""
        y = rng.integers(0, 2, n)
        x = rng.normal(0, 1, (n, 10)) + y[:, None] * 1.0
        flipped = np.where(rng.random(n) < 0.25, 1 - y, y)
        return torch.tensor(x, dtype=torch.float32), flipped

    x_train, y_train = noisy(100)
    x_val, y_val = noisy(1000)
    model = torch.nn.Sequential(torch.nn.Linear(10, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(500):  # memorises its 100 noisy labels: confident far beyond its accuracy
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x_train), torch.tensor(y_train)).backward()
        optimizer.step()
    with torch.no_grad():
        probs = torch.softmax(model(x_val), 1).numpy()
    temperature = metrics.fit_temperature(y_val, probs)
    assert temperature > 1.5  # over-confident: the logits are shrunk
    before = metrics.calibration_scores(y_val, probs, "val")["val_ece"]
    after = metrics.calibration_scores(y_val, metrics.apply_temperature(probs, temperature),
                                       "val")["val_ece"]
    assert after < before / 2


def test_a_validation_split_the_model_gets_all_right_leaves_the_temperature_at_one() -> None:
    y = np.array([0, 1, 1, 0])
    probs = np.array([[0.8, 0.2], [0.3, 0.7], [0.1, 0.9], [0.6, 0.4]])
    assert metrics.fit_temperature(y, probs) == 1.0
    y[3] = 1  # one mistake: now there is a finite optimum, and sharpening stays within 4x
    assert 0.25 <= metrics.fit_temperature(y, probs) < 100
