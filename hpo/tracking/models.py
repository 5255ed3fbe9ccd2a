"""Models in MLflow: the one helper that logs a model into a run (a trial's pt2 model, the
promoted classifier), and reading a logged model back: its flavors and metadata, its weights,
its python model."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpo.tracking.client import fluent_tracking_uri
from hpo.tracking.interrupts import interrupts_held
from imgcls.errors import ConfigError, first_line

if TYPE_CHECKING:
    import numpy as np
    import torch
    from mlflow.models import ModelSignature

    from hpo.tracking.client import Tracker


def log_model(tracker: Tracker, run_id: str, name: str, flavor: str, *,
              with_run_params: bool = False, **model_args: Any) -> str:
    """Log a model into run `run_id` as `name`, in MLflow's `flavor` ("pytorch", "pyfunc"), and
    return its model id. `model_args` are what that flavor's log_model takes (pytorch_model,
    python_model, artifacts, signature, input_example, metadata...).

    The logged model is created through the client in the run's experiment and linked to the
    run, as mlflow.<flavor>.log_model does, but with no fluent run opened or ended: a finished
    trial keeps its end time. `with_run_params`: the model records the run's params (a trial's
    hyperparameters). A model that fails to log is marked FAILED, never left PENDING, and the
    error raises. Ctrl-C waits for the export (seconds) so that the store is not left locked.
    """
    from mlflow.entities import LoggedModelStatus
    from mlflow.models import Model

    client = tracker.client
    run = client.get_run(run_id)
    logged = client.create_logged_model(
        run.info.experiment_id, name=name, source_run_id=run_id,
        params=run.data.params if with_run_params else None)
    try:
        # Model.log is what mlflow.<flavor>.log_model calls; given the logged model and the
        # run, it needs no active run. It reads the global tracking URI: set for the call.
        with fluent_tracking_uri(tracker.uri), interrupts_held():
            Model.log(artifact_path=None, name=name,
                      flavor=importlib.import_module(f"mlflow.{flavor}"), run_id=run_id,
                      model_id=logged.model_id, **model_args)
    except BaseException:
        # (a Ctrl-C comes once the export has ended: the interrupted trial's model is not one
        # to use either)
        client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
        raise
    return logged.model_id


def tensor_signature(input_example: np.ndarray, num_classes: int) -> ModelSignature:
    """The signature MLflow infers by running a classifier once: a float tensor of any batch
    size in (the example's other dimensions), one score per class out, in the same dtype."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    dtype = np.dtype(input_example.dtype)
    return ModelSignature(Schema([TensorSpec(dtype, (-1, *input_example.shape[1:]))]),
                          Schema([TensorSpec(dtype, (-1, num_classes))]))


@dataclass(frozen=True)
class ModelInfo:
    """What a logged model's MLmodel file says: its flavors (by name, with their
    configuration), its metadata, and where its files are (an artifact URI)."""

    uri: str
    flavors: dict[str, Any]
    metadata: dict[str, Any]
    location: str


def model_info(tracker: Tracker, uri: str) -> ModelInfo:
    """The MLmodel of the logged model `uri`, read alone (nothing of the model is loaded or
    run); ConfigError when there is none to read (an unreadable MLmodel, a missing artifact)."""
    import mlflow

    with fluent_tracking_uri(tracker.uri):
        try:
            info = mlflow.models.get_model_info(uri)
        except Exception as exc:
            raise ConfigError(f"cannot load the model {uri} from the tracking store "
                              f"{tracker.shown} ({first_line(exc)})") from None
        location = _files_location(info.model_uri) or info.artifact_path
    return ModelInfo(uri, dict(info.flavors), dict(info.metadata or {}), location.rstrip("/"))


def _files_location(model_uri: str) -> str | None:
    """Where the files of `model_uri` lie now, as the tracking store says: not the MLmodel's
    own `artifact_path`, which keeps the absolute path the model was logged at and is wrong
    once the store has moved (`imgcls-hpo relocate` rewrites the store, not the files)."""
    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository

    for scheme, repository in (("models:/", ModelsArtifactRepository),
                               ("runs:/", RunsArtifactRepository)):
        if model_uri.startswith(scheme):
            try:
                return str(repository.get_underlying_uri(model_uri))
            except Exception:  # an MLflow that resolves it otherwise: the MLmodel's path
                return None
    return None


def load_weights(tracker: Tracker, model: ModelInfo) -> dict[str, torch.Tensor]:
    """The state dict of a pytorch-flavored `model` (a trial's pt2 model), read from its
    torch.export file, which holds no pickle; a model saved any other way (MLflow's pickle
    format, whose loading can run code) raises ConfigError before anything of it is read."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = load_file(tracker, model, "data", Path(tmp))
        exported = sorted(folder.rglob("*.pt2"))
        if not exported:
            raise ConfigError(f"{model.uri} is a pytorch model saved as a pickle, which could "
                              "run code when loaded: refused; give a model promoted by "
                              "imgcls-hpo")
        program = torch.export.load(exported[0])
    return {k: v.detach().clone() for k, v in program.state_dict.items()}


def load_file(tracker: Tracker, model: ModelInfo, path: str, folder: Path) -> Path:
    """One file (or folder) of the logged `model`, its relative `path`, downloaded into
    `folder`."""
    import mlflow

    with fluent_tracking_uri(tracker.uri):
        return Path(mlflow.artifacts.download_artifacts(
            artifact_uri=f"{model.location}/{path}", dst_path=str(folder)))


# A trial's own model: its best weights and its input contract, as run artifacts under
# model/. Small, fast to write (no export), and safe to read (tensors only, weights_only).
WEIGHTS_DIR = "model"
WEIGHTS_FILE = "weights.pt"
PREPROCESSING_FILE = "preprocessing.json"


def log_weights(tracker: Tracker, run_id: str, state_dict: dict[str, torch.Tensor],
                metadata: dict[str, Any]) -> None:
    """The weights (a state dict) and the `imgcls` preprocessing metadata into run `run_id`,
    under model/."""
    import json
    import tempfile
    from pathlib import Path

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, folder / WEIGHTS_FILE)
        (folder / PREPROCESSING_FILE).write_text(json.dumps(metadata))
        with interrupts_held():
            tracker.log_artifacts(run_id, folder, WEIGHTS_DIR)


def has_weights(tracker: Tracker, run_id: str) -> bool:
    """Whether run `run_id` exists and holds a trial's weights under model/."""
    from mlflow.exceptions import MlflowException

    try:
        files = tracker.client.list_artifacts(run_id, WEIGHTS_DIR)
    except MlflowException:  # no such run
        return False
    return {WEIGHTS_FILE, PREPROCESSING_FILE} <= {f.path.rsplit("/", 1)[-1] for f in files}


def run_file(tracker: Tracker, run_id: str, path: str, folder: Path) -> Path | None:
    """Run `run_id`'s artifact `path`, downloaded into `folder`; None when the run has none."""
    from mlflow.exceptions import MlflowException

    try:
        return Path(tracker.client.download_artifacts(run_id, path, str(folder)))
    except (MlflowException, OSError):
        return None


def load_run_weights(tracker: Tracker, run_id: str
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and the metadata `log_weights` put into run `run_id`; loading runs no
    code (weights_only)."""
    import json
    import tempfile
    from pathlib import Path

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tracker.client.download_artifacts(run_id, WEIGHTS_DIR, tmp))
        metadata = json.loads((folder / PREPROCESSING_FILE).read_text())
        state = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return dict(state), metadata
