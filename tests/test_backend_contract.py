"""The contract every search backend keeps, run on each: a whole search runs the trials asked
for, records them in the same MLflow layout, records a failing trial and goes on, and resumes
to a larger total. Ray's searches share one Ray runtime for the module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from hpo.after.models import resolve_model
from hpo.config.store import Store
from hpo.config.study import load_study
from hpo.search.run import run_search
from hpo.tracking.client import Tracker

pytestmark = pytest.mark.slow

BACKENDS = ["optuna", "ray"]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    if request.param == "ray":
        request.getfixturevalue("ray_runtime")
    return str(request.param)


def _runs(store: Store, role: str) -> list[Any]:
    client = MlflowClient(store.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.imgcls_hpo.role = '{role}'")


def test_a_search_records_its_trials_in_the_mlflow_layout_and_resumes_to_the_total(
        backend: str, study_file: Path, store: Store) -> None:
    result = run_search(load_study(str(study_file), {"backend": backend, "trials": 3}), store)
    assert [t.number for t in result.trials] == [0, 1, 2]
    assert all(t.state.counts for t in result.trials)
    assert [t.state for t in result.trials] == ["COMPLETE"] * 3  # no pruner, 2 epochs

    (study_run,) = _runs(store, "study")
    assert study_run.info.status == "FINISHED"
    assert study_run.data.tags["imgcls_hpo.backend"] == backend
    assert study_run.data.metrics["trials_complete"] == 3
    client = MlflowClient(store.tracking_uri)
    trial_runs = sorted(_runs(store, "trial"), key=lambda r: r.info.run_name)
    # the runs table says how each trial ended, in the name it shows anyway
    assert [r.info.run_name for r in trial_runs] == [
        "trial-000 COMPLETE", "trial-001 COMPLETE", "trial-002 COMPLETE"]
    for run, outcome in zip(trial_runs, result.trials, strict=True):
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert run.info.run_id == outcome.run_id and run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == study_run.info.run_id
        assert (tags["imgcls_hpo.role"], tags["imgcls_hpo.trial_number"],
                tags["imgcls_hpo.state"]) == ("trial", str(outcome.number), "COMPLETE")
        # the sampled values inside the study's space, the fixed ones as the study says
        assert 0.01 <= float(params["lr"]) <= 0.1 and params["batch_size"] in ("4", "8")
        assert float(params["lr"]) == pytest.approx(outcome.params["lr"])
        assert (params["momentum"], params["arch"], params["max_epochs"]) == \
            ("0.9", "simplecnn", "2")
        history = client.get_metric_history(run.info.run_id, "val_f1")
        assert [m.step for m in history] == [1, 2]
        assert metrics["best_val_f1"] == pytest.approx(outcome.value)
        assert metrics["test_f1_ci_low"] <= metrics["test_f1"] <= metrics["test_f1_ci_high"]
        assert outcome.test["test_f1"] == pytest.approx(metrics["test_f1"])
        _, predictor = resolve_model(Tracker(store.tracking_uri), f"runs:/{run.info.run_id}/model")
        assert predictor.classes == ("ants", "bees")

    # the same search with a larger total adds exactly the difference, in the same study run
    resumed = run_search(load_study(str(study_file), {"backend": backend, "trials": 4}), store)
    assert [t.number for t in resumed.trials] == [0, 1, 2, 3]
    assert [r.info.run_id for r in _runs(store, "study")] == [study_run.info.run_id]
    assert sorted(r.info.run_name for r in _runs(store, "trial")) == [
        "trial-000 COMPLETE", "trial-001 COMPLETE", "trial-002 COMPLETE", "trial-003 COMPLETE"]
    # MLflow's UI opens the study's experiment on its training runs, not on GenAI traces
    experiment = client.get_experiment(study_run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_failing_trial_is_recorded_with_its_reason_and_the_study_goes_on(
        backend: str, study_file: Path, store: Store) -> None:
    spec = load_study(str(study_file), {"backend": backend, "trials": 3,
                                        "space.lr": "0.05,1e20",
                                        "enqueue": [{"lr": 1e20, "batch_size": 4}]})
    result = run_search(spec, store)
    assert [t.number for t in result.trials] == [0, 1, 2]
    first = result.trials[0]
    assert (first.params["lr"], first.state, first.fail_reason) == \
        (1e20, "FAIL", "diverged at epoch 1")
    for trial in result.trials:  # every trial ran: the failure stopped nothing
        if trial.params["lr"] == 1e20:
            assert trial.state == "FAIL" and trial.fail_reason.startswith("diverged at epoch")  # type: ignore[union-attr]
        else:
            assert (trial.state, trial.fail_reason) == ("COMPLETE", None)
    runs = {r.data.tags["imgcls_hpo.trial_number"]: r for r in _runs(store, "trial")}
    failed = runs["0"]
    assert (failed.info.status, failed.data.tags["imgcls_hpo.state"],
            failed.data.tags["imgcls_hpo.fail_reason"]) == ("FAILED", "FAIL",
                                                            "diverged at epoch 1")
    assert failed.info.run_name == "trial-000 FAILED"
    (study_run,) = _runs(store, "study")
    assert study_run.info.status == "FINISHED"
    assert study_run.data.metrics["trials_fail"] == sum(t.state == "FAIL" for t in result.trials)
