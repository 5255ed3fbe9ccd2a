"""What comes after a search, read from MLflow whatever backend ran it: results (the trials
table, the 3D plot, Optuna's views), promote (registry, aliases), models by reference, and the
served model (serving.py, the pyfunc). Never imports hpo.search. A new results plot is a module
here, plain data first, written by results.write_results."""

from imgcls.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("ResultsReport", "write_results"), "hpo.after.results"),
    **dict.fromkeys(("Promotion", "choose_trial", "promote"), "hpo.after.promote"),
    **dict.fromkeys(("model_uri", "resolve_model"), "hpo.after.models"),
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
