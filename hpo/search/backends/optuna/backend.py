"""Optuna: a study in its storage (storage.py), run trial by trial through the ask/tell loop
(loop.py), in this process or in one worker process per slot (workers.py), with the samplers
and pruners registered by name (samplers.py, pruners.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hpo.config.study import StudyError, StudySpec
from hpo.config.trial import TrialOutcome
from hpo.search.backends.optuna import workers
from hpo.search.backends.optuna.loop import outcome_of
from hpo.search.backends.optuna.pruners import PRUNERS
from hpo.search.backends.optuna.samplers import check_space, planned_trials
from hpo.search.backends.optuna.storage import make_storage, open_optuna_study
from hpo.search.backends.ray.schedulers import SCHEDULERS
from hpo.search.devices import plan_slots
from hpo.search.events import SearchObserver
from imgcls.errors import ConfigError

if TYPE_CHECKING:
    import optuna

    from hpo.config.store import Store
    from hpo.search.context import StudyContext


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
        return [outcome_of(t) for t in self.study.get_trials(deepcopy=False)
                if t.state.name != "WAITING"]

    def optimize(self, ctx: StudyContext, observer: SearchObserver) -> None:
        """Trials on every slot of the study's placement (gpus, trials_per_gpu, workers): in
        this process for one slot (on ctx.device), in one worker process per slot otherwise."""
        spec = self.spec
        slots = plan_slots(spec.gpus, spec.trials_per_gpu, spec.workers)
        target = planned_trials(spec.sampler, spec.space, spec.trials)  # grid: at most its size
        workers.optimize(self.study, self.store, ctx, observer, slots, target)


class OptunaBackend:
    name = "optuna"
    places_trials = False

    def check(self, spec: StudySpec) -> None:
        check_space(spec.sampler, spec.space, spec.enqueue, len(spec.terms))
        if spec.pruner not in PRUNERS and spec.pruner in SCHEDULERS:
            raise ConfigError(f"pruner {spec.pruner!r} runs on the Ray backend only: "
                              f"{SCHEDULERS.entry(spec.pruner).meta['why']}; use --backend ray")
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


BACKEND = OptunaBackend  # what hpo.search.backends.get_backend("optuna") makes
