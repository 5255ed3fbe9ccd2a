"""Optuna trials run by worker processes, one per slot (a share of a GPU, or of the CPU cores),
all asking the same Optuna storage through the trial loop (loop.py); and what keeps a study's
count of trials exact when some of them die.

- A worker that dies without telling (SIGKILL, the kernel's out-of-memory killer) leaves its
  trial RUNNING in Optuna and its run RUNNING in MLflow; recovery.py fails it as LOST and runs
  its parameters again. For an RDB storage, Optuna's heartbeat also tells when a worker on
  another machine is gone; Optuna 5's JournalStorage has no heartbeat, so a journal's lost
  trials are recovered from the machine that ran them.
- Workers send their events (trial started, epoch finished, trial finished) to the search
  process through a queue, where the observer (the live progress) sees them.

One slot needs no worker process: the same loop runs in the search process.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import time
import traceback
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from hpo.config.space import Scalar
from hpo.config.store import Store
from hpo.config.study import StudySpec
from hpo.config.trial import TrialOutcome
from hpo.search.artifacts import ArtifactWriter
from hpo.search.backends.optuna.loop import (
    LOCK_FILE,
    TrialLoop,
    enqueue_configured,
    orphaned,
    outcome_of,
    study_lock,
    worker_seed,
)
from hpo.search.backends.optuna.recovery import recover_lost_trials
from hpo.search.backends.optuna.storage import make_storage, open_optuna_study
from hpo.search.checkpoints import Checkpoints
from hpo.search.context import StudyContext
from hpo.search.devices import Slot, apply_slot
from hpo.search.events import SearchObserver
from hpo.search.trial import failure_reason
from hpo.tracking.client import Tracker
from imgcls.errors import ImgclsError

if TYPE_CHECKING:
    from multiprocessing.context import SpawnProcess
    from multiprocessing.queues import Queue

    import optuna

log = logging.getLogger(__name__)

STOP_GRACE_S = 60.0  # after Ctrl-C, time the workers get to close their runs before SIGTERM
POLL_S = 0.2  # how often the search process looks at its workers while no event comes


class WorkerError(ImgclsError):
    """A worker process stopped before the study held its trials."""


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

    def trial_resumed(self, number: int, epochs: int, why_not: str | None) -> None:
        self.events.put(("trial_resumed", number, epochs, why_not))

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        if orphaned():
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
        from imgcls.data.prepare import prepare_data

        spec, store = job.spec, job.store
        data = prepare_data(spec.data, spec.seed, store.cache_dir)
        tracker = Tracker(store.tracking_uri,
                          store.artifact_root if store.tracking_is_local else None)
        ctx = StudyContext(spec, data, device, tracker, job.experiment_id, job.study_run_id,
                           Checkpoints(store.checkpoint_dir / spec.name), ArtifactWriter())
        study = open_optuna_study(spec, make_storage(store), job.fresh_seed)
        try:
            TrialLoop(study, ctx, job.slot, job.target, store.root / LOCK_FILE, job.deadline,
                      QueueObserver(events)).run()
        finally:
            ctx.artifacts.close()  # the figures of this worker's last trials
    except KeyboardInterrupt:
        pass  # the running trial was paused, "interrupted"; the search process knows why
    except Exception as exc:
        if not isinstance(exc, ImgclsError):  # unexpected: the traceback is for a bug report
            traceback.print_exc()
        events.put(("crashed", job.slot.label, failure_reason(exc, None)))
        raise SystemExit(1) from None
    finally:
        if orphaned():
            events.cancel_join_thread()  # nobody reads the queue: do not wait to flush it


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
    finished = sum(outcome_of(t).state.counts for t in study.get_trials(deepcopy=False))
    timed_out = deadline is not None and time.time() >= deadline
    for line in problems:
        log.warning("%s", line)
    if problems and finished < target and not timed_out:
        raise WorkerError(f"{problems[0]}; {finished} of {target} trials finished and are "
                          "kept: run the search again to resume")
