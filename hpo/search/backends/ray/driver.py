"""The driver's side of a running Ray search: trial numbers, the observer's events, outcomes
still to collect from stopped trials, and whether to start another trial. Tune's callback,
stopper and searcher (tune.py) find it by the experiment path: they are pickled with the
experiment, and this is not."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from hpo.config.trial import TrialOutcome, TrialState
from hpo.search.backends.ray.space import from_ray
from hpo.tracking.runs import close_open_runs
from imgcls.errors import ConfigError, DataError, ImgclsError, first_line

if TYPE_CHECKING:
    from hpo.search.context import StudyContext
    from hpo.search.events import SearchObserver

log = logging.getLogger(__name__)

# Verdicts a trial waits for after each epoch's report.
GO_ON, PRUNE, STOP_NOW = "go on", "prune", "interrupt"


class Driver:
    """State of one running search, in the driver process: trial numbers, the observer's
    events, outcomes still to collect, and whether to start another trial. Tune's callback,
    stopper and searcher find it by the experiment path (they are pickled with the
    experiment; this is not)."""

    def __init__(self, ctx: StudyContext, observer: SearchObserver, finished: int,
                 next_number: int, deadline: float | None) -> None:
        self.spec = ctx.spec
        self.ctx = ctx
        self.observer = observer
        self.finished = finished  # trials that count towards spec.trials
        self.next_number = next_number
        self.deadline = deadline  # time.monotonic() after which no new trial starts
        self.running: dict[str, int] = {}  # Tune trial id -> number of its current attempt
        self.actors: dict[str, Any] = {}  # Tune trial id -> its actor (while running)
        self.open: set[str] = set()  # Tune trials created and not ended
        self.ended: set[str] = set()
        self.concluding: dict[Any, str] = {}  # outcome ref of a stopped trial -> its trial id
        self.started = 0  # trial attempts started by this search
        self.errors: list[str] = []  # trials that failed inside Ray itself
        self.stop_error: Exception | None = None  # a trial could not run at all: stop
        self.interrupted = False

    # -- deciding -----------------------------------------------------------------------------

    def may_start(self) -> bool:
        """Another trial is wanted: not enough finished or under way, before the deadline."""
        if self.stop_error is not None or self.interrupted:
            return False
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return False
        return self.finished + len(self.open - self.ended) < self.spec.trials

    def should_stop(self) -> bool:
        return self.stop_error is not None or self.interrupted

    # -- events from Tune ---------------------------------------------------------------------

    def suggested(self, trial_id: str) -> None:
        self.open.add(trial_id)

    def step(self, trials: list[Any]) -> None:
        """Trials restored from an earlier run are under way too."""
        self.open |= {t.trial_id for t in trials
                      if t.status in ("PENDING", "RUNNING", "PAUSED")} - self.ended
        self.collect(timeout=0)

    def trial_started(self, trial: Any) -> None:
        number = self.next_number
        self.next_number += 1
        self.started += 1
        actor = trial.temporary_state.ray_actor
        actor.assign.remote(number)  # before Tune's first train() call: actors run in order
        self.running[trial.trial_id] = number
        self.actors[trial.trial_id] = actor
        self.open.add(trial.trial_id)
        self._tell(self.observer.trial_started, number, from_ray(self.spec.space, trial.config))

    def trial_result(self, trial: Any, result: Mapping[str, Any]) -> None:
        info = info_of(result)
        number = self.running.get(trial.trial_id)
        if number is None:
            return
        actor = self.actors[trial.trial_id]
        if "epoch" in info:
            self._tell(self.observer.epoch_finished, number, info["epoch"], info["metrics"])
            if result.get("done"):  # the scheduler stopped it after this epoch
                prune = info["epoch"] < self.spec.max_epochs
                self.concluding[actor.conclude.remote(prune)] = trial.trial_id
            else:  # sent before Tune's next train() call reaches the actor
                actor.verdict.remote(STOP_NOW if self.should_stop() else GO_ON)
        elif "outcome" in info:
            self.concluded(trial.trial_id, outcome_from(info["outcome"]))
        elif "interrupted" in info:
            self.concluded(trial.trial_id, None)
        elif "error" in info:
            kind, message = info["error"]
            self.trial_lost(trial.trial_id, retried=False)
            if self.stop_error is None:
                error = {"data": DataError, "config": ConfigError}.get(kind, RuntimeError)
                self.stop_error = error(f"a Ray trial could not run: {message}")

    def trial_lost(self, trial_id: str, retried: bool, error: BaseException | None = None
                   ) -> None:
        """A trial's actor died (or Tune failed it): its run, if still open, ends as lost; Tune
        retries it once (`retried`), as a new trial number."""
        number = self.running.pop(trial_id, None)
        self.actors.pop(trial_id, None)
        if number is not None:
            close_runs(self.ctx, TrialState.LOST, numbers={number})
        if error is not None:
            self.errors.append(first_line(error))
        if not retried:
            self.ended.add(trial_id)

    def concluded(self, trial_id: str, outcome: TrialOutcome | None) -> None:
        self.running.pop(trial_id, None)
        self.actors.pop(trial_id, None)
        self.ended.add(trial_id)
        if outcome is None or outcome.state == TrialState.INTERRUPTED:
            return
        if outcome.state.counts:
            self.finished += 1
        self._tell(self.observer.trial_finished, outcome)

    def collect(self, timeout: float) -> None:
        """Outcomes of trials the scheduler stopped, as their actors deliver them."""
        if not self.concluding:
            return
        import ray
        from ray.exceptions import RayError

        refs = list(self.concluding)
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout)
        for ref in ready:
            trial_id = self.concluding.pop(ref)
            try:
                outcome = ray.get(ref)
            except RayError as exc:  # the actor died while recording the end
                self.trial_lost(trial_id, retried=False, error=exc)
                continue
            self.concluded(trial_id, outcome_from(outcome) if outcome else None)

    def abandon(self) -> None:
        """The driver itself was interrupted outside Tune's loop: end what still runs."""
        import ray

        for actor in self.actors.values():
            try:
                ray.kill(actor)
            except Exception as exc:  # already gone
                log.debug("could not kill a trial actor: %s", exc)
        self.interrupted = True

    def _tell(self, event: Callable[..., None], *args: Any) -> None:
        """An observer that raises KeyboardInterrupt (or a Ctrl-C landing in it) interrupts the
        search the way Tune's own handler does: trials stop, their runs close KILLED."""
        try:
            event(*args)
        except KeyboardInterrupt:
            self.interrupted = True


def error_kind(exc: BaseException) -> str:
    """How the driver re-raises a trial actor's error: "data" (DataError), "config" (any
    other error a user can fix) or "bug"."""
    if isinstance(exc, DataError):
        return "data"
    return "config" if isinstance(exc, ImgclsError) else "bug"


def info_of(result: Mapping[str, Any]) -> dict[str, Any]:
    """What a trial's report says besides the objective: {"epoch", "metrics"}, {"outcome"} or
    {"error"}. Sent as JSON text, so that Tune keeps it as it is instead of tracking every
    number in it (its experiment state would grow by kilobytes a trial)."""
    text = result.get("hpo")
    return json.loads(text) if isinstance(text, str) else {}


LIVE: dict[str, Driver] = {}  # experiment path -> the search running it in this process


def live_driver(key: str) -> Driver | None:
    return LIVE.get(key)


def close_runs(ctx: StudyContext, state: TrialState, numbers: set[int] | None = None) -> None:
    """Close the study's trial runs still open (all, or those of trial `numbers`) as `state`:
    their actor, or their search, is gone."""
    if ctx.tracker is not None:
        close_open_runs(ctx.tracker, ctx.experiment_id, ctx.study_run_id, state, numbers)


def outcome_from(fields: Mapping[str, Any]) -> TrialOutcome:
    """A TrialOutcome sent from a trial actor as a dict (dataclasses.asdict, through JSON)."""
    return TrialOutcome(**{**fields, "state": TrialState(fields["state"])})
