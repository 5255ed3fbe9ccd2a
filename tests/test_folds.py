"""Cross-validation (`folds: K`): the folds of the train and val images, a trial trained on all
of them at once and judged by their mean, its model refit on every image for the test split."""

from __future__ import annotations

import csv
import importlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from typer.testing import CliRunner

from hpo.cli import app
from hpo.config.study import StudyError, load_study
from hpo.config.trial import TrialState
from hpo.search.context import StudyContext
from hpo.search.trial import TrialRunner, run_trial
from imgcls.data.config import DataConfig
from imgcls.data.prepare import prepare_data
from imgcls.data.sources import Catalog
from imgcls.data.split import TEST, Split, fold_splits, make_split
from imgcls.errors import DataError
from imgcls.models.build import build_model
from imgcls.train import FoldTrainer, TrainConfig, Trainer, seed_everything

runner = CliRunner()


def _catalog(labels: list[int], groups: list[str] | None = None) -> Catalog:
    return Catalog("test", tuple(f"{i}.png" for i in range(len(labels))),
                   np.asarray(labels, dtype=np.int64), ("a", "b"), "fingerprint",
                   groups=tuple(groups) if groups else None)


def _val_folds(folds: list[Split]) -> np.ndarray:
    """The fold each image validates in (-1: none, the test images)."""
    which = np.full(len(folds[0].assignment), -1)
    for i, fold in enumerate(folds):
        which[fold.indices("val")] = i
    return which


def test_the_folds_partition_train_and_val_per_class_and_leave_test_alone() -> None:
    catalog = _catalog([0] * 30 + [1] * 12)
    split = make_split(catalog, "stratified", 0.2, 0.2, seed=0)
    folds = fold_splits(split, catalog.labels, catalog.classes, 4, seed=0)
    which = _val_folds(folds)
    pool = np.flatnonzero(split.assignment != TEST)
    assert (which[pool] >= 0).all() and (which[split.indices("test")] == -1).all()
    for fold in folds:  # each image validates once, trains in the other K-1
        assert (fold.assignment[split.indices("test")] == TEST).all()
        assert sorted([*fold.indices("train"), *fold.indices("val")]) == pool.tolist()
        per_class = Counter(catalog.labels[fold.indices("val")].tolist())
        assert set(per_class) == {0, 1}
    # every class dealt evenly: fold sizes of one class differ by at most one image
    for label in (0, 1):
        sizes = Counter(which[pool][catalog.labels[pool] == label].tolist())
        assert max(sizes.values()) - min(sizes.values()) <= 1
    again = fold_splits(split, catalog.labels, catalog.classes, 4, seed=0)
    other = fold_splits(split, catalog.labels, catalog.classes, 4, seed=1)
    assert (_val_folds(again) == which).all() and (_val_folds(other) != which).any()


def test_grouped_folds_keep_each_group_in_one_fold() -> None:
    rng = np.random.default_rng(3)
    groups = [f"patient{int(g)}" for g in rng.integers(0, 24, 120)]
    labels = [int(g[len("patient"):]) % 2 for g in groups]  # a patient's images share a class
    catalog = _catalog(labels, groups)
    split = make_split(catalog, "group", 0.2, 0.2, seed=0)
    folds = fold_splits(split, catalog.labels, catalog.classes, 3, seed=0, grouped=True)
    which = _val_folds(folds)
    folds_of = {}
    for i, group in enumerate(groups):
        if which[i] >= 0:
            folds_of.setdefault(group, set()).add(int(which[i]))
    assert all(len(f) == 1 for f in folds_of.values())
    assert all(set(catalog.labels[f.indices("val")].tolist()) == {0, 1} for f in folds)


def test_more_folds_than_a_class_can_validate_is_one_error_naming_it() -> None:
    catalog = _catalog([0] * 30 + [1] * 4)
    split = make_split(catalog, "stratified", 0.0, 0.25, seed=0)  # b keeps 3 for train/val
    with pytest.raises(DataError, match="class 'b' has 3 train/val image"):
        fold_splits(split, catalog.labels, catalog.classes, 4, seed=0)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"folds": 1}, "folds 1 is not cross-validation"),
    ({"folds": 3, "backend": "ray", "pruner": "pbt"}, "do not go together"),
])
def test_settings_that_cannot_cross_validate_are_refused(overrides, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(StudyError, match=message):
        load_study("digits", overrides)


# -- the fold trainer --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():  # type: ignore[no-untyped-def]
    return prepare_data(DataConfig(source="digits", image_size=8, channels=1), seed=0)


CONFIG = TrainConfig(optimizer="adam", lr=0.01, scheduler="cosine", max_epochs=4, patience=2)


def _fold_trainer(digits, refits: list[Trainer] | None = None) -> FoldTrainer:  # type: ignore[no-untyped-def]
    import dataclasses

    seed_everything(0)
    folds = fold_splits(digits.split, digits.catalog.labels, digits.classes, 3, seed=0)
    members = []
    for fold in folds:
        data = dataclasses.replace(digits, split=fold)
        members.append(Trainer(build_model("simplecnn", 10, 1, dropout=0.2),
                               data.batches("train", 64, seed=0), data.batches("val", 256),
                               CONFIG, 10, select=False))

    def refit() -> Trainer:
        seed_everything(0)
        every = dataclasses.replace(digits, split=digits.split.pooled("train"))
        trainer = Trainer(build_model("simplecnn", 10, 1, dropout=0.2),
                          every.batches("train", 64, seed=0), None, CONFIG, 10)
        if refits is not None:
            refits.append(trainer)
        return trainer

    return FoldTrainer(members, [f.indices("val") for f in folds], CONFIG, refit)


def test_an_epoch_is_the_folds_mean_with_their_deviation_and_the_best_is_out_of_fold(
        digits) -> None:  # type: ignore[no-untyped-def]
    trainer = _fold_trainer(digits)
    while not trainer.done:
        metrics = trainer.step()
        fold_f1 = [m.history[-1]["val_f1"] for m in trainer.members]
        assert metrics["val_f1"] == pytest.approx(np.mean(fold_f1))
        assert metrics["val_f1_std"] == pytest.approx(np.std(fold_f1))
        assert "train_loss_std" not in metrics
    best = max(trainer.history, key=lambda h: h["val_f1"])
    assert trainer.best_epoch == best["epoch"]
    oof = trainer.best_evaluation
    pool = np.flatnonzero(digits.split.assignment != TEST)
    assert oof is not None and len(oof.y_true) == len(pool)
    np.testing.assert_array_equal(oof.y_true, digits.catalog.labels[pool])  # the data's order
    assert np.allclose(oof.probs.sum(1), 1)


def test_the_model_is_refit_on_train_and_val_for_the_best_epochs_and_a_stopped_one_is_not(
        digits) -> None:  # type: ignore[no-untyped-def]
    refits: list[Trainer] = []
    trainer = _fold_trainer(digits, refits)
    for _ in range(2):
        trainer.step()
    trainer.best_epoch = 2  # whatever the folds chose
    trainer.stop_reason = "early_stopping"
    result = trainer.finish()
    (refit,) = refits
    pool = np.flatnonzero(digits.split.assignment != TEST)
    assert len(refit.train.labels) == len(pool) and refit.val is None
    assert refit.epoch == 2 == result.best_epoch and trainer.model is refit.model
    assert trainer.seconds > sum(m.seconds for m in trainer.members)

    pruned = _fold_trainer(digits, refits)
    pruned.step()
    pruned.stop("pruned at epoch 1")
    assert pruned.finish().best_epoch == 1 and pruned.model is None and len(refits) == 1


def test_a_fold_trainer_resumed_from_its_state_goes_on_as_if_never_stopped(
        digits, tmp_path) -> None:  # type: ignore[no-untyped-def]
    whole = _fold_trainer(digits)
    while not whole.done:
        whole.step()
    stopped = _fold_trainer(digits)
    stopped.step()
    torch.save(stopped.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    seed_everything(99)
    resumed = _fold_trainer(digits)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    while not resumed.done:
        resumed.step()
    assert resumed.history == [{**h, "train_images_per_s": r["train_images_per_s"],
                                "data_wait_frac": r["data_wait_frac"]}
                               for h, r in zip(whole.history, resumed.history, strict=True)]
    assert (resumed.best_epoch, resumed.stop_reason) == (whole.best_epoch, whole.stop_reason)
    np.testing.assert_array_equal(resumed.best_evaluation.probs, whole.best_evaluation.probs)
    a, b = whole.finish(), resumed.finish()
    assert a.best_metrics["val_f1"] == b.best_metrics["val_f1"]
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


# -- a cross-validated search --------------------------------------------------------------------


def test_a_pruner_sees_the_fold_mean_curve_and_a_pruned_trial_is_not_refit(digits) -> None:  # type: ignore[no-untyped-def]
    spec = load_study("digits", {"folds": 3, "max_epochs": 3, "patience": None})
    ctx = StudyContext(spec, digits, torch.device("cpu"))
    seen: list[tuple[int, float]] = []
    curve: list[float] = []

    def observe(number: int, epoch: int, metrics) -> None:  # type: ignore[no-untyped-def]
        curve.append(metrics["val_f1"])

    outcome = run_trial(ctx, 0, {"lr": 0.05, "arch": "simplecnn"},
                        should_prune=lambda epoch, value: seen.append((epoch, value)) or
                        epoch == 2, on_epoch=observe)
    assert outcome.state == TrialState.PRUNED and outcome.epochs == 2
    assert [v for _, v in seen] == curve and len(curve) == 2
    assert outcome.value == max(curve)
    assert "best_val_f1_std" in outcome.metrics
    assert not any(k.startswith("test_") for k in outcome.metrics)  # no refit, no test


def test_an_interrupted_cross_validated_trial_goes_on_from_its_checkpoint(
        digits, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from hpo.search.checkpoints import Checkpoints

    spec = load_study("digits", {"folds": 3, "max_epochs": 3, "checkpoint_every": 1})
    sampled = {"lr": 0.05, "arch": "simplecnn"}
    whole = run_trial(StudyContext(spec, digits, torch.device("cpu")), 0, sampled)
    ctx = StudyContext(spec, digits, torch.device("cpu"), checkpoints=Checkpoints(tmp_path))
    real, steps = FoldTrainer.step, []

    def interrupted_at_the_second(self):  # type: ignore[no-untyped-def]
        steps.append(1)
        if len(steps) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(FoldTrainer, "step", interrupted_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        run_trial(ctx, 0, sampled)
    checkpoint, _ = ctx.checkpoints.load(0)
    for other in (0, 2):  # a checkpoint of 3 folds is not one of 2, nor of one split
        spec_other = load_study("digits", {"folds": other, "max_epochs": 3})
        runner = TrialRunner(StudyContext(spec_other, digits, torch.device("cpu")), 0, sampled)
        assert runner.begin(checkpoint) == "its checkpoint was written for another folds"
    resumes: list[tuple[int, int, str | None]] = []
    again = run_trial(ctx, 0, sampled, resumed=True,
                      on_resume=lambda *args: resumes.append(args))
    assert resumes == [(0, 1, None)]  # the folds' first epoch, from the checkpoint
    assert again.state == whole.state == TrialState.COMPLETE
    assert (again.value, again.best_epoch) == (whole.value, whole.best_epoch)
    assert again.metrics["test_f1"] == whole.metrics["test_f1"]


def test_search_with_folds_logs_fold_means_and_deviations_and_tests_the_refit_model(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cli_app = importlib.import_module("hpo.cli.app")  # the module (hpo.cli.app is the Typer)

    store = tmp_path / "store"
    done = runner.invoke(app, ["search", "digits", "--folds", "3", "--trials", "2",
                               "--max-epochs", "2", "--pruner", "none", "--store", str(store)])
    assert done.exit_code == 0, done.output
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name("digits")
    trials = [r for r in client.search_runs([experiment.experiment_id])
              if r.data.tags.get("mlflow.parentRunId")]
    assert len(trials) == 2
    data = prepare_data(load_study("digits").data, 0)
    pool = data.split.indices("train").size + data.split.indices("val").size
    for run in trials:
        assert run.data.params["folds"] == "3"
        history = client.get_metric_history(run.info.run_id, "val_f1_std")
        assert [m.step for m in history] == [1, 2] and all(m.value >= 0 for m in history)
        metrics = run.data.metrics
        assert metrics["best_val_f1_std"] >= 0 and 0 < metrics["test_f1"] <= 1
        assert metrics["train_seconds"] > 0
        folder = Path(client.download_artifacts(run.info.run_id, "",
                                                str(tmp_path / run.info.run_id)))
        with open(folder / "predictions_val.csv") as f:  # out of fold: every train/val image
            rows = list(csv.DictReader(f))
        assert len(rows) == pool
        with open(folder / "predictions_test.csv") as f:
            assert len(list(csv.DictReader(f))) == data.split.indices("test").size
    monkeypatch.setattr(cli_app.console, "width", 300)  # the whole table, on one line a row
    shown = runner.invoke(app, ["results", "digits", "--store", str(store)])
    assert shown.exit_code == 0, shown.output
    best = max(trials, key=lambda r: r.data.metrics["best_val_f1"]).data.metrics
    assert f"{best['best_val_f1']:.4f} ± {best['best_val_f1_std']:.3f}" in shown.output
    # the refit model is promoted and predicts like any trial's
    for command in (["promote", "digits"], ["samples", "digits", "--count", "10", "--out",
                                            str(tmp_path / "samples")],
                    ["predict", "digits", str(tmp_path / "samples"), "--out",
                     str(tmp_path / "preds.csv")]):
        done = runner.invoke(app, [*command, "--store", str(store)])
        assert done.exit_code == 0, done.output
    with open(tmp_path / "preds.csv") as f:
        predicted = list(csv.DictReader(f))
    assert len(predicted) == 10
    right = sum(row["prediction"] == Path(row["file"]).name.split("_")[0] for row in predicted)
    assert right >= 5  # two epochs of the best trial: most digits right
