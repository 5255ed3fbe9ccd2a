"""One trial against a real MLflow store: what it records for each way a trial can end."""

import csv
import dataclasses
from pathlib import Path

import mlflow
import pytest
import torch

from hpo.after.models import resolve_model
from hpo.config.store import Store
from hpo.config.study import load_study
from hpo.search.context import StudyContext
from hpo.search.trial import run_trial
from hpo.tracking.client import Tracker, fluent_tracking_uri
from hpo.tracking.models import load_weights, model_info
from hpo.tracking.runs import open_study_run
from imgcls.data import prepare_data
from imgcls.errors import ConfigError
from imgcls.metrics import metric_goal


@pytest.fixture
def ctx(study_file: Path, store: Store) -> StudyContext:
    spec = load_study(str(study_file))
    data = prepare_data(spec.data, spec.seed)
    tracker = Tracker(store.tracking_uri, store.artifact_root)
    experiment = tracker.experiment(spec.name)
    parent, _ = open_study_run(tracker, experiment, spec.name, None, spec.as_params())
    return StudyContext(spec, data, torch.device("cpu"), tracker, experiment, parent)


def _run(ctx: StudyContext, run_id: str):  # type: ignore[no-untyped-def]
    return ctx.tracker.client.get_run(run_id)  # type: ignore[union-attr]


def test_a_complete_trial_records_the_contract(ctx: StudyContext) -> None:
    outcome = run_trial(ctx, 0, {"lr": 0.05, "batch_size": 4, "dropout": 0.1})
    assert outcome.state == "COMPLETE", outcome.fail_reason
    run = _run(ctx, outcome.run_id)
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    assert tags["mlflow.parentRunId"] == ctx.study_run_id
    assert (tags["imgcls_hpo.role"], tags["imgcls_hpo.trial_number"],
            tags["imgcls_hpo.state"]) == ("trial", "0", "COMPLETE")
    assert run.info.status == "FINISHED" and run.info.run_name == "trial-000 COMPLETE"
    # sampled values under their flag names, then fixed values and settings
    assert (params["lr"], params["batch_size"], params["dropout"]) == ("0.05", "4", "0.1")
    assert (params["momentum"], params["arch"], params["max_epochs"]) == ("0.9", "simplecnn", "2")
    history = ctx.tracker.client.get_metric_history(outcome.run_id, "val_f1")  # type: ignore[union-attr]
    assert [m.step for m in history] == [1, 2]
    for name in ("train_loss", "train_acc", "val_loss", "val_acc"):
        assert name in metrics
    assert metrics["best_val_f1"] == pytest.approx(outcome.value)
    assert metrics["best_epoch"] == outcome.best_epoch
    assert metrics["params_count"] > 0 and metrics["flops"] == 2 * metrics["macs"] > 0
    # the best epoch's weights, evaluated once on the test split, with 95% bootstrap intervals
    for name in ("acc", "bal_acc", "f1", "kappa", "log_loss", "auc", "sens", "spec"):
        point = metrics[f"test_{name}"]
        assert metrics[f"test_{name}_ci_low"] <= point <= metrics[f"test_{name}_ci_high"], name
    assert outcome.test["test_f1"] == metrics["test_f1"]
    artifacts = {a.path for a in ctx.tracker.client.list_artifacts(outcome.run_id)}  # type: ignore[union-attr]
    assert {"curves.png", "confusion_matrix_val.png", "confusion_matrix_test.png",
            "roc_test.png", "classification_report_test.txt", "classification_report_test.json",
            "predictions_test.csv"} <= artifacts
    local = Path(mlflow.artifacts.download_artifacts(
        run_id=outcome.run_id, artifact_path="predictions_test.csv",
        tracking_uri=ctx.tracker.uri))  # type: ignore[union-attr]
    rows = list(csv.DictReader(local.open()))
    test_ids = {ctx.data.catalog.ids[i] for i in ctx.data.split.indices("test")}
    assert {r["file"] for r in rows} == test_ids  # one row per test image, named by its file
    for row in rows:
        probs = {c: float(row[f"p_{c}"]) for c in ("ants", "bees")}
        assert sum(probs.values()) == pytest.approx(1, abs=1e-5)
        assert row["prediction"] == max(probs, key=probs.get)  # type: ignore[arg-type]
    report = mlflow.artifacts.load_dict(
        f"{run.info.artifact_uri}/classification_report_test.json")
    assert {"ants", "bees"} <= set(report)
    # runs:/<id>/model: the best epoch's weights and preprocessing, which predict with
    assert {"model/weights.pt", "model/preprocessing.json"} <= {
        a.path for a in ctx.tracker.client.list_artifacts(outcome.run_id, "model")}  # type: ignore[union-attr]
    _, predictor = resolve_model(ctx.tracker, f"runs:/{outcome.run_id}/model")  # type: ignore[arg-type]
    assert predictor.classes == ("ants", "bees")
    assert predictor.preprocessing.image_size == 16
    x = torch.zeros(3, 3, 16, 16)
    assert predictor.model(x).shape == (3, 2)
    assert not run.outputs.model_outputs  # no MLflow model export: promote makes that
    # every metric it logged ranks one way (promote --metric, results), but those that say
    # where a trial is or how it scales its probabilities rather than how good it is
    unranked = {"lr", "best_epoch", "epochs", "temperature"}
    assert unranked <= set(metrics)
    assert {name: metric_goal(name) for name in ("peak_memory_mb", "train_seconds", "flops",
                                                 "min_val_loss", "test_log_loss_ci_low",
                                                 "train_images_per_s", "best_val_f1")} == {
        "peak_memory_mb": "min", "train_seconds": "min", "flops": "min", "min_val_loss": "min",
        "test_log_loss_ci_low": "min", "train_images_per_s": "max", "best_val_f1": "max"}
    for name in set(metrics) - unranked:
        metric_goal(name)  # a metric with no known direction raises
    for name in unranked:
        with pytest.raises(ConfigError, match="has no better direction"):
            metric_goal(name)


def test_log_models_all_also_exports_each_complete_trial_as_an_mlflow_model(
        ctx: StudyContext) -> None:
    ctx = dataclasses.replace(ctx, spec=ctx.spec.model_copy(update={"log_models": "all"}))
    outcome = run_trial(ctx, 5, {"lr": 0.05, "batch_size": 4})
    assert outcome.state == "COMPLETE", outcome.fail_reason
    with fluent_tracking_uri(ctx.tracker.uri):  # type: ignore[union-attr]
        model = mlflow.pytorch.load_model(f"runs:/{outcome.run_id}/model")
        info = mlflow.models.get_model_info(f"runs:/{outcome.run_id}/model")
    assert model(torch.zeros(3, 3, 16, 16)).shape == (3, 2)
    assert info.metadata["imgcls"]["classes"] == ["ants", "bees"]
    assert _run(ctx, outcome.run_id).info.status == "FINISHED"
    # its weights, read from the torch.export file (no pickle), are the module's own
    logged = model_info(ctx.tracker, f"runs:/{outcome.run_id}/model")  # type: ignore[arg-type]
    weights = load_weights(ctx.tracker, logged)  # type: ignore[arg-type]
    expected = model.state_dict()
    assert weights and set(weights) == set(expected)
    for name, tensor in weights.items():
        assert torch.equal(tensor, expected[name]), name


def test_a_pruned_trial_keeps_its_metrics_but_logs_no_model(ctx: StudyContext) -> None:
    outcome = run_trial(ctx, 1, {"lr": 0.05, "batch_size": 4},
                        should_prune=lambda epoch, value: epoch == 1)
    assert (outcome.state, outcome.epochs) == ("PRUNED", 1)
    run = _run(ctx, outcome.run_id)
    assert run.data.tags["imgcls_hpo.state"] == "PRUNED"
    assert run.info.status == "FINISHED"
    assert "best_val_f1" in run.data.metrics
    assert not run.outputs.model_outputs


def test_a_failing_trial_is_recorded_with_its_reason(ctx: StudyContext) -> None:
    outcome = run_trial(ctx, 2, {"lr": 1e20, "batch_size": 4})
    assert (outcome.state, outcome.fail_reason) == ("FAIL", "diverged at epoch 1")
    run = _run(ctx, outcome.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["imgcls_hpo.state"] == "FAIL"
    assert run.data.tags["imgcls_hpo.fail_reason"] == "diverged at epoch 1"
    artifacts = [a.path for a in ctx.tracker.client.list_artifacts(outcome.run_id)]  # type: ignore[union-attr]
    assert "error.txt" in artifacts  # the traceback, for whoever debugs it


def test_an_interrupt_closes_the_run_as_killed(ctx: StudyContext) -> None:
    def interrupt(number: int, epoch: int, metrics: object) -> None:
        raise KeyboardInterrupt

    runs_before = ctx.tracker.client.search_runs([ctx.experiment_id])  # type: ignore[union-attr]
    with pytest.raises(KeyboardInterrupt):
        run_trial(ctx, 3, {"lr": 0.05, "batch_size": 4}, on_epoch=interrupt)
    runs = ctx.tracker.client.search_runs([ctx.experiment_id])  # type: ignore[union-attr]
    (killed,) = [r for r in runs if r.info.run_id not in {b.info.run_id for b in runs_before}]
    assert killed.info.status == "KILLED"
    assert killed.data.tags["imgcls_hpo.fail_reason"] == "interrupted"


def test_a_trial_records_how_fast_it_trained_and_how(ctx: StudyContext) -> None:
    outcome = run_trial(ctx, 0, {"lr": 0.05, "batch_size": 4})
    assert outcome.state == "COMPLETE", outcome.fail_reason
    client = ctx.tracker.client  # type: ignore[union-attr]
    for name in ("train_images_per_s", "data_wait_frac"):
        history = client.get_metric_history(outcome.run_id, name)
        assert [m.step for m in history] == [1, 2], name
    assert all(m.value > 0 for m in client.get_metric_history(outcome.run_id,
                                                             "train_images_per_s"))
    assert all(0 <= m.value < 1 for m in client.get_metric_history(outcome.run_id,
                                                                  "data_wait_frac"))
    run = _run(ctx, outcome.run_id)
    assert run.data.metrics["peak_memory_mb"] > 0
    params = run.data.params
    assert (params["precision"], params["channels_last"], params["compile"],
            params["images_on_device"]) == ("float32", "False", "False", "True")
