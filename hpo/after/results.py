"""After a search: which hyperparameters mattered, as tables and plots, in one folder.

    table.py   trials_table(record, top)        the top finished trials, the count per state
               write_trials_csv(record, path)   every trial: hyperparameters, metrics, reason
    plot3d.py  plot_points(record, x, y, z, c)  one 3D point per finished trial, axis scales
    views.py   optuna_study(tracker, record)    the MLflow records as an in-memory Optuna study
               param_importances(study)         each param's share of the objective's variation
               plan_views(study, importances)   which Optuna views can be drawn, and why not
    write_results(...)               all of the above under one folder, logged to the study run

It reads what MLflow holds, so it works on a study that is still running: RUNNING trials are
counted, not plotted. A view that cannot be drawn is left out with a note, never an exception.
A new plot goes in its own module beside these, plain data first, and is written here.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.after.plot3d import PlotData, plot_3d_html, plot_3d_png, plot_points
from hpo.after.table import TrialsTable, trials_table, write_trials_csv
from hpo.after.views import optuna_study, param_importances, plan_views, write_views_html
from hpo.config.trial import TrialState
from hpo.tracking.records import StudyRecord

if TYPE_CHECKING:
    from hpo.tracking.client import Tracker

# The files write_results owns under out_dir (and under results/ in the study run).
TRIALS_CSV = "trials.csv"
PLOT_HTML = "hparams_3d.html"
PLOT_PNG = "hparams_3d.png"
OPTUNA_HTML = "optuna.html"  # every Optuna view on one page: one 5 MB plotly.js bundle, not six
IMPORTANCES_CSV = "importances.csv"
NOTES_TXT = "notes.txt"  # the views not drawn and why; empty when every view was drawn
ARTIFACT_DIR = "results"


@dataclass
class ResultsReport:
    out_dir: Path
    files: list[Path]  # every file written, under out_dir
    table: TrialsTable  # the top trials and the counts per state
    plot: PlotData  # the 3D plot's points
    importances: dict[str, float] = field(default_factory=dict)  # {} when not computed
    notes: list[str] = field(default_factory=list)  # what was not drawn or left out, and why
    study_run_id: str | None = None  # the run the files were logged to (under results/)


def write_results(tracker: Tracker, record: StudyRecord, out_dir: Path, *, top: int = 10,
                  x: str = "lr", y: str = "batch_size", z: str | None = None,
                  color: str = "arch", log_to_study_run: bool = True) -> ResultsReport:
    """Tables, the 3D hyperparameter plot and Optuna's views of one study, written under
    `out_dir` and (log_to_study_run) logged to the study run under results/. Bad arguments
    (an unknown axis, top < 1) raise ConfigError before anything is written."""
    table = trials_table(record, top)
    space = record.space
    plot = plot_points(record, x, y, z, color, space=space)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (PLOT_HTML, PLOT_PNG, IMPORTANCES_CSV):  # no stale file from an earlier call
        (out_dir / name).unlink(missing_ok=True)
    files = [write_trials_csv(record, out_dir / TRIALS_CSV)]
    notes: list[str] = []

    running = record.counts().get(TrialState.RUNNING, 0)
    if running:
        notes.append(f"{running} trial(s) still RUNNING: counted, not plotted")
    if plot.left_out:
        notes.append(f"3D plot: trial(s) {', '.join(map(str, plot.left_out))} left out, no "
                     f"value on one of {plot.x.name}, {plot.y.name}, {plot.z.name}, "
                     f"{plot.color.name}")
    if len(plot):
        files.append(plot_3d_html(plot, out_dir / PLOT_HTML))
        figure = plot_3d_png(plot)
        figure.savefig(out_dir / PLOT_PNG, dpi=120)
        files.append(out_dir / PLOT_PNG)
    else:
        notes.append("3D plot: not drawn, no finished trial yet")

    study, trial_notes = optuna_study(tracker, record, space)
    notes += trial_notes
    importances, why_not = param_importances(study)
    if importances:
        path = out_dir / IMPORTANCES_CSV
        with path.open("w", newline="") as handle:
            csv.writer(handle).writerows([("param", "importance"), *importances.items()])
        files.append(path)
    views = plan_views(study, importances, why_not)
    notes += write_views_html(study, views, out_dir / OPTUNA_HTML,
                              f"study {record.name}: Optuna's views of {record.objective}")
    files.append(out_dir / OPTUNA_HTML)
    (out_dir / NOTES_TXT).write_text("".join(f"{n}\n" for n in notes))
    files.append(out_dir / NOTES_TXT)

    if log_to_study_run:
        if table.selection_gap is not None:  # the study's record of its selection optimism
            tracker.log_metrics(record.study_run_id, {"selection_gap": table.selection_gap})
        for path in files:
            tracker.log_artifact(record.study_run_id, path, ARTIFACT_DIR)
    return ResultsReport(out_dir, files, table, plot, importances, notes,
                         record.study_run_id if log_to_study_run else None)
