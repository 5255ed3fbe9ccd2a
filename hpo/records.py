"""A study read back from the tracking store, for the commands that come after a search
(`results`, `promote`): its study run and its trial runs, with typed parameters.

It reads what is there, so it works on a study that is still running. MLflow is the source of
truth here, not the backend's storage: it holds every trial's metrics and model whatever the
backend was.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hpo.space import Scalar
from hpo.study import HParams, StudyError
from hpo.tracking import TAG_FAIL_REASON, TAG_ROLE, TAG_STATE, TAG_TRIAL
from imgcls.metrics import Direction, metric_direction

if TYPE_CHECKING:
    from hpo.tracking import Tracker

FINISHED = ("COMPLETE", "PRUNED")
# Logged metrics where lower is better, besides losses: the cost of a model.
LOWER_IS_BETTER = ("params_count", "flops", "macs", "train_seconds")


def metric_goal(name: str) -> Direction:
    """Which way is better for any metric a trial logs: best_val_f1, test_auc, flops..."""
    base = name.removeprefix("best_")
    if base.startswith("val_"):
        return metric_direction(base)
    return "min" if "loss" in base or base in LOWER_IS_BETTER else "max"


@dataclass(frozen=True)
class TrialRecord:
    number: int
    state: str  # COMPLETE, PRUNED, FAIL, or RUNNING for a trial still training
    run_id: str
    params: dict[str, Scalar]  # every hyperparameter it trained with, typed
    metrics: dict[str, float]  # the last value of each metric: summaries, test_*, last epoch
    fail_reason: str | None = None
    artifact_uri: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


@dataclass(frozen=True)
class StudyRecord:
    name: str
    objective: str
    experiment_id: str
    study_run_id: str
    searched: tuple[str, ...]  # the hyperparameters the study searched, in its space's order
    trials: tuple[TrialRecord, ...] = field(default=())

    @property
    def direction(self) -> Direction:
        return metric_direction(self.objective)

    @property
    def objective_key(self) -> str:
        """The summary metric that holds each trial's objective value."""
        return f"best_{self.objective}"

    def counts(self) -> Counter[str]:
        return Counter(t.state for t in self.trials)

    def ranked(self, metric: str | None = None, states: tuple[str, ...] = ("COMPLETE",)
               ) -> list[TrialRecord]:
        """Trials in `states` that logged `metric` (default: the objective), best first."""
        key = metric or self.objective_key
        if key == self.objective:
            key = self.objective_key  # `val_f1` means the best epoch's, not the last one's
        chosen = [t for t in self.trials if t.state in states and key in t.metrics
                  and t.metrics[key] == t.metrics[key]]  # NaN never ranks
        return sorted(chosen, key=lambda t: t.metrics[key], reverse=metric_goal(key) == "max")


def load_record(tracker: Tracker, study: str) -> StudyRecord:
    """The study `study` as its store holds it; StudyError when the store has no such study."""
    experiment = tracker.client.get_experiment_by_name(study)
    runs = []
    if experiment is not None and experiment.lifecycle_stage == "active":
        runs = tracker.client.search_runs([experiment.experiment_id],
                                          filter_string=f"tags.{TAG_ROLE} = 'study'",
                                          order_by=["attributes.start_time DESC"])
    if not runs:
        raise StudyError(f"no study {study!r} in the tracking store {tracker.uri}; run "
                         f"`imgcls-hpo search {study}` first (with the same --store)")
    study_run = runs[0]
    space = {k.removeprefix("space."): v for k, v in study_run.data.params.items()
             if k.startswith("space.")}
    searched = tuple(name for name, spec in space.items() if ".." in spec or "," in spec)
    kinds = HParams.kinds()
    trials = []
    for run in tracker.client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.{TAG_ROLE} = 'trial' and "
                          f"tags.mlflow.parentRunId = '{study_run.info.run_id}'",
            max_results=50_000):
        tags = run.data.tags
        params = {k: _typed(v, kinds[k]) for k, v in run.data.params.items() if k in kinds}
        trials.append(TrialRecord(
            number=int(tags.get(TAG_TRIAL, -1)), state=tags.get(TAG_STATE, "RUNNING"),
            run_id=run.info.run_id, params=params, metrics=dict(run.data.metrics),
            fail_reason=tags.get(TAG_FAIL_REASON), artifact_uri=run.info.artifact_uri or "",
        ))
    trials.sort(key=lambda t: t.number)
    return StudyRecord(study, study_run.data.params.get("objective", "val_f1"),
                       experiment.experiment_id, study_run.info.run_id, searched, tuple(trials))


def _typed(text: str, kind: type) -> Scalar:
    """A logged param back to its hyperparameter's type (MLflow keeps params as text)."""
    try:
        if kind is bool:
            return text == "True"
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        pass
    return text
