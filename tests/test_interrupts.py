"""Ctrl-C held back while the store is written (`hpo.tracking.interrupts`)."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from hpo.tracking.interrupts import interrupts_held


def _press_ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_is_raised_once_the_block_has_ended() -> None:
    handler = signal.getsignal(signal.SIGINT)
    done = []
    with pytest.raises(KeyboardInterrupt), interrupts_held():
        _press_ctrl_c()
        _press_ctrl_c()  # pressed twice: raised once
        done.append("the rest of the block")
    assert done == ["the rest of the block"]
    assert signal.getsignal(signal.SIGINT) is handler


def test_without_ctrl_c_the_block_runs_and_the_handler_is_put_back() -> None:
    handler = signal.getsignal(signal.SIGINT)
    with interrupts_held():
        with interrupts_held():  # nested
            pass
        assert signal.getsignal(signal.SIGINT) is not handler
    assert signal.getsignal(signal.SIGINT) is handler
    with pytest.raises(KeyboardInterrupt):  # and it works again, at once
        _press_ctrl_c()


def test_the_handler_in_place_is_the_one_called() -> None:
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with interrupts_held():
            _press_ctrl_c()
            assert calls == []
        assert calls == [signal.SIGINT]
    finally:
        signal.signal(signal.SIGINT, previous)


def test_an_error_in_the_block_still_comes_with_the_interrupt() -> None:
    with pytest.raises(KeyboardInterrupt) as caught, interrupts_held():
        _press_ctrl_c()
        raise ValueError("the block failed")
    assert isinstance(caught.value.__context__, ValueError)


def test_other_threads_are_left_alone() -> None:
    seen = []

    def other() -> None:
        with interrupts_held():
            seen.append(signal.getsignal(signal.SIGINT))

    handler = signal.getsignal(signal.SIGINT)
    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    assert seen == [handler]
