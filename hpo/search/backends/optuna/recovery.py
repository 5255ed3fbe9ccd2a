"""Trials that stopped before their end, and who takes them up again.

A trial stops before its end when its search is interrupted (Ctrl-C) or its worker dies
(SIGKILL, the kernel's out-of-memory killer, a lost machine). Its Optuna trial stays RUNNING,
marked *resumable* with the reason, and its MLflow run is closed KILLED: INTERRUPTED or LOST.
The next process that looks for work, under the study lock (a sibling's next ask, the start of
every `search`), takes it up: it resumes from the trial's checkpoint, in the same run, with the
same number and parameters, and counts towards --trials only once it ends.

Each trial records the host and pid of its worker; a RUNNING trial not marked resumable whose
worker is gone from this machine, or whose Optuna heartbeat stopped (an RDB storage: any
machine), is found lost here. A trial lost twice (parameters that may kill their worker: out of
memory?) is not taken up a third time: it ends FAIL, "worker lost", left to the user.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.config.trial import TrialState
from hpo.tracking.runs import TrialRun, trial_runs

if TYPE_CHECKING:
    import optuna

    from hpo.search.context import StudyContext

log = logging.getLogger(__name__)

# Trial user attrs: where the trial runs; whether it waits to be taken up again (and why: its
# fail_reason); how often its worker was lost.
HOST, PID, WORKER = "host", "pid", "worker"
RESUMABLE, REASON, LOST_COUNT = "resumable", "fail_reason", "lost"
MAX_LOSSES = 2  # a trial whose worker died this many times is not taken up again


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
    """Mark each RUNNING trial whose worker is gone resumable, "worker lost", and close its
    MLflow run LOST; a trial lost for the MAX_LOSSES-th time ends FAIL instead. Call it under
    `study_lock`. Returns the numbers of the trials found lost."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState as OptunaState

    host = socket.gethostname()
    expired = _heartbeat_expired(study)
    storage = study._storage
    lost = []
    for trial in study.get_trials(deepcopy=False, states=(OptunaState.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get(RESUMABLE) or (trial._trial_id not in expired
                                    and not _worker_gone(trial, host)):
            continue
        losses = int(attrs.get(LOST_COUNT, 0)) + 1
        try:
            storage.set_trial_user_attr(trial._trial_id, REASON, TrialState.LOST.reason)
            storage.set_trial_user_attr(trial._trial_id, LOST_COUNT, losses)
            if losses >= MAX_LOSSES:
                study.tell(trial.number, state=OptunaState.FAIL)
            else:
                storage.set_trial_user_attr(trial._trial_id, RESUMABLE, True)
        except UpdateFinishedTrialError:  # another machine recovered it first
            continue
        close_trial_runs(ctx, trial.number, TrialState.LOST)
        log.warning("trial %d: its worker (%s, pid %s) is gone; %s", trial.number,
                    attrs.get(HOST), attrs.get(PID),
                    "not taken up again (lost twice)" if losses >= MAX_LOSSES
                    else "taking it up from its checkpoint")
        lost.append(trial.number)
    return lost


def pause_trial(study: optuna.Study, trial_id: int, state: TrialState) -> None:
    """Leave a trial RUNNING for another process to take up: resumable, with `state`'s reason
    (INTERRUPTED), and no worker (its pid would pass for alive while this process lives)."""
    storage = study._storage
    storage.set_trial_user_attr(trial_id, REASON, state.reason)
    storage.set_trial_user_attr(trial_id, PID, None)
    storage.set_trial_user_attr(trial_id, RESUMABLE, True)


def claim_resumable(study: optuna.Study, host: str, pid: int, worker: str
                    ) -> optuna.trial.FrozenTrial | None:
    """The oldest trial waiting to be taken up, now this worker's; None when none waits. Call
    it under `study_lock`."""
    from optuna.trial import TrialState as OptunaState

    for trial in study.get_trials(deepcopy=False, states=(OptunaState.RUNNING,)):
        if not trial.user_attrs.get(RESUMABLE):
            continue
        storage = study._storage
        for key, value in ((HOST, host), (PID, pid), (WORKER, worker), (RESUMABLE, False),
                           (REASON, None)):
            storage.set_trial_user_attr(trial._trial_id, key, value)
        return storage.get_trial(trial._trial_id)
    return None


def close_trial_runs(ctx: StudyContext, number: int, state: TrialState) -> None:
    """Close trial `number`'s runs still open as `state` (LOST, INTERRUPTED): its process is
    gone, or was stopped before it could (an interrupt while its run was being opened)."""
    if ctx.tracker is None:
        return
    try:
        for run_id in open_trial_runs(ctx, number):
            TrialRun(ctx.tracker, run_id, number).finish(state)
    except Exception as exc:  # the trial's own state is told; tracking is best effort here
        log.warning("could not close trial %d's MLflow run: %s", number, exc)


def open_trial_runs(ctx: StudyContext, number: int) -> list[str]:
    """The ids of trial `number`'s runs still open under the study run (one, normally; none
    when tracking is off or the trial died before its run was opened)."""
    if ctx.tracker is None:
        return []
    return [run.info.run_id for run in trial_runs(ctx.tracker, ctx.experiment_id,
                                                   ctx.study_run_id, number=number,
                                                   running=True)]
