"""Pointing a moved or copied store's MLflow database at the store's new folder.

MLflow records absolute artifact locations (`file:///old/store/artifacts/...`) for experiments,
runs, logged models and registry versions, and has no call to change them; after a store is
moved, `promote` and `predict` would look for models where the store used to be. `relocate`
rewrites those locations in the store's own SQLite database, in one transaction, from the
folder the store's manifest names to the folder it is in now.
"""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from hpo.config.store import Manifest, Store
from imgcls.errors import ConfigError

# Every column of MLflow's schema that holds a location under the store (those this schema
# version lacks are skipped), and the search's own tag that names the trial journal.
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)
STORAGE_TAG = "imgcls_hpo.storage"


@dataclass(frozen=True)
class Relocation:
    old_root: str
    new_root: str
    rewritten: int  # locations changed


def relocate(store: Store) -> Relocation | None:
    """Rewrite the artifact locations of `store`'s MLflow database from the folder the store
    was made in to the one it is in; None when there is nothing to do (it has not moved).
    Holds the store's lock, so no search sets up while the locations change."""
    database = store.mlflow_db
    if database is None:
        raise ConfigError(f"the store {store.root} tracks to {store.tracking_uri.split('://')[0]}"
                          ", not to its own mlflow.db: there is nothing here to relocate")
    if not database.exists():
        raise ConfigError(f"no MLflow store at {store.root}: nothing to relocate")
    with store.locked():
        manifest = Manifest.read(store.manifest_path)
        old = manifest.root if manifest else _made_in(database)
        new = str(store.root)
        if old is None or old == new:
            return None
        rewritten = _rewrite(database, old, new)
        if manifest is not None:
            Manifest(manifest.format, new, manifest.tracking.replace(old, new),
                     manifest.storage.replace(old, new), manifest.studies
                     ).write(store.manifest_path)
    return Relocation(old, new, rewritten)


def _made_in(database: Path) -> str | None:
    """The folder a store without a manifest was made in, read off its experiments' artifact
    locations (`<root>/artifacts/<study>`)."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        rows = db.execute("SELECT artifact_location FROM experiments").fetchall()
    for (location,) in rows:
        parsed = urlparse(location or "")
        path = Path(unquote(parsed.path)) if parsed.scheme in ("file", "") else None
        if path is not None and path.parent.name == "artifacts":
            return str(path.parent.parent)
    return None


def _rewrite(database: Path, old: str, new: str) -> int:
    """Replace the prefix `old` (as a file:// URI and as a plain path) with `new` in every
    location column; one transaction, so a failure changes nothing."""
    prefixes = [(Path(old).as_uri() + "/", Path(new).as_uri() + "/"), (old + "/", new + "/")]
    changed = 0
    with contextlib.closing(sqlite3.connect(database)) as db, db:
        for table, column in LOCATION_COLUMNS:
            if column not in {row[1] for row in db.execute(f"PRAGMA table_info({table})")}:
                continue
            for before, after in prefixes:
                changed += db.execute(
                    f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                    f"WHERE substr({column}, 1, ?) = ?",
                    (after, len(before) + 1, len(before), before)).rowcount
        db.execute("UPDATE tags SET value = replace(value, ?, ?) WHERE key = ?",
                   (old + "/", new + "/", STORAGE_TAG))
    return changed
