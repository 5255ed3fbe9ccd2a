"""The classes a Ray search hands to Tune, which derive from Ray's: imported, with Ray, only when
a study runs on the Ray backend (Ray pickles them by reference, so they live at module level).

- RayTrial: one trial attempt in its own actor, `run_trial` in a thread paced by Tune.
- TrialEvents: Tune's events, on the driver, to the running search.
- HaltSearch: ends the Tune run when the search is interrupted or a trial cannot start.
- StudySearch: OptunaSearch that knows the study (history, enqueued configurations, the count).
"""

from __future__ import annotations

import json
import math
import queue
import threading
import warnings
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray.tune import Callback, Stopper, Trainable
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from hpo.config.space import Scalar
from hpo.config.study import StudySpec
from hpo.config.trial import TrialOutcome, TrialState
from hpo.search.backends.optuna.samplers import SAMPLERS
from hpo.search.backends.ray.driver import (
    GO_ON,
    PRUNE,
    STOP_NOW,
    error_kind,
    info_of,
    live_driver,
)
from hpo.search.backends.ray.placement import TrialSetup
from hpo.search.backends.ray.space import from_ray, nothing_to_search, to_ray
from hpo.search.context import StudyContext
from hpo.search.trial import run_trial
from hpo.tracking.client import Tracker
from hpo.tracking.tags import TAG_DEVICE, TAG_WORKER
from imgcls.data.prepare import prepare_data
from imgcls.errors import first_line


class RayTrial(Trainable):
    """One trial attempt in its own actor: `run_trial` in a thread, paced by Tune.

    Each step returns one epoch's report (or, last, the outcome). After a report the
    thread waits for a verdict from the driver, who sends it as it hears of the report,
    before Tune's next train() call (an actor runs its calls in order): `verdict` (go on,
    or interrupted), or `conclude` (the scheduler stopped the trial: pruned, or after its
    last epoch, finished). `cleanup` without a verdict means interrupted."""

    def setup(self, config: dict[str, Any], setup: TrialSetup) -> None:
        self._setup = setup
        self._ctx: StudyContext | None = None  # built by the first trial of this actor
        self.reset_config(config)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """The actor takes on another trial (Tune reuses actors: imports, the decoded
        images and the tracker are set up once per actor, not per trial)."""
        if getattr(self, "_thread", None) is not None:
            self.cleanup()
        self._params = from_ray(self._setup.spec.space, new_config)
        self._number: int | None = None
        self._events: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self._verdicts: queue.Queue[str] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._waiting = False  # the thread waits for a verdict on its last report
        return True

    def assign(self, number: int) -> None:
        """The trial number, from the driver, before the first step."""
        self._number = number

    def step(self) -> dict[str, Any]:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, daemon=True,
                                            name="imgcls-hpo-trial")
            self._thread.start()
        return self._report(self._events.get())

    def verdict(self, verdict: str) -> None:
        """GO_ON or STOP_NOW for the epoch last reported (ignored after the last epoch,
        which waits for nothing)."""
        if self._waiting:
            self._waiting = False
            self._verdicts.put(verdict)

    def conclude(self, prune: bool) -> dict[str, Any] | None:
        """The scheduler stopped the trial after its last report: prune it there (or, after
        the last epoch, let it finish); returns the outcome once its run is closed."""
        self.verdict(PRUNE if prune else GO_ON)
        return self._finish()

    def cleanup(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.verdict(STOP_NOW)  # stopped without a verdict: the search was interrupted
            self._finish()

    def save_checkpoint(self, checkpoint_dir: str) -> dict[str, Any]:
        return {}  # a trial trains in one piece: nothing to resume from

    def load_checkpoint(self, checkpoint: Any) -> None:
        pass

    def _finish(self) -> dict[str, Any] | None:
        assert self._thread is not None
        self._thread.join()
        outcome = None
        while not self._events.empty():
            event = self._events.get()
            if event[0] == "outcome":
                outcome = event[1]
        return outcome

    def _report(self, event: tuple[Any, ...]) -> dict[str, Any]:
        objective = self._setup.spec.objective
        kind = event[0]
        if kind == "epoch":
            _, epoch, metrics, waiting = event
            self._waiting = waiting
            return {objective: metrics.get(objective, math.nan), "epoch": epoch,
                    "hpo": json.dumps({"epoch": epoch, "metrics": metrics})}
        if kind == "outcome":
            outcome = event[1]
            value = outcome["value"]
            return {objective: math.nan if value is None else value,
                    "epoch": outcome["epochs"], "done": True,
                    "hpo": json.dumps({"outcome": outcome})}
        # "error": the study's data or tracking cannot be opened here; or "interrupted"
        info = {"error": list(event[1:])} if kind == "error" else {"interrupted": True}
        return {objective: math.nan, "epoch": 0, "done": True, "hpo": json.dumps(info)}

    def _work(self) -> None:
        try:
            if self._ctx is None:
                self._ctx = self._context()
            ctx = self._ctx
        except Exception as exc:  # a study-wide problem (data, tracking): not a trial's
            self._events.put(("error", error_kind(exc), first_line(exc)))
            return
        metrics: dict[str, float] = {}
        max_epochs = self._setup.spec.max_epochs

        def on_epoch(number: int, epoch: int, values: Mapping[str, float]) -> None:
            metrics.clear()
            metrics.update({k: float(v) for k, v in values.items()})

        def should_prune(epoch: int, value: float) -> bool:
            waits = epoch < max_epochs  # after the last epoch there is nothing to stop
            self._events.put(("epoch", epoch, dict(metrics), waits))
            if not waits:
                return False
            verdict = self._verdicts.get()
            if verdict == STOP_NOW:
                raise KeyboardInterrupt  # run_trial closes the run KILLED, "interrupted"
            return verdict == PRUNE

        assert self._number is not None, "the driver assigns the number before step()"
        try:
            outcome = run_trial(ctx, self._number, self._params, should_prune, on_epoch,
                                placement=self._placement())
        except KeyboardInterrupt:
            self._events.put(("interrupted",))
            return
        except BaseException as exc:  # run_trial returns failures: this is a bug; say it
            self._events.put(("error", error_kind(exc), first_line(exc)))
            raise
        self._events.put(("outcome", asdict(outcome)))

    def _context(self) -> StudyContext:
        s = self._setup
        torch.set_num_threads(s.threads)
        data = prepare_data(s.spec.data, s.spec.seed, Path(s.cache_dir))
        tracker = Tracker(s.tracking_uri, Path(s.artifact_root) if s.artifact_root else None)
        # Ray pins a GPU trial's actor to its GPU(s) through CUDA_VISIBLE_DEVICES
        device = torch.device("cuda", 0) if s.use_gpu else torch.device("cpu")
        return StudyContext(s.spec, data, device, tracker, s.experiment_id, s.study_run_id)

    def _placement(self) -> dict[str, str]:
        gpus = ray.get_gpu_ids() if self._setup.use_gpu else []
        device = f"cuda:{gpus[0]}" if gpus else "cpu"
        return {TAG_DEVICE: device, TAG_WORKER: f"ray/{ray.util.get_node_ip_address()}"}

class TrialEvents(Callback):
    """Tune's events, on the driver, to the running search (found by `key`)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
        if (driver := live_driver(self.key)) is not None:
            driver.step(trials)

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        if (driver := live_driver(self.key)) is not None:
            driver.trial_started(trial)

    def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                        result: dict[str, Any], **info: Any) -> None:
        if (driver := live_driver(self.key)) is not None:
            driver.trial_result(trial, result)

    def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any,
                         **info: Any) -> None:
        if (driver := live_driver(self.key)) is not None:
            driver.trial_lost(trial.trial_id, retried=True, error=trial.get_error())

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                       **info: Any) -> None:
        if (driver := live_driver(self.key)) is not None:
            driver.trial_lost(trial.trial_id, retried=False, error=trial.get_error())

class HaltSearch(Stopper):
    """Ends the Tune run when the search is interrupted or a trial cannot start."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        return False

    def stop_all(self) -> bool:
        driver = live_driver(self.key)
        return driver is not None and driver.should_stop()

class StudySearch(OptunaSearch):
    """OptunaSearch that knows the study: earlier trials as history, enqueued
    configurations first, and no new trial once enough are finished or under way, or
    after the timeout."""

    def __init__(self, key: str, spec: StudySpec, seed: int, history: list[TrialOutcome],
                 enqueue: list[dict[str, Scalar]]) -> None:
        self.key = key
        searched = bool(spec.space.searched)
        space = (OptunaSearch.convert_search_space(to_ray(spec.space)) if searched
                 else nothing_to_search)
        sampler = SAMPLERS.get(spec.sampler)(seed, spec.trials, spec.space)
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # "a new study created..."
        try:
            super().__init__(space=space, metric=spec.objective, mode=spec.direction,
                             sampler=sampler)
        finally:
            optuna.logging.set_verbosity(verbosity)
        self._max_epochs = spec.max_epochs
        if not searched:
            return
        for config in enqueue:
            self._ot_study.enqueue_trial(dict(config))
        names = [p.name for p in spec.space.searched]
        for t in history:
            params = {n: t.params[n] for n in names if n in t.params}
            if (len(params) < len(names) or not t.state.counts
                    or not all(spec.space.contains(n, v) for n, v in params.items())):
                continue  # another space, or not a result: nothing to learn from
            if t.state == TrialState.COMPLETE and t.value is not None:
                self.add_evaluated_point(params, t.value)
            elif t.state == TrialState.PRUNED:
                self.add_evaluated_point(params, t.value, pruned=True)  # type: ignore[arg-type]
            elif t.state == TrialState.FAILED:
                self.add_evaluated_point(params, math.nan, error=True)

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        driver = live_driver(self.key)
        if driver is None or not driver.may_start():
            return Searcher.FINISHED
        config = super().suggest(trial_id)
        driver.suggested(trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        # A trial Tune restored after a crash reports its first epochs again: Optuna keeps
        # the first report of each step and says so in a warning, which is not news here.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The reported value is ignored")
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict[str, Any] | None = None,
                          error: bool = False) -> None:
        # Tell Optuna how the trial ended (not the last report Tune saw): a FAIL has no
        # value, a trial stopped before its last epoch was pruned.
        state = info_of(result or {}).get("outcome", {}).get("state")
        epoch = (result or {}).get("epoch", 0)
        if error or state == TrialState.FAILED:
            super().on_trial_complete(trial_id, None, error=True)
        elif state == TrialState.COMPLETE or (state is None and epoch >= self._max_epochs):
            super().on_trial_complete(trial_id, result)
        else:
            super().on_trial_complete(trial_id, None)
