"""A whole search: validate, prepare the data once, open the study in the backend and in
MLflow, run trials until the study holds `--trials` finished ones, record the summary.

Running it again on the same study and store resumes: the backend's storage keeps the trials,
and the study's MLflow run is found through the run id the backend study keeps.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hpo.config.store import Store, mask_uri
from hpo.config.study import StudySpec
from hpo.config.trial import TrialOutcome, Trials, TrialState
from hpo.search.artifacts import ArtifactWriter
from hpo.search.backends import Backend, get_backend
from hpo.search.backends.base import STUDY_RUN_ATTR, BackendStudy
from hpo.search.checkpoints import Checkpoints
from hpo.search.context import StudyContext, study_folds
from hpo.search.devices import apply_slot, plan_slots
from hpo.search.events import NullObserver, SearchObserver
from hpo.tracking.client import Tracker
from hpo.tracking.runs import open_study_run, study_runs, trial_runs
from imgcls.data.cache import Progress
from imgcls.data.prepare import PreparedData, prepare_data
from imgcls.errors import ConfigError
from imgcls.metrics import check_objective, check_operating_point
from imgcls.models.download import DownloadProgress, fetch_weights


@dataclass
class SearchResult:
    spec: StudySpec
    trials: Trials  # every trial the study holds, oldest first
    experiment_id: str = ""
    study_run_id: str = ""
    changed_settings: list[str] = field(default_factory=list)

    @property
    def best(self) -> TrialOutcome | None:
        return self.trials.best


def prepare_search(spec: StudySpec, store: Store, data_progress: Progress | None = None,
                   download_progress: DownloadProgress | None = None,
                   ) -> tuple[Backend, torch.device, PreparedData]:
    """What a search needs before its first trial, every check done first: the backend, the
    device a trial trains on if it trains in this process, the pretrained weights its trials
    may start from, the data, and the store."""
    store.check_writable()
    store.check_manifest()  # moved, or its database gone: before any image is read
    backend = get_backend(spec.backend)
    backend.check(spec)  # a bad sampler or pruner fails before any image is read
    device = torch.device("cpu")
    if not backend.places_trials:
        slots = plan_slots(spec.gpus, spec.trials_per_gpu, spec.workers)  # bad --gpus: now
        if len(slots) == 1:  # one slot trains here; several, in worker processes
            device = apply_slot(slots[0])
    for arch in spec.missing_weights():  # once, here, not in each trial: a failure is one line
        fetch_weights(arch, download_progress)
    data = prepare_data(spec.data, spec.seed, store.cache_dir, data_progress)
    check_objective(spec.objective, data.num_classes)  # val_sens: binary tasks only
    check_operating_point(spec.operating_point, data.num_classes)  # a threshold: the same
    if spec.folds:
        study_folds(spec, data)  # too many folds for a class: one line now, not in each trial
    store.create()  # after the data is known to be usable: bad input leaves nothing behind
    return backend, device, data


def run_search(spec: StudySpec, store: Store, observer: SearchObserver | None = None,
               data_progress: Progress | None = None,
               download_progress: DownloadProgress | None = None) -> SearchResult:
    observer = observer or NullObserver()
    backend, device, data = prepare_search(spec, store, data_progress, download_progress)
    with store.locked():  # processes started together: one database, one study run
        tracker = Tracker(store.tracking_uri,
                          store.artifact_root if store.tracking_is_local else None)
        study = backend.open(spec, store)
        experiment_id = tracker.experiment(spec.name)
        _check_same_study(spec, store, study, tracker, experiment_id)
        store.record_study(spec.name)
        run_id, changed = open_study_run(tracker, experiment_id, spec.name,
                                         study.get_attr(STUDY_RUN_ATTR), _study_params(spec, data),
                                         lambda: study.get_attr(STUDY_RUN_ATTR))
        study.set_attr(STUDY_RUN_ATTR, run_id)
    tracker.set_tags(run_id, {"imgcls_hpo.trials_target": spec.trials,
                              "imgcls_hpo.backend": backend.name,
                              "imgcls_hpo.storage": store.describe_storage()})
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(run_id, data.split.write_csv(Path(tmp) / "split.csv", data.catalog))
    if data.skipped:  # --skip-bad-images: which files the study left out, and why
        tracker.log_text(run_id, "\n".join(data.skipped) + "\n", "skipped_images.txt")
        tracker.set_tags(run_id, {"imgcls_hpo.skipped_images": len(data.skipped)})

    ctx = StudyContext(spec, data, device, tracker, experiment_id, run_id,
                       Checkpoints(store.checkpoint_dir / spec.name), ArtifactWriter())
    observer.study_started(spec, data, study.trials())
    status = "FAILED"
    try:
        study.optimize(ctx, observer)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        ctx.artifacts.close()  # the figures of the last trials
        trials = Trials(spec.objective, study.trials())
        try:
            _log_study_summary(tracker, run_id, spec, trials)
        finally:
            tracker.end_run(run_id, status)
    return SearchResult(spec, trials, experiment_id, run_id, changed)


def _check_same_study(spec: StudySpec, store: Store, study: BackendStudy, tracker: Tracker,
                      experiment_id: str) -> None:
    """The Optuna side and the MLflow side of a store describe the same study: trials that
    Optuna holds and MLflow has no study run for (mlflow.db deleted, another tracking URI) would
    leave results and promote with nothing to read, and a study MLflow holds trials of that
    Optuna has never seen (the journal deleted) would start again from trial 0 beside them; both
    are refused."""
    recorded = study.get_attr(STUDY_RUN_ATTR)
    trials = study.trials()
    if not recorded and not trials:  # a new study here: MLflow must not hold it already
        _, runs = study_runs(tracker, spec.name)
        held = sum(len(trial_runs(tracker, experiment_id, r.info.run_id)) for r in runs)
        if held:
            raise ConfigError(
                f"study {spec.name!r}: the MLflow store {mask_uri(store.tracking_uri)} holds "
                f"{held} trial run(s) of it, but its trial storage ({store.describe_storage()})"
                " has none (the journal deleted, or another --storage?); restore it, or search "
                "into a new --store")
    finished = [t for t in trials if t.state.counts]
    if recorded and finished and tracker.find_run(recorded, experiment_id) is None:
        raise ConfigError(
            f"study {spec.name!r}: its trial storage ({store.describe_storage()}) holds "
            f"{len(finished)} finished trial(s), but the MLflow store "
            f"{mask_uri(store.tracking_uri)} has no run of them (its database deleted or "
            "replaced, or another --tracking-uri?); restore it, or search into a new --store")


def _study_params(spec: StudySpec, data: PreparedData) -> dict[str, str]:
    counts = data.split.counts()
    return {
        **spec.as_params(),
        "data.fingerprint": data.catalog.fingerprint[:16],
        "data.classes": ",".join(data.classes),
        **{f"data.{name}_images": str(n) for name, n in counts.items()},
    }


def _log_study_summary(tracker: Tracker, run_id: str, spec: StudySpec, trials: Trials) -> None:
    counts = trials.counts()
    # trials_complete, trials_pruned, trials_fail: the states that count towards --trials
    tracker.log_metrics(run_id, {f"trials_{state.stored.lower()}": counts.get(state, 0)
                                 for state in TrialState if state.counts})
    if spec.objectives:  # a Pareto search: tag the trials no other trial beats on every term
        front = {t.number for t in pareto_front(trials, spec)}
        for t in trials:
            if t.state == TrialState.COMPLETE and t.run_id:
                tracker.set_tags(t.run_id, {"imgcls_hpo.pareto": str(t.number in front).lower()})
        tracker.set_tags(run_id, {"imgcls_hpo.pareto_trials": ",".join(map(str, sorted(front)))})
    best = trials.best
    if best is not None and best.value is not None:
        tracker.log_metrics(run_id, {f"best_{spec.objective}": best.value})
        tracker.set_tags(run_id, {"imgcls_hpo.best_trial": best.number,
                                  "imgcls_hpo.best_run_id": best.run_id or ""})


def pareto_front(trials: Sequence[TrialOutcome], spec: StudySpec) -> list[TrialOutcome]:
    """The COMPLETE trials that no other trial dominates: at least as good on every objective
    and better on one."""
    signs = [1.0 if direction == "max" else -1.0 for _, direction in spec.terms]
    scored = [(t, [s * v for s, v in zip(signs, t.values, strict=True)]) for t in trials
              if t.state == TrialState.COMPLETE and t.values is not None]

    def dominates(a: list[float], b: list[float]) -> bool:
        return all(x >= y for x, y in zip(a, b, strict=True)) and a != b

    return [t for t, mine in scored if not any(dominates(other, mine) for _, other in scored)]
