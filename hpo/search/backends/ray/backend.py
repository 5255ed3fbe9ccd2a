"""Ray Tune: every trial a Tune trial, run in its own Ray actor through THE trial
(`hpo.search.trial.TrialRunner`).

How a study maps onto Tune:
- Search: Ray's OptunaSearch over the study's space (converted in space.py), with Optuna's
  TPE or random sampler seeded like the Optuna backend's. One searcher for both, so that
  enqueued configurations, the trials of earlier searches (TPE learns from them) and
  `timeout` work alike.
- Pruning: a Tune scheduler under the Optuna pruner's name, comparing trials at the same
  epochs (schedulers.py): sha as ASHA, hyperband as synchronous HyperBand (it pauses and
  resumes trials), pbt, or none.
- Placement: one trial per slot, `max_concurrent_trials` slots; a trial asks for its share of
  the cores, and 1/trials_per_gpu of a GPU when GPUs are used.
- State: Tune's experiment under `<store>/ray/<study>` (restored when a search was cut short:
  Tuner.restore), and a JSON file of study attributes beside it in that folder.
- Trials: MLflow is the record (`RayStudy.trials` reads the study run's trial runs), with the
  same layout as the Optuna backend's, since both drive the same TrialRunner. Trial numbers
  are handed out by the driver as trials start: 0.. in order, unique across resumes; a Tune
  trial keeps its number and its MLflow run however often it is paused, restored or exploited.

A trial is a class Trainable (tune.py: `RayTrial`): one epoch per `step()`, the TrialRunner's
state as Tune's checkpoint (written when the study's checkpoint policy says, and whenever Tune
pauses the trial), so that Tune's own protocol pauses, resumes, prunes and restores it. A
trial Tune stops before its end is assessed PRUNED when its scheduler stopped it, or closed
INTERRUPTED (not counted) when the search was interrupted (Ctrl-C), and a restored search
takes it up from its checkpoint.

One search at a time per study: the Tune experiment folder has one writer. Importing this module
imports Ray (through tune.py, where the classes deriving from Ray's live).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray import tune
from ray.tune.search import BasicVariantGenerator

from hpo.config.study import StudyError, StudySpec
from hpo.config.trial import TrialOutcome, TrialState
from hpo.search.backends.base import STUDY_RUN_ATTR
from hpo.search.backends.optuna.samplers import SAMPLERS
from hpo.search.backends.ray.driver import LIVE, Driver, close_runs
from hpo.search.backends.ray.placement import Placement, TrialSetup, plan_placement
from hpo.search.backends.ray.runtime import environment, quiet_tune, ray_runtime
from hpo.search.backends.ray.schedulers import (
    PAUSING,
    RAY_SAMPLERS,
    check_pruner,
    make_scheduler,
)
from hpo.search.backends.ray.space import to_ray
from hpo.search.backends.ray.tune import HaltSearch, RayTrial, StudySearch, TrialEvents
from hpo.search.devices import plan_slots
from hpo.tracking.client import Tracker
from hpo.tracking.runs import study_trials
from imgcls.errors import ConfigError

if TYPE_CHECKING:
    from hpo.config.store import Store
    from hpo.search.context import StudyContext
    from hpo.search.devices import Slot
    from hpo.search.events import SearchObserver

STUDY_ATTRS = "imgcls_hpo.json"  # the study's attributes, in its Tune experiment folder
TUNE_FINISHED = "tune_finished"  # attr: the last Tune run ended by itself (nothing to restore)
ENQUEUED = "enqueued"  # attr: the configured `enqueue` entries already handed to a searcher
NUMBERS, RUN_IDS = "trial_numbers", "run_ids"  # attrs: Tune trial id -> number -> MLflow run
# Seconds a stopped trial may take to record its end (test evaluation, artifacts) once the
# search is over, before its actor is dropped and its run closed as lost.
CONCLUDE_TIMEOUT_S = 600.0


class RayBackend:
    name = "ray"
    places_trials = True

    def __init__(self) -> None:
        self._slots: tuple[str, list[Slot]] | None = None  # (gpus setting, its plan)

    def check(self, spec: StudySpec) -> None:
        if spec.sampler not in RAY_SAMPLERS:
            SAMPLERS.entry(spec.sampler)  # unknown to Optuna too: ConfigError listing them
            raise ConfigError(f"the Ray backend samples with {' or '.join(RAY_SAMPLERS)}, not "
                              f"{spec.sampler!r}; use --sampler tpe, or --backend optuna")
        check_pruner(spec)
        if spec.objectives:
            raise ConfigError("a search over several objectives (Pareto) runs on the Optuna "
                              "backend: Tune's schedulers follow one metric; use --backend optuna")
        if spec.ray_address is None:
            # Plan now, before `search` pins its own process to a slot (CUDA_VISIBLE_DEVICES),
            # which would hide the other GPUs from a plan made later.
            self._slots = (spec.gpus, plan_slots(spec.gpus, spec.trials_per_gpu, spec.workers))
        elif spec.ray_address.startswith("ray://"):
            # Through Ray Client, Tune runs its driver in an actor on the head, where this
            # search's trial bookkeeping, live view and Ctrl-C cannot follow it
            raise ConfigError(f"--ray-address {spec.ray_address} is a Ray Client address; run "
                              "`imgcls-hpo search` on a node of the cluster instead, with "
                              "--ray-address HEAD:6379 (or auto)")
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
            self._tracker = Tracker(self.store.tracking_uri)
        return self._tracker

    def trials(self) -> list[TrialOutcome]:
        """Every trial run under the study's MLflow run, oldest first: MLflow holds every
        trial's end whichever actor or machine ran it (Tune's own records stop at the last
        report a stopped trial made)."""
        return study_trials(self.tracker(), self.spec.name, self.get_attr(STUDY_RUN_ATTR),
                            self.spec.objective)

    # -- running ------------------------------------------------------------------------------

    def optimize(self, ctx: StudyContext, observer: SearchObserver) -> None:
        """Restore the Tune run a search left unfinished, then start new ones until the study
        holds `spec.trials` finished trials (or the timeout passed)."""
        spec = self.spec
        close_runs(ctx, TrialState.LOST)  # trial runs left RUNNING by a search that died
        previous = self.trials()
        finished = sum(t.state.counts for t in previous)
        if finished >= spec.trials:
            return  # a Tune run left unfinished waits for a search that asks for more
        restorable = self.get_attr(TUNE_FINISHED) is False
        deadline = time.monotonic() + spec.timeout if spec.timeout else None
        next_number = max((t.number for t in previous), default=-1) + 1
        driver = Driver(ctx, observer, finished, next_number, deadline,
                        numbers=self.get_attr(NUMBERS), run_ids=self.get_attr(RUN_IDS),
                        remember=self._remember)
        key = str(self.path)
        with ray_runtime(spec, self.slots, self.store):
            nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
            placement = plan_placement(self.spec, nodes, self.slots)
            trainable = tune.with_resources(
                tune.with_parameters(RayTrial, setup=self._setup(ctx, placement)),
                placement.resources)
            LIVE[key] = driver
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
                del LIVE[key]

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
                          ctx.study_run_id, placement.use_gpu, placement.threads,
                          pbt=spec.pruner == "pbt")

    def _remember(self, numbers: dict[str, int], run_ids: dict[str, str]) -> None:
        """Each Tune trial's number and each number's run, for a search restored later."""
        self.set_attr(NUMBERS, numbers)
        self.set_attr(RUN_IDS, run_ids)

    def _tuner(self, trainable: Any, placement: Placement, driver: Driver) -> Any:
        """A new Tune run for the trials still to do, its searcher seeded past the trials
        already drawn (as the Optuna backend's) and given them as history."""
        spec, key = self.spec, str(self.path)
        history = self.trials()
        done = [dict(c) for c in self.get_attr(ENQUEUED) or []]
        enqueue = [dict(c) for c in spec.enqueue if dict(c) not in done]
        self.set_attr(ENQUEUED, done + enqueue)
        pausing = spec.pruner in PAUSING
        param_space = None
        if spec.pruner == "pbt":  # PBT takes Tune's own generator (its population), no searcher
            search = BasicVariantGenerator(points_to_evaluate=enqueue or None,
                                           random_state=spec.seed + len(history))
            param_space = to_ray(spec.space)
        else:
            search = StudySearch(key, spec, spec.seed + len(history), history, enqueue)
        return tune.Tuner(
            trainable, param_space=param_space,
            tune_config=tune.TuneConfig(
                metric=spec.objective, mode=spec.direction, search_alg=search,
                scheduler=make_scheduler(spec), num_samples=spec.trials - driver.finished,
                # A pausing scheduler needs a bracket's (a population's) trials all created:
                # the resources per trial limit how many run at once instead.
                max_concurrent_trials=None if pausing else placement.slots,
                reuse_actors=True, trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=spec.name, storage_path=str(self.path.parent), verbose=0,
                callbacks=[TrialEvents(key)], stop=HaltSearch(key),
                # What a restored search, synchronous HyperBand and PBT go on from: the latest
                # state of each trial, saved when the trial's result says the study's
                # checkpoint_every makes one due (HyperBand and PBT also save when they pause or
                # exploit)
                checkpoint_config=tune.CheckpointConfig(
                    checkpoint_frequency=0,
                    # PBT clones a trial's checkpoint after the trial has gone on: keep a few
                    num_to_keep=3 if spec.pruner == "pbt" else 1, checkpoint_at_end=False),
                # an actor that dies (killed, out of memory) is retried once, from its last
                # checkpoint, under the same number
                failure_config=tune.FailureConfig(max_failures=1)),
        )

    def _fit(self, tuner: Any, driver: Driver) -> None:
        self.set_attr(TUNE_FINISHED, False)
        # Tune asks a searcher for one pending trial at a time; a pausing scheduler needs them
        # all (a bracket, a population) to exist
        pending = str(self.spec.trials) if self.spec.pruner in PAUSING else "auto"
        try:
            with quiet_tune(), environment(TUNE_MAX_PENDING_TRIALS_PG=pending):
                tuner.fit()
        except KeyboardInterrupt:
            driver.abandon()
            close_runs(driver.ctx, TrialState.INTERRUPTED, set(driver.running.values()))
            raise
        finally:
            driver.collect(timeout=CONCLUDE_TIMEOUT_S)
        for trial_id in list(driver.concluding.values()):  # never delivered: lost
            driver.trial_lost(trial_id, retried=False)
        if driver.stop_error is not None:
            raise driver.stop_error
        if driver.interrupted or driver.running:  # Ctrl-C (Tune's handler), or our observer
            close_runs(driver.ctx, TrialState.INTERRUPTED, set(driver.running.values()))
            raise KeyboardInterrupt
        self.set_attr(TUNE_FINISHED, True)
        for checkpoint in self.path.glob("*/checkpoint_*"):  # every trial of the run ended
            shutil.rmtree(checkpoint, ignore_errors=True)


def _trial_dirname(trial: Any) -> str:
    """Tune's folder per trial: its id (the default spells out every value sampled)."""
    return str(trial.trial_id)


BACKEND = RayBackend  # what hpo.search.backends.get_backend("ray") makes
