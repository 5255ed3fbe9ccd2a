"""The training engine: one epoch of training, one evaluation, and `fit`, which runs them.

`fit` knows nothing of hyperparameter search. It calls `on_epoch_end(epoch, metrics)` after each
epoch; a callback that returns a string stops training, and the string is recorded as the
reason (a search uses this to prune). Epochs are numbered from 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imgcls.data.batches import Batches
from imgcls.metrics import classification_metrics, metric_direction
from imgcls.train.callbacks import EarlyStopping
from imgcls.train.optim import build_optimizer

EpochCallback = Callable[[int, dict[str, float]], str | None]


@dataclass(frozen=True)
class TrainConfig:
    optimizer: str = "sgd"  # a name in OPTIMIZERS
    lr: float = 0.01
    momentum: float = 0.9  # SGD momentum, Adam's beta1
    weight_decay: float = 0.0
    label_smoothing: float = 0.0  # training loss only: validation loss is plain cross-entropy
    max_epochs: int = 10
    patience: int | None = None  # epochs without a better `monitor` before stopping
    monitor: str = "val_f1"  # picks the best epoch, and drives early stopping


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"diverged at epoch {epoch}")
        self.epoch = epoch


@dataclass
class Evaluation:
    metrics: dict[str, float]  # <prefix>_loss, <prefix>_acc, <prefix>_f1
    y_true: np.ndarray
    y_pred: np.ndarray
    probs: np.ndarray  # (N, classes) softmax probabilities


@dataclass
class FitResult:
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch, with "epoch"
    best_epoch: int = 0  # 0 when no epoch gave a finite monitored value
    best_metrics: dict[str, float] = field(default_factory=dict)
    best_evaluation: Evaluation | None = None
    stop_reason: str = "max_epochs"  # or "early_stopping", or what on_epoch_end returned

    @property
    def epochs(self) -> int:
        return len(self.history)


def train_one_epoch(model: nn.Module, batches: Batches, optimizer: torch.optim.Optimizer,
                    loss_fn: nn.Module) -> dict[str, float]:
    model.train()
    # Sums stay on the device: one synchronisation per epoch instead of one per step.
    loss_sum = torch.zeros((), device=batches.device)
    correct = torch.zeros((), device=batches.device, dtype=torch.long)
    seen = 0
    for x, y in batches:
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
    return {"train_loss": loss_sum.item() / seen, "train_acc": correct.item() / seen}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Batches, num_classes: int, prefix: str = "val"
             ) -> Evaluation:
    model.eval()
    loss_sum = torch.zeros((), device=batches.device, dtype=torch.float64)
    probs, labels = [], []
    for x, y in batches:
        logits = model(x).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        probs.append(logits.softmax(1).cpu())
        labels.append(y.cpu())
    p = torch.cat(probs).numpy()
    y_true = torch.cat(labels).numpy()
    y_pred = p.argmax(1)
    scores = classification_metrics(y_true, y_pred, num_classes)
    metrics = {f"{prefix}_loss": loss_sum.item() / len(y_true),
               **{f"{prefix}_{k}": v for k, v in scores.items()}}
    return Evaluation(metrics, y_true, y_pred, p)


def fit(model: nn.Module, train: Batches, val: Batches, config: TrainConfig, num_classes: int,
        on_epoch_end: EpochCallback | None = None) -> FitResult:
    """Train up to `config.max_epochs` epochs; leave the model holding its best epoch's weights."""
    optimizer = build_optimizer(config.optimizer, model, config.lr, config.momentum,
                                config.weight_decay)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    stopper = EarlyStopping(metric_direction(config.monitor), config.patience)
    result = FitResult()
    best_state: dict[str, torch.Tensor] | None = None
    for epoch in range(1, config.max_epochs + 1):
        metrics = train_one_epoch(model, train, optimizer, loss_fn)
        if not math.isfinite(metrics["train_loss"]):
            raise Diverged(epoch)
        evaluation = evaluate(model, val, num_classes)
        metrics.update(evaluation.metrics)
        result.history.append({"epoch": epoch, **metrics})
        decision = stopper.update(epoch, metrics[config.monitor])
        if decision.improved:
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in
                          model.state_dict().items()}
            result.best_epoch, result.best_metrics = epoch, dict(metrics)
            result.best_evaluation = evaluation
        reason = on_epoch_end(epoch, metrics) if on_epoch_end else None
        if reason:
            result.stop_reason = reason
            break
        if decision.stop:
            result.stop_reason = "early_stopping"
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return result
