"""Training that can stop and go on: a Trainer whose `step()` is one epoch and whose
`state_dict()` is everything needed to continue it, and `fit`, the loop over steps.

The state holds the model's weights, the optimizer's moments, the learning-rate schedule, the
gradient scaler, early stopping, every random generator a step draws from (torch's, CUDA's,
NumPy's, Python's, and the training batches' own, which orders and augments them), the history,
and the best epoch's weights with its validation predictions. It is tensors and plain Python
values only, so that `torch.load(..., weights_only=True)` reads it back without unpickling
anything else: a Trainer built the same way and given it goes on as the one that wrote it would
have. On the CPU that is exact: a run stopped after epoch k and resumed gives the same weights
and metrics as one never stopped (tests/test_train.py compares them).

Policies decided here: a NaN or infinite training loss raises Diverged; the learning-rate
schedule steps after every optimizer step; `finish()` leaves the model holding its best epoch's
weights.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from imgcls.data.augment import Augment
from imgcls.data.batches import Batches
from imgcls.errors import DataError
from imgcls.metrics import metric_direction
from imgcls.train.accel import Acceleration
from imgcls.train.callbacks import EarlyStopping
from imgcls.train.engine import (
    Diverged,
    EpochCallback,
    Evaluation,
    FitResult,
    TrainConfig,
    evaluate,
    train_one_epoch,
)
from imgcls.train.losses import build_loss
from imgcls.train.optim import build_optimizer
from imgcls.train.schedules import build_scheduler

STATE_FORMAT = 1  # bump when the state's layout changes: an older one is not loaded

State = dict[str, Any]


class Trainer:
    """One model's training, an epoch at a time.

    `model` is trained in place; `accel` moves it to the batches' device first (in its memory
    format) and says how it trains there, and without it the model trains as it is, in float32.

    Each epoch is evaluated on `val`, and the trainer selects: it keeps the best epoch's weights
    and stops early on `config.monitor`. With `select=False` it evaluates but leaves selection
    to its caller (a member of a cross-validated trial: the folds' mean decides); without `val`
    it only trains (a model refit on every image, for as many epochs as validation chose).
    """

    def __init__(self, model: nn.Module, train: Batches, val: Batches | None,
                 config: TrainConfig, num_classes: int, *, accel: Acceleration | None = None,
                 select: bool = True) -> None:
        if len(train) == 0:
            raise DataError("the training split has no images: there is nothing to train on")
        self.model, self.train, self.val = model, train, val
        self.config, self.num_classes = config, num_classes
        self.select = select and val is not None
        self.accel = accel or Acceleration(train.device)
        self.step_model = self.accel.prepare(model)  # shares model's parameters
        self.scaler = self.accel.grad_scaler()
        self.optimizer = build_optimizer(config.optimizer, model, config.lr, config.momentum,
                                         config.weight_decay, config.nesterov)
        self.scheduler = build_scheduler(config.scheduler, self.optimizer,
                                         config.schedule_plan(len(train)))
        self.loss_fn = build_loss(num_classes, train.labels, config.label_smoothing,
                                  config.class_weighted)
        self.stopper = EarlyStopping(metric_direction(config.monitor), config.patience)
        self.epoch = 0  # epochs trained
        self.history: list[dict[str, float]] = []  # per epoch, with "epoch"
        self.best_epoch = 0  # 0 while no epoch gave a finite monitored value
        self.best_metrics: dict[str, float] = {}
        self.best_weights: dict[str, torch.Tensor] | None = None  # on the CPU
        self.best_evaluation: Evaluation | None = None
        self.evaluation: Evaluation | None = None  # the last epoch's (not kept in the state)
        self.stop_reason: str | None = None  # early_stopping, or what a caller stopped it for
        self.seconds = 0.0  # spent in step(), over every run that trained this state

    @property
    def done(self) -> bool:
        """Stopped early, or every epoch trained."""
        return self.stop_reason is not None or self.epoch >= self.config.max_epochs

    def step(self) -> dict[str, float]:
        """Train one epoch and evaluate it; its metrics (train_*, val_*, lr, speed)."""
        if self.done:
            ended = self.stop_reason or "max_epochs"
            raise RuntimeError(f"step() after the training ended ({ended})")
        started = time.perf_counter()
        epoch = self.epoch + 1
        metrics = train_one_epoch(self.step_model, self.train, self.optimizer, self.loss_fn,
                                  self.scheduler, self.config.l2, accel=self.accel,
                                  scaler=self.scaler)
        if not math.isfinite(metrics["train_loss"]):
            raise Diverged(epoch)
        if self.val is not None:
            self.evaluation = evaluate(self.step_model, self.val, self.num_classes,
                                       accel=self.accel)
            metrics.update(self.evaluation.metrics)
        self.history.append({"epoch": epoch, **metrics})
        if self.select:
            self._select(epoch, metrics)
        self.epoch = epoch
        self.seconds += time.perf_counter() - started
        return metrics

    def _select(self, epoch: int, metrics: Mapping[str, float]) -> None:
        decision = self.stopper.update(epoch, metrics[self.config.monitor])
        if decision.improved:
            self.best_weights = {k: v.detach().to("cpu", copy=True)
                                 for k, v in self.model.state_dict().items()}
            self.best_epoch, self.best_metrics = epoch, dict(metrics)
            self.best_evaluation = self.evaluation
        if decision.stop:
            self.stop_reason = "early_stopping"

    def stop(self, reason: str) -> None:
        """End the training after this epoch, for `reason` (a pruner's verdict)."""
        self.stop_reason = reason

    def finish(self) -> FitResult:
        """The result so far, with the model holding its best epoch's weights."""
        if self.best_weights is not None:
            self.model.load_state_dict(self.best_weights)
        return FitResult(list(self.history), self.best_epoch, dict(self.best_metrics),
                         self.best_evaluation, self.stop_reason or "max_epochs")

    def set_hyperparameters(self, *, lr: float | None = None, momentum: float | None = None,
                            weight_decay: float | None = None,
                            augment: Augment | None = None) -> None:
        """Change what may change while training goes on (Population Based Training's
        perturbations): the peak learning rate (the schedule keeps its shape around it), SGD's
        momentum or Adam's beta1, the weight decay, the augmentation of training batches."""
        for group, base in zip(self.optimizer.param_groups, self.scheduler.base_lrs,
                               strict=True):
            if lr is not None:
                group["lr"] = group["lr"] / base * lr if base else lr
            if momentum is not None:
                if "betas" in group:
                    group["betas"] = (momentum, group["betas"][1])
                else:
                    group["momentum"] = momentum
            if weight_decay is not None:
                group["weight_decay"] = weight_decay
        if lr is not None:
            self.scheduler.base_lrs = [lr] * len(self.scheduler.base_lrs)
        if augment is not None:
            self.train.augment = augment

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> State:
        """Everything needed to go on: tensors and plain values only."""
        best = None
        if self.best_weights is not None:
            assert self.best_evaluation is not None
            # the best epoch's weights, unless they are the model's own (this epoch was best)
            weights = None if self.best_epoch == self.epoch else self.best_weights
            best = {"epoch": self.best_epoch, "metrics": dict(self.best_metrics),
                    "weights": weights,
                    "y_true": torch.from_numpy(self.best_evaluation.y_true),
                    "probs": torch.from_numpy(self.best_evaluation.probs)}
        return {
            "format": STATE_FORMAT, "epoch": self.epoch, "seconds": self.seconds,
            "stop_reason": self.stop_reason, "history": [dict(h) for h in self.history],
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "stopper": self.stopper.state_dict(), "best": best, "rng": self._rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Go on from `state` (as `state_dict` wrote it, for a Trainer built the same way)."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"a trainer state of format {state.get('format')!r}, not "
                             f"{STATE_FORMAT}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.stopper.load_state_dict(dict(state["stopper"]))
        self.epoch, self.seconds = int(state["epoch"]), float(state["seconds"])
        self.stop_reason = state["stop_reason"]
        self.history = [dict(h) for h in state["history"]]
        best = state["best"]
        if best is None:
            self.best_epoch, self.best_metrics = 0, {}
            self.best_weights = self.best_evaluation = None
        else:
            self.best_epoch, self.best_metrics = int(best["epoch"]), dict(best["metrics"])
            weights = state["model"] if best["weights"] is None else best["weights"]
            self.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in weights.items()}
            probs = best["probs"].numpy()
            self.best_evaluation = Evaluation(
                {k: v for k, v in self.best_metrics.items() if k.startswith("val_")},
                best["y_true"].numpy(), probs.argmax(1), probs)
        self._set_rng_state(state["rng"])

    def _rng_state(self) -> State:
        numpy = np.random.get_state()  # ("MT19937", keys, pos, has_gauss, cached_gaussian)
        return {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
            "numpy": {"keys": torch.from_numpy(numpy[1].astype(np.int64)), "pos": numpy[2],
                      "has_gauss": numpy[3], "gauss": numpy[4]},
            "python": [list(part) if isinstance(part, tuple) else part
                       for part in random.getstate()],
            "batches": self.train.generator.get_state(),
        }

    def _set_rng_state(self, rng: Mapping[str, Any]) -> None:
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        numpy = rng["numpy"]
        np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32),
                             int(numpy["pos"]), int(numpy["has_gauss"]), float(numpy["gauss"])))
        version, internal, gauss = rng["python"]
        random.setstate((version, tuple(internal), gauss))
        self.train.generator.set_state(rng["batches"])


def fit(model: nn.Module, train: Batches, val: Batches, config: TrainConfig, num_classes: int,
        on_epoch_end: EpochCallback | None = None, *, accel: Acceleration | None = None
        ) -> FitResult:
    """Train up to `config.max_epochs` epochs; leave the model holding its best epoch's weights.

    `on_epoch_end(epoch, metrics)` is called after each epoch; a string it returns stops the
    training and is recorded as the reason (a search uses this to prune).
    """
    trainer = Trainer(model, train, val, config, num_classes, accel=accel)
    while not trainer.done:
        metrics = trainer.step()
        reason = on_epoch_end(trainer.epoch, metrics) if on_epoch_end else None
        if reason:
            trainer.stop(reason)
    return trainer.finish()
