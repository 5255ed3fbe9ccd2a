"""Trials whose worker is gone: found, failed as LOST with their run closed, and their
parameters run again once.

Each trial records the host and pid of its worker; a trial still RUNNING whose worker process
is gone from this machine (SIGKILL, the kernel's out-of-memory killer), or whose Optuna
heartbeat stopped (an RDB storage: any machine), is lost. The check runs under the study lock:
at a sibling's next ask, and at the start and end of every `search`.
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

    from hpo.search.trial import StudyContext

log = logging.getLogger(__name__)

# Trial user attrs: where the trial runs, and which lost trial it retries.
HOST, PID, WORKER, RETRY_OF = "host", "pid", "worker", "retry_of"


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
    from optuna.trial import TrialState as OptunaState

    host = socket.gethostname()
    expired = _heartbeat_expired(study)
    lost = []
    for trial in study.get_trials(deepcopy=False, states=(OptunaState.RUNNING,)):
        if trial._trial_id not in expired and not _worker_gone(trial, host):
            continue
        run_ids = open_trial_runs(ctx, trial.number)
        try:
            study._storage.set_trial_user_attr(trial._trial_id, "fail_reason",
                                               TrialState.LOST.reason)
            if run_ids:
                study._storage.set_trial_user_attr(trial._trial_id, "mlflow_run_id", run_ids[0])
            study.tell(trial.number, state=OptunaState.FAIL)
        except UpdateFinishedTrialError:  # another machine recovered it first
            continue
        if ctx.tracker is not None:
            for run_id in run_ids:
                TrialRun(ctx.tracker, run_id).finish(TrialState.LOST)
        if RETRY_OF not in trial.user_attrs:
            study.enqueue_trial(dict(trial.params), user_attrs={RETRY_OF: trial.number})
        log.warning("trial %d: its worker (%s, pid %s) is gone; %s", trial.number,
                    trial.user_attrs.get(HOST), trial.user_attrs.get(PID),
                    "not retried again" if RETRY_OF in trial.user_attrs else "retrying it")
        lost.append(trial.number)
    return lost


def open_trial_runs(ctx: StudyContext, number: int) -> list[str]:
    """The ids of trial `number`'s runs still open under the study run (one, normally; none
    when tracking is off or the trial died before its run was opened)."""
    if ctx.tracker is None:
        return []
    return [run.info.run_id for run in trial_runs(ctx.tracker, ctx.experiment_id,
                                                   ctx.study_run_id, number=number,
                                                   running=True)]
