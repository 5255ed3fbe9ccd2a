import math

import numpy as np
import pytest

from imgcls.errors import ConfigError
from imgcls.metrics import classification_metrics, is_better, metric_direction


def test_nan_is_never_an_improvement() -> None:
    assert not is_better(math.nan, 0.1, "max")
    assert is_better(0.0, None, "min")


def test_macro_f1_weighs_every_class_the_same() -> None:
    y_true = np.array([0, 0, 0, 0, 1])
    y_pred = np.array([0, 0, 0, 0, 0])  # never predicts the rare class
    scores = classification_metrics(y_true, y_pred, num_classes=2)
    assert scores["acc"] == 0.8
    assert scores["f1"] == pytest.approx((8 / 9 + 0) / 2)


def test_objective_names_are_checked() -> None:
    assert metric_direction("val_loss") == "min"
    with pytest.raises(ConfigError, match="valid: val_loss, val_acc, val_f1"):
        metric_direction("val_accuracy")
