"""The MLflow Model Registry as promotion uses it: registered models, their versions and
aliases, the logged models of a run, and checking that a model reference names something.

The policies (which trial, which tags, what happens to the alias's old version) are
hpo.after.promote's; this module only says them to MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING

from hpo.tracking.client import fluent_tracking_uri
from hpo.tracking.models import WEIGHTS_DIR, has_weights
from imgcls.errors import ConfigError, first_line

if TYPE_CHECKING:
    from mlflow.entities import LoggedModel

    from hpo.tracking.client import Tracker


def check_names(name: str, alias: str) -> None:
    """ConfigError for a registered model name or alias the registry would refuse, before
    anything is logged. MLflow's own validators, so the rules are exactly the registry's."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.validation import (
        _validate_model_alias_name,
        _validate_model_alias_name_reserved,
        _validate_model_name,
    )

    if "'" in name:
        raise ConfigError(f"registered model name {name!r} contains a quote; choose another")
    try:
        _validate_model_name(name)
        _validate_model_alias_name(alias)
        _validate_model_alias_name_reserved(alias)
    except MlflowException as exc:
        raise ConfigError(f"{first_line(exc)} (registered model {name!r}, alias {alias!r})"
                          ) from None


def logged_models(tracker: Tracker, experiment_id: str, run_id: str, name: str
                  ) -> list[LoggedModel]:
    """The run's READY logged models named `name`, oldest first."""
    from mlflow.entities import LoggedModelStatus

    found = tracker.client.search_logged_models(
        [experiment_id], filter_string=f"name = '{name}' AND source_run_id = '{run_id}'")
    ready = [m for m in found if m.status == LoggedModelStatus.READY]
    return sorted(ready, key=lambda m: m.creation_timestamp)


def register_version(tracker: Tracker, name: str, model_id: str, run_id: str, *,
                     tags: Mapping[str, str], description: str, model_tags: Mapping[str, str],
                     model_description: str) -> tuple[int, bool]:
    """The version of registered model `name` that holds the logged model `model_id`, created
    (with `tags` and `description`, and the registered model itself with `model_tags` and
    `model_description` if it is new) when there is none; and whether it was created."""
    from mlflow.exceptions import MlflowException
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

    client = tracker.client
    source = f"models:/{model_id}"
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, tags=dict(model_tags),
                                       description=model_description)
    for existing in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
        if existing.source == source:
            return int(existing.version), False
    # The registry store resolves a models:/ source through the global tracking URI.
    with fluent_tracking_uri(tracker.uri):
        created = client.create_model_version(name, source, run_id=run_id, tags=dict(tags),
                                              description=description, model_id=model_id)
    # What mlflow.register_model records too: the logged model's page lists its versions.
    links = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
    links.append({"name": name, "version": int(created.version)})
    client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
    return int(created.version), True


def alias_version(tracker: Tracker, name: str, alias: str) -> int | None:
    aliases = tracker.client.get_registered_model(name).aliases
    return int(aliases[alias]) if alias in aliases else None


def set_alias(tracker: Tracker, name: str, alias: str, version: int) -> None:
    tracker.client.set_registered_model_alias(name, alias, str(version))


def check_reference(tracker: Tracker, uri: str, hint: str, references: str) -> None:
    """ConfigError naming what was looked for when the model URI `uri` (models:/NAME@ALIAS,
    models:/NAME/VERSION, runs:/RUN_ID/NAME) names nothing in the store. `hint`: what to do
    when the registered model does not exist; `references`: the forms a reference may take."""
    path = uri.split(":/", 1)[1].strip("/")
    if uri.startswith("models:/") and not path.startswith("m-"):
        _check_registered(tracker, path, hint)
    elif uri.startswith("runs:/"):
        _check_run_model(tracker, path, references)


def _check_registered(tracker: Tracker, path: str, hint: str) -> None:
    from mlflow.exceptions import MlflowException

    client = tracker.client
    name, _, selector = path.replace("@", "/@", 1).partition("/")
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = [m.name for m in client.search_registered_models(max_results=20)]
        hint = hint or f" (registered: {', '.join(known) or 'none'})"
        raise ConfigError(f"no registered model {name!r} in the tracking store "
                          f"{tracker.shown}{hint}") from None
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


def _check_run_model(tracker: Tracker, path: str, references: str) -> None:
    from mlflow.exceptions import MlflowException

    client = tracker.client
    run_id, _, artifact = path.partition("/")
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"no run {run_id!r} in the tracking store {tracker.shown}; give "
                          f"{references}") from None
    models = client.search_logged_models(
        [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    names = sorted({m.name for m in models} | ({WEIGHTS_DIR} if has_weights(tracker, run_id)
                                               else set()))
    # A model saved among the run's own artifacts (MLflow 2's layout) counts too.
    in_artifacts = any(f.path.endswith("MLmodel")
                       for f in client.list_artifacts(run_id, artifact or None))
    if artifact not in names and not in_artifacts:
        raise ConfigError(f"run {run_id} has no model {artifact!r} (its models: "
                          f"{', '.join(names) or 'none'})")
