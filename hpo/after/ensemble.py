"""`promote --ensemble K`: the top K COMPLETE trials of a study as one registered model.

The ensemble averages its members' calibrated probabilities (each member scaled by its own
temperature) and decides at its own threshold, chosen by the study's operating point on the
average of the members' validation probabilities. Before anything is registered it is evaluated
on the study's test split, from the per-image probabilities each trial logged when it ended
(`predictions_val.csv`, `predictions_test.csv`): no image is decoded again and no model run, so
the evaluation is exact and takes a second. Its test metrics, with bootstrap intervals, go to an
`ensemble` run nested under the study run, beside the best single trial's.

The registered version is an ImageClassifier like a single trial's (hpo.after.serving), so
`predict`, `explain` and `mlflow models serve` use it alike.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hpo.after.models import DEFAULT_ALIAS, registered_name
from hpo.after.promote import PREVIOUS_ALIAS, move_alias, version_tags
from hpo.config.study import StudyError
from hpo.config.trial import TrialOutcome
from hpo.tracking import registry
from hpo.tracking.models import has_weights, load_run_weights, run_file
from hpo.tracking.records import StudyRecord
from hpo.tracking.tags import TAG_ROLE, TAG_STUDY
from imgcls.errors import ConfigError
from imgcls.metrics import OperatingPoint, choose_threshold, test_metrics
from imgcls.predict import Preprocessing

if TYPE_CHECKING:
    from hpo.tracking.client import Tracker

TAG_MEMBERS = "imgcls_hpo.members"  # on the ensemble's run and version: its trials' numbers
# The metrics the comparison with the best single trial shows, where the study logged them
COMPARED = ("test_f1", "test_bal_acc", "test_acc", "test_auc", "test_log_loss")


@dataclass(frozen=True)
class Split:
    """One split's per-image probabilities, as a trial logged them."""

    ids: tuple[str, ...]
    labels: np.ndarray  # (N,) class indices
    probs: np.ndarray  # (N, K)


@dataclass(frozen=True)
class EnsemblePromotion:
    name: str
    version: int
    alias: str
    uri: str
    run_id: str  # the ensemble's run
    members: tuple[int, ...]  # the trials' numbers, best first
    metric: str  # what ranked them
    threshold: float | None  # the ensemble's decision threshold (None: argmax)
    metrics: dict[str, float]  # the ensemble's test metrics, with intervals
    best: dict[str, float]  # the best single trial's, alike
    previous_version: int | None


def promote_ensemble(tracker: Tracker, record: StudyRecord, k: int, *,
                     metric: str | None = None, name: str | None = None,
                     alias: str = DEFAULT_ALIAS) -> EnsemblePromotion:
    """Evaluate the top `k` COMPLETE trials by `metric` (default: the objective) as one model on
    the test split, log it into a new `ensemble` run, register it as a version of `name` and
    point `alias` at it."""
    name = name or registered_name(record.name)
    if alias == PREVIOUS_ALIAS:
        raise ConfigError(f"alias {PREVIOUS_ALIAS!r} is set by promotion itself; choose "
                          "another alias")
    registry.check_names(name, alias)
    members, key = top_trials(record, k, metric)
    study_params = tracker.run(record.study_run_id).data.params
    val = average([_split(tracker, t, "val") for t in members])
    test = average([_split(tracker, t, "test") for t in members])
    point = OperatingPoint.parse(study_params.get("operating_point", "argmax"))
    threshold = choose_threshold(val.labels, val.probs, point)
    scores = test_metrics(test.labels, test.probs, test.probs.shape[1],
                          seed=int(study_params.get("seed", 0)), threshold=threshold)
    run_id = _ensemble_run(tracker, record, members, key, scores, threshold)
    from hpo.after.serving import log_ensemble

    model_id = log_ensemble(tracker, run_id, [_weights(tracker, t) for t in members], threshold)
    numbers = tuple(t.number for t in members)
    tags = {**version_tags(record, members[0]), TAG_MEMBERS: ",".join(map(str, numbers)),
            **{k: str(v) for k, v in scores.items()}}
    version, _ = registry.register_version(
        tracker, name, model_id, run_id, tags=tags,
        description=f"ensemble of trials {', '.join(map(str, numbers))} of the study "
                    f"{record.name!r} (mean of their calibrated probabilities)",
        model_tags={TAG_STUDY: record.name},
        model_description=f"Image classifier promoted from the study {record.name!r}")
    previous = move_alias(tracker, name, alias, version)
    best = {m: v for m, v in members[0].metrics.items() if m.startswith("test_")}
    return EnsemblePromotion(name, version, alias, f"models:/{name}@{alias}", run_id, numbers,
                             key, threshold, scores, best, previous)


def top_trials(record: StudyRecord, k: int, metric: str | None = None
               ) -> tuple[list[TrialOutcome], str]:
    """The `k` best COMPLETE trials by `metric` (the objective by default), best first."""
    from hpo.after.promote import choose_trial

    if k < 2:
        raise ConfigError(f"an ensemble needs at least 2 trials, not {k}; promote one trial "
                          "without --ensemble")
    _, key = choose_trial(record, metric=metric)  # the checks: a COMPLETE trial, a known metric
    ranked = record.ranked(key)
    if len(ranked) < k:
        raise StudyError(f"study {record.name!r} has {len(ranked)} COMPLETE trial(s) with "
                         f"{key}, fewer than the {k} to ensemble; run more with `imgcls-hpo "
                         f"search {record.name}`, or ensemble fewer")
    return ranked[:k], key


def average(splits: list[Split]) -> Split:
    """The members' splits as one: the mean of their probabilities, image by image."""
    first = splits[0]
    for split in splits[1:]:
        if split.ids != first.ids or not np.array_equal(split.labels, first.labels):
            raise StudyError("the trials were evaluated on different images (a study whose data "
                             "or split changed between its runs); ensemble trials of one split")
    return Split(first.ids, first.labels, np.mean([s.probs for s in splits], axis=0))


def _split(tracker: Tracker, trial: TrialOutcome, split: str) -> Split:
    """The per-image probabilities trial `trial` logged for `split`."""
    assert trial.run_id is not None
    with tempfile.TemporaryDirectory() as tmp:
        path = run_file(tracker, trial.run_id, f"predictions_{split}.csv", Path(tmp))
        if path is None:
            raise StudyError(f"trial {trial.number} (run {trial.run_id}) logged no "
                             f"predictions_{split}.csv (a trial of an older imgcls-hpo, or "
                             "without a test split): it cannot be ensembled")
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    columns = [c for c in (rows[0] if rows else {}) if c.startswith("p_")]
    classes = [c.removeprefix("p_") for c in columns]
    return Split(tuple(r["file"] for r in rows),
                 np.array([classes.index(r["label"]) for r in rows], dtype=np.int64),
                 np.array([[float(r[c]) for c in columns] for r in rows], dtype=np.float64))


def _weights(tracker: Tracker, trial: TrialOutcome) -> tuple[dict, Preprocessing]:
    assert trial.run_id is not None
    if not has_weights(tracker, trial.run_id):
        raise StudyError(f"trial {trial.number} (run {trial.run_id}) holds no weights under "
                         "model/: it cannot be ensembled; ensemble other trials (--metric)")
    state_dict, metadata = load_run_weights(tracker, trial.run_id)
    return state_dict, Preprocessing.from_metadata(metadata)


def _ensemble_run(tracker: Tracker, record: StudyRecord, members: list[TrialOutcome], key: str,
                  scores: dict[str, float], threshold: float | None) -> str:
    """A run under the study run that holds the ensemble: which trials, how it was chosen, its
    test metrics; finished at once."""
    numbers = ",".join(str(t.number) for t in members)
    run = tracker.client.create_run(
        record.experiment_id, run_name=f"ensemble of trials {numbers}",
        tags={"mlflow.parentRunId": record.study_run_id, TAG_ROLE: "ensemble",
              TAG_STUDY: record.name, TAG_MEMBERS: numbers})
    run_id = run.info.run_id
    tracker.log_params(run_id, {"members": len(members), "ranked_by": key,
                                "member_runs": ",".join(str(t.run_id) for t in members)})
    tracker.log_metrics(run_id, {**scores, **({"threshold": threshold}
                                              if threshold is not None else {})})
    tracker.end_run(run_id, "FINISHED")
    return run_id
