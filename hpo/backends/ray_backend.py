"""Ray Tune: every trial a Tune trial, run in its own Ray actor through `hpo.objective.run_trial`.

How a study maps onto Tune:
- Search: Ray's OptunaSearch over the study's space (converted here: `to_ray`), with Optuna's
  TPE or random sampler seeded like the Optuna backend's. One searcher for both, so that
  enqueued configurations, the trials of earlier searches (TPE learns from them) and
  `timeout` work alike.
- Pruning: a Tune scheduler (`SCHEDULERS`): ASHA, asynchronous HyperBand, or none. The
  study's default pruner, "sha" (successive halving), runs as ASHA here, which is its
  asynchronous form; so does "median".
- Placement: one trial per slot, `max_concurrent_trials` slots; a trial asks for its share of
  the cores, and 1/trials_per_gpu of a GPU when GPUs are used.
- State: Tune's experiment under `<store>/ray/<study>` (restored when a search was cut short:
  Tuner.restore), and a JSON file of study attributes beside it in that folder.
- Trials: MLflow is the record (`RayStudy.trials` reads the study run's trial runs), with the
  same layout as the Optuna backend's, since both call `run_trial`. Trial numbers are handed
  out by the driver as trials start: 0.. in order, unique across resumes (a retried or
  restored trial gets a new number).

Pruning, in detail: Tune stops a trial by calling its actor's `stop()`; a function trainable
hears of it only as an exit raised inside its next report, and its actor is dropped without
waiting for it to record anything. So trials are a class Trainable (`RayTrial`) that runs
`run_trial` in a thread, and after each epoch's report waits for the driver's verdict: go on,
prune, or interrupted. When the scheduler stops a trial early, the driver tells the actor to
prune (`RayTrial.conclude`) before Tune stops it, and the trial ends PRUNED in MLflow, assessed
like an Optuna-pruned one. An interrupted search (Ctrl-C, or an observer raising
KeyboardInterrupt) ends its running trials at their next epoch's end: FAIL "interrupted", closed
KILLED, not counted.

One search at a time per study: the Tune experiment folder has one writer. Importing this module
does not import Ray; the classes that derive from Ray's are built on first use (module
`__getattr__`) under module-level names, so that Ray pickles them by reference.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.backends.base import BACKENDS, SearchObserver, counts_as_finished
from hpo.objective import INTERRUPTED, WORKER_LOST, TrialOutcome, headline_test
from hpo.space import Choice, FloatRange, IntRange, Scalar, SearchSpace
from hpo.study import HParams, StudyError, StudySpec
from hpo.tracking import TAG_FAIL_REASON, TAG_ROLE, TAG_STATE, TAG_TRIAL
from imgcls.errors import ConfigError, DataError, ImgclsError, first_line
from imgcls.registry import Registry

if TYPE_CHECKING:
    from hpo.devices import Slot
    from hpo.objective import StudyContext
    from hpo.store import Store
    from hpo.tracking import Tracker

log = logging.getLogger(__name__)

STUDY_ATTRS = "imgcls_hpo.json"  # the study's attributes, in its Tune experiment folder
TUNE_FINISHED = "tune_finished"  # attr: the last Tune run ended by itself (nothing to restore)
ENQUEUED = "enqueued"  # attr: the configured `enqueue` entries already handed to a searcher
SAMPLERS = ("tpe", "random")  # Optuna samplers that OptunaSearch drives trial by trial
# Optuna pruner names that mean the same thing here: the study's default "sha" (successive
# halving, which ASHA is, asynchronously) and "median" (stop the trials that fall behind).
PRUNER_ALIASES = {"median": "asha", "sha": "asha"}
UNSUPPORTED_PRUNERS = {
    "pbt": "Population Based Training hands a better trial's weights to a worse one during "
           "training, and trials here train in one piece (hpo.objective.run_trial)",
}
GRACE_EPOCHS = 3  # ASHA and HyperBand stop no trial before its 3rd epoch, like Optuna's median
# Seconds between saves of Tune's experiment state: what a restore after a crash starts from.
CHECKPOINT_EVERY_S = "1"
# Seconds a stopped trial may take to record its end (test evaluation, artifacts) once the
# search is over, before its actor is dropped and its run closed as lost.
CONCLUDE_TIMEOUT_S = 600.0

# Verdicts a trial waits for after each epoch's report.
GO_ON, PRUNE, STOP_NOW = "go on", "prune", "interrupt"


# --- pruners: Tune schedulers --------------------------------------------------------------

SchedulerFactory = Callable[[StudySpec], Any]
SCHEDULERS: Registry[SchedulerFactory] = Registry("Ray pruner")


@SCHEDULERS.register("asha", why="asynchronous successive halving: keep the best quarter at "
                                 "epochs 3, 12, 48... (the default; 'median' runs as this)")
def _asha(spec: StudySpec) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler

    # Ray's create_scheduler drops unknown keyword arguments silently: the class, directly.
    # Rungs at grace * 4**k epochs (Ray's reduction factor 4, as Optuna's halving); a trial
    # with max_epochs below the grace period is never stopped.
    return AsyncHyperBandScheduler(time_attr="epoch", max_t=spec.max_epochs,
                                   grace_period=min(GRACE_EPOCHS, spec.max_epochs))


@SCHEDULERS.register("hyperband", why="asynchronous HyperBand: ASHA over 3 brackets of "
                                      "different grace periods")
def _hyperband(spec: StudySpec) -> Any:
    from ray.tune.schedulers import AsyncHyperBandScheduler

    # Tune's synchronous HyperBandScheduler pauses trials and resumes them from checkpoints,
    # which one-piece trials cannot do; ASHA over several brackets is the asynchronous
    # HyperBand (Li et al., 2020), as Optuna's HyperbandPruner is.
    return AsyncHyperBandScheduler(time_attr="epoch", max_t=spec.max_epochs,
                                   grace_period=min(GRACE_EPOCHS, spec.max_epochs), brackets=3)


@SCHEDULERS.register("none", why="run every trial to its end (early stopping still applies)")
def _fifo(spec: StudySpec) -> Any:
    from ray.tune.schedulers import FIFOScheduler

    return FIFOScheduler()


def pruner_name(pruner: str) -> str:
    """The Ray scheduler a study's `pruner` runs as; ConfigError for one Ray cannot run."""
    if pruner in UNSUPPORTED_PRUNERS:
        raise ConfigError(f"pruner {pruner!r} is not available with the Ray backend: "
                          f"{UNSUPPORTED_PRUNERS[pruner]}; use --pruner asha or hyperband")
    name = PRUNER_ALIASES.get(pruner, pruner)
    SCHEDULERS.entry(name)  # unknown: ConfigError listing the Ray pruners
    return name


def make_scheduler(spec: StudySpec) -> Any:
    """The Tune scheduler for the study's pruner."""
    return SCHEDULERS.get(pruner_name(spec.pruner))(spec)


# --- the search space ------------------------------------------------------------------------


def to_ray(space: SearchSpace) -> dict[str, Any]:
    """The searched parameters as Ray Tune domains. Bounds here are inclusive; Ray's integer
    upper bound is exclusive, hence high + 1 (float bounds: a continuous draw never lands on
    exactly HIGH either way)."""
    from ray import tune

    out: dict[str, Any] = {}
    for p in space.searched:
        if isinstance(p, FloatRange):
            out[p.name] = (tune.loguniform if p.log else tune.uniform)(p.low, p.high)
        elif isinstance(p, IntRange):
            out[p.name] = (tune.lograndint if p.log else tune.randint)(p.low, p.high + 1)
        elif isinstance(p, Choice):
            out[p.name] = tune.choice(list(p.choices))
    return out


def from_ray(space: SearchSpace, config: Mapping[str, Any]) -> dict[str, Scalar]:
    """A Tune trial's config back to the declared types, inside the declared bounds (Ray hands
    out numpy scalars; a log-scale draw may round a hair past its bound)."""
    values: dict[str, Scalar] = {}
    for p in space.searched:
        if p.name not in config:
            continue
        value = config[p.name]
        value = value.item() if hasattr(value, "item") else value
        if isinstance(p, IntRange):
            value = min(max(int(value), p.low), p.high)
        elif isinstance(p, FloatRange):
            value = min(max(float(value), p.low), p.high)
        values[p.name] = value
    return values


def _nothing_to_search(trial: Any) -> None:
    """OptunaSearch's define-by-run space for a study that searches nothing (all fixed)."""
    return None


def _trial_dirname(trial: Any) -> str:
    """Tune's folder per trial: its id (the default spells out every value sampled)."""
    return str(trial.trial_id)


# --- what a trial actor needs ----------------------------------------------------------------


@dataclass(frozen=True)
class TrialSetup:
    """What a trial actor needs to rebuild the study's context: sent once per Tune run."""

    spec: StudySpec  # with the data path made absolute: actors run in their own folders
    cache_dir: str  # the store's decoded-image cache: actors read it, never decode
    tracking_uri: str
    artifact_root: str | None
    experiment_id: str
    study_run_id: str
    use_gpu: bool
    threads: int  # torch intra-op threads per trial: its share of the cores


@dataclass(frozen=True)
class Placement:
    slots: int  # trials at a time
    resources: dict[str, float]  # per trial: {"cpu": cores share, "gpu": 1 / trials_per_gpu}
    threads: int

    @property
    def use_gpu(self) -> bool:
        return self.resources.get("gpu", 0) > 0


def plan_placement(spec: StudySpec, cluster: Mapping[str, float], slots: list[Slot] | None
                   ) -> Placement:
    """Slots and per-trial resources. `slots`: this machine's plan (a local runtime), None for
    a cluster, whose resources (`cluster`: ray.cluster_resources()) decide instead."""
    cores = float(cluster.get("CPU", 1))
    if slots is not None:
        count, use_gpu = len(slots), slots[0].gpu is not None
    else:
        gpus = int(cluster.get("GPU", 0)) if spec.gpus != "none" else 0
        use_gpu = gpus > 0
        count = gpus * spec.trials_per_gpu if use_gpu else spec.workers
    resources = {"cpu": cores / count}
    if use_gpu:
        resources["gpu"] = 1 / spec.trials_per_gpu
    return Placement(count, resources, max(1, int(cores // count)))


# --- the driver's side of a running search ---------------------------------------------------


class _Driver:
    """State of one running search, in the driver process: trial numbers, the observer's
    events, outcomes still to collect, and whether to start another trial. Tune's callback,
    stopper and searcher find it by the experiment path (they are pickled with the
    experiment; this is not)."""

    def __init__(self, study: RayStudy, ctx: StudyContext, observer: SearchObserver,
                 finished: int, next_number: int, deadline: float | None) -> None:
        self.study = study
        self.spec = study.spec
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
        info = _info(result)
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
            self.concluded(trial.trial_id, TrialOutcome(**info["outcome"]))
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
            self.study.close_runs(self.ctx, WORKER_LOST, numbers={number})
        if error is not None:
            self.errors.append(first_line(error))
        if not retried:
            self.ended.add(trial_id)

    def concluded(self, trial_id: str, outcome: TrialOutcome | None) -> None:
        self.running.pop(trial_id, None)
        self.actors.pop(trial_id, None)
        self.ended.add(trial_id)
        if outcome is None or outcome.fail_reason == INTERRUPTED:
            return
        if counts_as_finished(outcome):
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
            self.concluded(trial_id, TrialOutcome(**outcome) if outcome else None)

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


def _error_kind(exc: BaseException) -> str:
    """How the driver re-raises a trial actor's error: "data" (DataError), "config" (any
    other error a user can fix) or "bug"."""
    if isinstance(exc, DataError):
        return "data"
    return "config" if isinstance(exc, ImgclsError) else "bug"


def _info(result: Mapping[str, Any]) -> dict[str, Any]:
    """What a trial's report says besides the objective: {"epoch", "metrics"}, {"outcome"} or
    {"error"}. Sent as JSON text, so that Tune keeps it as it is instead of tracking every
    number in it (its experiment state would grow by kilobytes a trial)."""
    text = result.get("hpo")
    return json.loads(text) if isinstance(text, str) else {}


_LIVE: dict[str, _Driver] = {}  # experiment path -> the search running it in this process


def _driver(key: str) -> _Driver | None:
    return _LIVE.get(key)


# --- classes deriving from Ray's, built on first use -----------------------------------------


def _build_tune_classes() -> dict[str, type]:
    from ray.tune import Callback, Stopper, Trainable
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

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
            from hpo.objective import run_trial

            try:
                if self._ctx is None:
                    self._ctx = self._context()
                ctx = self._ctx
            except Exception as exc:  # a study-wide problem (data, tracking): not a trial's
                self._events.put(("error", _error_kind(exc), first_line(exc)))
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
                self._events.put(("error", _error_kind(exc), first_line(exc)))
                raise
            self._events.put(("outcome", asdict(outcome)))

        def _context(self) -> StudyContext:
            import torch

            from hpo.objective import StudyContext
            from hpo.tracking import Tracker
            from imgcls.data import prepare_data

            s = self._setup
            torch.set_num_threads(s.threads)
            data = prepare_data(s.spec.data, s.spec.seed, Path(s.cache_dir))
            tracker = Tracker(s.tracking_uri, Path(s.artifact_root) if s.artifact_root else None)
            # Ray pins a GPU trial's actor to its GPU(s) through CUDA_VISIBLE_DEVICES
            device = torch.device("cuda", 0) if s.use_gpu else torch.device("cpu")
            return StudyContext(s.spec, data, device, tracker, s.experiment_id, s.study_run_id)

        def _placement(self) -> dict[str, str]:
            import ray

            from hpo.tracking import TAG_DEVICE, TAG_WORKER

            gpus = ray.get_gpu_ids() if self._setup.use_gpu else []
            device = f"cuda:{gpus[0]}" if gpus else "cpu"
            return {TAG_DEVICE: device, TAG_WORKER: f"ray/{ray.util.get_node_ip_address()}"}

    class TrialEvents(Callback):
        """Tune's events, on the driver, to the running search (found by `key`)."""

        def __init__(self, key: str) -> None:
            self.key = key

        def on_step_begin(self, iteration: int, trials: list[Any], **info: Any) -> None:
            if (driver := _driver(self.key)) is not None:
                driver.step(trials)

        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any,
                           **info: Any) -> None:
            if (driver := _driver(self.key)) is not None:
                driver.trial_started(trial)

        def on_trial_result(self, iteration: int, trials: list[Any], trial: Any,
                            result: dict[str, Any], **info: Any) -> None:
            if (driver := _driver(self.key)) is not None:
                driver.trial_result(trial, result)

        def on_trial_recover(self, iteration: int, trials: list[Any], trial: Any,
                             **info: Any) -> None:
            if (driver := _driver(self.key)) is not None:
                driver.trial_lost(trial.trial_id, retried=True, error=trial.get_error())

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any,
                           **info: Any) -> None:
            if (driver := _driver(self.key)) is not None:
                driver.trial_lost(trial.trial_id, retried=False, error=trial.get_error())

    class HaltSearch(Stopper):
        """Ends the Tune run when the search is interrupted or a trial cannot start."""

        def __init__(self, key: str) -> None:
            self.key = key

        def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
            return False

        def stop_all(self) -> bool:
            driver = _driver(self.key)
            return driver is not None and driver.should_stop()

    class StudySearch(OptunaSearch):
        """OptunaSearch that knows the study: earlier trials as history, enqueued
        configurations first, and no new trial once enough are finished or under way, or
        after the timeout."""

        def __init__(self, key: str, spec: StudySpec, seed: int, history: list[TrialOutcome],
                     enqueue: list[dict[str, Scalar]]) -> None:
            import optuna

            from hpo.backends.optuna_samplers import SAMPLERS as OPTUNA_SAMPLERS

            self.key = key
            searched = bool(spec.space.searched)
            space = (OptunaSearch.convert_search_space(to_ray(spec.space)) if searched
                     else _nothing_to_search)
            sampler = OPTUNA_SAMPLERS.get(spec.sampler)(seed, spec.trials, spec.space)
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
                if (len(params) < len(names) or t.fail_reason in (INTERRUPTED, WORKER_LOST)
                        or not all(spec.space.contains(n, v) for n, v in params.items())):
                    continue  # another space, or not a result: nothing to learn from
                if t.state == "COMPLETE" and t.value is not None:
                    self.add_evaluated_point(params, t.value)
                elif t.state == "PRUNED":
                    self.add_evaluated_point(params, t.value, pruned=True)  # type: ignore[arg-type]
                elif t.state == "FAIL":
                    self.add_evaluated_point(params, math.nan, error=True)

        def suggest(self, trial_id: str) -> dict[str, Any] | None:
            driver = _driver(self.key)
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
            state = _info(result or {}).get("outcome", {}).get("state")
            epoch = (result or {}).get("epoch", 0)
            if error or state == "FAIL":
                super().on_trial_complete(trial_id, None, error=True)
            elif state == "COMPLETE" or (state is None and epoch >= self._max_epochs):
                super().on_trial_complete(trial_id, result)
            else:
                super().on_trial_complete(trial_id, None)

    classes: dict[str, type] = {"RayTrial": RayTrial, "TrialEvents": TrialEvents,
                                "HaltSearch": HaltSearch, "StudySearch": StudySearch}
    for name, cls in classes.items():
        cls.__qualname__ = name  # importable as hpo.backends.ray_backend.<name>
    return classes


_TUNE_CLASSES = ("RayTrial", "TrialEvents", "HaltSearch", "StudySearch")


def __getattr__(name: str) -> Any:
    """RayTrial, TrialEvents, HaltSearch and StudySearch: built (importing Ray) on first use."""
    if name in _TUNE_CLASSES:
        globals().update(_build_tune_classes())
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the backend -----------------------------------------------------------------------------


@BACKENDS.register("ray")
class RayBackend:
    name = "ray"
    places_trials = True

    def __init__(self) -> None:
        self._slots: tuple[str, list[Slot]] | None = None  # (gpus setting, its plan)

    def check(self, spec: StudySpec) -> None:
        if spec.sampler not in SAMPLERS:
            raise ConfigError(f"the Ray backend samples with {' or '.join(SAMPLERS)}, not "
                              f"{spec.sampler!r}; use --sampler tpe, or --backend optuna")
        pruner_name(spec.pruner)
        if spec.objectives:
            raise ConfigError("a search over several objectives (Pareto) runs on the Optuna "
                              "backend: Tune's schedulers follow one metric; use --backend optuna")
        if spec.ray_address is None:
            # Plan now, before `search` pins its own process to a slot (CUDA_VISIBLE_DEVICES),
            # which would hide the other GPUs from a plan made later.
            from hpo.devices import plan_slots

            self._slots = (spec.gpus, plan_slots(spec.gpus, spec.trials_per_gpu, spec.workers))
        elif "," in spec.gpus or spec.gpus.isdigit():
            raise ConfigError(f"--gpus {spec.gpus} names this machine's GPUs, but trials run "
                              f"on the Ray cluster at {spec.ray_address}; use --gpus all or none")

    def open(self, spec: StudySpec, store: Store) -> RayStudy:
        if self._slots is None or self._slots[0] != spec.gpus:
            self.check(spec)
        study = RayStudy(spec, store, self._slots[1] if self._slots else None)
        recorded = study.get_attr("objective")
        if recorded and recorded != spec.objective:
            raise StudyError(f"study {spec.name!r} in {study.path} optimizes {recorded}, not "
                             f"{spec.objective}; use another --store, or another study name")
        study.set_attr("objective", spec.objective)
        return study


class RayStudy:
    """A study's Tune experiment (`<store>/ray/<study>`) and its attributes beside it."""

    def __init__(self, spec: StudySpec, store: Store, slots: list[Slot] | None) -> None:
        self.spec = spec
        self.store = store
        self.slots = slots  # this machine's plan for a local runtime; None for a cluster
        self.path = store.root / "ray" / spec.name
        self._tracker: Tracker | None = None

    # -- attributes ---------------------------------------------------------------------------

    def _attrs(self) -> dict[str, Any]:
        path = self.path / STUDY_ATTRS
        return json.loads(path.read_text()) if path.is_file() else {}

    def get_attr(self, key: str) -> Any:
        return self._attrs().get(key)

    def set_attr(self, key: str, value: Any) -> None:
        attrs = {**self._attrs(), key: value}
        self.path.mkdir(parents=True, exist_ok=True)
        part = self.path / f"{STUDY_ATTRS}.part"
        part.write_text(json.dumps(attrs, indent=1))
        part.replace(self.path / STUDY_ATTRS)  # whole or not at all

    # -- trials: read from MLflow -------------------------------------------------------------

    def tracker(self) -> Tracker:
        if self._tracker is None:
            from hpo.tracking import Tracker

            self._tracker = Tracker(self.store.tracking_uri)
        return self._tracker

    def _trial_runs(self, tracker: Tracker, state: str | None = None) -> list[Any]:
        from hpo.search import STUDY_RUN_ATTR

        study_run = self.get_attr(STUDY_RUN_ATTR)
        experiment = tracker.client.get_experiment_by_name(self.spec.name) if study_run else None
        if experiment is None:
            return []
        query = f"tags.{TAG_ROLE} = 'trial' and tags.mlflow.parentRunId = '{study_run}'"
        if state:
            query += f" and tags.{TAG_STATE} = '{state}'"
        return list(tracker.client.search_runs([experiment.experiment_id], filter_string=query,
                                               max_results=50_000))

    def trials(self) -> list[TrialOutcome]:
        """Every trial run under the study's MLflow run, oldest first: MLflow holds every
        trial's end whichever actor or machine ran it (Tune's own records stop at the last
        report a stopped trial made)."""
        outcomes = [_outcome_of(run, self.spec) for run in self._trial_runs(self.tracker())]
        return sorted(outcomes, key=lambda t: t.number)

    def close_runs(self, ctx: StudyContext, reason: str, numbers: set[int] | None = None
                   ) -> None:
        """Close trial runs still RUNNING (all, or those `numbers`) as FAIL `reason`, KILLED:
        their actor or their search is gone."""
        from hpo.tracking import TrialRun

        if ctx.tracker is None:
            return
        for run in self._trial_runs(ctx.tracker, state="RUNNING"):
            if numbers is None or int(run.data.tags.get(TAG_TRIAL, -1)) in numbers:
                TrialRun(ctx.tracker, run.info.run_id).finish("FAIL", reason, "KILLED")

    # -- running ------------------------------------------------------------------------------

    def optimize(self, ctx: StudyContext, observer: SearchObserver) -> None:
        """Restore the Tune run a search left unfinished, then start new ones until the study
        holds `spec.trials` finished trials (or the timeout passed)."""
        spec = self.spec
        self.close_runs(ctx, WORKER_LOST)  # trial runs left RUNNING by a search that died
        previous = self.trials()
        finished = sum(counts_as_finished(t) for t in previous)
        if finished >= spec.trials:
            return  # a Tune run left unfinished waits for a search that asks for more
        restorable = self.get_attr(TUNE_FINISHED) is False
        deadline = time.monotonic() + spec.timeout if spec.timeout else None
        next_number = max((t.number for t in previous), default=-1) + 1
        driver = _Driver(self, ctx, observer, finished, next_number, deadline)
        key = str(self.path)
        with _ray_runtime(spec, self.slots):
            from ray import tune

            trial_class = __getattr__("RayTrial")
            placement = self._placement()
            trainable = tune.with_resources(
                tune.with_parameters(trial_class, setup=self._setup(ctx, placement)),
                placement.resources)
            _LIVE[key] = driver
            try:
                if restorable and tune.Tuner.can_restore(str(self.path)):
                    self._fit(tune.Tuner.restore(str(self.path), trainable,
                                                 resume_errored=True), driver)
                while driver.may_start():
                    started = driver.started
                    self._fit(self._tuner(trainable, placement, driver), driver)
                    if driver.started == started:
                        if driver.errors:
                            raise RuntimeError(f"Ray could not run a trial: {driver.errors[0]}")
                        break  # nothing could start (no resources): do not spin
            finally:
                del _LIVE[key]

    def _placement(self) -> Placement:
        import ray

        return plan_placement(self.spec, ray.cluster_resources(), self.slots)

    def _setup(self, ctx: StudyContext, placement: Placement) -> TrialSetup:
        spec = self.spec
        if spec.data.path:  # actors run in their own folders: no path relative to ours
            absolute = str(Path(spec.data.path).expanduser().resolve())
            spec = spec.model_copy(update={"data": spec.data.model_copy(update={"path": absolute})})
        if spec.weights_dir:
            spec = spec.model_copy(
                update={"weights_dir": str(Path(spec.weights_dir).expanduser().resolve())})
        artifact_root = self.store.artifact_root if self.store.tracking_is_local else None
        return TrialSetup(spec, str(self.store.cache_dir), self.store.tracking_uri,
                          str(artifact_root) if artifact_root else None, ctx.experiment_id,
                          ctx.study_run_id, placement.use_gpu, placement.threads)

    def _tuner(self, trainable: Any, placement: Placement, driver: _Driver) -> Any:
        """A new Tune run for the trials still to do, its searcher seeded past the trials
        already drawn (as the Optuna backend's) and given them as history."""
        from ray import tune

        spec, key = self.spec, str(self.path)
        history = self.trials()
        done = [dict(c) for c in self.get_attr(ENQUEUED) or []]
        enqueue = [dict(c) for c in spec.enqueue if dict(c) not in done]
        search = __getattr__("StudySearch")(key, spec, spec.seed + len(history), history,
                                            enqueue)
        self.set_attr(ENQUEUED, done + enqueue)
        return tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(
                metric=spec.objective, mode=spec.direction, search_alg=search,
                scheduler=make_scheduler(spec), num_samples=spec.trials - driver.finished,
                max_concurrent_trials=placement.slots, reuse_actors=True,
                trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(self.path.parent), verbose=0,
                callbacks=[__getattr__("TrialEvents")(key)],
                stop=__getattr__("HaltSearch")(key),
                checkpoint_config=tune.CheckpointConfig(checkpoint_at_end=False),
                # an actor that dies (killed, out of memory) is retried once, as a new trial
                failure_config=tune.FailureConfig(max_failures=1)),
        )

    def _fit(self, tuner: Any, driver: _Driver) -> None:
        self.set_attr(TUNE_FINISHED, False)
        try:
            with _quiet_tune():
                tuner.fit()
        except KeyboardInterrupt:
            driver.abandon()
            self.close_runs(driver.ctx, INTERRUPTED, numbers=set(driver.running.values()))
            raise
        finally:
            driver.collect(timeout=CONCLUDE_TIMEOUT_S)
        for trial_id in list(driver.concluding.values()):  # never delivered: lost
            driver.trial_lost(trial_id, retried=False)
        if driver.stop_error is not None:
            raise driver.stop_error
        if driver.interrupted or driver.running:  # Ctrl-C (Tune's handler), or our observer
            self.close_runs(driver.ctx, INTERRUPTED, numbers=set(driver.running.values()))
            raise KeyboardInterrupt
        self.set_attr(TUNE_FINISHED, True)


def _outcome_of(run: Any, spec: StudySpec) -> TrialOutcome:
    """A trial run as the outcome the search reports (params typed as HParams declares)."""
    tags, metrics = run.data.tags, run.data.metrics
    logged = {k: v for k, v in run.data.params.items() if k in HParams.model_fields}
    try:
        params: dict[str, Scalar] = HParams.model_validate(logged).model_dump()
    except ValueError:  # a run written by another version: keep the text
        params = dict(logged)
    end = run.info.end_time
    state = tags.get(TAG_STATE, "RUNNING")
    return TrialOutcome(
        number=int(tags.get(TAG_TRIAL, -1)), params=params, state=state,
        value=metrics.get(f"best_{spec.objective}") if state in ("COMPLETE", "PRUNED") else None,
        best_epoch=int(metrics.get("best_epoch", 0)), epochs=int(metrics.get("epochs", 0)),
        test=headline_test(metrics, spec.objective), fail_reason=tags.get(TAG_FAIL_REASON),
        run_id=run.info.run_id, seconds=(end - run.info.start_time) / 1000 if end else 0.0,
    )


@contextmanager
def _ray_runtime(spec: StudySpec, slots: list[Slot] | None) -> Iterator[None]:
    """Join the cluster at spec.ray_address, or start a local runtime on this machine's cores
    and the study's GPUs (quietly: no dashboard, workers' output not relayed); shut down
    what was started here. An already running runtime (e.g. a test's) is used as it is."""
    import ray

    if ray.is_initialized():
        yield
        return
    # Ray's start-up notes (token authentication, the local address) are not the user's news
    quiet = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
    if spec.ray_address:
        try:
            ray.init(address=spec.ray_address, **quiet)  # type: ignore[arg-type]
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"cannot join the Ray cluster at {spec.ray_address}: "
                              f"{first_line(exc)}; check --ray-address") from None
    else:
        from hpo.devices import available_cores

        gpus = sorted({s.cuda_visible_devices or "" for s in slots or [] if s.gpu is not None})
        with _environment(CUDA_VISIBLE_DEVICES=",".join(gpus)):  # Ray sees the study's GPUs
            ray.init(num_cpus=available_cores(), num_gpus=len(gpus), **quiet)  # type: ignore[arg-type]
    try:
        yield
    finally:
        ray.shutdown()


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune without its console tables and with its experiment state saved every second; and
    Ctrl-C handled by Python again afterwards (Tune leaves its own handler installed)."""
    main = threading.current_thread() is threading.main_thread()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGUSR1)} if main else {}
    tune_log = logging.getLogger("ray.tune")
    level = tune_log.level
    tune_log.setLevel(logging.ERROR)  # "trials did not complete" and the like: ours to say
    try:
        with _environment(RAY_AIR_NEW_OUTPUT="0", TUNE_GLOBAL_CHECKPOINT_S=CHECKPOINT_EVERY_S,
                          TUNE_DISABLE_AUTO_CALLBACK_LOGGERS="1"):
            yield
    finally:
        tune_log.setLevel(level)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


__all__ = ["SCHEDULERS", "Placement", "RayBackend", "RayStudy", "TrialSetup", "from_ray",
           "make_scheduler", "plan_placement", "pruner_name", "to_ray"]
