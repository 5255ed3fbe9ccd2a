"""A study read back from the tracking store, for the commands that come after a search
(`results`, `promote`): its study run and its trials, as the same TrialOutcomes a search reports.

It reads what is there, so it works on a study that is still running. MLflow is the source of
truth here, not the backend's storage: it holds every trial's metrics and model whatever the
backend was.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hpo.config.hparams import HParams
from hpo.config.space import SearchSpace
from hpo.config.study import StudyError
from hpo.config.trial import TrialOutcome, Trials, TrialState
from hpo.tracking.runs import outcome_of_run, study_runs, trial_runs
from imgcls.metrics import Direction

if TYPE_CHECKING:
    from hpo.tracking.client import Tracker


@dataclass(frozen=True)
class StudyRecord:
    name: str
    objective: str
    experiment_id: str
    study_run_id: str
    searched: tuple[str, ...]  # the hyperparameters the study searched, in its space's order
    trials: Trials
    space: SearchSpace  # the space the study run recorded first (names this version knows)

    @property
    def direction(self) -> Direction:
        return self.trials.direction

    @property
    def objective_key(self) -> str:
        """The summary metric that holds each trial's objective value."""
        return f"best_{self.objective}"

    def counts(self) -> Counter[TrialState]:
        return self.trials.counts()

    def ranked(self, metric: str | None = None,
               states: tuple[TrialState, ...] = (TrialState.COMPLETE,)) -> list[TrialOutcome]:
        return self.trials.ranked(metric, states)


def load_record(tracker: Tracker, study: str) -> StudyRecord:
    """The study `study` as its store holds it; StudyError when the store has no such study."""
    experiment_id, runs = study_runs(tracker, study)
    if experiment_id is None or not runs:
        raise StudyError(f"no study {study!r} in the tracking store {tracker.shown}; run "
                         f"`imgcls-hpo search {study}` first (with the same --store)")
    study_run = runs[0]
    params = study_run.data.params
    objective = params.get("objective", "val_f1")
    kinds = HParams.kinds()
    entries = {k.removeprefix("space."): v for k, v in params.items()
               if k.startswith("space.") and k.removeprefix("space.") in kinds}
    space = SearchSpace.parse(entries, kinds)
    trials = Trials(objective, (outcome_of_run(run, objective) for run in
                                trial_runs(tracker, experiment_id, study_run.info.run_id)))
    return StudyRecord(study, objective, experiment_id, study_run.info.run_id,
                       tuple(p.name for p in space.searched), trials, space)
