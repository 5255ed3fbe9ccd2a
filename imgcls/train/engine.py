"""The training engine's pieces: how to train (TrainConfig), one epoch of training, one
evaluation, and what a training run gives (FitResult). The Trainer (trainer.py) runs them an
epoch at a time, and `fit` is its loop. Epochs are numbered from 1.

How fast it runs (mixed precision, channels_last, torch.compile) is an `Acceleration`, which
changes nothing when left out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from imgcls.data.batches import Batches
from imgcls.errors import ConfigError
from imgcls.metrics import classification_metrics, metric_direction
from imgcls.train.accel import Acceleration
from imgcls.train.losses import l2_penalty, penalized_weights
from imgcls.train.optim import OPTIMIZERS
from imgcls.train.schedules import SCHEDULERS, SchedulePlan

EpochCallback = Callable[[int, dict[str, float]], str | None]


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """How to train. A value that cannot work raises ConfigError here, before any data is
    touched. The defaults train with constant-rate SGD and a plain cross-entropy loss."""

    # Optimizer
    optimizer: str = "sgd"  # a name in OPTIMIZERS
    lr: float = 0.01  # base learning rate per step; the peak when a schedule varies it
    momentum: float = 0.9  # SGD momentum, Adam's beta1
    nesterov: bool = False  # SGD only; with momentum 0 it is plain SGD, not an error
    weight_decay: float = 0.0  # the optimizer's decay, on every trainable parameter
    # Learning-rate schedule, stepped per optimizer step over max_epochs * batches per epoch
    scheduler: str = "none"  # a name in SCHEDULERS: none, step, cosine, onecycle
    warmup_epochs: float = 0.0  # epochs of linear warm-up from lr/10 (fractions allowed);
    # for onecycle, the length of its rising phase (0: torch's 30% of the steps)
    lr_gamma: float = 0.1  # step: factor applied to the rate at each boundary
    lr_step_epochs: int = 0  # step: epochs between boundaries; 0: max_epochs // 3
    # Training loss (validation loss stays plain cross-entropy, so that trials compare)
    label_smoothing: float = 0.0  # share of the target mass spread over all classes
    class_weighted: bool = False  # weigh class c by n / (K * count_c) of the training labels,
    # so that a rare class (800 TB among 3,800 healthy) counts as much as a common one
    l2: float = 0.0  # adds l2 * sum(w ** 2) over conv/linear weights (not biases or norm
    # layers) to the training loss; the explicit form of weight decay, kept to compare the two
    # Epochs and selection
    max_epochs: int = 10
    patience: int | None = None  # epochs without a better `monitor` before stopping
    monitor: str = "val_f1"  # picks the best epoch, and drives early stopping

    def __post_init__(self) -> None:
        OPTIMIZERS.entry(self.optimizer)  # an unknown name raises, listing the known ones
        SCHEDULERS.entry(self.scheduler)
        metric_direction(self.monitor)
        if self.max_epochs < 1:
            raise ConfigError(f"max_epochs must be at least 1, not {self.max_epochs}")
        if not 0 <= self.warmup_epochs < self.max_epochs:
            raise ConfigError(f"warmup_epochs must be in [0, max_epochs = {self.max_epochs}), "
                              f"not {self.warmup_epochs}: shorten the warm-up")
        if not self.lr_gamma > 0:
            raise ConfigError(f"lr_gamma must be above 0, not {self.lr_gamma}")
        if self.lr_step_epochs < 0:
            raise ConfigError(f"lr_step_epochs must be at least 1, or 0 for a third of "
                              f"max_epochs, not {self.lr_step_epochs}")
        if not self.l2 >= 0:
            raise ConfigError(f"l2 must be 0 or more, not {self.l2}")

    def schedule_plan(self, steps_per_epoch: int) -> SchedulePlan:
        return SchedulePlan(steps_per_epoch, self.max_epochs, self.warmup_epochs, self.lr_gamma,
                            self.lr_step_epochs)


class Diverged(RuntimeError):
    """The training loss became NaN or infinite."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"diverged at epoch {epoch}")
        self.epoch = epoch


@dataclass
class Evaluation:
    metrics: dict[str, float]  # <prefix>_loss, and <prefix>_<name> per classification metric
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
                    loss_fn: nn.Module, scheduler: LRScheduler | None = None, l2: float = 0.0, *,
                    accel: Acceleration | None = None,
                    scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One pass over `batches`, stepping `scheduler` after every optimizer step.

    `model` is the module to call (a compiled one, with `accel.compile`), already prepared on
    the device; `scaler` scales fp16 losses (see `Acceleration.grad_scaler`).

    Returns train_loss: the data loss averaged over images, without the l2 penalty (so that it
    compares across l2 values); train_acc; lr: the rate of the epoch's first step (of the first
    parameter group); train_images_per_s: images trained per second of the epoch's wall time;
    data_wait_frac: the share of that time the host spent getting the next batch (indexing,
    augmenting and normalizing it, or waiting for the prefetch thread).
    """
    accel = accel or Acceleration(batches.device)
    model.train()
    lr = optimizer.param_groups[0]["lr"]
    weights = penalized_weights(model) if l2 > 0 else []
    # Sums stay on the device: one synchronisation per epoch instead of one per step.
    loss_sum = torch.zeros((), device=batches.device)
    correct = torch.zeros((), device=batches.device, dtype=torch.long)
    seen, waited = 0, 0.0
    start = time.perf_counter()
    steps = iter(batches)
    while True:
        asked = time.perf_counter()
        batch = next(steps, None)
        waited += time.perf_counter() - asked
        if batch is None:
            break
        x, y = batch
        with accel.autocast():
            logits = model(accel.inputs(x))
            loss = loss_fn(logits, y)
        objective = loss + l2 * l2_penalty(weights) if weights else loss
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            objective.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += loss.detach().float() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
    train_loss, train_acc = loss_sum.item() / seen, correct.item() / seen  # waits for the device
    elapsed = time.perf_counter() - start
    return {"train_loss": train_loss, "train_acc": train_acc, "lr": lr,
            "train_images_per_s": seen / elapsed, "data_wait_frac": waited / elapsed}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Batches, num_classes: int, prefix: str = "val", *,
             accel: Acceleration | None = None) -> Evaluation:
    """Metrics of `model` on `batches`, without gradients, in `accel`'s precision."""
    accel = accel or Acceleration(batches.device)
    model.eval()
    loss_sum = torch.zeros((), device=batches.device, dtype=torch.float64)
    probs, labels = [], []
    for x, y in batches:
        with accel.autocast():
            logits = model(accel.inputs(x)).float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        probs.append(logits.softmax(1))  # kept on the device: one copy back, at the end
        labels.append(y)
    p = torch.cat(probs).cpu().numpy()
    y_true = torch.cat(labels).cpu().numpy()
    y_pred = p.argmax(1)
    scores = classification_metrics(y_true, p, num_classes)
    metrics = {f"{prefix}_loss": loss_sum.item() / len(y_true),
               **{f"{prefix}_{k}": v for k, v in scores.items()}}
    return Evaluation(metrics, y_true, y_pred, p)
