"""Whole searches with real Optuna storage and a real MLflow store."""

import csv
import re
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from hpo.config.store import Store
from hpo.config.study import StudyError, load_study
from hpo.config.trial import TrialState
from hpo.search.checkpoints import Checkpoints
from hpo.search.events import NullObserver
from hpo.search.run import run_search
from imgcls.errors import ConfigError, DataError
from tests.conftest import InterruptAt, make_image_folder

pytestmark = pytest.mark.slow


def _runs(store: Store, study: str, role: str):  # type: ignore[no-untyped-def]
    client = MlflowClient(store.tracking_uri)
    experiment = client.get_experiment_by_name(study)
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.imgcls_hpo.role = '{role}'")


def test_search_records_the_study_and_resumes_to_the_total(study_file: Path, store: Store,
                                                           tmp_path: Path) -> None:
    result = run_search(load_study(str(study_file)), store)
    assert [t.state for t in result.trials] == ["COMPLETE", "COMPLETE"]
    (study_run,) = _runs(store, "tiny", "study")
    assert study_run.info.status == "FINISHED"
    assert study_run.data.params["space.lr"] == "0.01..0.1:log"
    assert study_run.data.params["space.batch_size"] == "4,8"
    assert study_run.data.params["objective"] == "val_f1"
    assert study_run.data.metrics["trials_complete"] == 2
    client = MlflowClient(store.tracking_uri)
    split_csv = Path(client.download_artifacts(study_run.info.run_id, "split.csv", str(tmp_path)))
    rows = list(csv.DictReader(split_csv.open()))
    assert len(rows) == 20 and {r["split"] for r in rows} == {"train", "val", "test"}
    assert store.journal_path.exists() and list(store.cache_dir.glob("*.npy"))

    # the same command with a larger --trials continues the same study
    resumed = run_search(load_study(str(study_file), {"trials": 3}), store)
    assert [t.number for t in resumed.trials] == [0, 1, 2]
    assert len(_runs(store, "tiny", "study")) == 1
    trial_runs = _runs(store, "tiny", "trial")
    assert sorted(r.data.tags["imgcls_hpo.trial_number"] for r in trial_runs) == ["0", "1", "2"]
    assert {r.data.tags["mlflow.parentRunId"] for r in trial_runs} == {study_run.info.run_id}
    # and asking for what is already there trains nothing more
    again = run_search(load_study(str(study_file), {"trials": 3}), store)
    assert len(again.trials) == 3


def test_a_failing_trial_does_not_stop_the_study(study_file: Path, store: Store) -> None:
    spec = load_study(str(study_file), {"trials": 4, "space.lr": "0.05,1e20"})
    result = run_search(spec, store)
    states = [t.state for t in result.trials]
    assert len(states) == 4 and "FAIL" in states and "COMPLETE" in states
    failed = [r for r in _runs(store, "tiny", "trial") if r.data.tags["imgcls_hpo.state"] == "FAIL"]
    assert failed and all(re.fullmatch(r"diverged at epoch [12]", r.data.tags[
        "imgcls_hpo.fail_reason"]) for r in failed)  # the reason, in the run
    assert result.best is not None and result.best.params["lr"] == 0.05


def test_an_interrupted_trial_goes_on_in_the_next_search_and_counts_once(
        study_file: Path, store: Store) -> None:
    spec = load_study(str(study_file))
    with pytest.raises(KeyboardInterrupt):
        run_search(spec, store, InterruptAt(trial=1))  # in trial 1's first epoch
    (study_run,) = _runs(store, "tiny", "study")
    assert study_run.info.status == "KILLED"
    (killed,) = [r for r in _runs(store, "tiny", "trial") if r.info.status == "KILLED"]
    assert killed.data.tags["imgcls_hpo.fail_reason"] == "interrupted"

    result = run_search(spec, store)
    # trial 1 went on from its checkpoint (epoch 1), in its own run: 2 trials in all
    assert [(t.number, t.state) for t in result.trials] == [
        (0, TrialState.COMPLETE), (1, TrialState.COMPLETE)]
    assert result.trials[1].run_id == killed.info.run_id
    (study_run,) = _runs(store, "tiny", "study")
    assert study_run.info.status == "FINISHED"
    statuses = sorted(r.info.status for r in _runs(store, "tiny", "trial"))
    assert statuses == ["FINISHED", "FINISHED"]
    history = MlflowClient(store.tracking_uri).get_metric_history(killed.info.run_id, "val_f1")
    assert [m.step for m in history] == [1, 2]


def test_a_stored_study_keeps_its_objective(study_file: Path, store: Store) -> None:
    run_search(load_study(str(study_file), {"trials": 1}), store)
    with pytest.raises(StudyError, match="optimizes val_f1, not val_loss"):
        run_search(load_study(str(study_file), {"trials": 1, "objective": "val_loss"}), store)


@pytest.mark.parametrize("storage", ["sqlite:///{tmp}/optuna.db", "{tmp}/shared/tiny.journal"])
def test_the_optuna_study_can_live_outside_the_store(study_file: Path, store: Store,
                                                     tmp_path: Path, storage: str) -> None:
    target = storage.format(tmp=tmp_path)
    elsewhere = Store(store.root, store.tracking_uri, target)
    spec = load_study(str(study_file), {"trials": 1})
    assert len(run_search(spec, elsewhere).trials) == 1
    assert not store.journal_path.exists()
    assert (tmp_path / ("optuna.db" if "sqlite" in target else "shared/tiny.journal")).exists()
    # optuna-dashboard, opened on that storage, labels the objective by its name
    import optuna

    from hpo.search.backends.optuna.storage import make_storage

    assert optuna.load_study(study_name="tiny", storage=make_storage(elsewhere)).metric_names \
        == ["val_f1"]
    # and it resumes from there
    assert len(run_search(load_study(str(study_file), {"trials": 2}), elsewhere).trials) == 2


def test_unusable_images_stop_the_search_or_are_left_out_and_listed(
        study_file: Path, store: Store, image_folder: Path, tmp_path: Path) -> None:
    for name in ("broken.jpg", "empty.png", "text.jpg", "zero.jpg"):
        (image_folder / "ants" / name).write_bytes(b"not a jpeg" if name != "empty.png" else b"")
    with pytest.raises(DataError, match=r"4 of 24 files are not usable images: "
                                        r"ants/broken.jpg .*; and 1 more \(all listed in "
                                        r".*unusable_images.txt\).*--skip-bad-images"):
        run_search(load_study(str(study_file)), store)
    assert not list(store.root.glob("*.journal"))  # bad input: no study was started
    # the message shows three; the file in the store lists every one, with its reason
    listed = (store.cache_dir / "unusable_images.txt").read_text().splitlines()
    assert [line.split(" (")[0] for line in listed] == [
        "ants/broken.jpg", "ants/empty.png", "ants/text.jpg", "ants/zero.jpg"]
    for name in ("empty.png", "text.jpg", "zero.jpg"):
        (image_folder / "ants" / name).unlink()

    spec = load_study(str(study_file), {"trials": 1, "data.skip_bad_images": True})
    result = run_search(spec, store)
    assert [t.state for t in result.trials] == ["COMPLETE"]
    (study_run,) = _runs(store, "tiny", "study")
    assert study_run.data.tags["imgcls_hpo.skipped_images"] == "1"
    client = MlflowClient(store.tracking_uri)
    listed = Path(client.download_artifacts(study_run.info.run_id, "skipped_images.txt",
                                            str(tmp_path))).read_text()
    assert listed.startswith("ants/broken.jpg (")
    split_csv = Path(client.download_artifacts(study_run.info.run_id, "split.csv", str(tmp_path)))
    assert "ants/broken.jpg" not in split_csv.read_text()  # never trained, validated or tested


def test_a_binary_only_objective_on_more_classes_is_refused(
        study_file: Path, store: Store, tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "three", classes=("a", "b", "c"), per_class=6)
    spec = load_study(str(study_file), {"data.path": str(data), "objective": "val_sens"})
    with pytest.raises(ConfigError, match="val_sens' needs two classes but the data has 3"):
        run_search(spec, store)


def test_every_new_hyperparameter_reaches_training(study_file: Path, store: Store) -> None:
    """One study that searches schedules, regularizers and every augmentation: trials complete
    and each run records the values it trained with."""
    overrides = {
        "trials": 2, "space.scheduler": "cosine,onecycle", "space.warmup_epochs": "0.5",
        "space.nesterov": "true", "space.l2": "0..1e-3", "space.class_weighted": "true,false",
        "space.vflip": "0.5", "space.rotation": "0..30", "space.crop_scale": "0.5..1",
        "space.brightness": "0.2", "space.contrast": "0.2", "space.sharpness": "2",
        "space.sharpness_p": "0.5", "space.optimizer": "sgd", "data.split": "sorted",
    }
    result = run_search(load_study(str(study_file), overrides), store)
    assert [t.state for t in result.trials] == ["COMPLETE", "COMPLETE"], \
        [t.fail_reason for t in result.trials]
    for run in _runs(store, "tiny", "trial"):
        params = run.data.params
        assert params["scheduler"] in ("cosine", "onecycle") and params["nesterov"] == "True"
        assert 0 <= float(params["rotation"]) <= 30 and params["sharpness"] == "2.0"
        assert "test_f1_ci_low" in run.data.metrics


def test_the_digits_study_runs_end_to_end(store: Store) -> None:
    """The shipped default, as `make demo` runs it, cut to its two enqueued baselines, one
    architecture each, for three epochs."""
    spec = load_study("digits", {"trials": 2, "max_epochs": 3})
    result = run_search(spec, store)
    assert [t.params["arch"] for t in result.trials] == ["simplecnn", "resnet18"]
    assert result.best is not None
    assert result.best.value > 0.5  # three epochs on digits are well above chance (0.1)
    assert set(result.best.test) >= {"test_f1", "test_f1_ci_low", "test_f1_ci_high"}
    assert "test_sens" not in result.best.test  # ten classes: no binary-only metric


def test_a_pareto_search_tags_the_trials_no_other_trial_beats(study_file: Path,
                                                               store: Store) -> None:
    spec = load_study(str(study_file), {"trials": 3, "objective": ["val_f1", "params_count:min"],
                                        "sampler": "nsga2", "space.dropout": "0.0,0.3"})
    result = run_search(spec, store)
    assert all(t.values is not None and len(t.values) == 2 for t in result.trials)
    # one architecture: every trial costs the same, so the front is the best val_f1 (ties kept)
    best = max(t.values[0] for t in result.trials)  # type: ignore[index]
    expected = {str(t.number) for t in result.trials if t.values[0] == best}  # type: ignore[index]
    tags = {r.data.tags["imgcls_hpo.trial_number"]: r.data.tags["imgcls_hpo.pareto"]
            for r in _runs(store, "tiny", "trial")}
    assert {n for n, pareto in tags.items() if pareto == "true"} == expected
    assert set(tags) == {"0", "1", "2"}
    (study_run,) = _runs(store, "tiny", "study")
    assert study_run.data.tags["imgcls_hpo.pareto_trials"] == ",".join(sorted(expected))


class Records(NullObserver):
    def __init__(self, interrupt_at: tuple[int, int] | None = None) -> None:
        self.interrupt_at = interrupt_at  # (trial, epoch) to press Ctrl-C after
        self.resumed: list[tuple[int, int, str | None]] = []
        self.epochs: list[tuple[int, int]] = []

    def trial_resumed(self, number: int, epochs: int, why_not: str | None) -> None:
        self.resumed.append((number, epochs, why_not))

    def epoch_finished(self, number: int, epoch: int, metrics: object) -> None:
        self.epochs.append((number, epoch))
        if (number, epoch) == self.interrupt_at:
            raise KeyboardInterrupt


def test_a_trial_interrupted_after_its_last_epoch_completes_in_the_next_search(
        study_file: Path, store: Store) -> None:
    # the case: Ctrl-C once a trial has trained all its epochs used to throw it away
    spec = load_study(str(study_file), {"trials": 1})
    with pytest.raises(KeyboardInterrupt):
        run_search(spec, store, Records(interrupt_at=(0, 2)))
    again = Records()
    result = run_search(spec, store, again)
    assert [t.state for t in result.trials] == [TrialState.COMPLETE]
    assert again.resumed == [(0, 2, None)] and again.epochs == []  # nothing trained again
    assert result.best is not None and result.best.epochs == 2


def test_a_trial_whose_checkpoint_is_unreadable_starts_over_in_a_new_run(
        study_file: Path, store: Store) -> None:
    spec = load_study(str(study_file), {"trials": 1})
    with pytest.raises(KeyboardInterrupt):
        run_search(spec, store, Records(interrupt_at=(0, 1)))
    (first,) = _runs(store, "tiny", "trial")
    checkpoint = Checkpoints(store.checkpoint_dir / "tiny").path(0)
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])  # truncated
    again = Records()
    result = run_search(spec, store, again)
    ((number, epochs, why),) = again.resumed
    assert (number, epochs) == (0, 0) and "cannot be read" in str(why)
    assert again.epochs == [(0, 1), (0, 2)]  # from epoch 1
    (trial,) = result.trials
    assert trial.state == TrialState.COMPLETE and trial.run_id != first.info.run_id
    replaced = MlflowClient(store.tracking_uri).get_run(first.info.run_id)
    assert replaced.data.tags["imgcls_hpo.superseded_by"] == trial.run_id
    assert not checkpoint.exists()


def test_auto_checkpoints_keep_their_writing_under_a_hundredth_of_the_training() -> None:
    from hpo.search.checkpoints import AUTO_SHARE, CheckpointPolicy, WriteSpeed

    speed = WriteSpeed()
    policy = CheckpointPolicy("auto", speed)
    nbytes = 100_000_000
    size, half = (lambda: nbytes), (lambda: nbytes // 2)
    assert policy.due(1, trained=3.0, last=False, size=size)  # the first: it measures
    with policy.writing({"w": torch.zeros(nbytes // 4)}, trained=3.0):
        time.sleep(0.05)
    cost = speed.cost(nbytes)
    assert cost is not None and cost >= 0.05
    # due once the training since the last checkpoint pays for the write a hundred times over
    assert not policy.due(2, trained=3.0 + 0.9 * cost / AUTO_SHARE, last=False, size=size)
    assert policy.due(3, trained=3.0 + 1.1 * cost / AUTO_SHARE, last=False, size=size)
    assert policy.due(3, trained=3.0 + 0.6 * cost / AUTO_SHARE, last=False, size=half)
    assert not policy.due(4, trained=1e9, last=True, size=size)  # the trial ends now
    # every N epochs, whatever a write costs; 0: never
    every3 = CheckpointPolicy(3, speed)
    assert [e for e in range(1, 8) if every3.due(e, 0.0, e == 7, size)] == [3, 6]
    assert not any(CheckpointPolicy(0, WriteSpeed()).due(e, 9e9, False, size) for e in range(1, 5))


@pytest.mark.slow
@pytest.mark.parametrize("existing", [False, True], ids=["fresh store", "existing store"])
def test_searches_started_together_share_one_database_and_one_study_run(
        existing: bool, study_file: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    store = tmp_path / "together"
    script = str(Path(sys.executable).parent / "imgcls-hpo")
    if existing:  # another study made the store and its database before
        other = tmp_path / "other.yaml"
        other.write_text(study_file.read_text().replace("trials: 2", "trials: 1"))
        subprocess.run([script, "search", str(other), "--store", str(store), "--max-epochs",
                        "1"], capture_output=True, check=True, timeout=300)
    command = [script, "search", str(study_file), "--store", str(store), "--trials", "4",
               "--max-epochs", "1"]
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    try:
        outs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outs
    study_runs = _runs(Store.resolve(store), "tiny", "study")
    assert len(study_runs) == 1  # both processes recorded into the same study run
    trials = _runs(Store.resolve(store), "tiny", "trial")
    assert sorted(int(r.data.tags["imgcls_hpo.trial_number"]) for r in trials) == [0, 1, 2, 3]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {study_runs[0].info.run_id}


@pytest.mark.slow
def test_a_store_whose_mlflow_database_is_gone_is_refused_not_silently_split(
        study_file: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "kept"
    command = [str(Path(sys.executable).parent / "imgcls-hpo"), "search", str(study_file),
               "--store", str(root), "--max-epochs", "1", "--trials"]
    subprocess.run([*command, "1"], capture_output=True, check=True, timeout=300)
    (root / "mlflow.db").unlink()  # the Optuna journal stays
    done = subprocess.run([*command, "2"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    # the store's manifest says so before any image is read
    assert re.fullmatch(r"error: the store .*kept holds studies tiny but its MLflow database "
                        r"mlflow.db is missing while their trials are still here: restore it "
                        r"from a backup, or search into a new --store", line)
    assert not list(root.glob("checkpoints/tiny/*"))  # nothing was started


def test_a_store_whose_trial_journal_is_gone_is_refused_not_started_again(
        study_file: Path, store: Store) -> None:
    run_search(load_study(str(study_file), {"trials": 1, "max_epochs": 1}), store)
    store.journal_path.unlink()  # mlflow.db stays
    with pytest.raises(ConfigError, match=r"study 'tiny': the MLflow store sqlite:.* holds 1 "
                                          r"trial run\(s\) of it, but its trial storage "
                                          r"\(journal file .*optuna.journal\) has none"):
        run_search(load_study(str(study_file), {"trials": 2, "max_epochs": 1}), store)
    assert len(_runs(store, "tiny", "study")) == 1  # no second study run beside the first
