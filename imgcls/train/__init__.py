"""Training: optimizers, learning-rate schedules, losses, early stopping, the Trainer (an epoch
at a time, with a state that round-trips) and `fit`, and how it runs fast on its device. The
registries of names (OPTIMIZERS, SCHEDULERS) import no torch; the rest loads it on first use."""

from imgcls.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("Acceleration", "configure_cuda", "fits_on_device"), "imgcls.train.accel"),
    **dict.fromkeys(("Decision", "EarlyStopping"), "imgcls.train.callbacks"),
    **dict.fromkeys(("Diverged", "EpochCallback", "Evaluation", "FitResult", "TrainConfig",
                     "evaluate", "train_one_epoch"), "imgcls.train.engine"),
    **dict.fromkeys(("Trainer", "fit"), "imgcls.train.trainer"),
    "FoldTrainer": "imgcls.train.folds",
    **dict.fromkeys(("build_loss", "class_weights", "l2_penalty", "penalized_weights"),
                    "imgcls.train.losses"),
    **dict.fromkeys(("OPTIMIZERS", "build_optimizer", "trainable_parameters"),
                    "imgcls.train.optim"),
    **dict.fromkeys(("available_cores", "seed_everything"), "imgcls.train.runtime"),
    **dict.fromkeys(("SCHEDULERS", "Schedule", "SchedulePlan", "build_scheduler",
                     "lr_multiplier"), "imgcls.train.schedules"),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
