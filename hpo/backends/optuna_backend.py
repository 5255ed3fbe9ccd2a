"""Optuna: study storage and the ask/tell trial loop (samplers and pruners: optuna_samplers)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.backends.base import BACKENDS, SearchObserver, counts_as_finished
from hpo.backends.optuna_samplers import PRUNERS, SAMPLERS
from hpo.objective import INTERRUPTED, TrialOutcome, headline_test, run_trial
from hpo.study import StudyError, StudySpec
from imgcls.errors import first_line

if TYPE_CHECKING:
    import optuna

    from hpo.objective import StudyContext
    from hpo.store import Store

def make_storage(store: Store) -> optuna.storages.BaseStorage:
    """The journal file under the store; or --storage: a database URL (sqlite:///...,
    postgresql://...), or a path, taken as a journal file (works on shared file systems)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    target = store.optuna_storage
    if target and "://" in target:
        try:
            return optuna.storages.RDBStorage(target)
        except Exception as exc:  # driver missing, server down, bad URL: all the user's to fix
            raise StudyError(f"cannot open the Optuna storage {target}: {first_line(exc)}"
                             ) from None
    path = Path(target).expanduser() if target else store.journal_path
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _outcome(trial: optuna.trial.FrozenTrial) -> TrialOutcome:
    attrs = trial.user_attrs
    value = trial.value if trial.state.name == "COMPLETE" else attrs.get("value")
    return TrialOutcome(
        number=trial.number, params=dict(trial.params), state=trial.state.name,  # type: ignore[arg-type]
        value=value, best_epoch=attrs.get("best_epoch", 0), epochs=attrs.get("epochs", 0),
        fail_reason=attrs.get("fail_reason"), run_id=attrs.get("mlflow_run_id"),
        seconds=attrs.get("seconds", 0.0), test=attrs.get("test", {}),
    )


class OptunaStudy:
    def __init__(self, study: optuna.Study, spec: StudySpec) -> None:
        self.study = study
        self.spec = spec

    def get_attr(self, key: str) -> Any:
        return self.study.user_attrs.get(key)

    def set_attr(self, key: str, value: Any) -> None:
        self.study.set_user_attr(key, value)

    def trials(self) -> list[TrialOutcome]:
        return [_outcome(t) for t in self.study.get_trials(deepcopy=False)]

    def optimize(self, ctx: StudyContext, observer: SearchObserver) -> None:
        from optuna.trial import TrialState

        distributions = self.spec.space.to_optuna()
        finished = sum(counts_as_finished(t) for t in self.trials())
        while finished < self.spec.trials:
            trial = self.study.ask(distributions)
            observer.trial_started(trial.number, trial.params)

            def should_prune(epoch: int, value: float, trial: optuna.Trial = trial) -> bool:
                trial.report(value, step=epoch)
                return trial.should_prune()

            try:
                outcome = run_trial(ctx, trial.number, trial.params, should_prune,
                                    observer.epoch_finished)
            except KeyboardInterrupt:
                trial.set_user_attr("fail_reason", INTERRUPTED)
                self.study.tell(trial, state=TrialState.FAIL)
                raise
            for key, value in (("mlflow_run_id", outcome.run_id),
                               ("fail_reason", outcome.fail_reason),
                               ("value", outcome.value), ("best_epoch", outcome.best_epoch),
                               ("epochs", outcome.epochs), ("seconds", outcome.seconds),
                               ("test", headline_test(outcome.test, self.spec.objective) or None)):
                if value is not None:
                    trial.set_user_attr(key, value)
            if outcome.state == "COMPLETE":
                self.study.tell(trial, outcome.value)
            else:
                self.study.tell(trial, state=TrialState[outcome.state])
            observer.trial_finished(outcome)
            finished += 1


@BACKENDS.register("optuna")
class OptunaBackend:
    name = "optuna"

    def check(self, spec: StudySpec) -> None:
        SAMPLERS.entry(spec.sampler)
        PRUNERS.entry(spec.pruner)

    def open(self, spec: StudySpec, store: Store) -> OptunaStudy:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is ours to show
        self.check(spec)
        storage = make_storage(store)
        direction = "maximize" if spec.direction == "max" else "minimize"
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
        study = optuna.create_study(
            study_name=spec.name, storage=storage, direction=direction, load_if_exists=True,
            sampler=SAMPLERS.get(spec.sampler)(spec.seed + drawn, spec.trials, spec.space),
            pruner=PRUNERS.get(spec.pruner)(),
        )
        study.set_user_attr("objective", spec.objective)
        return OptunaStudy(study, spec)
