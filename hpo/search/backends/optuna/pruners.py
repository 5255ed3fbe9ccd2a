"""Optuna's pruners by name: a new pruner is one registered factory here.

A pruner factory takes `(max_epochs)` and returns an `optuna.pruners.BasePruner`. Pruning steps
are epochs, counted from 1. Each entry's `why` is the command's help; its `rungs`, where it has
them, say at which epochs it compares trials, and the Ray backend takes a name only where its
scheduler compares at the same epochs (hpo.search.backends.ray.schedulers). Importing this
module imports no Optuna; PatientPruner, experimental, is used knowingly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from hpo.search.backends.optuna.samplers import experimental
from imgcls.registry import Registry

if TYPE_CHECKING:
    import optuna

PrunerFactory = Callable[[int], "optuna.pruners.BasePruner"]
PRUNERS: Registry[PrunerFactory] = Registry("pruner")


# Compare against 4 finished trials at least, and never before epoch 3: the first epochs of a
# from-scratch network say little about its end. Shared by median, percentile and patient.
STARTUP_TRIALS = 4
WARMUP_EPOCHS = 3
# Hyperband and successive halving keep the best third at each rung: epochs 1, 3, 9, 27, ...
REDUCTION_FACTOR = 3


@PRUNERS.register("median", why="stop a trial below the median of the others at the same epoch")
def _median(max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=STARTUP_TRIALS,
                                       n_warmup_steps=WARMUP_EPOCHS)


@PRUNERS.register("percentile", why="stricter median: keep only the best quarter at each epoch")
def _percentile(max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    # Optuna's percentile counts from the best: 25 keeps a trial only while it is in the best
    # quarter of the finished ones at its epoch (the median pruner is percentile 50). For studies
    # with many cheap trials, where only clear leaders are worth their full epochs.
    return optuna.pruners.PercentilePruner(25.0, n_startup_trials=STARTUP_TRIALS,
                                           n_warmup_steps=WARMUP_EPOCHS)


@PRUNERS.register("hyperband",
                  why="successive halving hedged over several budgets; for many trials")
def _hyperband(max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    # The budget runs from 1 epoch to the study's max_epochs, known now: Optuna's "auto" would
    # wait for a finished trial before any bracket exists, and guess low from one that stopped
    # early.
    return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max_epochs,
                                          reduction_factor=REDUCTION_FACTOR)


@PRUNERS.register("sha", why="asynchronous successive halving: keep the best third at 1, 3, 9...")
def _successive_halving(max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.SuccessiveHalvingPruner(min_resource=1,
                                                  reduction_factor=REDUCTION_FACTOR)


@PRUNERS.register("patient", why="median, but only after 2 epochs without improvement")
def _patient(max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    # Patience 2 epochs: one noisy epoch does not end a trial that is still improving.
    return experimental(lambda: optuna.pruners.PatientPruner(
        _median(max_epochs), patience=2))


@PRUNERS.register("none", why="run every trial to its end (early stopping still applies)")
def _no_pruning(max_epochs: int) -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.NopPruner()
