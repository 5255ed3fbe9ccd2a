"""Search backends by name. Each samples and prunes in its own way; all run `hpo.objective`."""

from hpo.backends import optuna_backend as _optuna_backend  # noqa: F401  (registers "optuna")
from hpo.backends import ray_backend as _ray_backend  # noqa: F401  (registers "ray")
from hpo.backends.base import (
    BACKENDS,
    Backend,
    BackendStudy,
    NullObserver,
    SearchObserver,
    counts_as_finished,
)

__all__ = [
    "BACKENDS", "Backend", "BackendStudy", "NullObserver", "SearchObserver",
    "counts_as_finished", "get_backend",
]


def get_backend(name: str) -> Backend:
    return BACKENDS.get(name)()
