"""The trial vocabulary every room shares: how a trial ended (TrialState), what is known of it
(TrialOutcome), and a study's trials ranked by any metric (Trials).

Both backends report TrialOutcomes, the progress view shows them, `results` and `promote` read
them back from MLflow. The stores keep the older spelling (Optuna's and MLflow's state "FAIL",
with the reason "interrupted" or "worker lost"); `TrialState.read` and `.stored` translate, here
and nowhere else.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import overload

from hpo.config.space import Scalar
from imgcls.metrics import Direction, metric_goal

# What the stores write for the two failures that are not the trial's fault.
_REASONS = {"INTERRUPTED": "interrupted", "LOST": "worker lost"}


class TrialState(StrEnum):
    """How a trial stands. Only COMPLETE, PRUNED and FAILED count towards --trials: an
    interrupted trial (Ctrl-C) or a lost one (its worker killed, its machine gone) is work still
    to do, not a result, and a lost one's parameters are run again."""

    RUNNING = "RUNNING"
    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAILED = "FAIL"
    INTERRUPTED = "INTERRUPTED"
    LOST = "LOST"

    @classmethod
    def read(cls, stored: str, reason: str | None = None) -> TrialState:
        """The state a store recorded as `stored` (COMPLETE, PRUNED, FAIL, RUNNING, or Optuna's
        WAITING) with the fail reason it recorded beside it."""
        if stored == "FAIL":
            return next((cls(name) for name, text in _REASONS.items() if text == reason),
                        cls.FAILED)
        return cls.RUNNING if stored == "WAITING" else cls(stored)

    @property
    def stored(self) -> str:
        """What the stores write: FAIL for every failure (the reason tells them apart)."""
        return "FAIL" if self in (TrialState.INTERRUPTED, TrialState.LOST) else self.value

    @property
    def reason(self) -> str | None:
        """The fail reason the stores write for an interrupted or lost trial."""
        return _REASONS.get(self.name)

    @property
    def counts(self) -> bool:
        """Whether a trial in this state counts towards --trials."""
        return self in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED)

    @property
    def has_result(self) -> bool:
        """Whether the trial trained and was assessed: COMPLETE or PRUNED."""
        return self in (TrialState.COMPLETE, TrialState.PRUNED)

    @property
    def label(self) -> str:
        """The word for it in summaries: "complete", "failed", "lost"..."""
        return {"FAILED": "failed"}.get(self.name, self.name.lower())


@dataclass
class TrialOutcome:
    """One trial, as its backend reports it or its MLflow run records it."""

    number: int
    state: TrialState
    params: dict[str, Scalar] = field(default_factory=dict)  # what it trained with
    value: float | None = None  # the objective at its best epoch
    values: list[float] | None = None  # a Pareto search's objective values, in the study's order
    best_epoch: int = 0
    epochs: int = 0
    # Its summary metrics as its run records them (best_<objective>, min_val_loss, params_count,
    # flops, train_seconds, test_* with their _ci_low/_ci_high...): all of them when read from
    # MLflow, the objective's test counterpart when read from a backend's storage.
    metrics: dict[str, float] = field(default_factory=dict)
    fail_reason: str | None = None  # one line, for every failed, interrupted or lost trial
    run_id: str | None = None
    seconds: float = 0.0

    @property
    def test(self) -> dict[str, float]:
        """Its test metrics (test_*) with their bootstrap intervals."""
        return {k: v for k, v in self.metrics.items() if k.startswith("test_")}


def test_counterpart(objective: str) -> str:
    """The test metric that matches a validation objective: val_f1 -> test_f1,
    val_loss -> test_log_loss (both are the cross-entropy of the true class)."""
    name = objective.removeprefix("val_")
    return "test_log_loss" if name == "loss" else f"test_{name}"


def headline_test(metrics: Mapping[str, float], objective: str) -> dict[str, float]:
    """The objective's test counterpart and its confidence interval, out of all metrics."""
    name = test_counterpart(objective)
    return {k: v for k, v in metrics.items() if k in (name, f"{name}_ci_low", f"{name}_ci_high")}


class Trials(Sequence[TrialOutcome]):
    """A study's trials, oldest first, that rank themselves by the objective or by any metric
    they logged (its direction from imgcls.metrics.metric_goal)."""

    def __init__(self, objective: str, trials: Iterable[TrialOutcome] = ()) -> None:
        self.objective = objective
        self._trials = sorted(trials, key=lambda t: t.number)

    @overload
    def __getitem__(self, index: int) -> TrialOutcome: ...

    @overload
    def __getitem__(self, index: slice) -> list[TrialOutcome]: ...

    def __getitem__(self, index: int | slice) -> TrialOutcome | list[TrialOutcome]:
        return self._trials[index]

    def __len__(self) -> int:
        return len(self._trials)

    def __iter__(self) -> Iterator[TrialOutcome]:
        return iter(self._trials)

    def __repr__(self) -> str:
        return f"Trials({self.objective!r}, {self._trials!r})"

    def add(self, outcome: TrialOutcome) -> None:
        """A trial that ended since (the live view collects them)."""
        self._trials = sorted([*self._trials, outcome], key=lambda t: t.number)

    @property
    def direction(self) -> Direction:
        return metric_goal(self.objective)

    def counts(self) -> Counter[TrialState]:
        """Trials per state; a state with none reads 0."""
        return Counter(t.state for t in self._trials)

    def counted(self) -> int:
        """The trials that count towards --trials."""
        return sum(t.state.counts for t in self._trials)

    def ranked(self, metric: str | None = None,
               states: tuple[TrialState, ...] = (TrialState.COMPLETE,)) -> list[TrialOutcome]:
        """Trials in `states` with a value of `metric`, best first. No metric, the objective or
        best_<objective>: each trial's value at its best epoch. A NaN never ranks."""
        objective = metric in (None, self.objective, f"best_{self.objective}")
        key = f"best_{self.objective}" if objective else str(metric)
        direction = self.direction if objective else metric_goal(key)

        def score(t: TrialOutcome) -> float | None:
            return t.value if objective and t.value is not None else t.metrics.get(key)

        chosen = [(s, t) for t in self._trials if t.state in states
                  and (s := score(t)) is not None and not math.isnan(s)]
        chosen.sort(key=lambda pair: pair[0], reverse=direction == "max")
        return [t for _, t in chosen]

    @property
    def best(self) -> TrialOutcome | None:
        ranked = self.ranked()
        return ranked[0] if ranked else None
