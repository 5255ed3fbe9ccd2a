"""Where a project's search state lives.

By default one folder (`--store`, default ./mlruns) holds all of it:
    mlflow.db        MLflow tracking (runs, params, metrics, registry)
    artifacts/       MLflow artifacts, one folder per experiment (study)
    optuna.journal   Optuna's study storage (every study of the store)
    cache/           decoded images, shared by every trial of every study on the same data
    checkpoints/     each running trial's last checkpoint, removed when the trial ends
    store.lock       held while a search sets itself up (one database, one study run)
    store.json       the manifest: format version, the folder the store was made in, where its
                     tracking and trial storage are, its studies (see Manifest)
`--tracking-uri` (an MLflow server, or another database) and `--storage` (an Optuna RDB or
journal) move their part elsewhere; the cache stays under the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse, urlsplit, urlunsplit

from imgcls.errors import ConfigError

DEFAULT_STORE = "mlruns"
STORE_ENV = "IMGCLS_HPO_STORE"
MANIFEST = "store.json"
STORE_FORMAT = 1  # the manifest's `format`: raised when a store's layout changes
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
class Manifest:
    """What a store says of itself (`<store>/store.json`), written by every search that sets
    up there: the folder it was made in (MLflow keeps absolute artifact locations, so a store
    moved or copied elsewhere must be relocated before use), where its MLflow tracking and trial
    storage are (masked), and the studies it holds."""

    format: int
    root: str
    tracking: str
    storage: str
    studies: tuple[str, ...]

    @classmethod
    def read(cls, path: Path) -> Manifest | None:
        """The manifest at `path`; None where there is none (a store older than manifests)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            manifest = cls(int(data["format"]), str(data["root"]), str(data["tracking"]),
                           str(data["storage"]), tuple(map(str, data["studies"])))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"the store's manifest {path} is unreadable ({exc}); move it "
                              "aside and search again to rewrite it") from None
        if manifest.format > STORE_FORMAT:
            raise ConfigError(f"the store {path.parent} has format {manifest.format}, newer "
                              f"than this imgcls-hpo reads ({STORE_FORMAT}): upgrade imgcls-hpo")
        return manifest

    def write(self, path: Path) -> None:
        """Written whole or not at all: a process killed mid-write leaves the old manifest."""
        data = {"format": self.format, "root": self.root, "tracking": self.tracking,
                "storage": self.storage, "studies": list(self.studies)}
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)


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
    def manifest_path(self) -> Path:
        return self.root / MANIFEST

    @property
    def mlflow_db(self) -> Path | None:
        """The store's own MLflow database; None when tracking goes elsewhere."""
        prefix = "sqlite:///"
        if not self.tracking_uri.startswith(prefix):
            return None
        path = Path(self.tracking_uri[len(prefix):])
        return path if path.parent == self.root else None

    def check_manifest(self) -> Manifest | None:
        """The store's manifest, checked against what is here: a store moved or copied from
        where it was made (its artifact locations still point there), or one whose MLflow
        database is gone while its studies' trials are still here, is a one-line error
        saying what to do. None for a store without a manifest yet. (A study whose trial
        journal alone is gone is refused by the search that opens it.)"""
        manifest = Manifest.read(self.manifest_path)
        if manifest is None:
            return None
        if manifest.root != str(self.root) and self.tracking_is_local:
            raise ConfigError(
                f"the store {self.root} was made in {manifest.root} and has been moved or copied"
                " since: its MLflow artifact locations still point there; run `imgcls-hpo "
                f"relocate --store {self.root}` once to point them here")
        database = self.mlflow_db
        trials_kept = self.journal_path.exists() or (self.root / "ray").exists()
        if manifest.studies and database is not None and not database.exists() and trials_kept:
            raise ConfigError(
                f"the store {self.root} holds studies {', '.join(manifest.studies)} but its "
                f"MLflow database {database.name} is missing while their trials are still here: "
                "restore it from a backup, or search into a new --store")
        return manifest

    def record_study(self, name: str) -> None:
        """Add study `name` to the manifest (written with this store's places). Called under
        the store's lock, so processes starting together do not lose each other's studies."""
        manifest = Manifest.read(self.manifest_path)
        studies = set(manifest.studies) if manifest else set()
        Manifest(STORE_FORMAT, str(self.root), mask_uri(self.tracking_uri),
                 self.describe_storage(), tuple(sorted(studies | {name}))
                 ).write(self.manifest_path)

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
