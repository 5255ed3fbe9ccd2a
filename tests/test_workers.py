"""Trials in worker processes: exact counts, lost workers, timeout, enqueued configurations.

The fast tests replace the training with a stub (`fake_trials`) to check the loop's rules on a
real Optuna journal; the slow ones train for real, in worker processes, and kill them."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from mlflow import MlflowClient
from optuna.trial import TrialState

from hpo.config.space import Scalar
from hpo.config.store import Store
from hpo.config.study import load_study
from hpo.config.trial import TrialOutcome
from hpo.config.trial import TrialState as State
from hpo.search.backends.optuna import loop, recovery, workers
from hpo.search.backends.optuna import storage as optuna_storage
from hpo.search.backends.optuna.backend import OptunaBackend, OptunaStudy
from hpo.search.backends.optuna.recovery import pause_trial
from hpo.search.backends.optuna.storage import make_storage
from hpo.search.context import StudyContext
from hpo.search.devices import plan_slots
from hpo.search.events import NullObserver
from hpo.search.run import run_search
from hpo.tracking.client import Tracker
from hpo.tracking.runs import open_study_run, start_trial

HERE = socket.gethostname()


class Recorder(NullObserver):
    """An observer that keeps every event."""

    def __init__(self) -> None:
        self.started: list[int] = []
        self.resumed: list[tuple[int, int, str | None]] = []
        self.epochs: list[tuple[int, int]] = []
        self.finished: list[TrialOutcome] = []

    def study_started(self, *args: Any) -> None:
        pass

    def trial_started(self, number: int, params: Mapping[str, Scalar]) -> None:
        self.started.append(number)

    def trial_resumed(self, number: int, epochs: int, why_not: str | None) -> None:
        self.resumed.append((number, epochs, why_not))

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        self.epochs.append((number, epoch))

    def trial_finished(self, outcome: TrialOutcome) -> None:
        self.finished.append(outcome)


# -- the loop's rules, with training stubbed out ------------------------------------------------

@pytest.fixture
def fake_trials(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace training with an instant COMPLETE trial (value 0.5); returns the calls made."""
    calls: list[dict[str, Any]] = []

    def fake_run_trial(ctx: StudyContext, number: int, sampled: Mapping[str, Scalar],
                       should_prune: Any = None, on_epoch: Any = None,
                       placement: Mapping[str, str] | None = None, *, resumed: bool = False,
                       **callbacks: Any) -> TrialOutcome:
        calls.append({"number": number, "params": dict(sampled), "placement": placement,
                      "resumed": resumed})
        return TrialOutcome(number, State.COMPLETE, dict(sampled), value=0.5, epochs=1,
                            best_epoch=1)

    monkeypatch.setattr(loop, "run_trial", fake_run_trial)
    return calls


def _open(study_file: Path, store: Store, **overrides: Any) -> tuple[OptunaStudy, StudyContext]:
    spec = load_study(str(study_file), {"gpus": "none", **overrides})
    store.create()
    study = OptunaBackend().open(spec, store)
    # the stubbed trials need no data and no tracking
    return study, StudyContext(spec, None, torch.device("cpu"))  # type: ignore[arg-type]


def _optimize(study: OptunaStudy, ctx: StudyContext, observer: Any = None) -> None:
    study.optimize(ctx, observer or Recorder())


def _ask(study: OptunaStudy, **attrs: Any) -> optuna.Trial:
    """A RUNNING trial as a worker leaves it, with the given user attrs."""
    with warnings.catch_warnings():  # an RDB storage's heartbeat, recorded by hand here
        warnings.filterwarnings("ignore", message="Heartbeat of storage")
        trial = study.study.ask(study.spec.space.to_optuna())
    for key, value in attrs.items():
        trial.set_user_attr(key, value)
    return trial


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()  # ended and reaped: nothing runs under this pid now
    return proc.pid


def test_a_study_runs_exactly_its_trials_here_with_placement(
        study_file: Path, store: Store, fake_trials: list[dict[str, Any]]) -> None:
    study, ctx = _open(study_file, store, trials=3)
    observer = Recorder()
    _optimize(study, ctx, observer)
    assert [(t.number, t.state) for t in study.trials()] == [
        (0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    assert observer.started == [0, 1, 2] and [o.number for o in observer.finished] == [0, 1, 2]
    assert fake_trials[0]["placement"] == {"imgcls_hpo.device": "cpu",  # which machine, too
                                           "imgcls_hpo.worker": f"{HERE}/cpu/worker0"}
    attrs = study.study.trials[0].user_attrs
    assert (attrs["host"], attrs["pid"], attrs["worker"]) == (HERE, os.getpid(), "cpu/worker0")

    resumed, ctx = _open(study_file, store, trials=5)
    _optimize(resumed, ctx)
    assert len(fake_trials) == 5 and len(resumed.trials()) == 5


def test_interrupted_and_lost_trials_are_taken_up_first_and_running_ones_are_counted(
        study_file: Path, store: Store, fake_trials: list[dict[str, Any]]) -> None:
    study, ctx = _open(study_file, store, trials=5)
    done = _ask(study)
    study.study.tell(done, 0.5)  # trial 0
    failed = _ask(study, fail_reason="diverged at epoch 1")
    study.study.tell(failed, state=TrialState.FAIL)  # trial 1: it counts
    paused = _ask(study)
    pause_trial(study.study, paused._trial_id, State.INTERRUPTED)  # trial 2: Ctrl-C
    lost = _ask(study, host=HERE, pid=_dead_pid())  # trial 3: its worker died
    _ask(study, host="another-host", pid=1)  # trial 4: running elsewhere, takes a place
    assert [(t.number, t.state) for t in study.trials()] == [
        (0, State.COMPLETE), (1, State.FAILED), (2, State.INTERRUPTED), (3, State.RUNNING),
        (4, State.RUNNING)]
    _optimize(study, ctx)
    # 2 and 3 go on (same numbers, same parameters), then nothing new: 0, 1, 2, 3 and 4 make 5
    assert [(c["number"], c["resumed"]) for c in fake_trials] == [(2, True), (3, True)]
    assert fake_trials[1]["params"] == lost.params
    states = [t.state for t in study.trials()]
    assert states == [State.COMPLETE, State.FAILED, State.COMPLETE, State.COMPLETE,
                      State.RUNNING]


def test_a_trial_whose_worker_dies_twice_is_left_to_the_user(
        study_file: Path, store: Store, fake_trials: list[dict[str, Any]]) -> None:
    study, ctx = _open(study_file, store, trials=2)
    twice = _ask(study, host=HERE, pid=_dead_pid(), worker="cpu/worker1", lost=1)
    alive = _ask(study, host=HERE, pid=os.getpid())
    _optimize(study, ctx)
    trials = {t.number: t for t in study.trials()}
    assert (trials[twice.number].state, trials[twice.number].fail_reason) == (
        State.LOST, "worker lost")
    assert trials[alive.number].state == State.RUNNING  # its worker lives: left alone, counted
    # the lost trial does not count: a new one makes up for it
    assert [(c["number"], c["resumed"]) for c in fake_trials] == [(2, False)]


def test_enqueued_configurations_run_first_and_once_per_study(
        study_file: Path, store: Store, fake_trials: list[dict[str, Any]]) -> None:
    configs = [{"lr": 0.05, "batch_size": 8}, {"lr": 0.02, "batch_size": 4, "dropout": 0.1}]
    study, ctx = _open(study_file, store, trials=1, enqueue=configs)
    _optimize(study, ctx)
    assert len(fake_trials) == 1 and fake_trials[0]["params"]["lr"] == 0.05
    assert fake_trials[0]["params"]["batch_size"] == 8
    assert len(study.trials()) == 1  # the second waits: not a trial of the study yet

    resumed, ctx = _open(study_file, store, trials=3, enqueue=configs)
    _optimize(resumed, ctx)
    assert fake_trials[1]["params"] == {"lr": 0.02, "batch_size": 4, "dropout": 0.1}
    assert fake_trials[2]["params"]["lr"] not in (0.05, 0.02)  # sampled, not enqueued again
    fixed = [t.system_attrs.get("fixed_params") for t in resumed.study.trials]
    assert sum(f is not None for f in fixed) == 2


def test_ctrl_c_as_a_trial_opens_its_run_leaves_the_run_killed(
        study_file: Path, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted_while_opening(ctx: StudyContext, number: int, *args: Any,
                                  **kwargs: Any) -> TrialOutcome:
        assert ctx.tracker is not None
        start_trial(ctx.tracker, ctx.experiment_id, ctx.study_run_id, "tiny", number, {})
        raise KeyboardInterrupt  # before run_trial held the run, so it could not close it

    monkeypatch.setattr(loop, "run_trial", interrupted_while_opening)
    study, ctx = _open(study_file, store, trials=2)
    tracker = Tracker(store.tracking_uri, store.artifact_root)
    experiment = tracker.experiment("tiny")
    parent, _ = open_study_run(tracker, experiment, "tiny", None, {})
    ctx = dataclasses.replace(ctx, tracker=tracker, experiment_id=experiment,
                              study_run_id=parent)
    with pytest.raises(KeyboardInterrupt):
        _optimize(study, ctx)
    # the trial waits, RUNNING in Optuna, to be taken up by the next search
    assert [(t.state, t.fail_reason) for t in study.trials()] == [
        (State.INTERRUPTED, "interrupted")]
    assert study.study.trials[0].state == TrialState.RUNNING
    (run,) = _trial_runs(store)
    assert run.info.status == "KILLED"
    assert run.data.tags["imgcls_hpo.fail_reason"] == "interrupted"


def test_a_pareto_study_is_told_every_objective(study_file: Path, store: Store,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    def scored_trial(ctx: StudyContext, number: int, sampled: Mapping[str, Scalar],
                     should_prune: Any = None, *args: Any, **kwargs: Any) -> TrialOutcome:
        assert should_prune is None  # Optuna prunes single-objective studies only
        return TrialOutcome(number, State.COMPLETE, dict(sampled), value=0.5 + number,
                            values=[0.5 + number, 1000.0 - number])

    monkeypatch.setattr(loop, "run_trial", scored_trial)
    study, ctx = _open(study_file, store, trials=2, objective=["val_f1:max", "flops:min"])
    _optimize(study, ctx)
    assert [d.name for d in study.study.directions] == ["MAXIMIZE", "MINIMIZE"]
    assert [(t.value, t.values) for t in study.trials()] == [
        (0.5, [0.5, 1000.0]), (1.5, [1.5, 999.0])]


def test_no_trial_starts_after_the_timeout(study_file: Path, store: Store,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[int] = []

    def slow_trial(ctx: StudyContext, number: int, sampled: Mapping[str, Scalar],
                   *args: Any, **kwargs: Any) -> TrialOutcome:
        started.append(number)
        time.sleep(0.7)  # longer than the timeout: the next trial would start after it
        return TrialOutcome(number, State.COMPLETE, dict(sampled), value=0.5)

    monkeypatch.setattr(loop, "run_trial", slow_trial)
    study, ctx = _open(study_file, store, trials=10, timeout=0.5)
    _optimize(study, ctx)
    assert started == [0]  # the running trial finished; no other started
    assert [t.state for t in study.trials()] == ["COMPLETE"]


def test_pid_alive_tells_running_dead_and_zombie_processes() -> None:
    assert recovery.pid_alive(os.getpid())
    assert not recovery.pid_alive(_dead_pid())
    zombie = subprocess.Popen(["true"])  # ends, but is not reaped until wait()
    try:
        for _ in range(200):
            stat = Path(f"/proc/{zombie.pid}/stat").read_text()
            if stat.rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert not recovery.pid_alive(zombie.pid)
    finally:
        zombie.wait()


def test_the_study_lock_keeps_other_processes_out(tmp_path: Path) -> None:
    lock = tmp_path / "store" / "optuna.lock"
    probe = ("import fcntl, sys\n"
             "with open(sys.argv[1], 'a') as f:\n"
             "    try:\n"
             "        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "    except BlockingIOError:\n"
             "        sys.exit(3)\n")
    with loop.study_lock(lock):
        held = subprocess.run([sys.executable, "-c", probe, str(lock)])
    free = subprocess.run([sys.executable, "-c", probe, str(lock)])
    assert (held.returncode, free.returncode) == (3, 0)


def test_worker_seeds_differ_between_workers_and_resumes() -> None:
    seeds = {loop.worker_seed(0, drawn, worker) for drawn in (0, 4) for worker in range(4)}
    assert len(seeds) == 8
    assert loop.worker_seed(0, 4, 1) == loop.worker_seed(0, 4, 1)


@pytest.mark.slow
def test_an_rdb_heartbeat_that_stopped_marks_the_trial_lost(
        study_file: Path, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        fake_trials: list[dict[str, Any]]) -> None:
    monkeypatch.setattr(optuna_storage, "HEARTBEAT_S", 1)
    monkeypatch.setattr(optuna_storage, "HEARTBEAT_GRACE_S", 1)
    rdb = Store(store.root, store.tracking_uri, f"sqlite:///{tmp_path}/optuna.db")
    study, ctx = _open(study_file, rdb, trials=1)
    storage = study.study._storage
    silent = _ask(study, host="another-host", pid=1)
    storage.record_heartbeat(silent._trial_id)
    time.sleep(2.5)  # past the grace period (SQLite's clock counts whole seconds)
    beating = _ask(study, host="another-host", pid=1)
    storage.record_heartbeat(beating._trial_id)
    assert recovery.recover_lost_trials(study.study, ctx) == [silent.number]
    assert optuna.load_study(study_name="tiny", storage=make_storage(rdb)).trials[
        beating.number].state == TrialState.RUNNING


# -- real trials in worker processes -----------------------------------------------------------

def _trial_runs(store: Store) -> list[Any]:
    client = MlflowClient(store.tracking_uri)
    experiment = client.get_experiment_by_name("tiny")
    return client.search_runs([experiment.experiment_id],
                              filter_string="tags.imgcls_hpo.role = 'trial'")


def _journal_study(store: Store) -> optuna.Study:
    return optuna.load_study(study_name="tiny", storage=make_storage(store))


@pytest.mark.slow
def test_two_workers_finish_exactly_the_trials_and_report_to_the_observer(
        study_file: Path, store: Store) -> None:
    observer = Recorder()
    spec = load_study(str(study_file), {"trials": 3, "workers": 2, "gpus": "none"})
    result = run_search(spec, store, observer)
    assert sorted((t.number, t.state) for t in result.trials) == [
        (0, "COMPLETE"), (1, "COMPLETE"), (2, "COMPLETE")]
    # events came from the workers: every trial started, trained 2 epochs and finished
    assert sorted(observer.started) == [0, 1, 2]
    assert sorted(observer.epochs) == [(n, e) for n in range(3) for e in (1, 2)]
    assert sorted(o.number for o in observer.finished) == [0, 1, 2]
    pids = {t.user_attrs["pid"] for t in _journal_study(store).trials}
    assert os.getpid() not in pids  # trained in worker processes, not here
    runs = _trial_runs(store)
    assert len(runs) == 3 and {r.info.status for r in runs} == {"FINISHED"}
    for run in runs:
        assert run.data.tags["imgcls_hpo.worker"] in (f"{HERE}/cpu/worker0",
                                                      f"{HERE}/cpu/worker1")
        assert run.data.tags["imgcls_hpo.device"] == "cpu"


@pytest.mark.slow
def test_a_worker_that_cannot_start_says_why(study_file: Path, store: Store,
                                              image_folder: Path) -> None:
    spec = load_study(str(study_file), {"gpus": "none"})
    image_folder.rename(image_folder.with_name("moved"))  # gone once the worker looks
    (slot,) = plan_slots("none", 1, 1)
    job = workers.WorkerJob(spec, store, slot, 1, "", "", 0, None)
    problems = workers.run_workers([job], Recorder())
    assert problems == [f"worker cpu/worker0 stopped: data folder not found: {image_folder}"]


SEARCH_SCRIPT = """\
import sys

from hpo.search.run import run_search
from hpo.config.store import Store
from hpo.config.study import load_study

if __name__ == "__main__":
    spec = load_study(sys.argv[1], {"trials": 3, "workers": 2, "gpus": "none",
                                    "max_epochs": 500})
    run_search(spec, Store.resolve(sys.argv[2]))
"""


def _search_in_background(tmp_path: Path, study_file: Path, store: Store) -> subprocess.Popen:
    """A 2-worker search of long trials in its own process group, and its first trial once it
    has trained an epoch (its MLflow run is open)."""
    script = tmp_path / "search.py"
    script.write_text(SEARCH_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    return subprocess.Popen([sys.executable, str(script), str(study_file), str(store.root)],
                            cwd=tmp_path, env=env, start_new_session=True)


def _wait_for_a_trained_epoch(store: Store, proc: subprocess.Popen) -> optuna.trial.FrozenTrial:
    end = time.monotonic() + 90
    while time.monotonic() < end:
        assert proc.poll() is None, "the search ended early"
        if store.journal_path.exists():
            for trial in _journal_study(store).get_trials(states=(TrialState.RUNNING,)):
                if trial.intermediate_values and "pid" in trial.user_attrs:
                    return trial
        time.sleep(0.2)
    raise AssertionError("no trial trained an epoch in 90 s")


def _group_pids(group: int) -> list[int]:
    """The live processes of process group `group` (zombies, dead but not reaped by their new
    parent, do not count)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _, pgrp = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError):
            continue
        if int(pgrp) == group and state != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _wait_until_ended(group: int) -> None:
    """Wait until no process of process group `group` runs."""
    end = time.monotonic() + 60
    while time.monotonic() < end:
        running = _group_pids(group)
        if not running:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes {running} of the killed search still run after 60 s")


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_taken_up_and_the_study_ends_exact(
        study_file: Path, store: Store, tmp_path: Path) -> None:
    proc = _search_in_background(tmp_path, study_file, store)
    try:
        victim = _wait_for_a_trained_epoch(store, proc)
        # Freeze the rest of the search first, so that the sibling worker cannot find the lost
        # trial (as it would at its next trial) before the search is killed too: the kill must
        # leave the lost trial for the next `search` to find.
        others = [p for p in _group_pids(proc.pid) if p not in (proc.pid, victim.user_attrs["pid"])]
        for pid in others:
            os.kill(pid, signal.SIGSTOP)
        os.kill(victim.user_attrs["pid"], signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)  # the search process too: the other worker is orphaned
        proc.wait()
        for pid in others:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        _wait_until_ended(proc.pid)  # ... and stops by itself
    finally:
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    (run,) = [r for r in _trial_runs(store)
              if r.data.tags["imgcls_hpo.trial_number"] == str(victim.number)]
    assert run.info.status == "RUNNING"  # as the kill left it
    # the orphaned worker paused its trial as Ctrl-C would, if it had one
    others = [t for t in _journal_study(store).trials if t.number != victim.number]
    assert {(t.state, t.user_attrs.get("fail_reason"), t.user_attrs.get("resumable"))
            for t in others} <= {(TrialState.RUNNING, "interrupted", True)}

    # Taken up by the next search, with fewer epochs: their checkpoints were written for 500,
    # so the trials start over, each in a new run that replaces its first one.
    spec = load_study(str(study_file), {"trials": 3, "max_epochs": 1, "gpus": "none"})
    observer = Recorder()
    result = run_search(spec, store, observer)
    assert [t.state for t in result.trials] == [State.COMPLETE] * 3  # exactly, numbers kept
    assert (victim.number, 0, "its checkpoint was written for another max_epochs") in \
        observer.resumed
    first = MlflowClient(store.tracking_uri).get_run(run.info.run_id)
    assert first.info.status == "KILLED"
    assert first.data.tags["imgcls_hpo.fail_reason"] == "worker lost"
    assert first.data.tags["imgcls_hpo.superseded_by"] == result.trials[victim.number].run_id
    stored = _journal_study(store).trials
    assert stored[victim.number].user_attrs["lost"] == 1
    assert [t.state for t in stored] == [TrialState.COMPLETE] * 3
    assert not [r for r in _trial_runs(store) if r.info.status == "RUNNING"]


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_their_trials_end_interrupted(
        study_file: Path, store: Store, tmp_path: Path) -> None:
    proc = _search_in_background(tmp_path, study_file, store)
    try:
        _wait_for_a_trained_epoch(store, proc)
        os.kill(proc.pid, signal.SIGINT)  # the search process only: it must stop its workers
        assert proc.wait(timeout=90) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    trials = _journal_study(store).trials  # paused: RUNNING, to be taken up by the next search
    ended = [(t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials]
    assert trials and all(t.state == TrialState.RUNNING and t.user_attrs["resumable"]
                          for t in trials), ended
    assert {t.user_attrs["fail_reason"] for t in trials} == {"interrupted"}, ended
    runs = _trial_runs(store)
    assert runs and {r.info.status for r in runs} == {"KILLED"}
    tracker = Tracker(store.tracking_uri)
    (study_run,) = tracker.client.search_runs(
        [tracker.experiment("tiny")], filter_string="tags.imgcls_hpo.role = 'study'")
    assert study_run.info.status == "KILLED"
