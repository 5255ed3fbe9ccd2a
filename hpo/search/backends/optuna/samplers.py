"""Optuna's samplers by name: a new sampler is one registered factory here.

A sampler factory takes `(seed, trials, space)` and returns an `optuna.samplers.BaseSampler`.
Every entry carries a one-line `why` (what it is good for) for the command's help and the
README; a sampler that needs a package Optuna does not install names it in `requires`, and is
refused with an install hint when it is used (`check_space`, the factory), never at import.
Importing this module imports no Optuna.

Construction is warn-free: Optuna's experimental QMCSampler is used knowingly (Optuna is pinned
to 5.x), and a fallback to independent sampling is a choice made here, not news.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from imgcls.errors import ConfigError
from imgcls.registry import Registry

if TYPE_CHECKING:
    import optuna

    from hpo.config.space import Scalar, SearchSpace

SamplerFactory = Callable[[int, int, "SearchSpace"], "optuna.samplers.BaseSampler"]

SAMPLERS: Registry[SamplerFactory] = Registry("sampler")

# A grid enumerates every integer of an integer range: beyond this many values per parameter the
# grid is a sweep nobody meant to pay for (batch_size 16..256 is 241 trials on its own axis).
GRID_MAX_INTEGERS = 32
# Optuna numbers grid points by their index in a list shuffled with the sampler's seed, so every
# process and every resume must shuffle alike: the order is fixed, not the study's seed (a
# resumed study's sampler gets another seed, which would rerun some points and skip others).
GRID_SHUFFLE_SEED = 0


def _startup_trials(trials: int) -> int:
    """Random trials before a model-based sampler starts modelling: a third of the study, 3 to
    10 of them (Optuna's 10 would leave a 12-trial study almost all random)."""
    return min(10, max(3, trials // 3))


def experimental(factory: Callable[[], Any]) -> Any:
    """`factory()` without Optuna's ExperimentalWarning: the class is chosen knowingly."""
    from optuna.exceptions import ExperimentalWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return factory()


def _require(sampler: str) -> None:
    """Raise ConfigError with the install hint when `sampler` needs a package that is missing."""
    missing = [m for m in SAMPLERS.entry(sampler).meta.get("requires", ())
               if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"sampler {sampler!r} needs {' and '.join(missing)}, which is not "
                          f"installed: pip install {' '.join(missing)}; or choose another "
                          "--sampler")


# --- samplers ------------------------------------------------------------------------------


@SAMPLERS.register("tpe", why="model-based default: learns which regions score well, any space")
def _tpe(seed: int, trials: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=_startup_trials(trials))


@SAMPLERS.register("random", why="independent uniform draws: a baseline, and for many workers")
def _random(seed: int, trials: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


@SAMPLERS.register("cmaes", requires=("cmaes",), single_objective=True,
                   why="evolution strategy for numeric ranges; long studies of 100+ trials")
def _cmaes(seed: int, trials: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    _require("cmaes")
    # CMA-ES models numeric ranges only; choices (arch, optimizer) are drawn by a univariate
    # TPE, which still learns from the finished trials. Optuna's warning for each fallback is
    # off: that split is the design, not a surprise.
    return optuna.samplers.CmaEsSampler(
        seed=seed, warn_independent_sampling=False,
        independent_sampler=optuna.samplers.TPESampler(
            seed=seed, n_startup_trials=_startup_trials(trials)),
    )


@SAMPLERS.register("gp", requires=("scipy", "torch"),
                   why="Gaussian-process Bayesian optimization: the fewest trials, costly ones")
def _gp(seed: int, trials: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    _require("gp")
    # Training is noisy (deterministic_objective stays False); the GP fits every finished trial
    # once the random start-up ones are done.
    return optuna.samplers.GPSampler(seed=seed, n_startup_trials=_startup_trials(trials))


@SAMPLERS.register("qmc", seed_per_study=True,
                   why="scrambled Sobol points: covers the space evenly, no model; for sweeps")
def _qmc(seed: int, trials: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    # The position in the Sobol sequence lives in the study's storage, keyed by this seed: see
    # sampler_seed. Choices take one Sobol coordinate each, so nothing falls back.
    return experimental(lambda: optuna.samplers.QMCSampler(
        qmc_type="sobol", scramble=True, seed=seed, warn_independent_sampling=False))


@SAMPLERS.register("grid", why="every combination of the listed choices, in a fixed order")
def _grid(seed: int, trials: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    """The study ends when the grid is exhausted: `planned_trials` caps --trials at the grid's
    size. `seed` is not used: see GRID_SHUFFLE_SEED."""
    return _grid_class()(grid_values(space), seed=GRID_SHUFFLE_SEED)


@SAMPLERS.register("nsga2",
                   why="genetic algorithm; the choice for multi-objective studies (score vs FLOPs)")
def _nsga2(seed: int, trials: int, space: SearchSpace) -> optuna.samplers.BaseSampler:
    import optuna

    # A generation of a quarter of the study, 4 to 50 trials (Optuna's 50 would leave a 20-trial
    # study as one random generation): at least about 4 generations evolve.
    population = min(50, max(4, trials // 4))
    return optuna.samplers.NSGAIISampler(seed=seed, population_size=population)


def sampler_seed(name: str, study_seed: int, fresh_seed: int) -> int:
    """The seed to build sampler `name` with in one process of a study.

    `fresh_seed`: a seed this process does not share with the processes before it or beside it
    (the study's seed moved past the trials already drawn, or one per worker), so that samplers
    that draw at random do not replay the same points. qmc instead keeps its position in its
    sequence in the study's storage, under its seed: every process and every resume must build
    it with the study's own seed, or each starts a new sequence and the even cover is lost.
    """
    return study_seed if SAMPLERS.entry(name).meta.get("seed_per_study") else fresh_seed


def seeded_per_trial(sampler: optuna.samplers.BaseSampler, seed: int
                     ) -> optuna.samplers.BaseSampler:
    """`sampler`, its random generators reseeded at each trial from (the study's seed, the
    trial's number). Trial numbers are handed out by the storage, once each, so processes that
    share a study (several machines on one database, each started alike) never draw the same
    random configuration, and a trial's random draw is the same however many processes ran the
    study. (A model-based draw still depends on the trials finished before it.) The generators
    are numpy RandomStates the sampler and its fallback samplers keep as `_rng`; a sampler
    without them is left as it is."""
    import numpy as np

    owners = [sampler, *(getattr(sampler, name, None)
                         for name in ("_random_sampler", "_independent_sampler"))]
    rngs = [owner._rng.rng for owner in owners
            if owner is not None and hasattr(getattr(owner, "_rng", None), "rng")]
    if not rngs:
        return sampler
    before_trial = sampler.before_trial

    def reseeded(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        for index, rng in enumerate(rngs):
            rng.seed(np.random.SeedSequence([seed, trial.number, index]).generate_state(1)[0])
        before_trial(study, trial)

    sampler.before_trial = reseeded  # type: ignore[method-assign]
    return sampler


# --- the grid ------------------------------------------------------------------------------


@functools.cache
def _grid_class() -> type[optuna.samplers.GridSampler]:
    """Optuna's GridSampler, adapted to an ask/tell loop that resumes interrupted studies. Built
    on first use: Optuna is imported late, not at import."""
    import optuna
    from optuna.trial import TrialState as OptunaState

    from hpo.config.trial import TrialState

    # Overrides two of Optuna's hooks, one of them private: tests/test_samplers.py runs both
    # (the pinned Optuna 5.x keeps them).
    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial,
                        state: OptunaState, values: Sequence[float] | None) -> None:
            # Optuna's version calls Study.stop(), which raises outside Study.optimize. The
            # loop stops instead after `planned_trials` trials.
            pass

        def _get_unvisited_grid_ids(self, study: optuna.Study) -> list[int]:
            # Optuna's version, except that a trial the user interrupted leaves its point to do
            # (it does not count towards --trials either). Points running elsewhere are handed
            # out again only when nothing else is left.
            done: set[int] = set()
            running: set[int] = set()
            for t in study._storage.get_all_trials(study._study_id, deepcopy=False):
                grid_id = t.system_attrs.get("grid_id")
                if grid_id is None or not self._same_search_space(t.system_attrs["search_space"]):
                    continue
                if t.state == OptunaState.RUNNING:
                    running.add(grid_id)
                elif t.state.is_finished() and TrialState.read(
                        t.state.name, t.user_attrs.get("fail_reason")) != TrialState.INTERRUPTED:
                    done.add(grid_id)
            todo = set(range(len(self._all_grids))) - done
            return sorted(todo - running) or sorted(todo)

    return Grid


def grid_values(space: SearchSpace) -> dict[str, list[Scalar]]:
    """Each searched parameter's grid values: its choices, or every integer of a small integer
    range. Raise ConfigError for a float range or a large integer range."""
    from hpo.config.space import Choice, FloatRange, IntRange

    values: dict[str, list[Scalar]] = {}
    for p in space.searched:
        if isinstance(p, Choice):
            values[p.name] = list(p.choices)
        elif isinstance(p, IntRange) and p.high - p.low + 1 <= GRID_MAX_INTEGERS:
            values[p.name] = list(range(p.low, p.high + 1))
        elif isinstance(p, IntRange):
            raise ConfigError(
                f"grid needs choices: {p.name} is a range {p.spec()} of {p.high - p.low + 1} "
                f"integers (at most {GRID_MAX_INTEGERS}); list the values to try, e.g. "
                f"{p.name}: {p.low},{(p.low + p.high) // 2},{p.high}")
        elif isinstance(p, FloatRange):
            raise ConfigError(
                f"grid needs choices: {p.name} is a range {p.spec()}; list the values to try "
                f"(A,B,C), or use another --sampler")
    return values


def grid_size(space: SearchSpace) -> int:
    """How many points the grid over `space` has (1 when nothing is searched)."""
    return math.prod(len(v) for v in grid_values(space).values())


def planned_trials(sampler: str, space: SearchSpace, trials: int) -> int:
    """The finished trials a study runs: --trials, capped at the grid's size for grid (a grid
    study ends when every point ran once; enqueued configurations count among them)."""
    return min(trials, grid_size(space)) if sampler == "grid" else trials


def check_space(sampler: str, space: SearchSpace,
                enqueue: Sequence[Mapping[str, Scalar]] = (), objectives: int = 1) -> None:
    """Raise ConfigError, before any data is read, when `sampler` cannot run this study: an
    unknown name, a missing package, several objectives for a single-objective sampler, grid
    over a range, or a configuration enqueued for grid that leaves a searched parameter unset
    (a grid trial takes all of them or none)."""
    meta = SAMPLERS.entry(sampler).meta  # unknown names list the known ones
    if objectives > 1 and meta.get("single_objective"):
        raise ConfigError(f"sampler {sampler!r} optimizes a single objective, and this study "
                          f"has {objectives}; use nsga2, tpe, gp, qmc or random")
    _require(sampler)
    if sampler != "grid":
        return
    values = grid_values(space)
    for config in enqueue:
        unset = [name for name in values if name not in config]
        if unset:
            raise ConfigError(f"grid: the enqueued configuration {dict(config)} leaves "
                              f"{', '.join(unset)} unset; with grid, give every searched "
                              "parameter a value")
