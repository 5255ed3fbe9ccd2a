"""The classes a Ray search hands to Tune, which derive from Ray's: imported, with Ray, only when
a study runs on the Ray backend (Ray pickles them by reference, so they live at module level).

- RayTrial: one trial in its own actor, an epoch per step, its state Tune's checkpoint.
- TrialEvents: Tune's events, on the driver, to the running search.
- HaltSearch: ends the Tune run when the search is interrupted or a trial cannot start.
- StudySearch: OptunaSearch that knows the study (history, enqueued configurations, the count).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import optuna
import ray
import torch
from ray.train._internal.session import _TrainingResult
from ray.tune import Callback, Stopper, Trainable
from ray.tune.result import SHOULD_CHECKPOINT
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from hpo.config.space import Scalar
from hpo.config.study import StudySpec
from hpo.config.trial import TrialOutcome, TrialState
from hpo.search.backends.optuna.samplers import SAMPLERS
from hpo.search.backends.ray.driver import error_kind, info_of, live_driver
from hpo.search.backends.ray.placement import TrialSetup
from hpo.search.backends.ray.space import from_ray, nothing_to_search, to_ray
from hpo.search.checkpoints import CHECKPOINT_FILE, load_checkpoint, save_checkpoint
from hpo.search.context import StudyContext
from hpo.search.trial import TrialRunner
from hpo.tracking.client import Tracker
from hpo.tracking.tags import PERTURBED_PREFIX, TAG_DEVICE, TAG_WORKER
from imgcls.data.prepare import prepare_data
from imgcls.errors import first_line

log = logging.getLogger(__name__)


class RayTrial(Trainable):
    """One trial in its own actor, an epoch per `step()`: THE trial's runner, paced by Tune.

    `save_checkpoint`/`load_checkpoint` are the runner's checkpoint (the trainer's whole state,
    and what the trial is), so Tune can pause a trial and resume it (synchronous HyperBand),
    restart a trial from another's checkpoint with perturbed hyperparameters (PBT), and restore
    trials after the driver died. Before the first step the driver tells the actor which trial
    it runs (`assign`: number and MLflow run). A trial that ends by itself (its last epoch,
    early stopping, a failure) reports its outcome with its last epoch; one that the scheduler
    stops is ended by the driver's `conclude`, which Tune's stop waits behind."""

    def setup(self, config: dict[str, Any], setup: TrialSetup) -> None:
        self._setup = setup
        self._ctx: StudyContext | None = None  # built by the first trial of this actor
        self.reset_config(config)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        """The actor takes on a trial (a new one, or one restarted by PBT with a new config;
        imports, the decoded images and the tracker are set up once per actor)."""
        self._params = from_ray(self._setup.spec.space, new_config)
        self._number: int | None = None
        self._run_id: str | None = None
        self._runner: TrialRunner | None = None
        self._loaded: dict[str, Any] | None = None  # a checkpoint to go on from
        self._outcome: dict[str, Any] | None = None
        self._failed: TrialOutcome | None = None  # the trial could not begin
        return True

    def assign(self, number: int, run_id: str | None) -> None:
        """Which trial this is: its number, and its MLflow run if it has one already."""
        self._number, self._run_id = number, run_id

    def step(self) -> dict[str, Any]:
        objective = self._setup.spec.objective
        info: dict[str, Any] = {}
        try:
            runner = self._runner or self._begin(info)
        except Exception as exc:  # a study-wide problem (data, tracking): not a trial's
            info = {"error": [error_kind(exc), first_line(exc)]}
            return {objective: math.nan, "epoch": 0, "done": True, "hpo": json.dumps(info)}
        if self._failed is not None:  # its hyperparameters or its model
            return self._ended(self._failed, info)
        try:
            metrics = runner.step()
            if self._setup.pbt and runner.run is not None:
                runner.run.log_metrics({f"{PERTURBED_PREFIX}{k}": float(v)
                                        for k, v in runner.perturbed().items()},
                                       step=runner.epoch)
            info.update(epoch=runner.epoch, metrics={k: float(v) for k, v in metrics.items()},
                        run_id=runner.run.run_id if runner.run else None)
            if runner.done:
                return self._ended(runner.end(), info)
            due = runner.due_checkpoint() is not None
        except Exception as exc:
            return self._ended(runner.failed(exc), info)
        # Tune saves the trial's checkpoint after this result when the study's checkpoint_every
        # makes one due (and before a pause or an exploit)
        return {objective: metrics.get(objective, math.nan), "epoch": runner.epoch,
                SHOULD_CHECKPOINT: due, "hpo": json.dumps(info)}

    def conclude(self, prune: bool) -> dict[str, Any] | None:
        """The scheduler stopped the trial after its last report: it ends there, PRUNED (or,
        after its last epoch, COMPLETE). Its outcome, once its run is closed."""
        runner = self._runner
        if self._outcome is not None or runner is None:
            return self._outcome
        try:
            if prune and not runner.done:
                runner.stop(f"stopped by the scheduler at epoch {runner.epoch}")
            outcome = runner.end()
        except Exception as exc:
            outcome = runner.failed(exc)
        self._outcome = asdict(outcome)
        return self._outcome

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        runner = self._runner
        if runner is not None and runner.trainer is not None:
            state = runner.checkpoint()
            with runner.policy.writing(state, runner.trainer.seconds):
                save_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE, state)
        elif self._loaded is not None:  # restored, not yet stepped: what it was restored from
            save_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE, self._loaded)

    def restore(self, checkpoint_path: Any) -> None:
        """Go on from the checkpoint Tune names, or, where that one is gone, from the newest
        of the trial's own that exists: Tune keeps only the newest (num_to_keep) and saves its
        experiment state a moment later, so a search killed in between names the checkpoint
        just replaced. With none left the trial starts again in its run."""
        checkpoint = getattr(checkpoint_path, "checkpoint", None)
        if checkpoint is not None and checkpoint.filesystem.type_name == "local" \
                and not Path(checkpoint.path).exists():
            newer = sorted(Path(checkpoint.path).parent.glob("checkpoint_*"))
            if not newer:
                log.warning("trial %s: its checkpoint %s is gone; it starts again",
                            self._number, checkpoint.path)
                self._loaded, self._runner = None, None
                return
            checkpoint_path = _TrainingResult(
                checkpoint=ray.tune.Checkpoint.from_directory(str(newer[-1])),
                metrics=checkpoint_path.metrics)
        super().restore(checkpoint_path)

    def load_checkpoint(self, checkpoint_dir: Any) -> None:
        state, why = load_checkpoint(Path(checkpoint_dir) / CHECKPOINT_FILE)
        if why:
            log.warning("%s", why)
        self._loaded, self._runner = state, None  # taken up at the next step

    def _begin(self, info: dict[str, Any]) -> TrialRunner:
        """The runner for the assigned trial: from its own checkpoint, from another trial's
        (PBT's exploit), or from epoch 1."""
        if self._ctx is None:
            self._ctx = self._context()
        assert self._number is not None, "the driver assigns the number before step()"
        runner = self._runner = TrialRunner(self._ctx, self._number, self._params,
                                            self._placement())
        state = self._loaded
        own = state is not None and state.get("trial", {}).get("number") == self._number
        try:
            if own or state is None:
                why = runner.begin(state, again=self._run_id is not None)
                if runner.epoch or why or self._run_id is not None:
                    info["resumed"] = [runner.epoch, why]
            else:
                runner.begin(None, run_id=self._run_id)
                donor = runner.adopt(state)
                info["resumed"] = [runner.epoch, None]
                info["exploited"] = donor
        except Exception as exc:
            self._failed = runner.failed(exc)
        self._loaded = None
        return runner

    def _ended(self, outcome: TrialOutcome, info: dict[str, Any]) -> dict[str, Any]:
        self._outcome = asdict(outcome)
        info["outcome"] = self._outcome
        value = outcome.value
        return {self._setup.spec.objective: math.nan if value is None else value,
                "epoch": outcome.epochs, "done": True, "hpo": json.dumps(info)}

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
        # the host the actor runs on, as the Optuna backend's workers name theirs
        return {TAG_DEVICE: device, TAG_WORKER: f"{socket.gethostname()}/ray-{device}"}


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

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any,
                          **info: Any) -> None:
        if (driver := live_driver(self.key)) is not None:
            driver.trial_completed(trial)


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
