"""The MLflow layout of a study: its parent run, one nested run per trial, and the one query and
the one reader that turn trial runs back into TrialOutcomes.

Layout (a contract other commands and users rely on):
- one experiment per study, named after it;
- one parent run per study (tag imgcls_hpo.role=study): the study settings and search space as
  params, the split as split.csv;
- one nested run per trial (tags imgcls_hpo.role=trial, imgcls_hpo.trial_number,
  imgcls_hpo.state = COMPLETE | PRUNED | FAIL, imgcls_hpo.fail_reason): its hyperparameters and
  fixed settings as params, per-epoch metrics with step=epoch, the best epoch's summary metrics,
  the confusion matrix, and for COMPLETE trials the model as `model` (pytorch flavor, pt2).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.config.hparams import HParams
from hpo.config.space import Scalar
from hpo.config.trial import TrialOutcome, TrialState
from hpo.tracking.models import log_model, tensor_signature
from hpo.tracking.tags import (
    MODEL_NAME,
    RUN_NAME,
    RUN_STATUS,
    TAG_FAIL_REASON,
    TAG_ROLE,
    TAG_STATE,
    TAG_STUDY,
    TAG_SUPERSEDED,
    TAG_TRIAL,
)

if TYPE_CHECKING:
    import numpy as np
    import torch
    from mlflow.entities import Run

    from hpo.tracking.client import Tracker

MAX_TRIAL_RUNS = 50_000  # a study's trial runs read in one query


def open_study_run(tracker: Tracker, experiment_id: str, study: str, run_id: str | None,
                   params: Mapping[str, str],
                   claimed: Callable[[], str | None] | None = None) -> tuple[str, list[str]]:
    """Resume the study's run, or start it. Returns the run id and the settings whose value
    differs from the one the run recorded first (MLflow params are write-once).

    `run_id`, and `claimed()` when asked again: the run the study's trial storage records
    (see settle_study_run)."""
    run_id = tracker.find_run(run_id, experiment_id)
    if run_id is None:
        run = tracker.client.create_run(
            experiment_id, run_name=study, tags={TAG_ROLE: "study", TAG_STUDY: study}
        )
        tracker.log_params(run.info.run_id, params)
        run_id = settle_study_run(tracker, experiment_id, study, run.info.run_id, claimed)
        if run_id == run.info.run_id:
            return run_id, []
    tracker.client.update_run(run_id, status="RUNNING")
    logged = tracker.run(run_id).data.params
    changed = [k for k, v in params.items() if k in logged and logged[k] != v]
    tracker.log_params(run_id, {k: v for k, v in params.items() if k not in logged})
    return run_id, changed


def settle_study_run(tracker: Tracker, experiment_id: str, study: str, mine: str,
                     claimed: Callable[[], str | None] | None = None) -> str:
    """The one study run of a study that processes on several machines began at the same
    moment, each creating its own (`mine`) because none existed yet: of the study's runs that
    hold no trial yet, the earliest (start time, then id) is kept, the same one for every
    process, and a process whose run lost deletes it. A study run that holds trials is an
    earlier search's, never a rival.

    Unless the study's trial storage has recorded a run by now (`claimed()`, asked after the
    runs are read): a process that records its run does so before its first trial, so a run
    that holds trials and is recorded there is a rival that got further, not an earlier
    search's, and it is the one kept."""
    runs = tracker.client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{TAG_ROLE}` = 'study' and tags.`{TAG_STUDY}` = '{study}'")
    rivals = [r for r in runs if r.info.run_id == mine
              or not trial_runs(tracker, experiment_id, r.info.run_id, superseded=True)]
    winner = min(rivals, key=lambda r: (r.info.start_time, r.info.run_id)).info.run_id
    recorded = tracker.find_run(claimed(), experiment_id) if claimed is not None else None
    if recorded is not None:
        winner = recorded
    if winner != mine:
        tracker.client.delete_run(mine)
    return winner


def study_runs(tracker: Tracker, study: str) -> tuple[str | None, list[Run]]:
    """The study's experiment id and its study runs, newest first (none: (None, []))."""
    experiment = tracker.client.get_experiment_by_name(study)
    if experiment is None or experiment.lifecycle_stage != "active":
        return None, []
    runs = tracker.client.search_runs([experiment.experiment_id],
                                      filter_string=f"tags.`{TAG_ROLE}` = 'study'",
                                      order_by=["attributes.start_time DESC"])
    return experiment.experiment_id, list(runs)


def trial_runs(tracker: Tracker, experiment_id: str, study_run_id: str, *,
               number: int | None = None, running: bool = False,
               superseded: bool = False) -> list[Run]:
    """The trial runs under a study run: all of them, trial `number`'s, and of those only the
    ones still open (`running`: MLflow status RUNNING, which a trial's end always changes).
    A run that a restarted trial replaced (its trial started over: tag imgcls_hpo.superseded_by)
    is left out unless `superseded`."""
    query = (f"tags.`{TAG_ROLE}` = 'trial' and tags.`mlflow.parentRunId` = '{study_run_id}'")
    if number is not None:
        query += f" and tags.`{TAG_TRIAL}` = '{number}'"
    if running:
        query += " and attributes.status = 'RUNNING'"
    runs = tracker.client.search_runs([experiment_id], filter_string=query,
                                      max_results=MAX_TRIAL_RUNS)
    return [run for run in runs if superseded or TAG_SUPERSEDED not in run.data.tags]


def study_trials(tracker: Tracker, study: str, study_run_id: str | None, objective: str
                 ) -> list[TrialOutcome]:
    """Every trial of the study run `study_run_id` of experiment `study`, oldest first."""
    experiment = tracker.client.get_experiment_by_name(study) if study_run_id else None
    if experiment is None or study_run_id is None:
        return []
    runs = trial_runs(tracker, experiment.experiment_id, study_run_id)
    return sorted((outcome_of_run(run, objective) for run in runs), key=lambda t: t.number)


def outcome_of_run(run: Run, objective: str) -> TrialOutcome:
    """A trial run as the outcome every backend reports: params typed as HParams declares them,
    every metric it logged (the last value of each), its state and reason."""
    tags, metrics = run.data.tags, dict(run.data.metrics)
    kinds = HParams.kinds()
    params = {k: _typed(v, kinds[k]) for k, v in run.data.params.items() if k in kinds}
    state = TrialState.read(tags.get(TAG_STATE, "RUNNING"), tags.get(TAG_FAIL_REASON))
    end = run.info.end_time
    return TrialOutcome(
        number=int(tags.get(TAG_TRIAL, -1)), state=state, params=params,
        value=metrics.get(f"best_{objective}") if state.has_result else None,
        best_epoch=int(metrics.get("best_epoch", 0)), epochs=int(metrics.get("epochs", 0)),
        metrics=metrics, fail_reason=tags.get(TAG_FAIL_REASON), run_id=run.info.run_id,
        seconds=(end - run.info.start_time) / 1000 if end else 0.0,
    )


def _typed(text: str, kind: type) -> Scalar:
    """A logged param back to its hyperparameter's type (MLflow keeps params as text); a value
    written by another version that does not read as the type stays text."""
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


# -- a trial's run ---------------------------------------------------------------------------

def start_trial(tracker: Tracker, experiment_id: str, study_run_id: str, study: str, number: int,
                params: Mapping[str, Any], tags: Mapping[str, str] | None = None, *,
                again: bool = False) -> TrialRun:
    """Open the trial's run under the study run. `tags`: extra tags, such as where the trial
    runs (imgcls_hpo.device, imgcls_hpo.worker). `again`: the trial ran before and starts over
    (it had no checkpoint to go on from): its earlier runs are marked superseded by this one,
    so that every reader sees one run per trial."""
    earlier = trial_runs(tracker, experiment_id, study_run_id, number=number) if again else []
    run = tracker.client.create_run(
        experiment_id,
        run_name=trial_run_name(number, TrialState.RUNNING),
        tags={
            **(tags or {}),
            "mlflow.parentRunId": study_run_id,
            TAG_ROLE: "trial",
            TAG_STUDY: study,
            TAG_TRIAL: str(number),
            TAG_STATE: TrialState.RUNNING.stored,
        },
    )
    trial = TrialRun(tracker, run.info.run_id, number)
    tracker.log_params(trial.run_id, params)
    for old in earlier:
        tracker.set_tags(old.info.run_id, {TAG_SUPERSEDED: trial.run_id})
    return trial


def trial_run_name(number: int, state: TrialState) -> str:
    """A trial run's name, which says how the trial ended so that MLflow's runs table shows it
    with no column added: "trial-007" while it runs, then "trial-007 PRUNED", "trial-007 FAILED"."""
    name = f"trial-{number:03d}"
    return name if state == TrialState.RUNNING else f"{name} {state.name}"


def reopen_trial(tracker: Tracker, run_id: str, number: int,
                 tags: Mapping[str, str] | None = None) -> TrialRun:
    """A trial's run opened again, to go on where the trial stopped: MLflow status RUNNING,
    state RUNNING, the reason it stopped (interrupted, worker lost) removed, `tags` (where it
    runs now) updated."""
    from mlflow.exceptions import MlflowException

    tracker.client.update_run(run_id, status="RUNNING",
                              name=trial_run_name(number, TrialState.RUNNING))
    tracker.set_tags(run_id, {**(tags or {}), TAG_STATE: TrialState.RUNNING.stored})
    with contextlib.suppress(MlflowException):  # none was set
        tracker.client.delete_tag(run_id, TAG_FAIL_REASON)
    return TrialRun(tracker, run_id, number)


def logged_epochs(tracker: Tracker, run_id: str, metric: str) -> int:
    """The last epoch (step) of `metric` that the run holds; 0 for none."""
    return max((step for step, _ in tracker.metric_history(run_id, metric)), default=0)


class TrialRun:
    """One trial's MLflow run (of trial `number`)."""

    def __init__(self, tracker: Tracker, run_id: str, number: int) -> None:
        self.tracker = tracker
        self.run_id = run_id
        self.number = number

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def log_text(self, text: str, name: str) -> None:
        self.tracker.log_text(self.run_id, text, name)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifact(self.run_id, path, artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.tracker.log_artifacts(self.run_id, folder, artifact_path)

    def finish(self, state: TrialState, reason: str | None = None) -> None:
        """Record how the trial ended and close the run with the matching MLflow status; an
        interrupted or lost trial gets its state's own reason."""
        tags = {TAG_STATE: state.stored, RUN_NAME: trial_run_name(self.number, state)}
        reason = reason or state.reason
        if reason:
            tags[TAG_FAIL_REASON] = reason[:5000]
        self.tracker.set_tags(self.run_id, tags)
        self.tracker.end_run(self.run_id, RUN_STATUS[state])

    def finish_with_model(self, model: torch.nn.Module, input_example: np.ndarray,
                          num_classes: int, metadata: Mapping[str, Any]) -> None:
        """Log the model as `model` (pt2: a traced graph that runs no code when loaded), then
        close the run as COMPLETE; a model that cannot be logged raises, and the run stays open
        for the caller to record the failure. `input_example`: a float batch as the model takes
        it; `num_classes`: its outputs (logits) per image. `metadata` travels in the MLmodel
        file: what predicting needs besides the weights (classes, image size, normalization).

        The signature is given from the shapes rather than inferred by running the model, and
        the saved model is not loaded back to predict the example (MLflow's "serving input
        validation", which can only warn): a quarter of mlflow.pytorch.log_model's time, 0.1
        to 0.2 s a trial on 2 shared CPU cores."""
        import torch

        # Naming the requirement saves MLflow from loading the model in a subprocess to guess.
        version = torch.__version__.split("+")[0]
        log_model(self.tracker, self.run_id, MODEL_NAME, "pytorch", with_run_params=True,
                  pytorch_model=model.eval(), serialization_format="pt2",
                  input_example=input_example,
                  signature=tensor_signature(input_example, num_classes),
                  pip_requirements=[f"torch=={version}"], metadata=dict(metadata),
                  validate_serving_input=False)
        self.finish(TrialState.COMPLETE)


def close_open_runs(tracker: Tracker, experiment_id: str, study_run_id: str,
                    state: TrialState, numbers: set[int] | None = None) -> list[int]:
    """Close the trial runs still open under a study run (all, or those of trial `numbers`) as
    `state` (INTERRUPTED, LOST): their trial's process or search is gone. Returns the trial
    numbers closed."""
    closed = []
    for run in trial_runs(tracker, experiment_id, study_run_id, running=True):
        number = int(run.data.tags.get(TAG_TRIAL, -1))
        if numbers is None or number in numbers:
            TrialRun(tracker, run.info.run_id, number).finish(state)
            closed.append(number)
    return closed

