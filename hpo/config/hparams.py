"""HParams: every hyperparameter a trial trains with, under its flag name, with its default and
its allowed range. The one source of both: a search space's bounds are checked against it, the
CLI's flags are named after it, and a trial's values are validated by it.

Where a field is handed to imgcls (imgcls.train.TrainConfig, imgcls.data.augment.Augment), it
has the same name and allows what imgcls allows (tests/test_study.py checks the ranges agree).
Names of architectures, optimizers and schedulers are checked against imgcls's registries,
which import no torch.
"""

from __future__ import annotations

import typing

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from hpo.config.space import Scalar, SpaceError
from imgcls.models.catalog import MODELS
from imgcls.train.optim import OPTIMIZERS
from imgcls.train.schedules import SCHEDULERS


class HParams(BaseModel):
    """One trial's hyperparameters. Every name a search space may use, under its flag name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Optimization
    lr: float = Field(0.01, gt=0)  # peak learning rate (too high diverges: the trial fails)
    momentum: float = Field(0.9, ge=0, lt=1)  # SGD momentum; Adam's beta1
    nesterov: bool = False  # SGD only
    batch_size: int = Field(64, ge=1, le=65536)
    optimizer: str = "sgd"  # sgd, adam or adamw
    scheduler: str = "none"  # none, step, cosine or onecycle: the learning rate over the epochs
    warmup_epochs: float = Field(0.0, ge=0)  # linear warm-up of the learning rate, in epochs
    lr_step_epochs: int = Field(0, ge=0)  # step scheduler: epochs per step (0: a third of them)
    lr_gamma: float = Field(0.1, gt=0, le=1)  # step scheduler: factor per step
    # Model
    arch: str = "simplecnn"  # a name in imgcls.models.MODELS
    pretrained: bool = False  # ImageNet weights: a local file, or fetched once
    freeze: bool = False  # train the classifier head only
    # Regularization
    weight_decay: float = Field(0.0, ge=0, le=1)  # the optimizer's decay
    l2: float = Field(0.0, ge=0, le=1)  # explicit L2 penalty on the weights, added to the loss
    dropout: float = Field(0.0, ge=0, lt=1)  # before the classifier head
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_weighted: bool = False  # weigh each class's loss by its rarity in the training split
    # Augmentation of training batches (0 = off)
    hflip: float = Field(0.5, ge=0, le=1)  # probability of a left-right flip per image
    vflip: float = Field(0.0, ge=0, le=1)  # probability of an up-down flip per image
    rotation: float = Field(0.0, ge=0, le=180)  # degrees: each image turned by up to +-rotation
    crop_scale: float = Field(1.0, gt=0, le=1)  # random resized crop keeping >= this area share
    brightness: float = Field(0.0, ge=0)  # factor drawn from [max(0, 1 - b), 1 + b]
    contrast: float = Field(0.0, ge=0)  # factor drawn from [max(0, 1 - c), 1 + c]
    sharpness: float = Field(1.0, ge=0)  # sharpness factor: 0 blurs, 1 keeps, 2 sharpens
    sharpness_p: float = Field(0.5, ge=0, le=1)  # probability of applying it per image

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return MODELS.check_name(value)

    @field_validator("optimizer")
    @classmethod
    def _known_optimizer(cls, value: str) -> str:
        return OPTIMIZERS.check_name(value)

    @field_validator("scheduler")
    @classmethod
    def _known_scheduler(cls, value: str) -> str:
        return SCHEDULERS.check_name(value)

    @classmethod
    def kinds(cls) -> dict[str, type]:
        """Each field's Python type: how a SPEC for it is read."""
        return {name: typing.get_origin(f.annotation) or f.annotation  # type: ignore[misc]
                for name, f in cls.model_fields.items()}

    @classmethod
    def check_value(cls, name: str, value: Scalar) -> None:
        """Raise SpaceError when `value` is not allowed for hyperparameter `name`."""
        try:
            cls.model_validate({name: value})
        except ValidationError as exc:
            raise SpaceError(f"{name}: {first_error(exc, with_field=False)}") from None


# What may change while a trial trains (Population Based Training perturbs these): the
# optimizer's and the augmentation's settings, never the model's shape or the batches'
PERTURBABLE = ("lr", "momentum", "weight_decay", "hflip", "vflip", "rotation", "crop_scale",
               "brightness", "contrast", "sharpness", "sharpness_p")


def first_error(exc: ValidationError, with_field: bool = True) -> str:
    """One line for the first problem pydantic found (the rest follow from fixing it)."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    if err["type"] not in ("value_error", "missing", "assertion_error"):
        message += f" (got {err['input']!r})"
    more = len(exc.errors()) - 1
    tail = f"; and {more} more problem(s)" if more else ""
    return f"{where}: {message}{tail}" if with_field and where else message + tail
