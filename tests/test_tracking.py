"""A trial's model as `hpo.tracking` logs it, against a real MLflow store: what promotion
(`hpo.after.promote`), `imgcls-hpo predict` and the MLflow UI read back."""

from __future__ import annotations

import os
import signal

import mlflow
import numpy as np
import pytest
import torch
from mlflow.entities import LoggedModelStatus
from mlflow.models import infer_signature

from hpo.config.store import Store
from hpo.config.trial import TrialState
from hpo.tracking.client import Tracker, fluent_tracking_uri
from hpo.tracking.runs import TrialRun, open_study_run, settle_study_run, start_trial
from hpo.tracking.tags import MODEL_NAME, TAG_STATE

METADATA = {"imgcls": {"arch": "tiny", "classes": ["a", "b", "c"], "image_size": 8}}


class Tiny(torch.nn.Module):
    """One channel of 8x8 pixels in, three class scores out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean(dim=(2, 3)))


class Unexportable(Tiny):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.export refuses it
            return super().forward(x)
        return super().forward(-x)


@pytest.fixture
def tracker(store: Store) -> Tracker:
    return Tracker(store.tracking_uri, store.artifact_root)


def _trial(tracker: Tracker) -> TrialRun:
    experiment = tracker.experiment("tiny")
    parent, _ = open_study_run(tracker, experiment, "tiny", None, {"seed": "0"})
    return start_trial(tracker, experiment, parent, "tiny", 0,
                               {"lr": 0.05, "arch": "tiny", "dropout": None})


def _models(tracker: Tracker, run: TrialRun) -> list:  # type: ignore[type-arg]
    """The run's logged models named `model`, searched as `hpo.after.promote` searches them."""
    experiment = tracker.client.get_run(run.run_id).info.experiment_id
    return tracker.client.search_logged_models(
        [experiment], filter_string=f"name = '{MODEL_NAME}' AND source_run_id = '{run.run_id}'")


def test_a_complete_trial_logs_a_model_that_loads_and_predicts(tracker: Tracker) -> None:
    run = _trial(tracker)
    run.log_metrics({"test_f1": 0.75})  # a summary metric (step 0)
    run.log_metrics({"val_f1": 0.5}, step=1)  # an epoch's metric
    torch.manual_seed(0)
    model = Tiny()
    example = np.random.default_rng(0).normal(size=(2, 1, 8, 8)).astype(np.float32)
    run.finish_with_model(model, example, 3, METADATA)

    logged = tracker.client.get_run(run.run_id)
    assert logged.info.status == "FINISHED" and logged.data.tags[TAG_STATE] == "COMPLETE"
    (found,) = _models(tracker, run)  # in the run's experiment: found by promotion
    assert found.status == LoggedModelStatus.READY
    assert [o.model_id for o in logged.outputs.model_outputs] == [found.model_id]
    # as MLflow's log_model records them: the run's parameters, its step-0 metrics
    assert found.params == {"lr": "0.05", "arch": "tiny", "dropout": ""}
    assert {(m.key, m.value) for m in found.metrics} == {("test_f1", 0.75)}
    uri = f"runs:/{run.run_id}/{MODEL_NAME}"
    with fluent_tracking_uri(tracker.uri):
        info = mlflow.models.get_model_info(uri)
        loaded = mlflow.pytorch.load_model(uri)
    assert {"pytorch", "python_function"} <= set(info.flavors)
    assert info.metadata == METADATA
    # the signature given is the one MLflow would infer by running the model
    with torch.no_grad():
        scores = model(torch.from_numpy(example)).numpy()
    assert info.signature == infer_signature(example, scores)
    x = torch.randn(5, 1, 8, 8)  # another batch size: the exported graph keeps it dynamic
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)


def test_a_model_that_cannot_be_logged_leaves_the_run_to_the_caller(tracker: Tracker) -> None:
    run = _trial(tracker)
    with pytest.raises(Exception, match="data-dependent"):
        run.finish_with_model(Unexportable(), np.ones((2, 1, 8, 8), np.float32), 3, METADATA)
    logged = tracker.client.get_run(run.run_id)
    # not COMPLETE: run_trial records the failure, with its reason
    assert logged.info.status == "RUNNING" and logged.data.tags[TAG_STATE] == "RUNNING"
    (found,) = _models(tracker, run)
    assert found.status == LoggedModelStatus.FAILED  # not left PENDING; promotion skips it


def test_ctrl_c_during_a_write_lets_it_finish_and_the_run_can_still_be_closed(
        tracker: Tracker) -> None:
    """Ctrl-C that lands inside an MLflow write waits for it: the write is kept, and the
    interrupted trial's handler closes its run KILLED. (Broken off halfway, a write can leave
    SQLite locked while the handler runs: the test of Ctrl-C in test_workers.py caught that.)"""
    from sqlalchemy import event

    run = _trial(tracker)
    engine = tracker.client._tracking_client.store.engine  # the SQLite store's

    def interrupt(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.startswith("INSERT INTO metrics"):  # written, not yet committed
            os.kill(os.getpid(), signal.SIGINT)

    event.listen(engine, "after_cursor_execute", interrupt)
    try:
        run.log_metrics({"val_f1": 0.5}, step=1)
    except KeyboardInterrupt:
        event.remove(engine, "after_cursor_execute", interrupt)
        run.finish(TrialState.INTERRUPTED)  # as run_trial's handler does
    else:
        pytest.fail("Ctrl-C was not raised")

    logged = tracker.client.get_run(run.run_id)
    assert logged.info.status == "KILLED" and logged.data.tags[TAG_STATE] == "FAIL"
    assert logged.data.metrics == {"val_f1": 0.5}  # the write under way was completed


def test_machines_that_began_a_study_at_once_settle_on_one_study_run(tracker: Tracker) -> None:
    """Each process found no study run and created its own; both keep the earliest, and the
    other is deleted, so every reader sees one."""
    experiment = tracker.experiment("tiny")
    tags = {"imgcls_hpo.role": "study", "imgcls_hpo.study": "tiny"}
    first = tracker.client.create_run(experiment, run_name="tiny", tags=tags, start_time=1000)
    second = tracker.client.create_run(experiment, run_name="tiny", tags=tags, start_time=1001)
    mine = [first.info.run_id, second.info.run_id]
    assert [settle_study_run(tracker, experiment, "tiny", run) for run in mine] == [mine[0]] * 2
    assert tracker.client.get_run(mine[1]).info.lifecycle_stage == "deleted"
    # a study run that holds trials is an earlier search's: a new one never yields to it
    start_trial(tracker, experiment, mine[0], "tiny", 0, {"lr": 0.05})
    later = tracker.client.create_run(experiment, run_name="tiny", tags=tags, start_time=2000)
    assert settle_study_run(tracker, experiment, "tiny", later.info.run_id) == later.info.run_id


def test_a_machine_that_settles_after_its_rival_began_a_trial_joins_the_rival_s_run(
        tracker: Tracker) -> None:
    """Both found no study run; the first recorded its run in the trial storage and started a
    trial before the second settled: the second yields to the recorded run, not keeping its
    own beside it."""
    experiment = tracker.experiment("tiny")
    tags = {"imgcls_hpo.role": "study", "imgcls_hpo.study": "tiny"}
    first = tracker.client.create_run(experiment, run_name="tiny", tags=tags, start_time=1000)
    start_trial(tracker, experiment, first.info.run_id, "tiny", 0, {"lr": 0.05})
    second = tracker.client.create_run(experiment, run_name="tiny", tags=tags, start_time=1001)
    settled = settle_study_run(tracker, experiment, "tiny", second.info.run_id,
                               lambda: first.info.run_id)
    assert settled == first.info.run_id
    assert tracker.client.get_run(second.info.run_id).info.lifecycle_stage == "deleted"
