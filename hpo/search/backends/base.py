"""The interface every search backend implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

# The attribute under which a backend's study keeps the id of its MLflow study run: how a
# resumed search finds the run it continues.
STUDY_RUN_ATTR = "mlflow_run_id"

if TYPE_CHECKING:
    from hpo.config.store import Store
    from hpo.config.study import StudySpec
    from hpo.config.trial import TrialOutcome
    from hpo.search.context import StudyContext
    from hpo.search.events import SearchObserver


class BackendStudy(Protocol):
    """A study opened in a backend's own storage."""

    def get_attr(self, key: str) -> Any: ...

    def set_attr(self, key: str, value: Any) -> None: ...

    def trials(self) -> list[TrialOutcome]:
        """Every trial the storage holds, oldest first, as outcomes."""
        ...

    def optimize(self, ctx: StudyContext, observer: SearchObserver) -> None:
        """Run trials until the study holds `ctx.spec.trials` that count (TrialState.counts)."""
        ...


class Backend(Protocol):
    name: str
    # True: the backend places its trials on devices itself (a Ray cluster); False: the search
    # plans the slots (hpo.search.devices) and a single slot trains in the search process.
    places_trials: bool

    def check(self, spec: StudySpec) -> None:
        """Raise ConfigError for a setting this backend cannot honour (e.g. an unknown pruner),
        before any data is read."""
        ...

    def open(self, spec: StudySpec, store: Store) -> BackendStudy: ...
