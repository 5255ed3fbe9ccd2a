"""Cross-validated training: one configuration trained on K folds at once, judged by the folds'
mean, and then refit on every image the folds shared.

A `FoldTrainer` steps K `Trainer`s (one per fold, each validating on its own part) in lockstep,
an epoch at a time, and offers the Trainer's interface (`step`, `done`, `stop`, `finish`,
`state_dict`...), so that whatever drives one trainer (a search's trial, its pruner, its
checkpoints) drives K. Each epoch's metrics are the folds' means, under the usual names, with
the standard deviation of every validation metric beside them (`val_f1_std`): early stopping,
pruning and the trial's value all see the mean curve.

Selection: the best epoch is the one with the best mean. Its validation predictions, one fold's
part each, together cover every train and validation image once (out-of-fold), and are what
the trial's temperature and operating point are fitted on.

The model: `finish()` trains a new one on all the folds' images (train and validation) for
the best epoch's number of epochs, with the same schedule, rather than keeping the K fold
models as an ensemble: it is one model to serve and explain, like any other trial's, it has
seen every image, and the test split is evaluated once on it. (An ensemble of the K would cost K
times the inference for what `promote --ensemble` already gives across trials.) A trial its
caller stopped (a pruner's verdict) is not refit: its model is None.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from imgcls.data.augment import Augment
from imgcls.metrics import metric_direction
from imgcls.train.callbacks import EarlyStopping
from imgcls.train.engine import Evaluation, FitResult, TrainConfig
from imgcls.train.trainer import State, Trainer

FOLDS_FORMAT = 1
SELF_STOPS = (None, "early_stopping")  # a trial that ended by itself, which is refit


class FoldTrainer:
    """K trainers of one configuration, one per fold, stepped together (see the module)."""

    def __init__(self, members: Sequence[Trainer], val_indices: Sequence[np.ndarray],
                 config: TrainConfig, refit: Callable[[], Trainer] | None = None) -> None:
        """`members[i]` validates on the images `val_indices[i]` (indices of the data set);
        `refit()` builds the trainer (without validation, of the members' configuration) that
        trains the final model on every fold's images (None: no refit; `finish` leaves the
        model None)."""
        self.members, self.config, self._refit = list(members), config, refit
        # the out-of-fold predictions of the folds, put back in the order of the data set
        self.order = np.argsort(np.concatenate(list(val_indices)), kind="stable")
        self.stopper = EarlyStopping(metric_direction(config.monitor), config.patience)
        self.history: list[dict[str, float]] = []
        self.best_epoch = 0
        self.best_metrics: dict[str, float] = {}
        self.best_folds: list[Evaluation] | None = None  # each fold's, at the best epoch
        self.stop_reason: str | None = None
        self.model: nn.Module | None = None  # the refit model, after finish()
        self.refit_seconds = 0.0

    @property
    def epoch(self) -> int:
        return self.members[0].epoch

    @property
    def seconds(self) -> float:
        return sum(m.seconds for m in self.members) + self.refit_seconds

    @property
    def done(self) -> bool:
        return self.stop_reason is not None or self.epoch >= self.config.max_epochs

    def step(self) -> dict[str, float]:
        """One epoch of every fold; the folds' mean metrics, and the deviation of the
        validation ones."""
        per_fold = [member.step() for member in self.members]
        metrics = {k: float(np.mean([m[k] for m in per_fold])) for k in per_fold[0]}
        metrics.update({f"{k}_std": float(np.std([m[k] for m in per_fold]))
                        for k in per_fold[0] if k.startswith("val_")})
        epoch = self.epoch
        self.history.append({"epoch": epoch, **metrics})
        decision = self.stopper.update(epoch, metrics[self.config.monitor])
        if decision.improved:
            self.best_epoch, self.best_metrics = epoch, dict(metrics)
            self.best_folds = [m.evaluation for m in self.members]  # type: ignore[misc]
        if decision.stop:
            self.stop_reason = "early_stopping"
        return metrics

    def stop(self, reason: str) -> None:
        self.stop_reason = reason

    @property
    def best_evaluation(self) -> Evaluation | None:
        """The best epoch's out-of-fold validation predictions, one per train/val image."""
        if self.best_folds is None:
            return None
        y_true = np.concatenate([e.y_true for e in self.best_folds])[self.order]
        probs = np.concatenate([e.probs for e in self.best_folds])[self.order]
        metrics = {k: v for k, v in self.best_metrics.items() if k.startswith("val_")}
        return Evaluation(metrics, y_true, probs.argmax(1), probs)

    def finish(self) -> FitResult:
        """The folds' result; the model refit on every fold's images for the best epoch's
        number of epochs, when the trial ended by itself (not when its caller stopped it)."""
        if self._refit is not None and self.model is None and self.best_epoch \
                and self.stop_reason in SELF_STOPS:
            trainer = self._refit()
            while trainer.epoch < self.best_epoch:
                trainer.step()
            trainer.finish()
            self.model, self.refit_seconds = trainer.model, trainer.seconds
        return FitResult(list(self.history), self.best_epoch, dict(self.best_metrics),
                         self.best_evaluation, self.stop_reason or "max_epochs")

    def set_hyperparameters(self, *, lr: float | None = None, momentum: float | None = None,
                            weight_decay: float | None = None,
                            augment: Augment | None = None) -> None:
        for member in self.members:
            member.set_hyperparameters(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                       augment=augment)

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> State:
        best = None
        if self.best_folds is not None:
            best = {"epoch": self.best_epoch, "metrics": dict(self.best_metrics),
                    "y_true": [torch.from_numpy(e.y_true) for e in self.best_folds],
                    "probs": [torch.from_numpy(e.probs) for e in self.best_folds]}
        return {"format": FOLDS_FORMAT, "members": [m.state_dict() for m in self.members],
                "stopper": self.stopper.state_dict(), "stop_reason": self.stop_reason,
                "history": [dict(h) for h in self.history], "best": best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("format") != FOLDS_FORMAT or \
                len(state.get("members", ())) != len(self.members):
            raise ValueError(f"a cross-validation state of format {state.get('format')!r} "
                             f"and {len(state.get('members', ()))} folds, not "
                             f"{FOLDS_FORMAT} and {len(self.members)}")
        for member, member_state in zip(self.members, state["members"], strict=True):
            member.load_state_dict(member_state)
        self.stopper.load_state_dict(dict(state["stopper"]))
        self.stop_reason = state["stop_reason"]
        self.history = [dict(h) for h in state["history"]]
        best = state["best"]
        self.best_epoch, self.best_metrics, self.best_folds = 0, {}, None
        if best is not None:
            self.best_epoch, self.best_metrics = int(best["epoch"]), dict(best["metrics"])
            self.best_folds = [Evaluation({}, y.numpy(), p.numpy().argmax(1), p.numpy())
                               for y, p in zip(best["y_true"], best["probs"], strict=True)]
