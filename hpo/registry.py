"""Promotion to the MLflow Model Registry, and loading a model back by any reference.

`promote` picks a study's trial (the best COMPLETE one by the objective, by another logged
metric, or a named run), logs its weights and preprocessing as the pyfunc `ImageClassifier`
(`hpo.serving`) into the trial's run as `classifier`, registers that as a version of NAME
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

Every MLflow call goes through the tracker's explicit client, except where MLflow reads the
global tracking URI itself (loading a model, creating a version from a `models:/` source): there
the URI is set for that call only.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpo.records import StudyRecord, TrialRecord
from hpo.study import StudyError
from hpo.tracking import MODEL_NAME, TAG_STUDY, TAG_TRIAL, fluent_tracking_uri
from imgcls.errors import ConfigError, first_line

if TYPE_CHECKING:
    import torch
    from mlflow import MlflowClient
    from mlflow.entities import LoggedModel

    from hpo.tracking import Tracker
    from imgcls.predict import Predictor, Preprocessing

DEFAULT_ALIAS = "champion"
PREVIOUS_ALIAS = "previous"  # given to the version an alias moves away from
MODEL_REFERENCES = ("models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, "
                    "runs:/RUN_ID/classifier, or a study name")


def registered_name(study: str) -> str:
    """The registered model a study promotes to by default."""
    return f"{study}-classifier"


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
        from `metric_goal`: losses and costs lower, the rest higher).
    run_id: promote this trial's run instead of ranking.
    """
    name = name or registered_name(record.name)
    _check_names(name, alias)
    trial, key = choose_trial(record, metric=metric, run_id=run_id)
    model_id = _classifier(tracker, record, trial)
    version, created = _version(tracker, name, record, trial, model_id)
    previous = _move_alias(tracker.client, name, alias, version)
    return Promotion(name, version, alias, f"models:/{name}@{alias}", trial.run_id,
                     trial.number, key, trial.metrics.get(key), previous, created)


def choose_trial(record: StudyRecord, *, metric: str | None = None, run_id: str | None = None
                 ) -> tuple[TrialRecord, str]:
    """The trial to promote and the metric key that chose it (the objective's for a run)."""
    if metric is not None and run_id is not None:
        raise ConfigError("choose a trial by metric or by run, not both")
    complete = [t for t in record.trials if t.state == "COMPLETE"]
    if run_id is not None:
        trial = next((t for t in record.trials if t.run_id == run_id), None)
        if trial is None:
            raise StudyError(f"run {run_id} is not a trial of study {record.name!r}; give one "
                             f"of its trial runs (see `imgcls-hpo results {record.name}`)")
        if trial.state != "COMPLETE":
            raise StudyError(f"trial {trial.number} (run {run_id}) of study {record.name!r} "
                             f"is {trial.state}; only COMPLETE trials have a model to promote")
        return trial, record.objective_key
    if not complete:
        counts = ", ".join(f"{n} {state}" for state, n in sorted(record.counts().items()))
        raise StudyError(f"study {record.name!r} has no COMPLETE trial to promote "
                         f"({counts or 'no trials'}); run more with "
                         f"`imgcls-hpo search {record.name}`")
    key = record.objective_key if metric in (None, record.objective) else metric
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


def version_tags(record: StudyRecord, trial: TrialRecord) -> dict[str, str]:
    """What a registered version is: study, trial, architecture, every searched
    hyperparameter, the objective's value (key best_<objective>) and every test_* metric."""
    tags: dict[str, Any] = {TAG_STUDY: record.name, TAG_TRIAL: trial.number}
    for param in ("arch", *record.searched):
        if param in trial.params:
            tags[param] = trial.params[param]
    keys = [record.objective_key, *sorted(k for k in trial.metrics if k.startswith("test_"))]
    tags.update({k: trial.metrics[k] for k in keys if k in trial.metrics})
    return {k: str(v) for k, v in tags.items()}


def resolve_model(tracker: Tracker, ref: str) -> tuple[str, Predictor]:
    """The model `ref` names, as its URI and a Predictor.

    ref: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model (a trial's pt2 model and
    its metadata), runs:/RUN_ID/classifier, or a study name (its `<study>-classifier@champion`).
    An unknown reference raises ConfigError naming what was looked for.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from hpo.serving import ImageClassifier
    from imgcls.predict import Predictor

    uri = model_uri(ref)
    _check_exists(tracker, uri, study=None if "/" in ref else ref)
    with fluent_tracking_uri(tracker.uri):
        try:
            flavors = mlflow.models.get_model_info(uri).flavors
        except Exception as exc:  # an unreadable MLmodel, a missing artifact: no usable model
            raise ConfigError(f"cannot load the model {uri} from the tracking store "
                              f"{tracker.uri} ({first_line(exc)})") from None
    if "pytorch" in flavors:  # a trial's own model: rebuild it from its weights and metadata
        state_dict, preprocessing = trial_weights(tracker, uri)
        return uri, Predictor.from_state_dict(state_dict, preprocessing)
    with fluent_tracking_uri(tracker.uri):
        model = mlflow.pyfunc.load_model(uri)  # the classifier's load_context builds its Predictor
    try:
        python_model = model.unwrap_python_model()
    except MlflowException:  # another flavor's pyfunc: not ours
        python_model = None
    if not isinstance(python_model, ImageClassifier) or python_model.predictor is None:
        raise ConfigError(f"{uri} is not an image classifier promoted by imgcls-hpo (flavors: "
                          f"{', '.join(flavors)}); give {MODEL_REFERENCES}")
    return uri, python_model.predictor


def model_uri(ref: str) -> str:
    """An MLflow model URI for `ref`: URIs as given, a study name as its champion."""
    ref = ref.strip()
    if ref.startswith(("models:/", "runs:/")):
        return ref
    if ":" in ref or "/" in ref or not ref:
        raise ConfigError(f"model reference {ref!r} is none of {MODEL_REFERENCES}")
    return f"models:/{registered_name(ref)}@{DEFAULT_ALIAS}"


def trial_weights(tracker: Tracker, uri: str
                  ) -> tuple[dict[str, torch.Tensor], Preprocessing]:
    """A trial's pt2 model as a state dict for `imgcls.models.build_model`, and its
    preprocessing (the `imgcls` metadata it was logged with)."""
    import mlflow

    from imgcls.predict import Preprocessing

    with fluent_tracking_uri(tracker.uri):
        metadata = mlflow.models.get_model_info(uri).metadata or {}
        if "imgcls" not in metadata:
            raise ConfigError(f"the model {uri} has no 'imgcls' metadata (classes, image size, "
                              "normalization), so it cannot predict; promote a trial logged by "
                              "imgcls-hpo")
        preprocessing = Preprocessing.from_metadata(metadata["imgcls"])
        module = mlflow.pytorch.load_model(uri)
    return dict(module.state_dict()), preprocessing


# -- promotion steps ---------------------------------------------------------------------------

def _check_names(name: str, alias: str) -> None:
    """Refuse a bad name or alias before anything is logged. MLflow's own validators, so the
    rules are exactly the registry's."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
        _validate_model_name,
    )

    if alias == PREVIOUS_ALIAS:
        raise ConfigError(f"alias {PREVIOUS_ALIAS!r} is set by promotion itself, on the version "
                          "an alias moves away from; choose another alias")
    if "'" in name:
        raise ConfigError(f"registered model name {name!r} contains a quote; choose another")
    try:
        _validate_model_name(name)
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as exc:
        raise ConfigError(f"{first_line(exc)} (registered model {name!r}, alias {alias!r})"
                          ) from None


def _logged_models(client: MlflowClient, experiment_id: str, run_id: str, name: str
                   ) -> list[LoggedModel]:
    """The run's READY logged models named `name`, oldest first."""
    from mlflow.entities import LoggedModelStatus

    found = client.search_logged_models(
        [experiment_id], filter_string=f"name = '{name}' AND source_run_id = '{run_id}'")
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return sorted(ready, key=lambda m: m.creation_timestamp)


def _classifier(tracker: Tracker, record: StudyRecord, trial: TrialRecord) -> str:
    """The id of the trial's `classifier` logged model, logged from its `model` if absent."""
    from hpo.serving import CLASSIFIER, log_classifier

    client = tracker.client
    existing = _logged_models(client, record.experiment_id, trial.run_id, CLASSIFIER)
    if existing:
        return existing[-1].model_id
    trained = _logged_models(client, record.experiment_id, trial.run_id, MODEL_NAME)
    if not trained:
        raise StudyError(f"trial {trial.number} (run {trial.run_id}) of study {record.name!r} "
                         f"has no logged model {MODEL_NAME!r}; promote another trial (--run) or "
                         "run the trial again")
    state_dict, preprocessing = trial_weights(tracker, f"models:/{trained[-1].model_id}")
    return log_classifier(tracker.uri, record.experiment_id, trial.run_id, state_dict,
                          preprocessing)


def _version(tracker: Tracker, name: str, record: StudyRecord, trial: TrialRecord,
             model_id: str) -> tuple[int, bool]:
    """The version of `name` holding the classifier `model_id`, created if there is none;
    and whether it was created."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = tracker.client
    source = f"models:/{model_id}"
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(
            name, tags={TAG_STUDY: record.name},
            description=f"Image classifier promoted from the study {record.name!r}")
    for existing in client.search_model_versions(
            f"name = '{name}' AND run_id = '{trial.run_id}'"):
        if existing.source == source:
            return int(existing.version), False
    # The registry store resolves a models:/ source through the global tracking URI.
    with fluent_tracking_uri(tracker.uri):
        created = client.create_model_version(
            name, source, run_id=trial.run_id, tags=version_tags(record, trial),
            description=f"trial {trial.number} of the study {record.name!r}", model_id=model_id)
    # What mlflow.register_model records too: the logged model's page lists its versions.
    links = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    links.append({"name": name, "version": int(created.version)})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
    return int(created.version), True


def _alias_version(client: MlflowClient, name: str, alias: str) -> int | None:
    aliases = client.get_registered_model(name).aliases
    return int(aliases[alias]) if alias in aliases else None


def _move_alias(client: MlflowClient, name: str, alias: str, version: int) -> int | None:
    """Point `alias` at `version`; the version it leaves gets `previous`. Returns that one."""
    current = _alias_version(client, name, alias)
    if current == version:
        return None
    client.set_registered_model_alias(name, alias, str(version))
    if current is not None:
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, str(current))
    return current


# -- resolving references ----------------------------------------------------------------------

def _check_exists(tracker: Tracker, uri: str, study: str | None) -> None:
    """ConfigError naming what was looked for when `uri` names nothing in the store."""
    from mlflow.exceptions import MlflowException

    client = tracker.client
    store = f"the tracking store {tracker.uri}"
    path = uri.split(":/", 1)[1].strip("/")
    if uri.startswith("models:/") and not path.startswith("m-"):
        name, _, selector = path.replace("@", "/@", 1).partition("/")
        try:
            model = client.get_registered_model(name)
        except MlflowException:
            known = [m.name for m in client.search_registered_models(max_results=20)]
            hint = (f"; promote a trial first: `imgcls-hpo promote {study}`" if study
                    else f" (registered: {', '.join(known) or 'none'})")
            raise ConfigError(f"no registered model {name!r} in {store}{hint}") from None
        if selector.startswith("@"):
            alias = selector[1:]
            if alias not in model.aliases:
                held = ", ".join(f"{a} (version {v})" for a, v in sorted(model.aliases.items()))
                raise ConfigError(f"registered model {name!r} has no alias {alias!r} (aliases: "
                                  f"{held or 'none'}); promote a trial to it first")
        elif selector.isdigit():
            try:
                client.get_model_version(name, selector)
            except MlflowException:
                versions = sorted(int(v.version) for v in
                                  client.search_model_versions(f"name = '{name}'"))
                raise ConfigError(f"registered model {name!r} has no version {selector} "
                                  f"(versions: {', '.join(map(str, versions)) or 'none'})"
                                  ) from None
    elif uri.startswith("runs:/"):
        run_id, _, artifact = path.partition("/")
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ConfigError(f"no run {run_id!r} in {store}; give {MODEL_REFERENCES}"
                              ) from None
        models = client.search_logged_models(
            [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
        names = sorted({m.name for m in models})
        # A model saved among the run's own artifacts (MLflow 2's layout) counts too.
        in_artifacts = any(f.path.endswith("MLmodel")
                           for f in client.list_artifacts(run_id, artifact or None))
        if artifact not in names and not in_artifacts:
            raise ConfigError(f"run {run_id} has no model {artifact!r} (its models: "
                              f"{', '.join(names) or 'none'})")
