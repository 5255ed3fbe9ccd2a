"""Ctrl-C between store writes (MLflow's, Optuna's), never inside one.

A KeyboardInterrupt raised inside a SQLite transaction makes SQLAlchemy close the connection,
but the traceback still holds the connection's statements, so SQLite keeps the database locked
for as long as the exception is handled. The handler's own writes (the trial told FAIL, its run
closed KILLED) then wait on that lock until they time out, and the trial's record stays RUNNING.
Holding the interrupt until the operation ends lets those writes through.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

_holding = False  # whether the main thread is in an interrupts_held block


@contextmanager
def interrupts_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block ends, then deliver it to the handler that was
    in place. Only the main thread can be interrupted, so elsewhere this does nothing; blocks
    nest. The handler is swapped rather than the signal masked: a masked signal goes to another
    thread (torch starts some), and the main thread's handler runs all the same."""
    global _holding
    if _holding or threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGINT)
    if not callable(handler):  # ignored, or left to the OS: nothing to hold back
        yield
        return
    caught: list[FrameType | None] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(frame))
    _holding = True
    try:
        yield
    finally:
        _holding = False
        signal.signal(signal.SIGINT, handler)
        if caught:
            handler(signal.SIGINT, caught[0])
