"""Optuna's samplers and pruners by name. A sampler factory takes (seed, trials, space); a
pruner factory takes nothing."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imgcls.registry import Registry

if TYPE_CHECKING:
    import optuna

    from hpo.space import SearchSpace

SAMPLERS: Registry[Any] = Registry("sampler")
PRUNERS: Registry[Any] = Registry("pruner")


@SAMPLERS.register("tpe")
def _tpe(seed: int, trials: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    # TPE starts modelling the space after its random start-up trials: a third of the study,
    # 3 to 10 of them (Optuna's 10 would leave a 12-trial study almost all random).
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(3, trials // 3)))


@SAMPLERS.register("random")
def _random(seed: int, trials: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


@PRUNERS.register("median")
def _median() -> optuna.pruners.BasePruner:
    import optuna

    # Compare against 4 finished trials at least, and never before epoch 3 (steps are epochs,
    # counted from 1): the first epochs of a from-scratch network say little about its end.
    return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=3)


@PRUNERS.register("none")
def _no_pruning() -> optuna.pruners.BasePruner:
    import optuna

    return optuna.pruners.NopPruner()
