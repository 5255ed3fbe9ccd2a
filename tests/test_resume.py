"""A trial stopped in the middle goes on from its checkpoint: after SIGKILL, Ctrl-C, or a killed
worker, the next `search` finishes it in the same MLflow run, each epoch logged once, at most one
epoch trained twice, and with the metrics of a trial never stopped.

Each search runs `imgcls-hpo search` in a process of its own, whose epochs are counted (and, on
request, stalled once one has begun, so that the test can stop it there)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from hpo.config.store import Store
from hpo.search.checkpoints import Checkpoints

pytestmark = pytest.mark.slow

# `imgcls-hpo search ARGS...`, with every epoch's start and end written to $EPOCH_LOG, and the
# $STALL_AT-th epoch of the process stalled once it has begun (after touching $STALLED).
SEARCH = """\
import os, sys, time
from pathlib import Path

import torch

import imgcls.train.trainer as trainer

torch.set_num_threads(1)
log, stall = Path(os.environ["EPOCH_LOG"]), int(os.environ.get("STALL_AT", "0"))
real, calls = trainer.train_one_epoch, []


def counted(*args, **kwargs):
    calls.append(1)
    with log.open("a") as f:
        f.write(f"start {os.getpid()}\\n")
    if len(calls) == stall:
        Path(os.environ["STALLED"]).touch()
        time.sleep(600)
    result = real(*args, **kwargs)
    with log.open("a") as f:
        f.write("end\\n")
    return result


trainer.train_one_epoch = counted
from hpo.cli import main

sys.argv = ["imgcls-hpo", "search", *sys.argv[1:]]
main()
"""


def _search(tmp_path: Path, study_file: Path, store: Path, *flags: str, stall_at: int = 0
            ) -> tuple[subprocess.Popen[str], Path]:
    log, stalled = tmp_path / f"epochs-{store.name}.log", tmp_path / f"stalled-{store.name}"
    stalled.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "EPOCH_LOG": str(log),
           "STALL_AT": str(stall_at), "STALLED": str(stalled), "COLUMNS": "200"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SEARCH, str(study_file), "--store", str(store), "--trials", "1",
         "--max-epochs", "5", "--patience", "5", "--pruner", "none", *flags],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    if stall_at:
        end = time.monotonic() + 120
        while not stalled.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < end, "the stalled epoch never began"
            time.sleep(0.1)
    return proc, log


def _finish(proc: subprocess.Popen[str], timeout: float = 300) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, out


def _trial_run(store: Path) -> Any:
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="tags.imgcls_hpo.role = 'trial'")
    assert len(runs) == 1, [r.data.tags for r in runs]
    return runs[0]


def _epochs(run: Any, store: Path, metric: str = "val_loss") -> list[tuple[int, float]]:
    client = MlflowClient(f"sqlite:///{store}/mlflow.db")
    return [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric)]


@pytest.fixture(scope="module")
def never_stopped(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """The same trial, trained in one go: what a resumed one must equal."""
    from tests.conftest import TINY_STUDY, make_image_folder

    root = tmp_path_factory.mktemp("whole")
    study = root / "tiny.yaml"
    study.write_text(TINY_STUDY.format(data=make_image_folder(root / "data"), trials=1))
    proc, _ = _search(root, study, root / "store")
    code, out = _finish(proc)
    assert code == 0, out
    return _trial_run(root / "store"), root / "store"


def _assert_resumed_as_never_stopped(store: Path, log: Path,
                                     never_stopped: tuple[Any, Path]) -> None:
    run = _trial_run(store)
    whole, whole_store = never_stopped
    assert run.data.tags["imgcls_hpo.state"] == "COMPLETE"
    assert run.info.status == "FINISHED"
    assert [step for step, _ in _epochs(run, store)] == [1, 2, 3, 4, 5]  # each epoch once
    starts = log.read_text().split().count("start")
    assert starts <= 5 + 1  # at most one epoch trained twice in all
    # as if never stopped: the same curve, the same best epoch, the same test scores
    assert _epochs(run, store) == _epochs(whole, whole_store)
    for key in ("best_val_f1", "best_epoch", "min_val_loss", "test_f1", "test_log_loss"):
        assert run.data.metrics[key] == whole.data.metrics[key], key
    assert not Checkpoints(Store.resolve(store).checkpoint_dir / "tiny").path(0).exists()


def test_a_search_killed_in_epoch_3_finishes_the_trial_from_its_checkpoint(
        study_file: Path, tmp_path: Path, never_stopped: tuple[Any, Path]) -> None:
    store = tmp_path / "store"
    proc, log = _search(tmp_path, study_file, store, stall_at=3)
    os.killpg(proc.pid, signal.SIGKILL)  # no handler runs: the trial stays RUNNING
    _finish(proc)
    assert _trial_run(store).info.status == "RUNNING"
    assert Checkpoints(Store.resolve(store).checkpoint_dir / "tiny").path(0).is_file()

    again, _ = _search(tmp_path, study_file, store)
    code, out = _finish(again)
    assert code == 0, out
    assert "trial   0 resumes after epoch 2" in out
    assert "1 trials in study tiny: 1 complete" in out
    _assert_resumed_as_never_stopped(store, log, never_stopped)


def test_ctrl_c_in_epoch_3_and_the_next_search_finishes_the_trial(
        study_file: Path, tmp_path: Path, never_stopped: tuple[Any, Path]) -> None:
    store = tmp_path / "store"
    proc, log = _search(tmp_path, study_file, store, stall_at=3)
    os.kill(proc.pid, signal.SIGINT)
    code, out = _finish(proc)
    assert code == 130, out
    run = _trial_run(store)
    assert (run.info.status, run.data.tags["imgcls_hpo.fail_reason"]) == ("KILLED",
                                                                          "interrupted")
    assert run.info.run_name == "trial-000 INTERRUPTED"
    again, _ = _search(tmp_path, study_file, store)
    code, out = _finish(again)
    assert code == 0, out
    assert "trial   0 resumes after epoch 2" in out
    assert _trial_run(store).info.run_name == "trial-000 COMPLETE"
    _assert_resumed_as_never_stopped(store, log, never_stopped)


# Installed as sitecustomize in every process of the search (worker processes are spawned and
# import anew): epochs counted, and the first process to begin its $STALL_AT-th epoch stalls
# there, its pid in $STALLED.
SITECUSTOMIZE = """\
import os, time
from pathlib import Path

import torch

import imgcls.train.trainer as trainer

torch.set_num_threads(1)
real, calls = trainer.train_one_epoch, []


def counted(*args, **kwargs):
    calls.append(1)
    with open(os.environ["EPOCH_LOG"], "a") as f:
        f.write(f"start {os.getpid()}\\n")
    if len(calls) == int(os.environ["STALL_AT"]):
        try:
            fd = os.open(os.environ["STALLED"], os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass  # another worker stalls
        else:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            time.sleep(600)
    return real(*args, **kwargs)


trainer.train_one_epoch = counted
"""


def test_a_killed_worker_s_trial_is_finished_by_its_sibling_from_its_checkpoint(
        study_file: Path, tmp_path: Path, store: Store) -> None:
    import optuna
    import torch

    from hpo.config.study import load_study
    from hpo.search.backends.optuna.storage import make_storage
    from hpo.search.context import StudyContext
    from hpo.search.trial import run_trial
    from hpo.tracking.client import Tracker
    from hpo.tracking.runs import open_study_run
    from imgcls.data.prepare import prepare_data

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log, stalled = tmp_path / "epochs.log", tmp_path / "stalled"
    env = {**os.environ, "EPOCH_LOG": str(log), "STALL_AT": "3", "STALLED": str(stalled),
           "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).parents[1])])}
    proc = subprocess.Popen(
        [sys.executable, "-m", "hpo.cli.app", "search", str(study_file), "--store",
         str(store.root), "--trials", "2", "--workers", "2", "--gpus", "none",
         "--max-epochs", "5", "--patience", "5", "--pruner", "none"],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        end = time.monotonic() + 180
        while not (stalled.exists() and stalled.read_text()):
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < end, "no worker began its third epoch"
            time.sleep(0.1)
        os.kill(int(stalled.read_text()), signal.SIGKILL)  # a worker dies in its epoch 3
        code, out = _finish(proc)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert code == 0, out  # the sibling took the lost trial up: the search ended whole
    assert "resumes after epoch 2" in out
    client = MlflowClient(store.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id],
                              filter_string="tags.imgcls_hpo.role = 'trial'")
    assert len(runs) == 2 and {r.data.tags["imgcls_hpo.state"] for r in runs} == {"COMPLETE"}
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")]
        assert steps == [1, 2, 3, 4, 5]
    assert log.read_text().split().count("start") <= 2 * 5 + 1  # one epoch trained twice
    # the resumed trial ended as it would have, never stopped: the same trial trained here
    journal = optuna.load_study(study_name="tiny", storage=make_storage(store))
    (number,) = [t.number for t in journal.trials if t.user_attrs.get("lost") == 1]
    (lost,) = [r for r in runs if r.data.tags["imgcls_hpo.trial_number"] == str(number)]
    spec = load_study(str(study_file), {"max_epochs": 5, "patience": 5, "pruner": "none"})
    fresh = Store.resolve(tmp_path / "fresh")
    fresh.create()
    tracker = Tracker(fresh.tracking_uri, fresh.artifact_root)
    experiment_id = tracker.experiment("tiny")
    parent, _ = open_study_run(tracker, experiment_id, "tiny", None, {})
    ctx = StudyContext(spec, prepare_data(spec.data, spec.seed), torch.device("cpu"), tracker,
                       experiment_id, parent)
    params = {k: v for k, v in lost.data.params.items() if k in ("lr", "batch_size", "dropout")}
    whole = run_trial(ctx, number, {"lr": float(params["lr"]),
                                    "batch_size": int(params["batch_size"]),
                                    "dropout": float(params["dropout"])})
    assert [(m.step, m.value) for m in client.get_metric_history(lost.info.run_id, "val_loss")] \
        == [(s, v) for s, v in tracker.metric_history(whole.run_id or "", "val_loss")]
    assert lost.data.metrics["best_val_f1"] == whole.metrics["best_val_f1"]
    assert lost.data.metrics["test_f1"] == whole.metrics["test_f1"]
