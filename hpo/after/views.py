"""Optuna's own views of a study (history, importances, parallel coordinates, contour, slice,
intermediate values), whatever backend ran it: its MLflow records as an in-memory Optuna study,
a plan of which views can be drawn and why not the others (plain data, tested), and one page
that draws them."""

from __future__ import annotations

import html
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from hpo.config.space import SearchSpace
from hpo.config.trial import TrialOutcome, TrialState
from hpo.tracking.records import StudyRecord
from imgcls.errors import first_line

if TYPE_CHECKING:
    import optuna
    from plotly.graph_objects import Figure as PlotlyFigure

    from hpo.tracking.client import Tracker


def optuna_study(tracker: Tracker, record: StudyRecord, space: SearchSpace | None = None
                 ) -> tuple[optuna.Study, list[str]]:
    """The study's trials in an in-memory Optuna study, whatever backend ran them, so that
    Optuna's views can draw them. Trial k of the record is trial k here: a number with no
    usable record (RUNNING, FAIL, never tracked) is a FAIL placeholder, which every view
    ignores. Intermediate values are the objective per epoch (step = epoch). Returns the study
    and notes on trials that could not be added as they are."""
    import optuna
    from optuna.trial import TrialState as OptunaState
    from optuna.trial import create_trial

    space = space if space is not None else record.space
    distributions = space.to_optuna()
    direction = "maximize" if record.direction == "max" else "minimize"
    notes: list[str] = []
    with _quiet_optuna():
        study = optuna.create_study(study_name=record.name, direction=direction)
    for trial in record.trials:
        while len(study.trials) < trial.number:  # numbers with no record
            study.add_trial(create_trial(state=OptunaState.FAIL))
        study.add_trial(_frozen_trial(tracker, record, trial, distributions, notes))
    return study, notes


def _frozen_trial(tracker: Tracker, record: StudyRecord, trial: TrialOutcome,
                  distributions: Mapping[str, optuna.distributions.BaseDistribution],
                  notes: list[str]) -> optuna.trial.FrozenTrial:
    from optuna.trial import TrialState as OptunaState
    from optuna.trial import create_trial

    placeholder = create_trial(state=OptunaState.FAIL, user_attrs={"state": trial.state.value})
    if not trial.state.has_result:
        return placeholder
    value = trial.metrics.get(record.objective_key)
    if trial.state == TrialState.COMPLETE and (value is None or value != value):
        notes.append(f"trial {trial.number}: COMPLETE without a {record.objective_key} value; "
                     "left out of the Optuna views")
        return placeholder
    missing = [k for k in distributions if k not in trial.params]
    if missing:
        notes.append(f"trial {trial.number}: no value for {', '.join(missing)}; left out of "
                     "the Optuna views")
        return placeholder
    history = tracker.metric_history(trial.run_id or "", record.objective)
    try:
        return create_trial(
            state=OptunaState[trial.state.value],
            value=value if trial.state == TrialState.COMPLETE else None,
            params={k: trial.params[k] for k in distributions},
            distributions=dict(distributions),
            intermediate_values={step: v for step, v in history if v == v},
            user_attrs={"run_id": trial.run_id},
        )
    except ValueError as exc:  # a value outside the space the study run recorded first
        notes.append(f"trial {trial.number}: {first_line(exc)}; left out of the Optuna views")
        return placeholder


@contextmanager
def _quiet_optuna() -> Iterator[None]:
    """Optuna's INFO lines (study created...) off for the block, then as they were."""
    import optuna

    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        yield
    finally:
        optuna.logging.set_verbosity(previous)


def _complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    from optuna.trial import TrialState as OptunaState

    return study.get_trials(deepcopy=False, states=(OptunaState.COMPLETE,))


def _searched(study: optuna.Study) -> list[str]:
    """The searched hyperparameters, in the space's order."""
    names: dict[str, None] = {}
    for t in study.get_trials(deepcopy=False):
        names.update(dict.fromkeys(t.distributions))
    return list(names)


def param_importances(study: optuna.Study) -> tuple[dict[str, float], str | None]:
    """Each searched hyperparameter's importance for the objective (Optuna's default
    evaluator, PED-ANOVA; shares that sum to 1), most important first; or {} and why not."""
    import optuna

    complete, searched = _complete(study), _searched(study)
    if len(complete) < 2:
        return {}, (f"parameter importances: not computed, they need 2 COMPLETE trials and the "
                    f"study has {len(complete)}; run more trials")
    if len(searched) < 2:
        return {}, (f"parameter importances: not computed, the study searched "
                    f"{len(searched)} hyperparameter(s): nothing to compare")
    try:
        with _quiet_optuna():
            return dict(optuna.importance.get_param_importances(study)), None
    except Exception as exc:  # Optuna's own limits (e.g. every objective value equal)
        return {}, f"parameter importances: not computed ({first_line(exc)})"


@dataclass(frozen=True)
class View:
    """One of Optuna's views: drawn on `params`, or skipped for `skipped` (the reason)."""

    name: str  # history, importances, parallel, contour, slice, intermediate
    title: str
    params: tuple[str, ...] = ()
    skipped: str | None = None


def plan_views(study: optuna.Study, importances: Mapping[str, float],
               importance_note: str | None = None) -> list[View]:
    """Which views can be drawn from what the study holds, and on which hyperparameters: the
    contour and slice show the two most important ones (the first two searched when importances
    are unknown). A multi-objective study would add a Pareto front; studies have one objective.
    """
    complete, searched = _complete(study), _searched(study)
    ranked = [k for k in importances if k in searched] or searched
    top = tuple(ranked[:2])
    by = "most important" if importances else "first searched (importances unknown)"
    views = [
        View("history", "optimization history",
             skipped=_needs(complete, searched, 0, "optimization history")),
        View("importances", "parameter importances", tuple(importances),
             skipped=None if importances else importance_note
             or "parameter importances: not computed"),
        View("parallel", "parallel coordinates", tuple(searched),
             skipped=_needs(complete, searched, 1, "parallel coordinates")),
    ]
    contour = _needs(complete, searched, 2, "contour")
    if contour is None:
        flat = [k for k in top if len({t.params[k] for t in complete if k in t.params}) < 2]
        if flat:
            contour = (f"contour: not drawn, {', '.join(flat)} took a single value in the "
                       "COMPLETE trials")
    views.append(View("contour", f"contour of the two {by} hyperparameters", top,
                      skipped=contour))
    views.append(View("slice", f"slice of the {by} hyperparameters", top,
                      skipped=_needs(complete, searched, 1, "slice")))
    stepped = any(t.intermediate_values for t in study.get_trials(deepcopy=False))
    views.append(View("intermediate", "objective per epoch (intermediate values)", skipped=None
                      if stepped else "intermediate values: not drawn, no trial reported an "
                      "epoch yet"))
    return views


def _needs(complete: Sequence[object], searched: Sequence[str], params: int, what: str
           ) -> str | None:
    """Why a view over `params` searched hyperparameters cannot be drawn, or None."""
    if not complete:
        return f"{what}: not drawn, it needs a COMPLETE trial and the study has none yet"
    if len(searched) < params:
        return (f"{what}: not drawn, it needs {params} searched hyperparameters and the study "
                f"searched {len(searched)}")
    return None


def render_view(study: optuna.Study, view: View) -> PlotlyFigure:
    """Draw one planned view with optuna.visualization."""
    from optuna import visualization as vis

    params = list(view.params) or None
    with _quiet_optuna():
        if view.name == "history":
            return vis.plot_optimization_history(study)
        if view.name == "importances":
            return vis.plot_param_importances(study)
        if view.name == "parallel":
            return vis.plot_parallel_coordinate(study, params=params)
        if view.name == "contour":
            return vis.plot_contour(study, params=params)
        if view.name == "slice":
            return vis.plot_slice(study, params=params)
        if view.name == "intermediate":
            return vis.plot_intermediate_values(study)
    raise ValueError(f"no view named {view.name!r}")


def write_views_html(study: optuna.Study, views: Sequence[View], path: Path, title: str
                     ) -> list[str]:
    """Every drawable view on one self-contained page (plotly.js once, at the first figure),
    and the reasons for the others at the top. A view that fails to draw becomes a note: the
    report is worth more than any one view. Returns the notes."""
    notes = [v.skipped for v in views if v.skipped]
    sections = []
    for view in views:
        if view.skipped:
            continue
        try:
            fig = render_view(study, view)
        except Exception as exc:
            notes.append(f"{view.title}: not drawn ({type(exc).__name__}: {first_line(exc)})")
            continue
        first = not sections
        sections.append(f"<h2>{html.escape(view.title)}</h2>\n"
                        + fig.to_html(full_html=False, include_plotlyjs=first))
    listed = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    path.write_text(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title></head><body>\n<h1>{html.escape(title)}</h1>\n"
        + (f"<ul>{listed}</ul>\n" if listed else "") + "\n".join(sections)
        + "\n</body></html>\n"
    )
    return notes
