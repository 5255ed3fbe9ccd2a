"""hpo: hyperparameter search over imgcls training, tracked in MLflow.

Importing hpo imports neither optuna nor mlflow: they load when a search or a tracker starts.
"""

from hpo.space import Choice, Fixed, FloatRange, IntRange, SearchSpace, SpaceError, parse_param
from hpo.store import Store
from hpo.study import HParams, StudyError, StudySpec, find_study, known_studies, load_study

__all__ = [
    "Choice", "Fixed", "FloatRange", "HParams", "IntRange", "SearchSpace", "SpaceError",
    "Store", "StudyError", "StudySpec", "find_study", "known_studies", "load_study",
    "parse_param",
]
