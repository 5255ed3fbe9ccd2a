"""The registered model: an MLflow pyfunc that carries its weights and its preprocessing.

`ImageClassifier` needs nothing but its own artifacts to predict: a state dict (`weights.pt`) and
the `imgcls` preprocessing dict (`preprocessing.json`: architecture, classes, image size,
channels, normalization). So `mlflow.pyfunc.load_model("models:/NAME@champion")`, and
`mlflow models serve -m models:/NAME@champion --env-manager local`, classify images with the
exact input contract the trial trained with (decoding through `imgcls.predict`).

Input: a DataFrame with a column `image`, each value an image file path, the bytes of an encoded
image (PNG, JPEG, ...), or the base64 text of those bytes (a `data:image/...;base64,` URL too).
A loaded pyfunc enforces that column; the python model itself also takes a list or Series.
The signature declares `image` as binary: over REST, MLflow base64-decodes a binary column sent
as `dataframe_split` or `dataframe_records` itself, while `inputs` and `instances` hand the
base64 text over as is; `predict` decodes that text, so every format works.
Output: a DataFrame with `class` (the top class), `probability` (its probability) and one
`p_<class>` column per class, in the model's class order.

Importing this module imports mlflow.pyfunc (the one module outside hpo.tracking that does: it
is the served model's own code); hpo.after imports it only when it needs it.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from PIL import Image

from hpo.tracking.models import log_model
from hpo.tracking.tags import CLASSIFIER_PREPROCESSING, CLASSIFIER_WEIGHTS
from imgcls.errors import DataError
from imgcls.predict import EnsemblePredictor, ImageInput, Predictor, Preprocessing

if TYPE_CHECKING:
    from hpo.tracking.client import Tracker

CLASSIFIER = "classifier"  # the pyfunc's name in a trial's run (the pt2 model is `model`)
IMAGE_COLUMN = "image"
WEIGHTS, PREPROCESSING = CLASSIFIER_WEIGHTS, CLASSIFIER_PREPROCESSING  # artifact keys
_FILES = {WEIGHTS: "weights.pt", PREPROCESSING: "preprocessing.json"}
ENSEMBLE_KEY = "members"  # in both artifacts of an ensemble: one entry per model, in order

# Base64 text: the alphabet, line breaks, up to two '=' of padding. An encoded image never matches
# whole (every format's header has a byte outside the alphabet: PNG 0x89, JPEG 0xFF, NULs...).
_BASE64_BYTES = re.compile(rb"[A-Za-z0-9+/\s]*={0,2}\s*")
_BASE64_TEXT = re.compile(r"[A-Za-z0-9+/\s]*={0,2}\s*")
_DATA_URL = re.compile(r"data:[\w.+-]+/[\w.+-]+;base64,", re.IGNORECASE)

# The model as MLflow stores it ("models from code"): a file that MLflow runs when it loads the
# model, instead of a cloudpickle of an ImageClassifier (unpickling can run any code).
_MODEL_CODE = """\
from mlflow.models import set_model

from hpo.after.serving import ImageClassifier

set_model(ImageClassifier())
"""


class ImageClassifier(mlflow.pyfunc.PythonModel):
    """Image paths or bytes in, class probabilities out. Holds no state when logged: the weights
    and preprocessing are artifacts that `load_context` reads."""

    def __init__(self) -> None:
        self.predictor: Predictor | None = None

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.predictor = load_predictor(context.artifacts)

    def predict(self, context: mlflow.pyfunc.PythonModelContext | None,
                model_input: pd.DataFrame, params: dict[str, Any] | None = None
                ) -> pd.DataFrame:
        """`model_input`: a DataFrame with an `image` column, a Series, a list, or a mapping
        with an `image` entry (MLflow's `inputs` format). One output row per image."""
        if self.predictor is None:
            raise RuntimeError("ImageClassifier.predict before load_context: load it with "
                               "mlflow.pyfunc.load_model")
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            probabilities = self.predictor.probabilities(image_inputs(model_input))
        except DataError as exc:  # the request's fault: served as a 400 naming the input
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        return prediction_frame(probabilities, self.predictor.classes,
                                self.predictor.decide(probabilities))


def load_predictor(artifacts: Mapping[str, str]) -> Predictor:
    """A Predictor from the classifier's artifacts (local paths by artifact key): one model's,
    or an ensemble's (`promote --ensemble`: its members' state dicts and preprocessing)."""
    with open(artifacts[PREPROCESSING]) as f:
        described = json.load(f)
    # weights_only: a state dict is tensors only, so nothing in the file can run code.
    weights = torch.load(artifacts[WEIGHTS], map_location="cpu", weights_only=True)
    if ENSEMBLE_KEY not in described:
        return Predictor.from_state_dict(weights, Preprocessing.from_metadata(described))
    members = [Predictor.from_state_dict(state_dict, Preprocessing.from_metadata(metadata))
               for state_dict, metadata in zip(weights[ENSEMBLE_KEY], described[ENSEMBLE_KEY],
                                               strict=True)]
    return EnsemblePredictor(members, described.get("decision_threshold"))


def image_inputs(model_input: Any) -> list[ImageInput]:
    """The images of a pyfunc input, as `Predictor.probabilities` takes them; DataError naming
    the first value that is neither an existing file, nor image bytes, nor base64 text."""
    if isinstance(model_input, pd.DataFrame):
        if IMAGE_COLUMN not in model_input.columns:
            raise DataError(f"the input has no {IMAGE_COLUMN!r} column (columns: "
                            f"{', '.join(map(str, model_input.columns)) or 'none'}); put image "
                            f"paths, bytes or base64 text under {IMAGE_COLUMN!r}")
        values: Sequence[Any] = model_input[IMAGE_COLUMN].tolist()
    elif isinstance(model_input, Mapping):
        if IMAGE_COLUMN not in model_input:
            raise DataError(f"the input has no {IMAGE_COLUMN!r} entry (keys: "
                            f"{', '.join(map(str, model_input)) or 'none'}); put image paths, "
                            f"bytes or base64 text under {IMAGE_COLUMN!r}")
        values = list(np.atleast_1d(np.asarray(model_input[IMAGE_COLUMN], dtype=object)))
    elif isinstance(model_input, pd.Series | np.ndarray):
        values = model_input.tolist()
    elif isinstance(model_input, str | bytes | os.PathLike | Image.Image):
        values = [model_input]  # one image, not a sequence of characters
    else:
        values = list(model_input)
    # MLflow turns {"image": [a, b]} into one row holding the list: its items are the images.
    flat = [v for value in values for v in
            (value.tolist() if isinstance(value, np.ndarray) else value
             if isinstance(value, list | tuple) else [value])]
    return [_image_value(value, i) for i, value in enumerate(flat)]


def _image_value(value: Any, index: int) -> ImageInput:
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        return base64.b64decode(data) if _BASE64_BYTES.fullmatch(data) else data
    if isinstance(value, os.PathLike | Image.Image):
        return value
    if isinstance(value, str):
        if os.path.isfile(value):
            return value
        text = _DATA_URL.sub("", value, count=1)
        if text.strip() and _BASE64_TEXT.fullmatch(text):
            try:
                return base64.b64decode(text)
            except binascii.Error:
                pass  # bad padding: not base64 after all
        shown = value if len(value) <= 80 else value[:77] + "..."
        raise DataError(f"image {index}: {shown!r} is neither an existing file nor base64 "
                        "text of an image; pass image file paths, bytes, or base64 text")
    raise DataError(f"image {index} has type {type(value).__name__}; pass image file paths, "
                    "bytes, or base64 text")


def prediction_frame(probabilities: np.ndarray, classes: Sequence[str],
                     predicted: np.ndarray | None = None) -> pd.DataFrame:
    """`class` (the `predicted` index per row, by default the most probable), `probability`
    (the predicted class's), then `p_<class>` per class: one row per image."""
    chosen = probabilities.argmax(axis=1) if predicted is None else np.asarray(predicted)
    frame = pd.DataFrame({
        "class": pd.Series([classes[k] for k in chosen], dtype=object),
        "probability": probabilities[np.arange(len(chosen)), chosen].astype(np.float64),
    })
    for k, name in enumerate(classes):
        frame[f"p_{name}"] = probabilities[:, k].astype(np.float64)
    return frame


def signature(classes: Sequence[str]) -> ModelSignature:
    """`image` (binary) in; `class`, `probability` and `p_<class>` per class out."""

    outputs = [ColSpec("string", "class"), ColSpec("double", "probability")]
    outputs += [ColSpec("double", f"p_{name}") for name in classes]
    return ModelSignature(inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
                          outputs=Schema(outputs))


def input_example(preprocessing: Preprocessing) -> pd.DataFrame:
    """One PNG of the model's input size, as bytes: MLflow stores it base64 in the model's
    serving example and checks at logging time that the model answers it."""
    size, mode = preprocessing.image_size, "L" if preprocessing.channels == 1 else "RGB"
    gradient = np.linspace(0, 255, size * size).reshape(size, size).astype(np.uint8)
    image = Image.fromarray(gradient).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [buffer.getvalue()]})


def requirements() -> list[str]:
    """What the classifier imports, pinned to this environment. `imgcls-hpo` is this project:
    the model's code is not copied into it, so it runs where the project is installed (as with
    `mlflow models serve --env-manager local`)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in ("imgcls-hpo", "mlflow", "torch", "torchvision", "numpy", "pandas", "pillow"):
        try:
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


def log_classifier(tracker: Tracker, run_id: str, state_dict: Mapping[str, torch.Tensor],
                   preprocessing: Preprocessing) -> str:
    """Log an ImageClassifier of these weights into the run as `classifier`; its model id.
    The run is neither reopened nor ended (a finished trial keeps its end time)."""
    return _log(tracker, run_id, _cpu(state_dict), preprocessing.to_metadata(), preprocessing)


def log_ensemble(tracker: Tracker, run_id: str,
                 members: Sequence[tuple[Mapping[str, torch.Tensor], Preprocessing]],
                 decision_threshold: float | None) -> str:
    """Log an ImageClassifier that averages `members` (state dict, preprocessing) into the run
    as `classifier`; its model id. The same two artifacts as one model's, holding a list each,
    so that everything that checks or loads a classifier takes an ensemble alike."""
    predictor = EnsemblePredictor([Predictor.from_state_dict(w, p) for w, p in members],
                                  decision_threshold)  # refuses members that do not fit
    described = {ENSEMBLE_KEY: [p.to_metadata() for _, p in members],
                 "decision_threshold": decision_threshold}
    return _log(tracker, run_id, {ENSEMBLE_KEY: [_cpu(w) for w, _ in members]}, described,
                predictor.preprocessing, members=len(members))


def _cpu(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def _log(tracker: Tracker, run_id: str, weights: Mapping[str, Any], described: Mapping[str, Any],
         preprocessing: Preprocessing, **metadata: Any) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {key: str(Path(tmp) / name) for key, name in _FILES.items()}
        torch.save(dict(weights), artifacts[WEIGHTS])
        Path(artifacts[PREPROCESSING]).write_text(json.dumps(described))
        code = Path(tmp) / "image_classifier.py"
        code.write_text(_MODEL_CODE)
        return log_model(tracker, run_id, CLASSIFIER, "pyfunc", python_model=str(code),
                         artifacts=artifacts, signature=signature(preprocessing.classes),
                         input_example=input_example(preprocessing),
                         pip_requirements=requirements(),
                         metadata={"imgcls": {**preprocessing.to_metadata(), **metadata}})
