"""Optuna trials run by worker processes, one per slot (a share of a GPU, or of the CPU cores),
all asking the same Optuna storage; and what keeps a study's count of trials exact.

- A trial starts only while finished + running < --trials. The check and the ask happen under
  a file lock (`<store>/optuna.lock`), one process of the machine at a time.
- A worker that dies without telling (SIGKILL, the kernel's out-of-memory killer) leaves its
  trial RUNNING in Optuna and its run RUNNING in MLflow. Each trial records the host and pid of
  its worker; the next check (a sibling's next ask, or the next `search`) fails a trial whose
  worker is gone with reason "worker lost", closes its run KILLED, and enqueues its parameters
  once to be retried. For an RDB storage, Optuna's heartbeat also tells when a worker on another
  machine is gone; Optuna 5's JournalStorage has no heartbeat, so a journal's lost trials are
  recovered from the machine that ran them.
- Workers send their events (trial started, epoch finished, trial finished) to the search
  process through a queue, where the observer (the live progress) sees them.

One slot needs no worker process: the same loop runs in the search process.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import queue
import signal
import socket
import time
import traceback
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import numpy as np

from hpo.backends.base import SearchObserver, counts_as_finished
from hpo.devices import Slot, apply_slot
from hpo.interrupts import interrupts_held
from hpo.objective import (
    INTERRUPTED,
    WORKER_LOST,
    StudyContext,
    TrialOutcome,
    failure_reason,
    headline_test,
    run_trial,
)
from hpo.space import Scalar
from hpo.tracking import TAG_DEVICE, TAG_TRIAL, TAG_WORKER, Tracker, TrialRun
from imgcls.errors import ImgclsError

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.queues import Queue

    import optuna

    from hpo.store import Store
    from hpo.study import StudySpec

log = logging.getLogger(__name__)

LOCK_FILE = "optuna.lock"  # under the store
# Trial user attrs: where the trial runs, and which lost trial it retries.
HOST, PID, WORKER, RETRY_OF = "host", "pid", "worker", "retry_of"
STOP_GRACE_S = 60.0  # after Ctrl-C, time the workers get to close their runs before SIGTERM
POLL_S = 0.2  # how often the search process looks at its workers while no event comes


class WorkerError(ImgclsError):
    """A worker process stopped before the study held its trials."""


def outcome_of(trial: optuna.trial.FrozenTrial) -> TrialOutcome:
    """An Optuna trial as the outcome every backend reports."""
    attrs = trial.user_attrs
    told = trial.values if trial.state.name == "COMPLETE" else None  # one per objective
    return TrialOutcome(
        number=trial.number, params=dict(trial.params), state=trial.state.name,  # type: ignore[arg-type]
        value=told[0] if told else attrs.get("value"),
        values=list(told) if told and len(told) > 1 else None,
        best_epoch=attrs.get("best_epoch", 0), epochs=attrs.get("epochs", 0),
        fail_reason=attrs.get("fail_reason"), run_id=attrs.get("mlflow_run_id"),
        seconds=attrs.get("seconds", 0.0), test=attrs.get("test", {}),
    )


def placement_tags(slot: Slot) -> dict[str, str]:
    """Where a slot's trials train, as trial-run tags: the device by the search process's GPU
    index ("cuda:1"; inside the worker it is "cuda:0"), and the slot's label."""
    device = "cpu" if slot.gpu is None else f"cuda:{slot.gpu}"
    return {TAG_DEVICE: device, TAG_WORKER: slot.label}


def worker_seed(seed: int, drawn: int, worker: int) -> int:
    """Each worker its own sampler seed: two workers seeded alike would draw the same random
    points. Distinct per (study seed, trials drawn so far, worker), reproducible."""
    return int(np.random.SeedSequence([seed, drawn, worker]).generate_state(1)[0])


# -- the study lock -------------------------------------------------------------------------------

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


# -- lost trials ----------------------------------------------------------------------------------

def pid_alive(pid: int) -> bool:
    """Whether process `pid` of this machine still runs (a zombie, dead but not yet reaped by
    its parent, does not). A pid reused by a new process reads as alive: its trial then waits
    until that process ends."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _worker_gone(trial: optuna.trial.FrozenTrial, host: str) -> bool:
    pid = trial.user_attrs.get(PID)
    return trial.user_attrs.get(HOST) == host and isinstance(pid, int) and not pid_alive(pid)


def _heartbeat_expired(study: optuna.Study) -> set[int]:
    """Trial ids whose Optuna heartbeat stopped (RDB storages; see make_storage). Optuna's own
    fail_stale_trials would fail them without a reason and cannot be told to retry them, so we
    ask the storage which they are (private API, stable since Optuna 2.9)."""
    from optuna.storages._heartbeat import is_heartbeat_enabled

    storage = study._storage
    if not is_heartbeat_enabled(storage):
        return set()
    return set(storage._get_stale_trial_ids(study._study_id))  # type: ignore[attr-defined]


def recover_lost_trials(study: optuna.Study, ctx: StudyContext) -> list[int]:
    """Fail each RUNNING trial whose worker is gone with reason "worker lost", close its MLflow
    run KILLED, and enqueue its parameters to be retried first. A retry that is lost in turn is
    not retried again: parameters that killed their worker twice are left to the user. Call it
    under `study_lock`. Returns the numbers of the trials failed."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    host = socket.gethostname()
    expired = _heartbeat_expired(study)
    lost = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial._trial_id not in expired and not _worker_gone(trial, host):
            continue
        run_ids = _running_trial_runs(ctx, trial.number)
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason", WORKER_LOST)
            if run_ids:
                study._storage.set_trial_user_attr(trial._trial_id, "mlflow_run_id", run_ids[0])
            study.tell(trial.number, state=TrialState.FAIL)
        except UpdateFinishedTrialError:  # another machine recovered it first
            continue
        if ctx.tracker is not None:
            for run_id in run_ids:
                TrialRun(ctx.tracker, run_id).finish("FAIL", WORKER_LOST, "KILLED")
        if RETRY_OF not in trial.user_attrs:
            study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: trial.number})
        log.warning("trial %d: its worker (%s, pid %s) is gone; %s", trial.number,
                    trial.user_attrs.get(HOST), trial.user_attrs.get(PID),
                    "not retried again" if RETRY_OF in trial.user_attrs else "retrying it")
        lost.append(trial.number)
    return lost


def _running_trial_runs(ctx: StudyContext, number: int) -> list[str]:
    """The MLflow runs of trial `number` of this study still RUNNING (none when the worker died
    before opening its run)."""
    if ctx.tracker is None:
        return []
    runs = ctx.tracker.client.search_runs(
        [ctx.experiment_id],
        filter_string=(f"tags.`{TAG_TRIAL}` = '{number}' and tags.`mlflow.parentRunId` = "
                       f"'{ctx.study_run_id}' and attributes.status = 'RUNNING'"),
    )
    return [run.info.run_id for run in runs]


def enqueue_configured(study: optuna.Study, spec: StudySpec) -> None:
    """Enqueue the study's `enqueue` configurations, each once per study: a resumed study
    skips those a trial already has (enqueued, run, or retried), and enqueues one added since.
    Under `study_lock`, so that two processes never enqueue the same one together."""
    for config in spec.enqueue:
        study.enqueue_trial(dict(config), skip_if_exists=True)


# -- the trial loop -------------------------------------------------------------------------------

class TrialLoop:
    """ask -> run_trial -> tell, until the study holds its trials or the deadline passed.
    Runs in a worker process, or in the search process when there is one slot."""

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
        self.trial: optuna.Trial | None = None  # the trial being run, told if interrupted

    def run(self) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

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
                        self.trial.set_user_attr("fail_reason", INTERRUPTED)
                        self.study.tell(self.trial, state=TrialState.FAIL)
                    self._close_runs(self.trial.number)
                raise

    def _close_runs(self, number: int) -> None:
        """Close KILLED a run that run_trial could not: one the interrupt caught while it was
        being opened, before run_trial held it."""
        try:
            for run_id in _running_trial_runs(self.ctx, number):
                TrialRun(self.ctx.tracker, run_id).finish(  # type: ignore[arg-type]
                    "FAIL", INTERRUPTED, "KILLED")
        except Exception as exc:  # the trial's own state is told; tracking is best effort here
            log.warning("could not close trial %d's MLflow run: %s", number, exc)

    def _ask(self) -> bool:
        """Start a trial if the study still needs one; under the lock, so that the counts
        cannot change between the check and the ask."""
        if self._stopping():
            return False
        with study_lock(self.lock):
            recover_lost_trials(self.study, self.ctx)
            trials = self.study.get_trials(deepcopy=False)
            finished = sum(counts_as_finished(outcome_of(t)) for t in trials)
            running = sum(t.state.name == "RUNNING" for t in trials)
            if finished + running >= self.target:
                return False
            with warnings.catch_warnings():  # heartbeats are ours to record (see _run)
                warnings.filterwarnings("ignore", message="Heartbeat of storage")
                self.trial = self.study.ask(self.ctx.spec.space.to_optuna())
            for key, value in ((HOST, socket.gethostname()), (PID, os.getpid()),
                               (WORKER, self.slot.label)):
                self.trial.set_user_attr(key, value)
        return True

    def _stopping(self) -> bool:
        past_deadline = self.deadline is not None and time.time() >= self.deadline
        return past_deadline or _orphaned()

    def _run(self, trial: optuna.Trial) -> None:
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.storages._heartbeat import get_heartbeat_thread
        from optuna.trial import TrialState

        spec = self.ctx.spec
        self.observer.trial_started(trial.number, trial.params)

        def should_prune(epoch: int, value: float) -> bool:
            with interrupts_held():  # an RDB storage is written
                trial.report(value, step=epoch)
                return trial.should_prune()

        # Optuna prunes single-objective studies only (Trial.report refuses several).
        pruning = None if spec.objectives else should_prune
        # Records the trial's heartbeat every interval where the storage keeps them (RDB).
        with get_heartbeat_thread(trial._trial_id, self.study._storage):
            outcome = run_trial(self.ctx, trial.number, trial.params, pruning,
                                self.observer.epoch_finished, self.placement)
        # A trial that has ended is told so whole: Ctrl-C from here waits until it is.
        with interrupts_held():
            try:
                for key, value in (("mlflow_run_id", outcome.run_id),
                                   ("fail_reason", outcome.fail_reason),
                                   ("value", outcome.value), ("best_epoch", outcome.best_epoch),
                                   ("epochs", outcome.epochs), ("seconds", outcome.seconds),
                                   ("test", headline_test(outcome.test, spec.objective) or None)):
                    if value is not None:
                        trial.set_user_attr(key, value)
                if outcome.state == "COMPLETE":
                    self.study.tell(trial, outcome.values if spec.objectives else outcome.value)
                else:
                    self.study.tell(trial, state=TrialState[outcome.state])
            except UpdateFinishedTrialError:
                # Another process took this worker for lost (a heartbeat missed for longer than
                # the grace period): its retry runs the parameters again; this result is dropped.
                log.warning("trial %d was failed as lost while it ran; its result is not kept",
                            trial.number)
                self.trial = None
                return
            self.trial = None  # told: an interrupt from here on has nothing to tell
        self.observer.trial_finished(outcome)


# -- worker processes -----------------------------------------------------------------------------

@dataclass(frozen=True)
class WorkerJob:
    """What a worker process needs to rebuild its share of the study (pickled to it)."""

    spec: StudySpec
    store: Store
    slot: Slot
    target: int  # finished trials the study should hold
    experiment_id: str
    study_run_id: str
    fresh_seed: int  # this worker's own sampler seed (see worker_seed)
    deadline: float | None  # time.time() after which no trial starts


class QueueObserver:
    """A worker's observer: every event goes to the search process. Should that process be
    gone (killed without the chance to stop its workers), the worker stops its trial at the
    end of the epoch as Ctrl-C would, rather than train on for nobody."""

    def __init__(self, events: Queue[tuple[Any, ...]]) -> None:
        self.events = events

    def trial_started(self, number: int, params: Mapping[str, Scalar]) -> None:
        self.events.put(("trial_started", number, dict(params)))

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        if _orphaned():
            raise KeyboardInterrupt
        self.events.put(("epoch_finished", number, epoch, dict(metrics)))

    def trial_finished(self, outcome: TrialOutcome) -> None:
        self.events.put(("trial_finished", outcome))


def worker_main(job: WorkerJob, events: Queue[tuple[Any, ...]]) -> None:
    """A worker process: pin it to its slot, reopen the data (from the decode cache: a
    memory-mapped read), tracking and the study, and run trials."""
    signal.signal(signal.SIGINT, _interrupt_once)
    try:
        device = apply_slot(job.slot)  # before anything initialises CUDA
        from hpo.backends.optuna_backend import make_storage, open_optuna_study
        from imgcls.data import prepare_data

        spec, store = job.spec, job.store
        data = prepare_data(spec.data, spec.seed, store.cache_dir)
        tracker = Tracker(store.tracking_uri,
                          store.artifact_root if store.tracking_is_local else None)
        ctx = StudyContext(spec, data, device, tracker, job.experiment_id, job.study_run_id)
        study = open_optuna_study(spec, make_storage(store), job.fresh_seed)
        TrialLoop(study, ctx, job.slot, job.target, store.root / LOCK_FILE, job.deadline,
                  QueueObserver(events)).run()
    except KeyboardInterrupt:
        pass  # the running trial was told "interrupted"; the search process knows why
    except Exception as exc:
        if not isinstance(exc, ImgclsError):  # unexpected: the traceback is for a bug report
            traceback.print_exc()
        events.put(("crashed", job.slot.label, failure_reason(exc, None)))
        raise SystemExit(1) from None
    finally:
        if _orphaned():
            events.cancel_join_thread()  # nobody reads the queue: do not wait to flush it


def _orphaned() -> bool:
    """Whether this is a worker process whose search process has died."""
    parent = multiprocessing.parent_process()
    return parent is not None and not parent.is_alive()


def _interrupt_once(signum: int, frame: FrameType | None) -> None:
    """Ctrl-C reaches a worker twice (from the terminal and from the search process): the
    second must not interrupt the closing of the trial's run."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def run_workers(jobs: list[WorkerJob], observer: SearchObserver) -> list[str]:
    """Start one worker process per job and pass their events to `observer` until all have
    ended. On any exception here (Ctrl-C, or the observer's own), the workers are stopped as
    Ctrl-C stops a trial: their running trials end FAIL "interrupted", runs KILLED. Returns a
    line for each worker that stopped abnormally."""
    mp = multiprocessing.get_context("spawn")  # a forked child could not use CUDA
    events: Queue[tuple[Any, ...]] = mp.Queue()
    procs = [mp.Process(target=worker_main, args=(job, events),
                        name=f"imgcls-hpo {job.slot.label}") for job in jobs]
    crashed: dict[str, str] = {}  # slot label -> why its worker stopped
    try:
        for proc in procs:
            proc.start()
        while any(proc.is_alive() for proc in procs):
            _relay(events, observer, crashed, timeout=POLL_S)
        while _relay(events, observer, crashed, timeout=0):
            pass
    except BaseException:
        _stop(procs, events)
        raise
    finally:
        events.close()
    problems = []
    for job, proc in zip(jobs, procs, strict=True):
        label, code = job.slot.label, proc.exitcode or 0
        if label in crashed:
            problems.append(f"worker {label} stopped: {crashed[label]}")
        elif code:
            how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
            problems.append(f"worker {label} (pid {proc.pid}) {how}")
    return problems


def _relay(events: Queue[tuple[Any, ...]], observer: SearchObserver, crashed: dict[str, str],
           timeout: float) -> bool:
    """Pass one event on; False when none came within `timeout` seconds."""
    try:
        kind, *args = events.get(timeout=timeout) if timeout else events.get_nowait()
    except queue.Empty:
        return False
    if kind == "crashed":
        crashed[args[0]] = args[1]
    else:
        getattr(observer, kind)(*args)
    return True


def _stop(procs: list[SpawnProcess], events: Queue[tuple[Any, ...]]) -> None:
    """SIGINT each worker, give them STOP_GRACE_S to tell their trials and close their runs
    (reading their events meanwhile, so that none blocks on a full queue), then terminate."""
    for proc in procs:
        if proc.is_alive() and proc.pid is not None:
            with suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(proc.pid, signal.SIGINT)
    end = time.monotonic() + STOP_GRACE_S
    while any(proc.is_alive() for proc in procs) and time.monotonic() < end:
        with suppress(queue.Empty):
            events.get(timeout=POLL_S)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()  # its trial stays RUNNING: the next search recovers it
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()


# -- a whole optimize -----------------------------------------------------------------------------

def optimize(study: optuna.Study, store: Store, ctx: StudyContext, observer: SearchObserver,
             slots: list[Slot], target: int) -> None:
    """Recover lost trials, enqueue the configured ones, then run trials on `slots` until the
    study holds `target` finished ones or spec.timeout seconds have passed (running trials
    finish; none starts after that)."""
    spec = ctx.spec
    deadline = time.time() + spec.timeout if spec.timeout is not None else None
    lock = store.root / LOCK_FILE
    with study_lock(lock):  # before any new trial: retries and enqueued configurations first
        recover_lost_trials(study, ctx)
        enqueue_configured(study, spec)
    if len(slots) == 1:  # no worker process: trials train here, on ctx.device
        TrialLoop(study, ctx, slots[0], target, lock, deadline, observer).run()
        return
    drawn = len(study.get_trials(deepcopy=False))
    jobs = [WorkerJob(spec, store, slot, target, ctx.experiment_id, ctx.study_run_id,
                      worker_seed(spec.seed, drawn, slot.worker), deadline) for slot in slots]
    problems = run_workers(jobs, observer)
    with study_lock(lock):  # a worker that died last left its trial RUNNING
        recover_lost_trials(study, ctx)
    finished = sum(counts_as_finished(outcome_of(t)) for t in study.get_trials(deepcopy=False))
    timed_out = deadline is not None and time.time() >= deadline
    for line in problems:
        log.warning("%s", line)
    if problems and finished < target and not timed_out:
        raise WorkerError(f"{problems[0]}; {finished} of {target} trials finished and are "
                          "kept: run the search again to resume")
