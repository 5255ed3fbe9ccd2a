"""Every MLflow call of the project: the Tracker (an explicit client for one tracking URI), the
layout of a study's runs and the one query and reader of its trial runs (runs.py), the one
helper that logs a model into a run and reads it back (models.py), the Model Registry
(registry.py), a study read back for the commands after a search (records.py), and Ctrl-C held
during store writes (interrupts.py). A new field a trial records goes in runs.py."""

from imgcls.lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(("Tracker", "TrackingError", "fluent_tracking_uri", "quiet_mlflow"),
                    "hpo.tracking.client"),
    **dict.fromkeys(("TrialRun", "open_study_run", "outcome_of_run", "start_trial",
                     "trial_runs"), "hpo.tracking.runs"),
    **dict.fromkeys(("StudyRecord", "load_record"), "hpo.tracking.records"),
    "interrupts_held": "hpo.tracking.interrupts",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(__name__, _EXPORTS)
