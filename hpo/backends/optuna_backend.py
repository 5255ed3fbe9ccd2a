"""Optuna: study storage and the study (samplers and pruners: optuna_samplers; the ask/tell
trial loop, in this process or in one worker process per slot: workers)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.backends import workers
from hpo.backends.base import BACKENDS, SearchObserver
from hpo.backends.optuna_samplers import (
    PRUNERS,
    SAMPLERS,
    check_space,
    planned_trials,
    sampler_seed,
)
from hpo.devices import plan_slots
from hpo.objective import TrialOutcome
from hpo.study import StudyError, StudySpec
from imgcls.errors import first_line

if TYPE_CHECKING:
    import optuna

    from hpo.objective import StudyContext
    from hpo.store import Store

# RDB storages keep each running trial's heartbeat: a trial whose worker has not beaten for
# HEARTBEAT_GRACE_S seconds is taken as lost, wherever it ran (see workers). Beats are cheap
# (one row update); the grace outlasts a busy host's stalls.
HEARTBEAT_S = 60
HEARTBEAT_GRACE_S = 600


def make_storage(store: Store) -> optuna.storages.BaseStorage:
    """The journal file under the store; or --storage: a database URL (sqlite:///...,
    postgresql://...), a Redis URL (redis://..., Optuna's journal kept in Redis), or a path,
    taken as a journal file (works on shared file systems)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    target = store.optuna_storage
    if target and target.startswith(("redis://", "rediss://", "unix://")):
        try:
            from optuna.storages.journal import JournalRedisBackend

            with warnings.catch_warnings():  # "experimental" since Optuna 3.1
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.JournalStorage(JournalRedisBackend(target))
        except ImportError:
            raise StudyError(f"--storage {target} needs the redis package: pip install redis"
                             ) from None
        except Exception as exc:
            raise StudyError(f"cannot open the Optuna storage {target}: {first_line(exc)}"
                             ) from None
    if target and "://" in target:
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(target, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=HEARTBEAT_GRACE_S)
        except Exception as exc:  # driver missing, server down, bad URL: all the user's to fix
            raise StudyError(f"cannot open the Optuna storage {target}: {first_line(exc)}"
                             ) from None
    path = Path(target).expanduser() if target else store.journal_path
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


class OptunaStudy:
    def __init__(self, study: optuna.Study, spec: StudySpec, store: Store) -> None:
        self.study = study
        self.spec = spec
        self.store = store

    def get_attr(self, key: str) -> Any:
        return self.study.user_attrs.get(key)

    def set_attr(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)

    def trials(self) -> list[TrialOutcome]:
        """Every trial started (RUNNING ones included), oldest first; enqueued ones that have
        not started yet (WAITING) are not trials of the study yet."""
        return [workers.outcome_of(t) for t in self.study.get_trials(deepcopy=False)
                if t.state.name != "WAITING"]

    def optimize(self, ctx: StudyContext, observer: SearchObserver) -> None:
        """Trials on every slot of the study's placement (gpus, trials_per_gpu, workers): in
        this process for one slot (on ctx.device), in one worker process per slot otherwise."""
        spec = self.spec
        slots = plan_slots(spec.gpus, spec.trials_per_gpu, spec.workers)
        target = planned_trials(spec.sampler, spec.space, spec.trials)  # grid: at most its size
        workers.optimize(self.study, self.store, ctx, observer, slots, target)


@BACKENDS.register("optuna")
class OptunaBackend:
    name = "optuna"
    places_trials = False

    def check(self, spec: StudySpec) -> None:
        check_space(spec.sampler, spec.space, spec.enqueue, len(spec.terms))
        PRUNERS.entry(spec.pruner)

    def open(self, spec: StudySpec, store: Store) -> OptunaStudy:
        import optuna

        self.check(spec)
        storage = make_storage(store)
        # Peek at the stored study first: a resumed sampler is seeded past the trials it has
        # already drawn, so that it does not replay the same random start-up points.
        try:
            existing = optuna.load_study(study_name=spec.name, storage=storage)
        except KeyError:
            existing = None
        if existing is not None:
            recorded = existing.user_attrs.get("objective")
            if recorded and recorded != spec.objective:
                raise StudyError(
                    f"study {spec.name!r} in {store.describe_storage()} optimizes {recorded}, "
                    f"not {spec.objective}; use another --store, or another study name"
                )
        drawn = len(existing.trials) if existing is not None else 0
        study = open_optuna_study(spec, storage, spec.seed + drawn)
        study.set_user_attr("objective", spec.objective)
        return OptunaStudy(study, spec, store)


def open_optuna_study(spec: StudySpec, storage: optuna.storages.BaseStorage,
                      fresh_seed: int) -> optuna.Study:
    """The study in `storage`, created on first use, with the spec's sampler and pruner. Each
    worker process opens it too. `fresh_seed`: a seed no other process of the study uses (see
    sampler_seed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is ours to show
    return optuna.create_study(
        study_name=spec.name, storage=storage, load_if_exists=True,
        directions=["maximize" if direction == "max" else "minimize"
                    for _, direction in spec.terms],
        sampler=SAMPLERS.get(spec.sampler)(sampler_seed(spec.sampler, spec.seed, fresh_seed),
                                           spec.trials, spec.space),
        pruner=PRUNERS.get(spec.pruner)(spec.max_epochs),
    )
