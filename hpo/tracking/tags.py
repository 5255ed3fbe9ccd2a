"""How the MLflow layout names things: tags, the trial model's name, and each trial state's
MLflow run status. Plain constants: importing this module imports no MLflow."""

from __future__ import annotations

from hpo.config.trial import TrialState

TAG_ROLE = "imgcls_hpo.role"  # "study" for the parent run, "trial" for each trial's
TAG_STUDY = "imgcls_hpo.study"
TAG_TRIAL = "imgcls_hpo.trial_number"
TAG_STATE = "imgcls_hpo.state"  # COMPLETE, PRUNED, FAIL (TrialState.stored), RUNNING
TAG_FAIL_REASON = "imgcls_hpo.fail_reason"
TAG_DEVICE = "imgcls_hpo.device"  # where a trial trained: "cpu", "cuda:1" (the search's index)
# the machine and worker slot that ran it: "node7/cpu/worker0", "node7/gpu1/slot0"
TAG_WORKER = "imgcls_hpo.worker"
# On the run of a trial that started over (no checkpoint to go on from): the run that replaced it
TAG_SUPERSEDED = "imgcls_hpo.superseded_by"
# On a trial Population Based Training restarted from another's checkpoint, one tag per exploit:
# imgcls_hpo.exploit.<epoch> = "from trial 3: lr=0.012, momentum=0.9, ..."
TAG_EXPLOIT = "imgcls_hpo.exploit"
# Per-epoch metrics of a PBT trial: the values of the hyperparameters PBT may change (pbt_lr...)
PERTURBED_PREFIX = "pbt_"
RUN_NAME = "mlflow.runName"  # what MLflow's runs table shows of a run: see runs.trial_run_name
# The artifacts of a promoted ImageClassifier (hpo.after.serving), by MLflow artifact key
CLASSIFIER_WEIGHTS, CLASSIFIER_PREPROCESSING = "weights", "preprocessing"
MODEL_NAME = "model"  # a COMPLETE trial's model in its run: its weights, and its pt2 model

# How a trial's end shows in MLflow's own run status: a trial stopped from outside (Ctrl-C, a
# lost worker) was KILLED, not FAILED.
RUN_STATUS = {
    TrialState.RUNNING: "RUNNING", TrialState.COMPLETE: "FINISHED",
    TrialState.PRUNED: "FINISHED", TrialState.FAILED: "FAILED",
    TrialState.INTERRUPTED: "KILLED", TrialState.LOST: "KILLED",
}
