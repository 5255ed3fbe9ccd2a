"""Training: optimizers, learning-rate schedules, losses, early stopping, the epoch loop, and
how it runs fast on its device."""

from imgcls.train.accel import Acceleration, configure_cuda, fits_on_device
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
from imgcls.train.losses import build_loss, class_weights, l2_penalty, penalized_weights
from imgcls.train.optim import OPTIMIZERS, build_optimizer, trainable_parameters
from imgcls.train.runtime import seed_everything
from imgcls.train.schedules import (
    SCHEDULERS,
    Schedule,
    SchedulePlan,
    build_scheduler,
    lr_multiplier,
)

__all__ = [
    "OPTIMIZERS", "SCHEDULERS", "Acceleration", "Decision", "Diverged", "EarlyStopping",
    "EpochCallback", "Evaluation", "FitResult", "Schedule", "SchedulePlan", "TrainConfig",
    "build_loss", "build_optimizer", "build_scheduler", "class_weights", "configure_cuda",
    "evaluate", "fit", "fits_on_device", "l2_penalty", "lr_multiplier", "penalized_weights",
    "seed_everything", "train_one_epoch", "trainable_parameters",
]
