"""The Tracker: an explicit MlflowClient for one tracking URI (no global run), whose calls each
finish before Ctrl-C is raised, and the generic logging every room uses through it."""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hpo.config.store import mask_uri
from hpo.tracking.interrupts import interrupts_held
from imgcls.errors import ImgclsError

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run


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
        raise TrackingError(f"cannot reach the MLflow tracking server at {mask_uri(uri)} ({reason})"
                            ) from None


class _WholeCalls:
    """An MlflowClient whose calls each end before Ctrl-C is raised (see interrupts.py): an
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


# MLflow 3's UI opens an experiment of this kind on its training runs, not on GenAI traces
EXPERIMENT_KIND, TRAINING_RUNS = "mlflow.experimentKind", "custom_model_development"


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

    @property
    def shown(self) -> str:
        """The tracking URI as messages show it: a password masked."""
        return mask_uri(self.uri)

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
            if existing.tags.get(EXPERIMENT_KIND) != TRAINING_RUNS:  # made before the tag
                self.client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND,
                                               TRAINING_RUNS)
            return existing.experiment_id
        location = (self.artifact_root / name).as_uri() if self.artifact_root else None
        from mlflow.exceptions import MlflowException

        try:
            return self.client.create_experiment(name, artifact_location=location,
                                                 tags={EXPERIMENT_KIND: TRAINING_RUNS})
        except MlflowException:  # another machine created it a moment ago
            created = self.client.get_experiment_by_name(name)
            if created is None:
                raise
            return created.experiment_id

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

    def log_artifacts(self, run_id: str, folder: Path, artifact_path: str | None = None) -> None:
        """Every file of `folder`, in one call."""
        self.client.log_artifacts(run_id, str(folder), artifact_path)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    def end_run(self, run_id: str, status: str) -> None:
        self.client.set_terminated(run_id, status)

    # -- reading back --------------------------------------------------------------------------

    def run(self, run_id: str) -> Run:
        return self.client.get_run(run_id)

    def metric_history(self, run_id: str, key: str) -> list[tuple[int, float]]:
        """(step, value) of every logged value of `key`, in the order logged."""
        return [(m.step, m.value) for m in self.client.get_metric_history(run_id, key)]
