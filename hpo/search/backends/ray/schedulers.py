"""What the Ray backend runs of a study's sampler and pruner: the pruner as a Tune scheduler, by
the same names as Optuna's pruners, and the samplers OptunaSearch can drive.

- `sha` keeps the best third at epochs 1, 3, 9, 27..., as Optuna's SuccessiveHalvingPruner
  does: Tune's ASHA with the same grace period and reduction factor (tests/test_ray_backend.py
  builds both and compares the rungs).
- `hyperband` is Tune's synchronous HyperBand (Li et al., 2017), which pauses the trials of a
  bracket at each rung and resumes the best from their checkpoints, with Optuna's reduction
  factor and the study's max_epochs as its budget. Its rungs are max_epochs / 3**k: Optuna's
  1, 3, 9... when max_epochs is a power of 3.
- `pbt`, Ray only: Population Based Training, synchronous. Every `perturbation_interval` epochs
  the population waits for its slowest trial; then each trial in the worst quarter restarts
  from the checkpoint of one in the best quarter, with its hyperparameters that may change
  mid-training (lr, momentum, weight decay, the augmentation) perturbed or resampled from the
  study's space.
- `none` runs every trial to its end.

An Optuna pruner with no Tune scheduler that compares alike (median, percentile, patient) is
refused with the names Ray has. Importing this module imports no Ray: the factories do.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from hpo.config.hparams import PERTURBABLE
from hpo.config.space import SearchSpace
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


@SCHEDULERS.register("sha", why=PRUNERS.entry("sha").meta["why"])
def _sha(spec: StudySpec) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler

    # Ray's create_scheduler drops unknown keyword arguments silently: the class, directly.
    return AsyncHyperBandScheduler(time_attr="epoch", max_t=spec.max_epochs,
                                   grace_period=MIN_EPOCHS, reduction_factor=REDUCTION_FACTOR)


@SCHEDULERS.register("hyperband", why="synchronous HyperBand: brackets paused at each rung, the "
                                      "best resumed from their checkpoints")
def _hyperband(spec: StudySpec) -> Any:
    from ray.tune.schedulers import HyperBandScheduler

    return HyperBandScheduler(time_attr="epoch", max_t=spec.max_epochs,
                              reduction_factor=REDUCTION_FACTOR)


@SCHEDULERS.register("pbt", why="Population Based Training: the worst trials restart from the "
                                "best's checkpoints, their lr, momentum, decay, augmentation "
                                "perturbed (Ray only)")
def _pbt(spec: StudySpec) -> Any:
    from ray.tune.schedulers import PopulationBasedTraining

    from hpo.search.backends.ray.space import to_ray

    mutations = to_ray(perturbable_space(spec))
    return PopulationBasedTraining(time_attr="epoch",
                                   perturbation_interval=perturbation_interval(spec),
                                   hyperparam_mutations=mutations, quantile_fraction=0.25,
                                   resample_probability=0.25,
                                   # the population waits at each interval, so that every trial
                                   # is compared with all the others at the same epoch
                                   synch=True)


def perturbable_space(spec: StudySpec) -> SearchSpace:
    """The searched hyperparameters PBT may change mid-training; ConfigError for none."""
    searched = [p for p in spec.space.searched if p.name in PERTURBABLE]
    if not searched:
        raise ConfigError(f"pruner 'pbt' perturbs hyperparameters while trials train, and this "
                          f"study searches none it may change ({', '.join(PERTURBABLE)}); "
                          "search one of them, or use another --pruner")
    return SearchSpace(tuple(searched))


def perturbation_interval(spec: StudySpec) -> int:
    """Epochs between PBT's exploits: the study's, or a quarter of max_epochs (at least 1)."""
    return spec.perturbation_interval or max(1, spec.max_epochs // 4)


@SCHEDULERS.register("none", why=PRUNERS.entry("none").meta["why"])
def _fifo(spec: StudySpec) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def check_pruner(spec: StudySpec) -> None:
    """ConfigError for a pruner the Ray backend cannot run as it means on Optuna, or a study
    PBT has nothing to perturb in."""
    pruner = spec.pruner
    if pruner == "pbt":
        perturbable_space(spec)
    if pruner in SCHEDULERS:
        return
    if pruner in PRUNERS:
        raise ConfigError(f"pruner {pruner!r} is not available with the Ray backend: Tune has "
                          f"no scheduler that compares trials as Optuna's {pruner!r} does; use "
                          f"--pruner {', '.join(SCHEDULERS.names())}, or --backend optuna")
    SCHEDULERS.entry(pruner)  # unknown to both: ConfigError listing the Ray pruners


def make_scheduler(spec: StudySpec) -> Any:
    """The Tune scheduler for the study's pruner."""
    check_pruner(spec)
    return SCHEDULERS.get(spec.pruner)(spec)


# Schedulers that pause trials and resume them from checkpoints, or restart them from another's
PAUSING = frozenset({"hyperband", "pbt"})
