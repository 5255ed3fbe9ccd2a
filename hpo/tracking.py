"""Every MLflow call of the project. An explicit MlflowClient per tracking URI, no global run.

Layout (a contract other commands and users rely on):
- one experiment per study, named after it;
- one parent run per study (tag imgcls_hpo.role=study): the study settings and search space as
  params, the split as split.csv;
- one nested run per trial (tags imgcls_hpo.role=trial, imgcls_hpo.trial_number,
  imgcls_hpo.state = COMPLETE | PRUNED | FAIL, imgcls_hpo.fail_reason): its hyperparameters and
  fixed settings as params, per-epoch metrics with step=epoch, the best epoch's summary metrics,
  the confusion matrix, and for COMPLETE trials the model as `model` (pytorch flavor, pt2).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hpo.interrupts import interrupts_held
from imgcls.errors import ImgclsError

if TYPE_CHECKING:
    import numpy as np
    import torch
    from matplotlib.figure import Figure
    from mlflow import MlflowClient
    from mlflow.models import ModelSignature

TAG_ROLE = "imgcls_hpo.role"
TAG_STUDY = "imgcls_hpo.study"
TAG_TRIAL = "imgcls_hpo.trial_number"
TAG_STATE = "imgcls_hpo.state"
TAG_FAIL_REASON = "imgcls_hpo.fail_reason"
TAG_DEVICE = "imgcls_hpo.device"  # where a trial trained: "cpu", "cuda:1" (the search's index)
TAG_WORKER = "imgcls_hpo.worker"  # the worker slot that ran it: "cpu/worker0", "gpu1/slot0"
MODEL_NAME = "model"

# How a trial's end shows in MLflow's own run status.
RUN_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "RUNNING": "RUNNING"}


class TrackingError(ImgclsError):
    """The tracking store cannot be used as asked (e.g. the study's experiment was deleted)."""


def quiet_mlflow() -> None:
    """No progress bars and no INFO chatter (database migrations, model logging notes)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """mlflow.<flavor>.log_model reads the global tracking URI; set it for the call only."""
    import mlflow

    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  (None unsets it again)


def check_server(uri: str, timeout: float = 10.0) -> None:
    """Fail in seconds when a tracking server does not answer (MLflow's client would retry
    for minutes). Any HTTP answer, even an error, means a server is there."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass
    except OSError as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(f"cannot reach the MLflow tracking server at {uri} ({reason})"
                            ) from None


class _WholeCalls:
    """An MlflowClient whose calls each end before Ctrl-C is raised (see hpo.interrupts): an
    interrupted trial can then still close its run."""

    def __init__(self, client: MlflowClient) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def whole(*args: Any, **kwargs: Any) -> Any:
            with interrupts_held():
                return attr(*args, **kwargs)

        return whole


class Tracker:
    """MLflow for one tracking URI. `artifact_root` is where new experiments keep their
    artifacts when tracking is local (a tracking server chooses for itself). Ctrl-C waits for
    the MLflow call in progress, so that the store is never left locked by a half-done write."""

    def __init__(self, tracking_uri: str, artifact_root: Path | None = None) -> None:
        from mlflow import MlflowClient

        quiet_mlflow()
        if tracking_uri.startswith(("http://", "https://")):
            check_server(tracking_uri)
        self.uri = tracking_uri
        self.artifact_root = artifact_root
        self.client = cast("MlflowClient", _WholeCalls(MlflowClient(tracking_uri)))

    # -- experiments and the study run ---------------------------------------------------------

    def experiment(self, name: str) -> str:
        """The id of the study's experiment, created on first use."""
        existing = self.client.get_experiment_by_name(name)
        if existing is not None:
            if existing.lifecycle_stage == "deleted":
                raise TrackingError(
                    f"the MLflow experiment {name!r} was deleted; restore it in the MLflow UI, "
                    "or remove it for good with `mlflow gc`, then run again"
                )
            return existing.experiment_id
        location = (self.artifact_root / name).as_uri() if self.artifact_root else None
        return self.client.create_experiment(name, artifact_location=location)

    def find_run(self, run_id: str | None, experiment_id: str) -> str | None:
        """`run_id` if it is a live run of that experiment in this store, else None."""
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return None
        ok = run.info.experiment_id == experiment_id and run.info.lifecycle_stage == "active"
        return run_id if ok else None

    def open_study_run(self, experiment_id: str, study: str, run_id: str | None,
                       params: Mapping[str, str]) -> tuple[str, list[str]]:
        """Resume the study's run, or start it. Returns the run id and the settings whose value
        differs from the one the run recorded first (MLflow params are write-once)."""
        run_id = self.find_run(run_id, experiment_id)
        if run_id is None:
            run = self.client.create_run(
                experiment_id, run_name=study, tags={TAG_ROLE: "study", TAG_STUDY: study}
            )
            run_id = run.info.run_id
            self.log_params(run_id, params)
            return run_id, []
        self.client.update_run(run_id, status="RUNNING")
        logged = self.client.get_run(run_id).data.params
        changed = [k for k, v in params.items() if k in logged and logged[k] != v]
        self.log_params(run_id, {k: v for k, v in params.items() if k not in logged})
        return run_id, changed

    # -- generic logging -----------------------------------------------------------------------

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, "" if v is None else str(v)) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None
                    ) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items()]
        if batch:
            self.client.log_batch(run_id, metrics=batch)

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, run_id: str, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def log_figure(self, run_id: str, figure: Figure, name: str) -> None:
        self.client.log_figure(run_id, figure, name)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def log_dict(self, run_id: str, data: Mapping[str, Any], name: str) -> None:
        self.client.log_dict(run_id, dict(data), name)

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    # -- trials --------------------------------------------------------------------------------

    def start_trial(self, experiment_id: str, study_run_id: str, study: str, number: int,
                    params: Mapping[str, Any], tags: Mapping[str, str] | None = None
                    ) -> TrialRun:
        """Open the trial's run under the study run. `tags`: extra tags, such as where the
        trial runs (imgcls_hpo.device, imgcls_hpo.worker)."""
        run = self.client.create_run(
            experiment_id,
            run_name=f"trial-{number:03d}",
            tags={
                **(tags or {}),
                "mlflow.parentRunId": study_run_id,
                TAG_ROLE: "trial",
                TAG_STUDY: study,
                TAG_TRIAL: str(number),
                TAG_STATE: "RUNNING",
            },
        )
        trial = TrialRun(self, run.info.run_id)
        self.log_params(trial.run_id, params)
        return trial


class TrialRun:
    """One trial's MLflow run."""

    def __init__(self, tracker: Tracker, run_id: str) -> None:
        self.tracker = tracker
        self.run_id = run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        self.tracker.log_metrics(self.run_id, metrics, step)

    def log_figure(self, figure: Figure, name: str) -> None:
        self.tracker.log_figure(self.run_id, figure, name)

    def log_text(self, text: str, name: str) -> None:
        self.tracker.log_text(self.run_id, text, name)

    def log_dict(self, data: Mapping[str, Any], name: str) -> None:
        self.tracker.log_dict(self.run_id, data, name)

    def log_artifact(self, path: Path) -> None:
        self.tracker.log_artifact(self.run_id, path)

    def finish(self, state: str, reason: str | None = None, status: str | None = None) -> None:
        """Record how the trial ended and close the run (status: MLflow's, if not implied)."""
        tags = {TAG_STATE: state}
        if reason:
            tags[TAG_FAIL_REASON] = reason[:5000]
        self.tracker.set_tags(self.run_id, tags)
        self.tracker.end_run(self.run_id, status or RUN_STATUS[state])

    def finish_with_model(self, model: torch.nn.Module, input_example: np.ndarray,
                          num_classes: int, metadata: Mapping[str, Any]) -> None:
        """Log the model as `model` (pt2: a traced graph that runs no code when loaded), then
        close the run as COMPLETE; a model that cannot be logged raises, and the run stays open
        for the caller to record the failure. `input_example`: a float batch as the model takes
        it; `num_classes`: its outputs (logits) per image. `metadata` travels in the MLmodel
        file: what predicting needs besides the weights (classes, image size, normalization).

        What this spares mlflow.pytorch.log_model (a quarter of its time: 0.1 to 0.2 s a trial
        on 2 shared CPU cores): running the model to infer the signature (given here from the
        shapes), loading the saved model back to predict the input example (its "serving input
        validation", which can only warn), and the fluent run it opens and ends. The model is
        created through the client in the run's experiment with the run's parameters, as
        log_model creates it, and linked to the run with the run's step-0 metrics, as there."""
        import mlflow
        import torch
        from mlflow.entities import LoggedModelStatus
        from mlflow.models import Model

        client = self.tracker.client
        run = client.get_run(self.run_id)
        logged = client.create_logged_model(run.info.experiment_id, name=MODEL_NAME,
                                            source_run_id=self.run_id, params=run.data.params)
        # Naming the requirement saves MLflow from loading the model in a subprocess to guess it.
        version = torch.__version__.split("+")[0]
        try:
            # Model.log is what mlflow.pytorch.log_model calls; given the logged model and the
            # run, it needs no active run. It reads the global tracking URI: set for the call.
            # It writes to the store throughout: Ctrl-C waits for it (seconds: the export).
            with fluent_tracking_uri(self.tracker.uri), interrupts_held():
                Model.log(
                    artifact_path=None, name=MODEL_NAME, flavor=mlflow.pytorch,
                    run_id=self.run_id, model_id=logged.model_id, pytorch_model=model.eval(),
                    serialization_format="pt2", input_example=input_example,
                    signature=tensor_signature(input_example, num_classes),
                    pip_requirements=[f"torch=={version}"], metadata=dict(metadata),
                    validate_serving_input=False,
                )
        except BaseException:
            # Not left PENDING: Model.log marks it FAILED on its errors, not on a Ctrl-C (which
            # comes once it has ended; the interrupted trial's model is not one to use).
            client.finalize_logged_model(logged.model_id, LoggedModelStatus.FAILED)
            raise
        self.finish("COMPLETE")


def tensor_signature(input_example: np.ndarray, num_classes: int) -> ModelSignature:
    """The signature MLflow infers by running a classifier once: a float tensor of any batch
    size in (the example's other dimensions), one score per class out, in the same dtype."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    dtype = np.dtype(input_example.dtype)
    return ModelSignature(Schema([TensorSpec(dtype, (-1, *input_example.shape[1:]))]),
                          Schema([TensorSpec(dtype, (-1, num_classes))]))
