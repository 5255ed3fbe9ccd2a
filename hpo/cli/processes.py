"""A server the CLI runs in the foreground (the MLflow UI) and takes down whole when it stops.

MLflow's UI is a tree of processes (uvicorn workers, job consumers). It runs in a process group
of its own, so that Ctrl-C reaches it once, through us, rather than as a traceback from each
worker; and however the command ends (Ctrl-C, SIGTERM, SIGHUP when the terminal closes, an
error) the whole group is stopped: SIGTERM, then SIGKILL for what is still there after a grace
period. Nothing is left serving.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from types import FrameType

GRACE_SECONDS = 10.0


class _Stop(Exception):
    """SIGTERM or SIGHUP arrived."""


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop(signum)


def run_in_foreground(command: Sequence[str]) -> int:
    """Run `command` until it exits or this process is told to stop; return its exit code (0
    when stopped by Ctrl-C or a signal). Its whole process group ends with it."""
    previous = {s: signal.signal(s, _raise_stop) for s in (signal.SIGTERM, signal.SIGHUP)}
    process = subprocess.Popen(list(command), start_new_session=True)
    try:
        return process.wait()
    except (KeyboardInterrupt, _Stop):
        return 0
    finally:
        stop_group(process)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """End `process`'s process group (it leads one: start_new_session): SIGTERM, then SIGKILL
    for whatever of the group is still there after GRACE_SECONDS."""
    deadline = time.monotonic() + GRACE_SECONDS
    try:
        os.killpg(process.pid, signal.SIGTERM)
        while time.monotonic() < deadline:
            process.poll()  # reap the leader, or it stays in the group as a zombie
            os.killpg(process.pid, 0)  # raises once no process of the group is left
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()
