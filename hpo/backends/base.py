"""The interface every search backend implements, and the events a search reports."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from imgcls.registry import Registry

if TYPE_CHECKING:
    from hpo.objective import StudyContext, TrialOutcome
    from hpo.space import Scalar
    from hpo.store import Store
    from hpo.study import StudySpec
    from imgcls.data import PreparedData


class SearchObserver(Protocol):
    """What a search tells whoever watches it (the live progress display, tests)."""

    def study_started(self, spec: StudySpec, data: PreparedData,
                      previous: list[TrialOutcome]) -> None: ...

    def trial_started(self, number: int, params: Mapping[str, Scalar]) -> None: ...

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None: ...

    def trial_finished(self, outcome: TrialOutcome) -> None: ...


class NullObserver:
    def study_started(self, spec: StudySpec, data: PreparedData,
                      previous: list[TrialOutcome]) -> None:
        pass

    def trial_started(self, number: int, params: Mapping[str, Scalar]) -> None:
        pass

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        pass

    def trial_finished(self, outcome: TrialOutcome) -> None:
        pass


class BackendStudy(Protocol):
    """A study opened in a backend's own storage."""

    def get_attr(self, key: str) -> Any: ...

    def set_attr(self, key: str, value: Any) -> None: ...

    def trials(self) -> list[TrialOutcome]:
        """Every trial the storage holds, oldest first, as outcomes."""
        ...

    def optimize(self, ctx: StudyContext, observer: SearchObserver) -> None:
        """Run trials until the study holds `ctx.spec.trials` finished ones."""
        ...


class Backend(Protocol):
    name: str
    # True: the backend places its trials on devices itself (a Ray cluster); False: the search
    # plans the slots (hpo.devices) and a single slot trains in the search process.
    places_trials: bool

    def check(self, spec: StudySpec) -> None:
        """Raise ConfigError for a setting this backend cannot honour (e.g. an unknown pruner),
        before any data is read."""
        ...

    def open(self, spec: StudySpec, store: Store) -> BackendStudy: ...


BACKENDS: Registry[type[Backend]] = Registry("backend")


def counts_as_finished(outcome: TrialOutcome) -> bool:
    """A trial counts towards --trials once it ended, unless the user interrupted it or its
    worker died under it: such a trial is work still to do (a lost worker's parameters are
    retried), not a result."""
    from hpo.objective import INTERRUPTED, WORKER_LOST

    return (outcome.state in ("COMPLETE", "PRUNED", "FAIL")
            and outcome.fail_reason not in (INTERRUPTED, WORKER_LOST))
