"""What a search is asked to do, as plain validated data: the search space, the hyperparameters
(their one source of ranges and defaults), the study spec, the store, and the trial vocabulary
(TrialState, TrialOutcome, Trials). Imports no backend, no MLflow and no torch."""

from hpo.config.hparams import HParams, first_error
from hpo.config.space import (
    Choice,
    Fixed,
    FloatRange,
    IntRange,
    Param,
    Scalar,
    SearchSpace,
    SpaceError,
    parse_param,
)
from hpo.config.store import DEFAULT_STORE, STORE_ENV, Store
from hpo.config.study import (
    StudyError,
    StudySpec,
    find_study,
    known_studies,
    load_study,
    objective_term,
    parse_assignments,
    parse_duration,
)
from hpo.config.trial import (
    TrialOutcome,
    Trials,
    TrialState,
    headline_test,
    test_counterpart,
)

__all__ = [
    "DEFAULT_STORE", "STORE_ENV", "Choice", "Fixed", "FloatRange", "HParams", "IntRange",
    "Param", "Scalar", "SearchSpace", "SpaceError", "Store", "StudyError", "StudySpec",
    "TrialOutcome", "TrialState", "Trials", "find_study", "first_error", "headline_test",
    "known_studies", "load_study", "objective_term", "parse_assignments", "parse_duration",
    "parse_param", "test_counterpart",
]
