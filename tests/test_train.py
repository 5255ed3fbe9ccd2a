
import pytest
import torch

from imgcls.data import DataConfig, prepare_data
from imgcls.models import build_model
from imgcls.train import Diverged, EarlyStopping, TrainConfig, evaluate, fit, seed_everything
from imgcls.train.optim import build_optimizer


def test_early_stopping_waits_patience_epochs_without_improvement() -> None:
    stop = EarlyStopping("max", patience=2)
    decisions = [stop.update(e, v) for e, v in enumerate([0.5, 0.7, 0.6, 0.7, 0.65], start=1)]
    assert [d.improved for d in decisions] == [True, True, False, False, False]
    assert [d.stop for d in decisions] == [False, False, False, True, True]
    assert (stop.best, stop.best_epoch) == (0.7, 2)  # a tie is not an improvement


def test_early_stopping_state_round_trips() -> None:
    a = EarlyStopping("min", patience=3)
    for e, v in enumerate([1.0, 0.8, 0.9], start=1):
        a.update(e, v)
    b = EarlyStopping("min", patience=3)
    b.load_state_dict(a.state_dict())
    assert a.update(4, 0.95) == b.update(4, 0.95)
    assert b.bad_epochs == 2


def test_momentum_is_adams_beta1() -> None:
    model = torch.nn.Linear(2, 2)
    for name in ("adam", "adamw"):
        assert build_optimizer(name, model, 0.1, 0.8, 0.0).defaults["betas"] == (0.8, 0.999)
    assert build_optimizer("sgd", model, 0.1, 0.8, 0.0).defaults["momentum"] == 0.8


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return prepare_data(DataConfig(source="digits", image_size=8, channels=1), seed=0)


def test_fit_learns_and_keeps_its_best_epoch(digits) -> None:  # type: ignore[no-untyped-def]
    seed_everything(0)
    model = build_model("simplecnn", 10, 1)
    seen = []
    result = fit(model, digits.batches("train", 32, seed=0), digits.batches("val", 256),
                 TrainConfig(lr=0.05, max_epochs=4), 10,
                 on_epoch_end=lambda epoch, metrics: seen.append(epoch) and None)
    assert seen == [1, 2, 3, 4] and result.epochs == 4
    assert result.best_metrics["val_acc"] > 0.8
    best = max(result.history, key=lambda h: h["val_f1"])
    assert result.best_epoch == best["epoch"]
    # the model holds the best epoch's weights, not the last epoch's
    again = evaluate(model, digits.batches("val", 256), 10)
    assert again.metrics["val_f1"] == pytest.approx(result.best_metrics["val_f1"])


def test_a_callback_can_stop_training_with_a_reason(digits) -> None:  # type: ignore[no-untyped-def]
    model = build_model("simplecnn", 10, 1)
    result = fit(model, digits.batches("train", 64), digits.batches("val", 256),
                 TrainConfig(max_epochs=5), 10,
                 on_epoch_end=lambda epoch, m: "pruned at epoch 2" if epoch == 2 else None)
    assert (result.epochs, result.stop_reason) == (2, "pruned at epoch 2")


def test_a_diverging_loss_stops_training(digits) -> None:  # type: ignore[no-untyped-def]
    model = build_model("simplecnn", 10, 1)
    with pytest.raises(Diverged, match="diverged at epoch 1"):
        fit(model, digits.batches("train", 64), digits.batches("val", 256),
            TrainConfig(lr=1e20, momentum=0.0, max_epochs=3), 10)
