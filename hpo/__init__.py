"""hpo: hyperparameter search over imgcls training, tracked in MLflow.

The folders are the architecture, in the order a study flows through them:

    config/     what a search is asked to do: space, hyperparameters, study spec, store, and the
                trial vocabulary (TrialState, TrialOutcome, Trials); no backend, no torch
    search/     running it: the search run, THE trial function, devices, interrupts, and the
                backends (optuna/, ray/), each imported only when chosen
    tracking/   every MLflow call: study and trial runs, models logged into runs, the registry,
                a study read back from the store
    after/      what comes after a search: results, promote, the served model; never search/
    cli/        the `imgcls-hpo` command line and its live progress view

Importing hpo imports none of them; `from hpo import StudySpec` loads hpo.config only.
"""

from imgcls.lazy import lazy_exports

_CONFIG = ("Choice", "Fixed", "FloatRange", "HParams", "IntRange", "SearchSpace", "SpaceError",
           "Store", "StudyError", "StudySpec", "TrialOutcome", "TrialState", "Trials",
           "find_study", "known_studies", "load_study", "parse_param")
__all__ = sorted(_CONFIG)
__getattr__ = lazy_exports(__name__, dict.fromkeys(_CONFIG, "hpo.config"))
