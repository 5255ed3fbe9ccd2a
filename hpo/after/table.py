"""The trials of a study as a table: the top finished trials for the terminal, and every trial,
whatever its state, as trials.csv."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from hpo.config.hparams import HParams
from hpo.config.space import Scalar
from hpo.config.trial import TrialState, test_counterpart
from hpo.tracking.records import StudyRecord
from imgcls.errors import ConfigError
from imgcls.metrics import EPOCH_LOGGED, metric_goal

# Metrics that count something: whole numbers in trials.csv.
COUNT_METRICS = frozenset({"best_epoch", "epochs", "params_count", "flops", "macs"})
# The states the table counts, in this order (zeros kept).
STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED, TrialState.INTERRUPTED,
          TrialState.LOST, TrialState.RUNNING)


@dataclass(frozen=True)
class TrialRow:
    """One trial of the table: what a user compares to pick a model."""

    number: int
    state: TrialState  # COMPLETE or PRUNED
    value: float  # the objective at the trial's best epoch (best_<objective>)
    value_std: float | None  # its deviation over the folds of a cross-validated trial
    params: dict[str, Scalar]  # the searched hyperparameters
    test: float | None  # the objective's test counterpart (val_f1 -> test_f1); None: no test split
    test_ci: tuple[float, float] | None  # its bootstrap confidence interval (low, high)
    threshold: float | None  # the decision threshold its operating point chose; None: argmax
    params_count: int | None  # trainable and frozen parameters of the model
    flops: int | None  # per image, one forward pass
    run_id: str


@dataclass(frozen=True)
class TrialsTable:
    objective: str  # the study's objective, e.g. val_f1
    objective_key: str  # the metric holding each trial's value: best_val_f1
    test_metric: str  # the objective's test counterpart: test_f1
    searched: tuple[str, ...]
    rows: tuple[TrialRow, ...]  # the top finished trials, best first
    counts: dict[TrialState, int]  # trials per state, every state of STATES, zeros kept

    @property
    def selection_gap(self) -> float | None:
        """How much better the chosen (top) trial's validation score is than its test
        counterpart, in the objective's units (for a loss: how far below): the optimism of
        picking the best of many noisy validation scores, positive when validation flattered
        it. None without a finished trial or a test split."""
        if not self.rows or self.rows[0].test is None:
            return None
        top = self.rows[0]
        gap = top.value - top.test
        return -gap if metric_goal(self.objective) == "min" else gap


def trials_table(record: StudyRecord, top: int = 10) -> TrialsTable:
    """The `top` best finished (COMPLETE or PRUNED) trials by the objective, best first; a trial
    without an objective value (NaN, or never logged) does not rank."""
    if top < 1:
        raise ConfigError(f"top={top}: the table needs at least one row; use --top 1 or more")
    test = test_counterpart(record.objective)
    rows = []
    for trial in record.ranked(states=(TrialState.COMPLETE, TrialState.PRUNED))[:top]:
        m = trial.metrics
        ci = (m[f"{test}_ci_low"], m[f"{test}_ci_high"]) \
            if f"{test}_ci_low" in m and f"{test}_ci_high" in m else None
        rows.append(TrialRow(
            number=trial.number, state=trial.state, value=m[record.objective_key],
            value_std=m.get(f"{record.objective_key}_std"),
            params={k: trial.params[k] for k in record.searched if k in trial.params},
            test=m.get(test), test_ci=ci, threshold=m.get("threshold"),
            params_count=_int(m.get("params_count")), flops=_int(m.get("flops")),
            run_id=trial.run_id or "",
        ))
    counts = record.counts()
    states = {s: counts.get(s, 0) for s in STATES}
    return TrialsTable(record.objective, record.objective_key, test, record.searched,
                       tuple(rows), states)


def _int(value: float | None) -> int | None:
    return None if value is None or value != value else int(value)


def summary_metrics(record: StudyRecord) -> list[str]:
    """Every trial-level metric any trial logged: the objective's best first, then its test
    counterpart with its interval, then the rest by name."""
    names = {k for t in record.trials for k in t.metrics if k not in EPOCH_LOGGED}
    test = test_counterpart(record.objective)
    first = [record.objective_key, test, f"{test}_ci_low", f"{test}_ci_high"]
    rest = sorted(names.difference(first),  # test_acc, test_acc_ci_low, test_acc_ci_high
                  key=lambda k: (k.removesuffix("_ci_low").removesuffix("_ci_high"),
                                 k.endswith("_ci_low") + 2 * k.endswith("_ci_high")))
    return [k for k in first if k in names] + rest


def write_trials_csv(record: StudyRecord, path: Path) -> Path:
    """Every trial, whatever its state, one row each by trial number: number, state, the
    searched hyperparameters, the summary metrics, the other hyperparameters, run id, fail
    reason. A value a trial did not log is an empty cell."""
    kinds = HParams.kinds()
    others = [k for k in kinds if k not in record.searched]
    metrics = summary_metrics(record)
    header = ["number", "state", *record.searched, *metrics, *others, "run_id", "fail_reason"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for t in record.trials:
            writer.writerow([
                t.number, t.state.value,
                *(t.params.get(k, "") for k in record.searched),
                *(_cell(k, t.metrics.get(k)) for k in metrics),
                *(t.params.get(k, "") for k in others),
                t.run_id or "", t.fail_reason or "",
            ])
    return path


def _cell(name: str, value: float | None) -> str | float | int:
    """A metric as a CSV cell: counts as integers, a missing value empty."""
    if value is None:
        return ""
    return int(value) if name in COUNT_METRICS and value.is_integer() else value
