"""Promotion to the MLflow Model Registry.

`promote` picks a study's trial (the best COMPLETE one by the objective, by another logged
metric, or a named run), logs its weights and preprocessing as the pyfunc `ImageClassifier`
(`hpo.after.serving`) into the trial's run as `classifier`, registers that as a version of NAME
(default `<study>-classifier`) and points ALIAS (default `champion`) at it.

Policies, decided here:
- A run is registered once per name: promoting it again reuses its version (and its logged
  `classifier`), so repeating a promotion changes nothing.
- The version that held ALIAS before keeps its version number and gets the alias `previous`;
  promoting the previous run again is therefore a rollback, and `previous` then marks the
  version that was just replaced.
- Each version is tagged with its study, trial number, architecture, every searched
  hyperparameter, the objective's value and every test metric, so the registry alone says
  what a version is.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpo.after.models import DEFAULT_ALIAS, registered_name, trial_weights
from hpo.config.study import StudyError
from hpo.config.trial import TrialOutcome, TrialState
from hpo.tracking import registry
from hpo.tracking.models import has_weights, load_run_weights
from hpo.tracking.records import StudyRecord
from hpo.tracking.tags import MODEL_NAME, TAG_STUDY, TAG_TRIAL
from imgcls.errors import ConfigError

if TYPE_CHECKING:
    from hpo.tracking.client import Tracker

PREVIOUS_ALIAS = "previous"  # given to the version an alias moves away from


@dataclass(frozen=True)
class Promotion:
    name: str  # the registered model
    version: int  # the version ALIAS now points at
    alias: str
    uri: str  # models:/NAME@ALIAS
    run_id: str  # the trial's run
    trial: int  # the trial's number
    metric: str  # what chose it: the ranking metric (the objective's key when a run was named)
    value: float | None  # the trial's value of `metric`
    previous_version: int | None  # the version ALIAS moved away from (now `previous`), or None
    created: bool  # False when the run was registered under NAME already and reused


def promote(tracker: Tracker, record: StudyRecord, *, metric: str | None = None,
            name: str | None = None, alias: str = DEFAULT_ALIAS, run_id: str | None = None
            ) -> Promotion:
    """Register the chosen trial's model as a version of `name` and point `alias` at it.

    metric: rank COMPLETE trials by this logged metric instead of the objective (its direction
        from imgcls.metrics.metric_goal: losses and costs lower, the rest higher).
    run_id: promote this trial's run instead of ranking.
    """
    name = name or registered_name(record.name)
    if alias == PREVIOUS_ALIAS:
        raise ConfigError(f"alias {PREVIOUS_ALIAS!r} is set by promotion itself, on the version "
                          "an alias moves away from; choose another alias")
    registry.check_names(name, alias)
    trial, key = choose_trial(record, metric=metric, run_id=run_id)
    assert trial.run_id is not None  # read from MLflow: every trial has its run
    model_id = _classifier(tracker, record, trial)
    version, created = registry.register_version(
        tracker, name, model_id, trial.run_id, tags=version_tags(record, trial),
        description=f"trial {trial.number} of the study {record.name!r}",
        model_tags={TAG_STUDY: record.name},
        model_description=f"Image classifier promoted from the study {record.name!r}")
    previous = move_alias(tracker, name, alias, version)
    return Promotion(name, version, alias, f"models:/{name}@{alias}", trial.run_id,
                     trial.number, key, trial.metrics.get(key), previous, created)


def choose_trial(record: StudyRecord, *, metric: str | None = None, run_id: str | None = None
                 ) -> tuple[TrialOutcome, str]:
    """The trial to promote and the metric key that chose it (the objective's for a run)."""
    if metric is not None and run_id is not None:
        raise ConfigError("choose a trial by metric or by run, not both")
    complete = [t for t in record.trials if t.state == TrialState.COMPLETE]
    if run_id is not None:
        return _named_trial(record, run_id), record.objective_key
    if not complete:
        counts = ", ".join(f"{n} {state.label}" for state, n in sorted(record.counts().items()))
        raise StudyError(f"study {record.name!r} has no COMPLETE trial to promote "
                         f"({counts or 'no trials'}); run more with "
                         f"`imgcls-hpo search {record.name}`")
    key = record.objective_key if metric in (None, record.objective) else str(metric)
    logged = sorted({k for t in complete for k in t.metrics})
    if key not in logged:
        close = difflib.get_close_matches(key, logged, n=3, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        shown = close + [k for k in logged if k not in close]
        more = f", ... ({len(shown) - 12} more)" if len(shown) > 12 else ""
        raise StudyError(f"no COMPLETE trial of study {record.name!r} logged the metric "
                         f"{key!r}{hint} (logged: {', '.join(shown[:12])}{more})")
    ranked = record.ranked(key)
    if not ranked:
        raise StudyError(f"the metric {key!r} is NaN for every COMPLETE trial of study "
                         f"{record.name!r}; rank by another metric")
    return ranked[0], key


def _named_trial(record: StudyRecord, run_id: str) -> TrialOutcome:
    trial = next((t for t in record.trials if t.run_id == run_id), None)
    if trial is None:
        raise StudyError(f"run {run_id} is not a trial of study {record.name!r}; give one "
                         f"of its trial runs (see `imgcls-hpo results {record.name}`)")
    if trial.state != TrialState.COMPLETE:
        raise StudyError(f"trial {trial.number} (run {run_id}) of study {record.name!r} "
                         f"is {trial.state.stored}; only COMPLETE trials have a model to "
                         "promote")
    return trial


def version_tags(record: StudyRecord, trial: TrialOutcome) -> dict[str, str]:
    """What a registered version is: study, trial, architecture, every searched
    hyperparameter, the objective's value (key best_<objective>) and every test_* metric."""
    tags: dict[str, Any] = {TAG_STUDY: record.name, TAG_TRIAL: trial.number}
    for param in ("arch", *record.searched):
        if param in trial.params:
            tags[param] = trial.params[param]
    keys = [record.objective_key, *sorted(k for k in trial.metrics if k.startswith("test_"))]
    tags.update({k: trial.metrics[k] for k in keys if k in trial.metrics})
    return {k: str(v) for k, v in tags.items()}


def _classifier(tracker: Tracker, record: StudyRecord, trial: TrialOutcome) -> str:
    """The id of the trial's `classifier` logged model, logged from its `model` if absent."""
    from hpo.after.serving import CLASSIFIER, log_classifier
    from imgcls.predict import Preprocessing

    assert trial.run_id is not None
    existing = registry.logged_models(tracker, record.experiment_id, trial.run_id, CLASSIFIER)
    if existing:
        return existing[-1].model_id
    if has_weights(tracker, trial.run_id):  # the trial's best weights (every COMPLETE trial)
        state_dict, metadata = load_run_weights(tracker, trial.run_id)
        preprocessing = Preprocessing.from_metadata(metadata)
    else:  # a trial logged with its pt2 model only (log_models: all, before weights were kept)
        trained = registry.logged_models(tracker, record.experiment_id, trial.run_id,
                                         MODEL_NAME)
        if not trained:
            raise StudyError(f"trial {trial.number} (run {trial.run_id}) of study "
                             f"{record.name!r} has no logged model {MODEL_NAME!r}; promote "
                             "another trial (--run) or run the trial again")
        state_dict, preprocessing = trial_weights(tracker, f"models:/{trained[-1].model_id}")
    return log_classifier(tracker, trial.run_id, state_dict, preprocessing)


def move_alias(tracker: Tracker, name: str, alias: str, version: int) -> int | None:
    """Point `alias` at `version`; the version it leaves gets `previous`. Returns that one."""
    current = registry.alias_version(tracker, name, alias)
    if current == version:
        return None
    registry.set_alias(tracker, name, alias, version)
    if current is not None:
        registry.set_alias(tracker, name, PREVIOUS_ALIAS, current)
    return current
