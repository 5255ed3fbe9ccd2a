"""The driver's side of a running Ray search: trial numbers, the observer's events, outcomes
still to collect from stopped trials, and whether to start another trial. Tune's callback,
stopper and searcher (tune.py) find it by the experiment path: they are pickled with the
experiment, and this is not.

A Tune trial keeps its number and its MLflow run for good, however often it starts: resumed by
synchronous HyperBand, restarted by PBT from another trial's checkpoint, restored after a crash.
Both are told to its actor before it trains (`assign`), and both are kept in the study's
attributes, so that a restored search knows them too.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.config.trial import TrialOutcome, TrialState
from hpo.search.backends.ray.space import from_ray
from hpo.search.checkpoints import CHECKPOINT_FILE, load_checkpoint
from hpo.search.trial import TrialRunner
from hpo.tracking.runs import close_open_runs
from imgcls.errors import ConfigError, DataError, ImgclsError, first_line

if TYPE_CHECKING:
    from hpo.search.context import StudyContext
    from hpo.search.events import SearchObserver

log = logging.getLogger(__name__)

Remember = Callable[[dict[str, int], dict[str, str]], None]  # (numbers, run ids) to keep


class Driver:
    """State of one running search, in the driver process: trial numbers, the observer's
    events, outcomes still to collect, and whether to start another trial. Tune's callback,
    stopper and searcher find it by the experiment path (they are pickled with the
    experiment; this is not)."""

    def __init__(self, ctx: StudyContext, observer: SearchObserver, finished: int,
                 next_number: int, deadline: float | None, *,
                 numbers: dict[str, int] | None = None, run_ids: dict[str, str] | None = None,
                 remember: Remember | None = None) -> None:
        self.spec = ctx.spec
        self.ctx = ctx
        self.observer = observer
        self.finished = finished  # trials that count towards spec.trials
        self.next_number = max([next_number, *[n + 1 for n in (numbers or {}).values()]])
        self.deadline = deadline  # time.monotonic() after which no new trial starts
        self.numbers = dict(numbers or {})  # Tune trial id -> trial number, for good
        self.run_ids = dict(run_ids or {})  # trial number (text) -> its MLflow run
        self.remember = remember
        self.running: dict[str, int] = {}  # Tune trial id -> its number, while it runs
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
        """A Tune trial's actor starts (or starts again): its number and run, before it
        restores or trains (Tune schedules both after this callback; an actor runs its calls
        in order)."""
        number = self.numbers.get(trial.trial_id)
        first = number is None
        if number is None:
            number = self.numbers[trial.trial_id] = self.next_number
            self.next_number += 1
            self.started += 1
            self._remember()
        actor = trial.temporary_state.ray_actor
        actor.assign.remote(number, self.run_ids.get(str(number)))
        self.running[trial.trial_id] = number
        self.actors[trial.trial_id] = actor
        self.open.add(trial.trial_id)
        if first:
            self._tell(self.observer.trial_started, number,
                       from_ray(self.spec.space, trial.config))

    def trial_result(self, trial: Any, result: Mapping[str, Any]) -> None:
        info = info_of(result)
        number = self.running.get(trial.trial_id)
        if number is None:
            return
        if info.get("run_id") and self.run_ids.get(str(number)) != info["run_id"]:
            self.run_ids[str(number)] = info["run_id"]
            self._remember()
        if info.get("resumed") is not None:
            self._tell(self.observer.trial_resumed, number, *info["resumed"])
        if "epoch" in info:
            self._tell(self.observer.epoch_finished, number, info["epoch"], info["metrics"])
        if "outcome" in info:  # it ended by itself: its last epoch, early stopping, a failure
            self.concluded(trial.trial_id, outcome_from(info["outcome"]))
        elif "error" in info:
            kind, message = info["error"]
            self.trial_lost(trial.trial_id, retried=False)
            if self.stop_error is None:
                error = {"data": DataError, "config": ConfigError}.get(kind, RuntimeError)
                self.stop_error = error(f"a Ray trial could not run: {message}")
        elif result.get("done"):  # the scheduler stopped it after this epoch: pruned
            actor = self.actors[trial.trial_id]
            prune = info.get("epoch", 0) < self.spec.max_epochs
            self.concluding[actor.conclude.remote(prune)] = trial.trial_id

    def _remember(self) -> None:
        if self.remember is not None:
            self.remember(self.numbers, self.run_ids)

    def trial_lost(self, trial_id: str, retried: bool, error: BaseException | None = None
                   ) -> None:
        """A trial's actor died (or Tune failed it): its run, if still open, ends as lost; Tune
        retries it once (`retried`), from its last checkpoint, under the same number."""
        number = self.running.pop(trial_id, None)
        self.actors.pop(trial_id, None)
        if number is not None:
            close_runs(self.ctx, TrialState.LOST, numbers={number})
        if error is not None:
            self.errors.append(first_line(error))
        if not retried:
            self.ended.add(trial_id)

    def trial_completed(self, trial: Any) -> None:
        """Tune ended a trial. One stopped while paused (synchronous HyperBand's halving) has
        no actor to end it: it ends here, PRUNED, from its last checkpoint."""
        trial_id = trial.trial_id
        if trial_id in self.ended or trial_id in self.concluding.values() \
                or trial_id not in self.numbers:
            return
        number = self.numbers[trial_id]
        state = None
        if trial.checkpoint is not None:
            state, _ = load_checkpoint(Path(trial.checkpoint.path) / CHECKPOINT_FILE)
        runner = TrialRunner(self.ctx, number, from_ray(self.spec.space, trial.config))
        try:
            runner.begin(state, run_id=self.run_ids.get(str(number)))
            if not runner.done:
                runner.stop(f"stopped by the scheduler at epoch {runner.epoch}")
            outcome = runner.end()
        except Exception as exc:
            outcome = runner.failed(exc)
        self.concluded(trial_id, outcome)

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
