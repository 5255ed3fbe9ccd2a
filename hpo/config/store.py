"""Where a project's search state lives.

By default one folder (`--store`, default ./mlruns) holds all of it:
    mlflow.db        MLflow tracking (runs, params, metrics, registry)
    artifacts/       MLflow artifacts, one folder per experiment (study)
    optuna.journal   Optuna's study storage (every study of the store)
    cache/           decoded images, shared by every trial of every study on the same data
    checkpoints/     each running trial's last checkpoint, removed when the trial ends
    store.lock       held while a search sets itself up (one database, one study run)
`--tracking-uri` (an MLflow server, or another database) and `--storage` (an Optuna RDB or
journal) move their part elsewhere; the cache stays under the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse, urlsplit, urlunsplit

from imgcls.errors import ConfigError

DEFAULT_STORE = "mlruns"
STORE_ENV = "IMGCLS_HPO_STORE"
# What MLflow tracks to: its databases (a driver may follow: postgresql+psycopg://), a server,
# a folder (file://, or a plain path), Databricks
TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "file",
                    "databricks")


def mask_uri(uri: str) -> str:
    """`uri` with its password, if it has one, shown as ***: postgresql://optuna:***@db/optuna."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # not a URL
        return uri
    if not password:
        return uri
    user, _, host = parts.netloc.rpartition("@")
    name = user.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{name}:***@{host}" if name else f"***@{host}"))


def mask_secrets(text: str, *uris: str | None) -> str:
    """`text` (an error message, say) with the password of each of `uris` shown as ***."""
    for uri in uris:
        if not uri:
            continue
        try:
            password = urlsplit(uri).password
        except ValueError:
            continue
        if password:  # wherever it shows: in the URL, or quoted alone
            text = text.replace(password, "***")
    return text


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
        scheme = urlparse(uri).scheme
        if scheme and scheme.split("+")[0] not in TRACKING_SCHEMES:
            raise ConfigError(f"tracking URI {mask_uri(uri)!r}: unknown scheme {scheme!r}; "
                              f"give one of {', '.join(s + '://' for s in TRACKING_SCHEMES)}"
                              " (a database, or an MLflow server)")
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

    def check_writable(self) -> None:
        """A store this process cannot write to (a read-only folder or file system), or make
        (below such a folder), is a one-line error, raised before anything is written."""
        folder = self.root
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not os.access(folder, os.W_OK | os.X_OK):
            raise self._unwritable("read-only" if folder == self.root else f"{folder} is "
                                   "read-only")

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The store's lock (`<store>/store.lock`), held by a search while it sets itself up, so
        that however many processes of this machine start at once, MLflow's database is created
        and migrated once, and a study gets one experiment and one study run."""
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / "store.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def create(self) -> None:
        """The store's folder, made if need be."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root):
                pass
        except OSError as exc:
            raise self._unwritable(exc.strerror or str(exc)) from None

    def _unwritable(self, why: str) -> ConfigError:
        return ConfigError(f"the store {self.root} cannot be written to ({why}); pass --store "
                           "with a folder you can write to")

    def describe_storage(self) -> str:
        """Where the trials are stored, to show or record: a URL's password masked."""
        return mask_uri(self.optuna_storage) if self.optuna_storage else \
            f"journal file {self.journal_path}"
