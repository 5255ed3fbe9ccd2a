"""What the search benchmarks (study.py, pruning.py) share: a study spec with overrides, and a
search with MLflow tracking switched off.

A search without tracking, `search_untracked`, is `run_search` less its MLflow calls: the same
`prepare_search`, the backend's study, a `StudyContext` whose tracker is None (its trials still
checkpoint every epoch) and `study.optimize`, so that the two differ in tracking and in nothing
else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hpo.config.space import Scalar
from hpo.config.store import Store
from hpo.config.study import StudySpec, load_study
from hpo.config.trial import TrialOutcome
from hpo.search.checkpoints import Checkpoints
from hpo.search.context import StudyContext
from hpo.search.devices import plan_slots
from hpo.search.events import NullObserver, SearchObserver
from hpo.search.run import prepare_search


def study_spec(name: str, overrides: Mapping[str, Any]) -> StudySpec:
    """studies/<name>.yaml with overrides, as `imgcls-hpo search --set KEY=VALUE` applies them
    ("space.arch": "resnet18" as `--arch resnet18`)."""
    return load_study(name, dict(overrides))


class EpochCounter(NullObserver):
    """Counts the epochs each trial trained, told by the trial loop at every epoch's end: exact
    also for a trial that failed midway (its outcome then says 0 epochs)."""

    def __init__(self) -> None:
        self.epochs: dict[int, int] = {}

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        self.epochs[number] = max(self.epochs.get(number, 0), epoch)

    @property
    def total(self) -> int:
        return sum(self.epochs.values())


def search_untracked(spec: StudySpec, store: Store,
                     observer: SearchObserver | None = None) -> list[TrialOutcome]:
    """The search `run_search` runs, with no MLflow tracking; its trials, oldest first."""
    observer = observer or NullObserver()
    slots = plan_slots(spec.gpus, spec.trials_per_gpu, spec.workers)
    if spec.backend != "optuna" or len(slots) != 1:
        # worker processes and Ray trials open their own Tracker
        raise ValueError(f"an untracked search here runs one trial at a time in this process: "
                         f"backend optuna, one slot (got {spec.backend}, {len(slots)} slots)")
    backend, device, data = prepare_search(spec, store)
    study = backend.open(spec, store)
    ctx = StudyContext(spec, data, device, tracker=None,
                       checkpoints=Checkpoints(store.checkpoint_dir / spec.name))
    observer.study_started(spec, data, study.trials())
    study.optimize(ctx, observer)
    return study.trials()


def best_value(trials: list[TrialOutcome], spec: StudySpec) -> float | None:
    """The best objective value of the COMPLETE trials (what Optuna's best_trial and `promote`
    consider: a pruned trial has no final model); None when none completed."""
    values = [t.value for t in trials if t.state == "COMPLETE" and t.value is not None]
    if not values:
        return None
    return max(values) if spec.direction == "max" else min(values)


def describe_params(params: Mapping[str, Scalar], names: list[str]) -> str:
    """A trial's searched values, short: "lr=0.0123 batch_size=64"."""
    parts = []
    for name in names:
        value = params.get(name)
        parts.append(f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}")
    return " ".join(parts)
