"""Search backends by name. Each samples and prunes in its own way; all run THE trial
(hpo.search.trial.run_trial) and report the same TrialOutcomes.

A backend is a module defining `BACKEND`, a class with the `Backend` interface (base.py); it is
registered here by the module's name only, so that choosing a backend imports it and the other
is never loaded (Ray takes seconds to import). A new backend is a package beside optuna/ and
ray/ and one line here.
"""

from __future__ import annotations

import importlib

from hpo.search.backends.base import Backend, BackendStudy
from imgcls.registry import Registry

BACKENDS: Registry[str] = Registry("backend")
BACKENDS.add("optuna", "hpo.search.backends.optuna.backend")
BACKENDS.add("ray", "hpo.search.backends.ray.backend")

__all__ = ["BACKENDS", "Backend", "BackendStudy", "get_backend"]


def get_backend(name: str) -> Backend:
    """A new instance of backend `name`; ConfigError listing the known ones for another."""
    module = importlib.import_module(BACKENDS.get(name))
    return module.BACKEND()  # type: ignore[no-any-return]
