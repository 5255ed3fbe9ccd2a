"""Training: optimizers, early stopping, and the epoch loop."""

from imgcls.train.callbacks import Decision, EarlyStopping
from imgcls.train.engine import (
    Diverged,
    EpochCallback,
    Evaluation,
    FitResult,
    TrainConfig,
    evaluate,
    fit,
    train_one_epoch,
)
from imgcls.train.optim import OPTIMIZERS, build_optimizer
from imgcls.train.runtime import resolve_device, seed_everything

__all__ = [
    "OPTIMIZERS", "Decision", "Diverged", "EarlyStopping", "EpochCallback", "Evaluation",
    "FitResult", "TrainConfig", "build_optimizer", "evaluate", "fit", "resolve_device",
    "seed_everything", "train_one_epoch",
]
