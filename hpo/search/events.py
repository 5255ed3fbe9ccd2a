"""What a running search tells whoever watches it: the live progress view, a worker's queue to
the search process, tests. Every backend reports the same events with the same TrialOutcome."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from hpo.config.space import Scalar
    from hpo.config.study import StudySpec
    from hpo.config.trial import TrialOutcome
    from imgcls.data.prepare import PreparedData


class SearchObserver(Protocol):
    def study_started(self, spec: StudySpec, data: PreparedData,
                      previous: list[TrialOutcome]) -> None: ...

    def trial_started(self, number: int, params: Mapping[str, Scalar]) -> None: ...

    def trial_resumed(self, number: int, epochs: int, why_not: str | None) -> None:
        """Trial `number` goes on after `epochs` epochs trained before; or, with `why_not`,
        starts over from epoch 1 (its checkpoint is missing, unreadable or another trial's)."""
        ...

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None: ...

    def trial_finished(self, outcome: TrialOutcome) -> None: ...


class NullObserver:
    def study_started(self, spec: StudySpec, data: PreparedData,
                      previous: list[TrialOutcome]) -> None:
        pass

    def trial_started(self, number: int, params: Mapping[str, Scalar]) -> None:
        pass

    def trial_resumed(self, number: int, epochs: int, why_not: str | None) -> None:
        pass

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        pass

    def trial_finished(self, outcome: TrialOutcome) -> None:
        pass
