"""Where an Optuna study lives: the journal file under the store, or --storage (a database URL,
a Redis URL, a journal file on a shared file system); and the study opened in it with the
spec's sampler and pruner."""

from __future__ import annotations

import random
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from hpo.config.store import mask_secrets, mask_uri
from hpo.config.study import StudyError, StudySpec
from hpo.search.backends.optuna.pruners import PRUNERS
from hpo.search.backends.optuna.samplers import SAMPLERS, sampler_seed, seeded_per_trial
from imgcls.errors import first_line

if TYPE_CHECKING:
    import optuna

    from hpo.config.store import Store

# RDB storages keep each running trial's heartbeat: a trial whose worker has not beaten for
# HEARTBEAT_GRACE_S seconds is taken as lost, wherever it ran (see recovery). Beats are cheap
# (one row update); the grace outlasts a busy host's stalls.
HEARTBEAT_S = 60
HEARTBEAT_GRACE_S = 600
# Opening an empty database that another process is filling with Optuna's tables: attempts,
# and the first wait in seconds (doubled at each attempt, with jitter so they do not collide).
CREATE_ATTEMPTS = 5
CREATE_BACKOFF_S = 0.2


# The extra that installs the driver of a database URL's scheme
DRIVER_EXTRAS = {"postgresql": "postgres", "postgres": "postgres"}


def missing_driver(target: str, exc: BaseException) -> str:
    """What to tell a user whose storage could not be opened: the extra to install when its
    driver is missing, else the error itself; never the URL's password."""
    text = mask_secrets(first_line(exc), target)
    scheme = urlsplit(target).scheme.split("+")[0]
    if scheme in DRIVER_EXTRAS and ("DB access module" in text
                                    or isinstance(exc, ImportError)):
        return (f"no driver for {scheme}:// is installed; pip install "
                f"'imgcls-hpo[{DRIVER_EXTRAS[scheme]}]'")
    return text


def make_storage(store: Store) -> optuna.storages.BaseStorage:
    """The journal file under the store; or --storage: a database URL (sqlite:///...,
    postgresql://...), a Redis URL (redis://..., Optuna's journal kept in Redis), or a path,
    taken as a journal file (works on shared file systems)."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    target = store.optuna_storage
    if target and target.startswith(("redis://", "rediss://", "unix://")):
        try:
            from optuna.storages.journal import JournalRedisBackend

            with warnings.catch_warnings():  # "experimental" since Optuna 3.1
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.JournalStorage(JournalRedisBackend(target))
        except ImportError:
            raise StudyError(f"--storage {mask_uri(target)} needs the redis package: "
                             "pip install 'imgcls-hpo[redis]'") from None
        except Exception as exc:
            raise StudyError(f"cannot open the Optuna storage {mask_uri(target)}: "
                             f"{mask_secrets(first_line(exc), target)}") from None
    if target and "://" in target:
        try:
            return _rdb_storage(target)
        except Exception as exc:  # driver missing, server down, bad URL: all the user's to fix
            raise StudyError(f"cannot open the Optuna storage {mask_uri(target)}: "
                             f"{missing_driver(target, exc)}") from None
    path = Path(target).expanduser() if target else store.journal_path
    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def _rdb_storage(target: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage at `target`. Processes that open an empty database at the same
    instant (machines started together) each create Optuna's tables, and all but one fail on
    PostgreSQL's catalog (UniqueViolation on pg_type_typname_nsp_index, or a table that
    already exists): those try again, after a short random wait, and find the tables made."""
    import optuna
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(CREATE_ATTEMPTS):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" since Optuna 2.9
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(target, heartbeat_interval=HEARTBEAT_S,
                                                  grace_period=HEARTBEAT_GRACE_S)
        except (IntegrityError, ProgrammingError):
            if attempt == CREATE_ATTEMPTS - 1:
                raise
            time.sleep(CREATE_BACKOFF_S * 2 ** attempt * (1 + random.random()))
    raise AssertionError("unreachable")


def open_optuna_study(spec: StudySpec, storage: optuna.storages.BaseStorage,
                      fresh_seed: int) -> optuna.Study:
    """The study in `storage`, created on first use, with the spec's sampler and pruner. Each
    worker process opens it too. `fresh_seed`: a seed no other process of the study uses (see
    sampler_seed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress is ours to show
    sampler = SAMPLERS.get(spec.sampler)(sampler_seed(spec.sampler, spec.seed, fresh_seed),
                                         spec.trials, spec.space)
    if not SAMPLERS.entry(spec.sampler).meta.get("seed_per_study"):
        sampler = seeded_per_trial(sampler, spec.seed)
    study = optuna.create_study(
        study_name=spec.name, storage=storage, load_if_exists=True,
        directions=["maximize" if direction == "max" else "minimize"
                    for _, direction in spec.terms],
        sampler=sampler, pruner=PRUNERS.get(spec.pruner)(spec.max_epochs),
    )
    names = [name for name, _ in spec.terms]
    if study.metric_names != names:  # optuna-dashboard labels the objectives by these
        with warnings.catch_warnings():  # "experimental" since Optuna 3.2
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    return study
