"""Artifacts recorded in the background: a trial's figures are rendered while the next trial
trains, instead of before it starts."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class ArtifactWriter:
    """A thread that records artifacts in the background, in the order submitted. A failure is
    logged as a warning (the trial's result stands: it is in its run already). `close()` waits
    for what was submitted."""

    def __init__(self) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[], None]) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="imgcls-hpo-artifacts",
                                            daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def close(self) -> None:
        """Wait for every submitted job; the writer may be used again afterwards."""
        if self._thread is not None and self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()
        self._thread = None

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job()
            except Exception as exc:
                log.warning("a trial's figures could not be recorded: %s", exc)


class Inline:
    """An artifact writer that records at once, in the caller's thread (for contexts without a
    search around them, and tests that read the artifacts right away)."""

    def submit(self, job: Callable[[], None]) -> None:
        job()

    def close(self) -> None:
        pass
