"""What the Ray backend runs of a study's sampler and pruner: the pruner as a Tune scheduler, by
the same names as Optuna's pruners, and the samplers OptunaSearch can drive.

A name means the same on both backends: `sha` keeps the best third at epochs 1, 3, 9, 27...
(Optuna's SuccessiveHalvingPruner; Tune's ASHA with the same grace period and reduction
factor), `hyperband` runs that over the same brackets (grace periods 1, 3, 9...: Optuna's
HyperbandPruner, Tune's asynchronous HyperBand), `none` runs every trial to its end. An Optuna
pruner with no Tune scheduler that compares at the same epochs (median, percentile, patient) is
refused with the names Ray has. tests/test_ray_backend.py builds both and compares the rungs.

Importing this module imports no Ray: the factories do, when a search starts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hpo.search.backends.optuna.pruners import PRUNERS, REDUCTION_FACTOR
from imgcls.errors import ConfigError
from imgcls.registry import Registry

if TYPE_CHECKING:
    from hpo.config.study import StudySpec

# The Optuna samplers Ray's OptunaSearch drives trial by trial (the Ray backend refuses others).
RAY_SAMPLERS = ("tpe", "random")

SchedulerFactory = Callable[["StudySpec"], Any]
SCHEDULERS: Registry[SchedulerFactory] = Registry("Ray pruner")

# Optuna's pruners start at one epoch (min_resource=1); so do these (Tune's grace period).
MIN_EPOCHS = 1


def hyperband_brackets(max_epochs: int) -> int:
    """The brackets Optuna's HyperbandPruner makes for this budget: one per grace period
    1, 3, 9... up to max_epochs."""
    return int(math.log(max_epochs / MIN_EPOCHS, REDUCTION_FACTOR) + 1e-9) + 1


@SCHEDULERS.register("sha", why=PRUNERS.entry("sha").meta["why"])
def _sha(spec: StudySpec) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler

    # Ray's create_scheduler drops unknown keyword arguments silently: the class, directly.
    return AsyncHyperBandScheduler(time_attr="epoch", max_t=spec.max_epochs,
                                   grace_period=MIN_EPOCHS, reduction_factor=REDUCTION_FACTOR)


@SCHEDULERS.register("hyperband", why=PRUNERS.entry("hyperband").meta["why"])
def _hyperband(spec: StudySpec) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler

    # ASHA over several brackets is the asynchronous HyperBand (Li et al., 2020), as Optuna's
    # HyperbandPruner is: bracket s compares at epochs 3**s, 3**(s+1), ...
    return AsyncHyperBandScheduler(time_attr="epoch", max_t=spec.max_epochs,
                                   grace_period=MIN_EPOCHS, reduction_factor=REDUCTION_FACTOR,
                                   brackets=hyperband_brackets(spec.max_epochs))


@SCHEDULERS.register("none", why=PRUNERS.entry("none").meta["why"])
def _fifo(spec: StudySpec) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def check_pruner(pruner: str) -> None:
    """ConfigError for a pruner the Ray backend cannot run as it means on Optuna."""
    if pruner in SCHEDULERS:
        return
    if pruner in PRUNERS:
        raise ConfigError(f"pruner {pruner!r} is not available with the Ray backend: Tune has "
                          f"no scheduler that compares trials as Optuna's {pruner!r} does; use "
                          f"--pruner {', '.join(SCHEDULERS.names())}, or --backend optuna")
    SCHEDULERS.entry(pruner)  # unknown to both: ConfigError listing the Ray pruners


def make_scheduler(spec: StudySpec) -> Any:
    """The Tune scheduler for the study's pruner."""
    check_pruner(spec.pruner)
    return SCHEDULERS.get(spec.pruner)(spec)
