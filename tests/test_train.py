
import copy
import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

from imgcls.data import DataConfig, prepare_data
from imgcls.data.batches import Batches
from imgcls.errors import ConfigError, DataError
from imgcls.models import build_model
from imgcls.train import (
    SCHEDULERS,
    Diverged,
    EarlyStopping,
    TrainConfig,
    build_loss,
    build_optimizer,
    build_scheduler,
    class_weights,
    evaluate,
    fit,
    l2_penalty,
    penalized_weights,
    seed_everything,
    train_one_epoch,
)


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


def test_nesterov_reaches_sgd_and_momentum_zero_is_plain_sgd() -> None:
    model = nn.Linear(2, 2)
    assert build_optimizer("sgd", model, 0.1, 0.9, 0.0, nesterov=True).defaults["nesterov"]
    assert not build_optimizer("sgd", model, 0.1, 0.9, 0.0).defaults["nesterov"]
    with pytest.raises(ValueError):  # what torch does, and what a sampled momentum 0 must avoid
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0, nesterov=True)
    optimizer = build_optimizer("sgd", model, 0.1, 0.0, 0.0, nesterov=True)
    before = model.weight.detach().clone()
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    assert torch.allclose(model.weight, before - 0.1 * model.weight.grad)


def tiny_cnn() -> nn.Sequential:
    """Conv, batch norm, linear: weights, biases and norm parameters, on 6x6 one-channel images."""
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 2))


def tiny_batches(labels: list[int], batch_size: int | None = None) -> Batches:
    images = torch.randint(0, 256, (len(labels), 1, 6, 6), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    return Batches(images, torch.tensor(labels), batch_size or len(labels), train=True,
                   mean=(0.5,), std=(0.25,), seed=0)


def test_frozen_parameters_are_not_optimized_and_do_not_change() -> None:
    torch.manual_seed(0)
    model = tiny_cnn()
    conv = model[0]
    conv.requires_grad_(False)
    optimizer = build_optimizer("sgd", model, 0.1, 0.9, 0.1)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(conv.weight) not in in_optimizer
    frozen, head = conv.weight.detach().clone(), model[4].weight.detach().clone()
    train_one_epoch(model, tiny_batches([0, 1] * 4, 4), optimizer, nn.CrossEntropyLoss())
    assert torch.equal(conv.weight, frozen)  # weight decay did not touch it either
    assert not torch.equal(model[4].weight, head)


def test_a_model_with_nothing_to_train_is_refused() -> None:
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ConfigError, match="Linear has no trainable parameters"):
        build_optimizer("adam", model, 0.1, 0.9, 0.0)


def lr_curve(config: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate of every optimizer step of a run planned by `config`."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=config.lr)
    scheduler = build_scheduler(config.scheduler, optimizer, config.schedule_plan(steps_per_epoch))
    rates = []
    for _ in range(config.max_epochs * steps_per_epoch):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_rises_linearly_from_a_tenth_of_the_rate() -> None:
    lr, steps_per_epoch = 0.5, 4
    config = TrainConfig(lr=lr, warmup_epochs=1.5, max_epochs=4)
    warmup = round(1.5 * steps_per_epoch)
    rates = lr_curve(config, steps_per_epoch)
    assert rates[:warmup] == pytest.approx([lr / 10 + (lr - lr / 10) * k / warmup
                                            for k in range(warmup)])
    assert rates[warmup:] == pytest.approx([lr] * (len(rates) - warmup))


def test_step_schedule_multiplies_by_gamma_at_each_boundary() -> None:
    steps_per_epoch = 3
    config = TrainConfig(lr=1.0, scheduler="step", lr_gamma=0.5, lr_step_epochs=2, max_epochs=6)
    rates = lr_curve(config, steps_per_epoch)
    boundary = 2 * steps_per_epoch
    assert rates[boundary - 1] == pytest.approx(1.0)
    assert rates[boundary] == pytest.approx(0.5)
    assert rates[2 * boundary - 1] == pytest.approx(0.5)
    assert rates[2 * boundary] == pytest.approx(0.25)


@pytest.mark.parametrize("max_epochs", [2, 9])
def test_step_schedule_steps_every_third_of_the_epochs_by_default(max_epochs: int) -> None:
    config = TrainConfig(lr=1.0, scheduler="step", max_epochs=max_epochs)
    rates = lr_curve(config, 2)
    first_drop = next(i for i, rate in enumerate(rates) if rate < 1.0)
    assert first_drop == max(1, max_epochs // 3) * 2
    assert rates[first_drop] == pytest.approx(config.lr_gamma)


def test_cosine_peaks_after_warmup_and_ends_near_zero() -> None:
    lr, steps_per_epoch = 0.2, 10
    rates = lr_curve(TrainConfig(lr=lr, scheduler="cosine", warmup_epochs=1, max_epochs=5),
                     steps_per_epoch)
    peak = rates.index(max(rates))
    assert peak == steps_per_epoch and rates[peak] == pytest.approx(lr)
    after = rates[peak:]
    assert all(a >= b for a, b in itertools.pairwise(after))
    assert 0 < rates[-1] < 0.01 * lr


@pytest.mark.parametrize("warmup_epochs", [0.0, 2.0])
def test_onecycle_is_torchs_policy_peaking_at_lr(warmup_epochs: float) -> None:
    lr, steps_per_epoch, epochs = 0.3, 7, 5
    config = TrainConfig(lr=lr, scheduler="onecycle", warmup_epochs=warmup_epochs,
                         max_epochs=epochs)
    rates = lr_curve(config, steps_per_epoch)
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    torchs = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch,
        pct_start=warmup_epochs / epochs or 0.3, cycle_momentum=False)
    expected = []
    for _ in range(epochs * steps_per_epoch):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        torchs.step()
    assert rates == pytest.approx(expected)
    assert max(rates) == pytest.approx(lr, rel=0.01)
    assert rates[0] == pytest.approx(lr / 25) and rates[-1] < lr / 1000


def test_unknown_scheduler_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown scheduler 'cosin'; did you mean 'cosine'") \
            as error:
        TrainConfig(scheduler="cosin")
    assert all(name in str(error.value) for name in SCHEDULERS.names())


@pytest.mark.parametrize(("field", "value", "message"), [
    ("warmup_epochs", 10.0, "warmup_epochs must be in \\[0, max_epochs = 10\\), not 10.0"),
    ("warmup_epochs", -1.0, "warmup_epochs must be in"),
    ("lr_step_epochs", -1, "lr_step_epochs must be at least 1, or 0 for a third of max_epochs, "
                           "not -1"),
    ("lr_gamma", 0.0, "lr_gamma must be above 0, not 0.0"),
    ("l2", -0.1, "l2 must be 0 or more, not -0.1"),
    ("max_epochs", 0, "max_epochs must be at least 1, not 0"),
])
def test_settings_that_cannot_work_are_refused(field: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{field: value})


def test_class_weights_are_n_over_k_times_count() -> None:
    labels = [0, 0, 0, 0, 0, 0, 1, 1, 2]
    counts = np.bincount(labels)
    expected = len(labels) / (3 * counts)
    assert class_weights(torch.tensor(labels), 3).numpy() == pytest.approx(expected)


def test_class_weights_make_the_rare_class_mistakes_cost_more() -> None:
    labels = torch.tensor([0, 0, 0, 1])  # class 1 is rare
    targets = torch.tensor([0, 1])
    rare_wrong = torch.tensor([[3.0, 0.0], [3.0, 0.0]])  # the common image right, the rare wrong
    common_wrong = torch.tensor([[0.0, 3.0], [0.0, 3.0]])  # the common image wrong, the rare right
    plain = build_loss(2, labels)
    assert plain(rare_wrong, targets) == pytest.approx(plain(common_wrong, targets).item())
    weighted = build_loss(2, labels, class_weighted=True)
    assert weighted(rare_wrong, targets) > 2 * weighted(common_wrong, targets)


def test_a_class_absent_from_training_cannot_be_weighted() -> None:
    model = tiny_cnn()
    with pytest.raises(DataError, match=r"no images of class index 2 \(of 0\.\.2\)"):
        fit(model, tiny_batches([0, 1, 0, 1]), tiny_batches([0, 1, 2]),
            TrainConfig(class_weighted=True, max_epochs=1), 3)


def test_l2_penalty_sums_squared_weights_without_biases_or_norm_layers() -> None:
    torch.manual_seed(0)
    model = tiny_cnn()
    conv, norm, linear = model[0], model[1], model[4]
    assert {id(w) for w in penalized_weights(model)} == {id(conv.weight), id(linear.weight)}
    by_hand = (conv.weight ** 2).sum() + (linear.weight ** 2).sum()
    assert l2_penalty(penalized_weights(model)).item() == pytest.approx(by_hand.item())
    with torch.no_grad():
        norm.weight.add_(5.0)
        conv.bias.add_(5.0)
    assert l2_penalty(penalized_weights(model)).item() == pytest.approx(by_hand.item())


def test_l2_adds_its_gradient_to_weights_only_and_train_loss_leaves_it_out() -> None:
    """One SGD step with l2 moves each weight by an extra -lr * 2 * l2 * w, biases not at all."""
    torch.manual_seed(0)
    plain_model = tiny_cnn()
    l2_model = copy.deepcopy(plain_model)
    start = {k: v.detach().clone() for k, v in plain_model.named_parameters()}
    lr, l2 = 0.1, 0.5
    runs = {}
    for name, model, penalty in (("plain", plain_model, 0.0), ("l2", l2_model, l2)):
        optimizer = build_optimizer("sgd", model, lr, 0.0, 0.0)
        runs[name] = train_one_epoch(model, tiny_batches([0, 1] * 3), optimizer,
                                     nn.CrossEntropyLoss(), l2=penalty)
    assert runs["l2"]["train_loss"] == pytest.approx(runs["plain"]["train_loss"])
    plain, penalized = dict(plain_model.named_parameters()), dict(l2_model.named_parameters())
    for key, w0 in start.items():
        extra = -lr * 2 * l2 * w0 if w0.ndim > 1 else torch.zeros_like(w0)
        assert torch.allclose(penalized[key] - plain[key], extra, atol=1e-6), key


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


def test_the_history_records_each_epochs_learning_rate(digits) -> None:  # type: ignore[no-untyped-def]
    lr, gamma = 0.05, 0.5
    result = fit(build_model("simplecnn", 10, 1), digits.batches("train", 128),
                 digits.batches("val", 256),
                 TrainConfig(lr=lr, scheduler="step", lr_step_epochs=1, lr_gamma=gamma,
                             max_epochs=3), 10)
    assert [h["lr"] for h in result.history] == pytest.approx([lr * gamma ** e for e in range(3)])
    assert all(math.isfinite(h["train_loss"]) for h in result.history)


def test_a_diverging_loss_stops_training(digits) -> None:  # type: ignore[no-untyped-def]
    model = build_model("simplecnn", 10, 1)
    with pytest.raises(Diverged, match="diverged at epoch 1"):
        fit(model, digits.batches("train", 64), digits.batches("val", 256),
            TrainConfig(lr=1e20, momentum=0.0, max_epochs=3), 10)


def _trainer(digits, seed: int = 0):  # type: ignore[no-untyped-def]
    """A trainer that draws from every generator a step can: shuffled and augmented batches,
    dropout, a warm-up and cosine schedule, Adam's moments, early stopping."""
    from imgcls.data.augment import Augment
    from imgcls.train import Trainer

    seed_everything(seed)
    model = build_model("simplecnn", 10, 1, dropout=0.3)
    augment = Augment(hflip=0.5, rotation=10, crop_scale=0.8, brightness=0.2)
    config = TrainConfig(optimizer="adam", lr=0.01, scheduler="cosine", warmup_epochs=1,
                         label_smoothing=0.1, class_weighted=True, l2=1e-4, max_epochs=5,
                         patience=3)
    return Trainer(model, digits.batches("train", 64, augment=augment, seed=seed),
                   digits.batches("val", 256), config, 10)


def test_a_trainer_resumed_from_its_saved_state_goes_on_as_if_never_stopped(
        digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    whole = _trainer(digits)
    for _ in range(5):
        whole.step()
    stopped = _trainer(digits)
    for _ in range(2):
        stopped.step()
    torch.save(stopped.state_dict(), tmp_path / "state.pt")
    del stopped
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # tensors and plain values
    seed_everything(123)  # a new process: every generator elsewhere, and another initialisation
    resumed = _trainer(digits, seed=7)
    resumed.load_state_dict(state)
    assert resumed.epoch == 2 and not resumed.done
    while not resumed.done:
        resumed.step()
    keep = ("epoch", "train_loss", "train_acc", "lr", "val_loss", "val_f1")
    assert [{k: h[k] for k in keep} for h in resumed.history] == \
        [{k: h[k] for k in keep} for h in whole.history]
    a, b = whole.finish(), resumed.finish()
    assert (a.best_epoch, a.stop_reason) == (b.best_epoch, b.stop_reason)
    assert a.best_metrics["val_f1"] == b.best_metrics["val_f1"]
    np.testing.assert_array_equal(a.best_evaluation.probs, b.best_evaluation.probs)
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


def test_a_saved_state_holds_the_best_weights_once_and_restores_them(
        digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    trainer = _trainer(digits)
    for _ in range(3):
        trainer.step()
        torch.save(trainer.state_dict(), tmp_path / "state.pt")
        state = torch.load(tmp_path / "state.pt", weights_only=True)
        # an epoch that was the best so far: its weights are the model's, not written twice
        assert (state["best"]["weights"] is None) == (trainer.best_epoch == trainer.epoch)
        resumed = _trainer(digits, seed=7)
        resumed.load_state_dict(state)
        assert resumed.best_epoch == trainer.best_epoch
        assert trainer.best_weights is not None and resumed.best_weights is not None
        for key, value in trainer.best_weights.items():
            assert torch.equal(value, resumed.best_weights[key]), key
        restored = resumed.best_weights
        resumed.step()  # training on leaves the restored best weights as they were
        for key, value in trainer.best_weights.items():
            assert torch.equal(value, restored[key]), key


def test_population_based_training_changes_what_may_change(digits) -> None:  # type: ignore[no-untyped-def]
    from imgcls.data.augment import Augment

    trainer = _trainer(digits)
    trainer.step()
    scheduled = trainer.optimizer.param_groups[0]["lr"] / trainer.scheduler.base_lrs[0]
    trainer.set_hyperparameters(lr=0.002, momentum=0.8, weight_decay=1e-3,
                                augment=Augment(hflip=0.1))
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == pytest.approx(0.002 * scheduled)  # the schedule keeps its shape
    assert group["betas"][0] == 0.8 and group["weight_decay"] == 1e-3
    assert trainer.train.augment == Augment(hflip=0.1)
    trainer.step()  # the schedule goes on from the new peak rate
    assert trainer.scheduler.base_lrs == [0.002]
    assert trainer.optimizer.param_groups[0]["lr"] < 0.002
