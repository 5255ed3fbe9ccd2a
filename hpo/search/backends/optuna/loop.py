"""The Optuna trial loop: take up a trial that waits to go on, or ask a new one -> run_trial ->
tell, until the study holds its trials. It runs in a worker process, or in the search process
when there is one slot.

A trial starts only while counted + running < --trials (a trial waiting to be taken up is
running: it is taken up first). The check and the ask happen under a file lock
(`<store>/optuna.lock`), one process of the machine at a time.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import socket
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpo.config.trial import TrialOutcome, TrialState, headline_test
from hpo.search.backends.optuna.recovery import (
    HOST,
    PID,
    REASON,
    RESUMABLE,
    WORKER,
    claim_resumable,
    close_trial_runs,
    pause_trial,
    recover_lost_trials,
)
from hpo.search.context import StudyContext
from hpo.search.devices import Slot
from hpo.search.events import SearchObserver
from hpo.search.trial import run_trial
from hpo.tracking.interrupts import interrupts_held
from hpo.tracking.tags import TAG_DEVICE, TAG_WORKER

if TYPE_CHECKING:
    import optuna

    from hpo.config.study import StudySpec

log = logging.getLogger(__name__)

LOCK_FILE = "optuna.lock"  # under the store


def outcome_of(trial: optuna.trial.FrozenTrial) -> TrialOutcome:
    """An Optuna trial as the outcome every backend reports."""
    attrs = trial.user_attrs
    told = trial.values if trial.state.name == "COMPLETE" else None  # one per objective
    # a RUNNING trial waiting to be taken up stands as why it stopped: INTERRUPTED, LOST
    stored = "FAIL" if trial.state.name == "RUNNING" and attrs.get(RESUMABLE) else \
        trial.state.name
    return TrialOutcome(
        number=trial.number, state=TrialState.read(stored, attrs.get(REASON)),
        params=dict(trial.params), value=told[0] if told else attrs.get("value"),
        values=list(told) if told and len(told) > 1 else None,
        best_epoch=attrs.get("best_epoch", 0), epochs=attrs.get("epochs", 0),
        metrics=dict(attrs.get("test") or {}), fail_reason=attrs.get("fail_reason"),
        run_id=attrs.get("mlflow_run_id"), seconds=attrs.get("seconds", 0.0),
    )


def placement_tags(slot: Slot) -> dict[str, str]:
    """Where a slot's trials train, as trial-run tags: the device by the search process's GPU
    index ("cuda:1"; inside the worker it is "cuda:0"), and the slot's label."""
    device = "cpu" if slot.gpu is None else f"cuda:{slot.gpu}"
    return {TAG_DEVICE: device, TAG_WORKER: f"{socket.gethostname()}/{slot.label}"}


def worker_seed(seed: int, drawn: int, worker: int) -> int:
    """Each worker its own sampler seed: two workers seeded alike would draw the same random
    points. Distinct per (study seed, trials drawn so far, worker), reproducible."""
    return int(np.random.SeedSequence([seed, drawn, worker]).generate_state(1)[0])


@contextmanager
def study_lock(path: Path) -> Iterator[None]:
    """Hold the machine-wide lock under which a process checks the counts and asks for a trial
    (or recovers lost ones), so that two workers never both take the last trial.

    The lock is local to the machine. Machines sharing one RDB storage each hold their own lock,
    so up to (machines - 1) of them may pass the check at the same moment: the study then ends
    with at most that many trials more than --trials. We keep it at that; an exact count across
    machines would need the database's own locking, which differs from one database to another.

    Ctrl-C waits until the lock is released, so that a trial is never asked without its worker
    recorded (a trial without host and pid could not be recovered).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with interrupts_held(), open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def enqueue_configured(study: optuna.Study, spec: StudySpec) -> None:
    """Enqueue the study's `enqueue` configurations, each once per study: a resumed study
    skips those a trial already has (enqueued, run, or retried), and enqueues one added since.
    Under `study_lock`, so that two processes never enqueue the same one together."""
    for config in spec.enqueue:
        study.enqueue_trial(dict(config), skip_if_exists=True)


class StoredTrial:
    """A RUNNING trial taken up again, as the loop uses an optuna.Trial: its number, parameters,
    reports and the pruner's verdict. (optuna.Trial is made by study.ask: building one for a
    trial in progress would tell the sampler that a trial begins.)"""

    def __init__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.study = study
        self._trial_id = trial._trial_id
        self.number = trial.number
        self.params = dict(trial.params)

    def report(self, value: float, step: int) -> None:
        storage = self.study._storage
        if step not in storage.get_trial(self._trial_id).intermediate_values:
            storage.set_trial_intermediate_value(self._trial_id, step, float(value))

    def should_prune(self) -> bool:
        return self.study.pruner.prune(self.study, self.study._storage.get_trial(self._trial_id))

    def set_user_attr(self, key: str, value: object) -> None:
        self.study._storage.set_trial_user_attr(self._trial_id, key, value)


class TrialLoop:
    """(take up, or ask) -> run_trial -> tell, until the study holds its trials or the deadline
    passed. Runs in a worker process, or in the search process when there is one slot."""

    def __init__(self, study: optuna.Study, ctx: StudyContext, slot: Slot, target: int,
                 lock: Path, deadline: float | None, observer: SearchObserver) -> None:
        self.study = study
        self.ctx = ctx
        self.target = target  # finished trials the study should hold (--trials, or a grid's size)
        self.slot = slot
        self.lock = lock
        self.deadline = deadline  # time.time() after which no trial starts; None: no limit
        self.observer = observer
        self.placement = placement_tags(slot)
        # the trial being run (paused if interrupted), and whether it was taken up again
        self.trial: optuna.Trial | StoredTrial | None = None
        self.resumed = False

    def run(self) -> None:
        from optuna.exceptions import UpdateFinishedTrialError

        while True:
            self.trial = None
            try:
                if not self._ask():
                    return
                assert self.trial is not None
                self._run(self.trial)
            except KeyboardInterrupt:
                if self.trial is not None:
                    # (already told when the interrupt came just after the tell)
                    with suppress(UpdateFinishedTrialError):
                        pause_trial(self.study, self.trial._trial_id, TrialState.INTERRUPTED)
                    # a run the interrupt caught while it was being opened, before
                    # run_trial held it
                    close_trial_runs(self.ctx, self.trial.number, TrialState.INTERRUPTED)
                raise

    def _ask(self) -> bool:
        """Take up a trial that waits to go on, or start a new one if the study still needs
        one; under the lock, so that the counts cannot change between the check and the ask."""
        if self._stopping():
            return False
        host, pid = socket.gethostname(), os.getpid()
        with study_lock(self.lock):
            recover_lost_trials(self.study, self.ctx)
            waiting = claim_resumable(self.study, host, pid, self.slot.label)
            if waiting is not None:
                self.trial, self.resumed = StoredTrial(self.study, waiting), True
                return True
            trials = self.study.get_trials(deepcopy=False)
            counted = sum(outcome_of(t).state.counts for t in trials)
            running = sum(t.state.name == "RUNNING" for t in trials)
            if counted + running >= self.target:
                return False
            with warnings.catch_warnings():  # heartbeats are ours to record (see _run)
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                self.trial, self.resumed = self.study.ask(self.ctx.spec.space.to_optuna()), False
            for key, value in ((HOST, host), (PID, pid), (WORKER, self.slot.label)):
                self.trial.set_user_attr(key, value)
        return True

    def _stopping(self) -> bool:
        past_deadline = self.deadline is not None and time.time() >= self.deadline
        return past_deadline or orphaned()

    def _run(self, trial: optuna.Trial | StoredTrial) -> None:
        from optuna.storages._heartbeat import get_heartbeat_thread

        spec = self.ctx.spec
        self.observer.trial_started(trial.number, trial.params)

        def report(epoch: int, value: float) -> None:
            with interrupts_held():  # an RDB storage is written
                trial.report(value, step=epoch)

        def should_prune(epoch: int, value: float) -> bool:
            with interrupts_held():
                trial.report(value, step=epoch)
                return trial.should_prune()

        # Optuna prunes single-objective studies only (Trial.report refuses several).
        single = not spec.objectives
        # Records the trial's heartbeat every interval where the storage keeps them (RDB).
        with get_heartbeat_thread(trial._trial_id, self.study._storage), \
                warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The reported value is ignored")
            outcome = run_trial(self.ctx, trial.number, trial.params,
                                should_prune if single else None, self.observer.epoch_finished,
                                self.placement, resumed=self.resumed,
                                report=report if single else None,
                                on_resume=self.observer.trial_resumed)
        if self._tell(trial, outcome):
            self.observer.trial_finished(outcome)

    def _tell(self, trial: optuna.Trial | StoredTrial, outcome: TrialOutcome) -> bool:
        """Tell Optuna how the trial ended, whole: Ctrl-C from here waits until it is. False
        when another process took the trial for lost meanwhile and ended it (a heartbeat missed
        for longer than the grace period): this result is then dropped."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState as OptunaState

        spec = self.ctx.spec
        with interrupts_held():
            try:
                for key, value in (("mlflow_run_id", outcome.run_id),
                                   (REASON, outcome.fail_reason),
                                   ("value", outcome.value), ("best_epoch", outcome.best_epoch),
                                   ("epochs", outcome.epochs), ("seconds", outcome.seconds),
                                   ("test", headline_test(outcome.metrics, spec.objective)
                                    or None)):
                    if value is not None:
                        trial.set_user_attr(key, value)
                if outcome.state == TrialState.COMPLETE:
                    self.study.tell(trial.number,
                                    outcome.values if spec.objectives else outcome.value)
                else:
                    self.study.tell(trial.number, state=OptunaState[outcome.state.stored])
            except UpdateFinishedTrialError:
                log.warning("trial %d was ended as lost while it ran; its result is not kept",
                            trial.number)
                return False
            finally:
                self.trial = None  # told: an interrupt from here on has nothing to tell
        return True


def orphaned() -> bool:
    """Whether this is a worker process whose search process has died."""
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()
