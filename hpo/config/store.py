"""Where a project's search state lives.

By default one folder (`--store`, default ./mlruns) holds all of it:
    mlflow.db        MLflow tracking (runs, params, metrics, registry)
    artifacts/       MLflow artifacts, one folder per experiment (study)
    optuna.journal   Optuna's study storage (every study of the store)
    cache/           decoded images, shared by every trial of every study on the same data
    checkpoints/     each running trial's last checkpoint, removed when the trial ends
`--tracking-uri` (an MLflow server, or another database) and `--storage` (an Optuna RDB or
journal) move their part elsewhere; the cache stays under the store.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from imgcls.errors import ConfigError

DEFAULT_STORE = "mlruns"
STORE_ENV = "IMGCLS_HPO_STORE"


@dataclass(frozen=True)
class Store:
    root: Path
    tracking_uri: str
    optuna_storage: str | None  # None: the journal file under root

    @classmethod
    def resolve(cls, root: str | Path | None = None, tracking_uri: str | None = None,
                storage: str | None = None) -> Store:
        path = Path(root or os.environ.get(STORE_ENV) or DEFAULT_STORE).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"the store {path} is a file, not a folder")
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{path}/mlflow.db"
        return cls(path, uri, storage)

    @property
    def journal_path(self) -> Path:
        return self.root / "optuna.journal"

    @property
    def checkpoint_dir(self) -> Path:
        """Running trials' checkpoints, one folder per study: <store>/checkpoints/<study>."""
        return self.root / "checkpoints"

    @property
    def cache_dir(self) -> Path:
        return self.root / "cache"

    @property
    def artifact_root(self) -> Path:
        return self.root / "artifacts"

    @property
    def tracking_is_local(self) -> bool:
        """Tracking in a local database or folder: this process decides where artifacts go.
        (A tracking server decides that itself.)"""
        return urlparse(self.tracking_uri).scheme in ("sqlite", "file", "")

    def create(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)

    def describe_storage(self) -> str:
        return self.optuna_storage or f"journal file {self.journal_path}"
