"""A model named by any reference, loaded as a Predictor: what `predict`, `explain` and
serving start from.

References: models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model (a trial's pt2 model and
its metadata), runs:/RUN_ID/classifier, or a study name (its `<study>-classifier@champion`).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.tracking import registry
from hpo.tracking.models import (
    WEIGHTS_DIR,
    ModelInfo,
    has_weights,
    load_file,
    load_run_weights,
    load_weights,
    model_info,
)
from hpo.tracking.tags import CLASSIFIER_PREPROCESSING, CLASSIFIER_WEIGHTS
from imgcls.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from hpo.tracking.client import Tracker
    from imgcls.predict import Predictor, Preprocessing

DEFAULT_ALIAS = "champion"
CODE_MODEL_LOADER = "mlflow.pyfunc.loaders.code_model"  # MLflow's loader of models from code
MODEL_REFERENCES = ("models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, "
                    "runs:/RUN_ID/classifier, or a study name")


def registered_name(study: str) -> str:
    """The registered model a study promotes to by default."""
    return f"{study}-classifier"


def model_uri(ref: str) -> str:
    """An MLflow model URI for `ref`: URIs as given, a study name as its champion."""
    ref = ref.strip()
    if ref.startswith(("models:/", "runs:/")):
        return ref
    if ":" in ref or "/" in ref or not ref:
        raise ConfigError(f"model reference {ref!r} is none of {MODEL_REFERENCES}")
    return f"models:/{registered_name(ref)}@{DEFAULT_ALIAS}"


def resolve_model(tracker: Tracker, ref: str) -> tuple[str, Predictor]:
    """The model `ref` names, as its URI and a Predictor. An unknown reference raises
    ConfigError naming what was looked for."""
    from hpo.after.serving import load_predictor
    from imgcls.predict import Predictor, Preprocessing

    uri = model_uri(ref)
    run_id = _trial_weights_run(tracker, uri)
    if run_id is not None:  # a trial's own weights (runs:/ID/model)
        state_dict, metadata = load_run_weights(tracker, run_id)
        return uri, Predictor.from_state_dict(state_dict, Preprocessing.from_metadata(metadata))
    study = None if "/" in ref else ref
    hint = f"; promote a trial first: `imgcls-hpo promote {study}`" if study else ""
    registry.check_reference(tracker, uri, hint, MODEL_REFERENCES)
    # What the model is, from its MLmodel file alone: nothing of it is loaded, and none of its
    # code run, before it is known to be one of ours; then only its tensors are read.
    model = model_info(tracker, uri)
    if "pytorch" in model.flavors:  # a trial's own model: rebuild it from weights and metadata
        state_dict, preprocessing = trial_weights(tracker, uri, model)
        return uri, Predictor.from_state_dict(state_dict, preprocessing)
    if not is_classifier(model.flavors, model.metadata):
        raise ConfigError(f"{uri} is not an image classifier promoted by imgcls-hpo (flavors: "
                          f"{', '.join(model.flavors)}); it was not loaded. Give "
                          f"{MODEL_REFERENCES}")
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = model.flavors["python_function"]["artifacts"]
        files = {key: str(load_file(tracker, model, artifacts[key]["path"], Path(tmp)))
                 for key in (CLASSIFIER_WEIGHTS, CLASSIFIER_PREPROCESSING)}
        return uri, load_predictor(files)  # torch.load(weights_only=True): tensors only


def is_classifier(flavors: Mapping[str, Any], metadata: Mapping[str, Any]) -> bool:
    """Whether an MLmodel describes an ImageClassifier as `promote` logs it: a pyfunc loaded
    from its code file, with the weights and preprocessing artifacts and the imgcls metadata."""
    pyfunc = flavors.get("python_function") or {}
    artifacts = pyfunc.get("artifacts") or {}
    return (set(flavors) == {"python_function"} and "imgcls" in metadata
            and pyfunc.get("loader_module") == CODE_MODEL_LOADER
            and all(isinstance(artifacts.get(key), dict) and "path" in artifacts[key]
                    for key in (CLASSIFIER_WEIGHTS, CLASSIFIER_PREPROCESSING)))


def _trial_weights_run(tracker: Tracker, uri: str) -> str | None:
    """The run of `runs:/RUN_ID/model` when that run holds a trial's weights; else None."""
    if not uri.startswith("runs:/"):
        return None
    run_id, _, artifact = uri.removeprefix("runs:/").strip("/").partition("/")
    return run_id if artifact == WEIGHTS_DIR and has_weights(tracker, run_id) else None


def trial_weights(tracker: Tracker, uri: str, model: ModelInfo | None = None
                  ) -> tuple[dict[str, torch.Tensor], Preprocessing]:
    """A trial's pt2 model as a state dict for `imgcls.models.build_model`, and its
    preprocessing (the `imgcls` metadata it was logged with). `model`: its MLmodel, when the
    caller has read it already."""
    from imgcls.predict import Preprocessing

    model = model or model_info(tracker, uri)
    metadata = model.metadata
    if "imgcls" not in metadata:
        raise ConfigError(f"the model {uri} has no 'imgcls' metadata (classes, image size, "
                          "normalization), so it cannot predict; promote a trial logged by "
                          "imgcls-hpo")
    preprocessing = Preprocessing.from_metadata(metadata["imgcls"])
    return load_weights(tracker, model), preprocessing
