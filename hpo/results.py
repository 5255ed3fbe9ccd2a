"""After a search: which hyperparameters mattered, as tables and plots.

Plain data first, each step tested; thin renderers after (plotly for interactive HTML,
matplotlib for PNG, Optuna's own views):

    trials_table(record, top)        the top finished trials and the count per state
    write_trials_csv(record, path)   every trial: hyperparameters, summary metrics, fail reason
    plot_points(record, x, y, z, c)  one 3D point per finished trial, with each axis's scale
    optuna_study(tracker, record)    the MLflow records as an in-memory Optuna study
    param_importances(study)         the share of the objective's variation each param explains
    plan_views(study, importances)   which Optuna views can be drawn, and why not the others
    write_results(...)               all of the above under one folder, logged to the study run

It reads what MLflow holds, so it works on a study that is still running: RUNNING trials are
counted, not plotted. A view that cannot be drawn is left out with a note, never an exception.
"""

from __future__ import annotations

import csv
import difflib
import html
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from hpo.objective import test_counterpart
from hpo.records import FINISHED, StudyRecord, TrialRecord
from hpo.space import FloatRange, IntRange, Scalar, SearchSpace
from hpo.study import HParams
from imgcls.errors import ConfigError, first_line
from imgcls.metrics import EPOCH_METRICS

if TYPE_CHECKING:
    import optuna
    from matplotlib.figure import Figure
    from plotly.graph_objects import Figure as PlotlyFigure

    from hpo.tracking import Tracker

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING")
# Metrics logged once per epoch: a trial's last value of these describes its last epoch, not
# the trial, so tables and axes use the summaries instead (best_<objective>, min_val_loss...).
EPOCH_LOGGED = frozenset({*EPOCH_METRICS, "lr"})
# Metrics that count something: whole numbers in trials.csv.
COUNT_METRICS = frozenset({"best_epoch", "epochs", "params_count", "flops", "macs"})
# A numeric colour with more distinct values than this is a colour scale, not one trace each.
MAX_COLOR_GROUPS = 10
# A point's number is written next to it in the PNG up to this many points (then it clutters).
MAX_PNG_LABELS = 30

# The files write_results owns under out_dir (and under results/ in the study run).
TRIALS_CSV = "trials.csv"
PLOT_HTML = "hparams_3d.html"
PLOT_PNG = "hparams_3d.png"
OPTUNA_HTML = "optuna.html"  # every Optuna view on one page: one 5 MB plotly.js bundle, not six
IMPORTANCES_CSV = "importances.csv"
NOTES_TXT = "notes.txt"  # the views not drawn and why; empty when every view was drawn
ARTIFACT_DIR = "results"

Scale = Literal["linear", "log", "log2", "category"]


# -- the trials table ---------------------------------------------------------------------------

@dataclass(frozen=True)
class TrialRow:
    """One trial of the table: what a user compares to pick a model."""

    number: int
    state: str  # COMPLETE or PRUNED
    value: float  # the objective at the trial's best epoch (best_<objective>)
    params: dict[str, Scalar]  # the searched hyperparameters
    test: float | None  # the objective's test counterpart (val_f1 -> test_f1); None: no test split
    test_ci: tuple[float, float] | None  # its bootstrap confidence interval (low, high)
    params_count: int | None  # trainable and frozen parameters of the model
    flops: int | None  # per image, one forward pass
    run_id: str


@dataclass(frozen=True)
class TrialsTable:
    objective: str  # the study's objective, e.g. val_f1
    objective_key: str  # the metric holding each trial's value: best_val_f1
    test_metric: str  # the objective's test counterpart: test_f1
    searched: tuple[str, ...]
    rows: tuple[TrialRow, ...]  # the top finished trials, best first
    counts: dict[str, int]  # trials per state, every state of STATES (RUNNING too), zeros kept


def trials_table(record: StudyRecord, top: int = 10) -> TrialsTable:
    """The `top` best finished (COMPLETE or PRUNED) trials by the objective, best first; a trial
    without an objective value (NaN, or never logged) does not rank."""
    if top < 1:
        raise ConfigError(f"top={top}: the table needs at least one row; use --top 1 or more")
    test = test_counterpart(record.objective)
    rows = []
    for trial in record.ranked(states=FINISHED)[:top]:
        m = trial.metrics
        ci = (m[f"{test}_ci_low"], m[f"{test}_ci_high"]) \
            if f"{test}_ci_low" in m and f"{test}_ci_high" in m else None
        rows.append(TrialRow(
            number=trial.number, state=trial.state, value=m[record.objective_key],
            params={k: trial.params[k] for k in record.searched if k in trial.params},
            test=m.get(test), test_ci=ci,
            params_count=_int(m.get("params_count")), flops=_int(m.get("flops")),
            run_id=trial.run_id,
        ))
    counts = record.counts()
    states = {s: counts.get(s, 0) for s in STATES}
    states.update({s: n for s, n in counts.items() if s not in states})  # an unexpected tag
    return TrialsTable(record.objective, record.objective_key, test, record.searched,
                       tuple(rows), states)


def _int(value: float | None) -> int | None:
    return None if value is None or value != value else int(value)


def summary_metrics(record: StudyRecord) -> list[str]:
    """Every trial-level metric any trial logged: the objective's best first, then its test
    counterpart with its interval, then the rest by name."""
    names = {k for t in record.trials for k in t.metrics if k not in EPOCH_LOGGED}
    test = test_counterpart(record.objective)
    first = [record.objective_key, test, f"{test}_ci_low", f"{test}_ci_high"]
    rest = sorted(names.difference(first),  # test_acc, test_acc_ci_low, test_acc_ci_high
                  key=lambda k: (k.removesuffix("_ci_low").removesuffix("_ci_high"),
                                 k.endswith("_ci_low") + 2 * k.endswith("_ci_high")))
    return [k for k in first if k in names] + rest


def write_trials_csv(record: StudyRecord, path: Path) -> Path:
    """Every trial, whatever its state, one row each by trial number: number, state, the
    searched hyperparameters, the summary metrics, the other hyperparameters, run id, fail
    reason. A value a trial did not log is an empty cell."""
    kinds = HParams.kinds()
    others = [k for k in kinds if k not in record.searched]
    metrics = summary_metrics(record)
    header = ["number", "state", *record.searched, *metrics, *others, "run_id", "fail_reason"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for t in record.trials:
            writer.writerow([
                t.number, t.state,
                *(t.params.get(k, "") for k in record.searched),
                *(_cell(k, t.metrics.get(k)) for k in metrics),
                *(t.params.get(k, "") for k in others),
                t.run_id, t.fail_reason or "",
            ])
    return path


def _cell(name: str, value: float | None) -> str | float | int:
    """A metric as a CSV cell: counts as integers, a missing value empty."""
    if value is None:
        return ""
    return int(value) if name in COUNT_METRICS and value.is_integer() else value


# -- the 3D hyperparameter plot: data ----------------------------------------------------------

@dataclass(frozen=True)
class Axis:
    """One dimension of the plot: a hyperparameter or a metric, one value per point."""

    name: str
    values: tuple[Scalar, ...]
    scale: Scale
    categories: tuple[str, ...] = ()  # a category axis's values, in axis order

    @property
    def label(self) -> str:
        suffix = {"log": " (log10 scale)", "log2": " (log2 scale)"}.get(self.scale, "")
        return self.name + suffix

    def positions(self) -> np.ndarray:
        """Where each value sits on a linear axis: log10 or log2 of it, a category's index, or
        the value itself. (matplotlib's 3D axes cannot draw a log scale themselves.)"""
        if self.scale == "category":
            return np.array([self.categories.index(_text(v)) for v in self.values], dtype=float)
        numbers = np.array(self.values, dtype=float)
        if self.scale == "log":
            return np.log10(numbers)
        if self.scale == "log2":
            return np.log2(numbers)
        return numbers

    def ticks(self) -> tuple[list[float], list[str]] | None:
        """Tick positions (as `positions` gives them) and labels that state the real values;
        None: a linear axis, whose default ticks are honest already."""
        if self.scale == "category":
            return list(range(len(self.categories))), list(self.categories)
        if self.scale == "linear" or not self.values:
            return None
        pos = self.positions()
        low, high = float(pos.min()), float(pos.max())
        if self.scale == "log2":
            exps = list(range(math.ceil(low), math.floor(high) + 1)) or [low]
            return [float(e) for e in exps], [f"{2.0 ** e:g}" for e in exps]
        decades = range(math.ceil(low), math.floor(high) + 1)
        values = [10.0 ** d for d in decades]
        if len(values) < 2:  # under two decades shown: 1-2-5 steps inside the range
            values = [m * 10.0 ** d for d in range(math.floor(low), math.ceil(high) + 1)
                      for m in (1, 2, 5) if low <= math.log10(m * 10.0 ** d) <= high]
        if len(values) < 2:  # a narrow range: its ends
            values = sorted({10.0 ** low, 10.0 ** high})
        return [math.log10(v) for v in values], [f"{v:.3g}" for v in values]


@dataclass(frozen=True)
class PlotData:
    """One point per finished trial (COMPLETE or PRUNED) that has a value on every axis."""

    study: str
    x: Axis
    y: Axis
    z: Axis
    color: Axis
    trials: tuple[int, ...]  # each point's trial number
    states: tuple[str, ...]  # each point's trial state
    params: tuple[dict[str, Scalar], ...]  # each point's searched hyperparameters (hover text)
    left_out: tuple[int, ...] = ()  # finished trials without a value on some axis

    def __len__(self) -> int:
        return len(self.trials)

    def groups(self) -> list[tuple[str, list[int]]]:
        """Point indices per colour value, in the colour axis's order; [] when the colour is a
        continuous scale (a number with more than MAX_COLOR_GROUPS distinct values)."""
        if self.color.scale != "category" and len(set(self.color.values)) > MAX_COLOR_GROUPS:
            return []
        labels = self.color.categories or tuple(_text(v) for v in sorted(set(self.color.values)))
        texts = [_text(v) for v in self.color.values]
        return [(label, [i for i, t in enumerate(texts) if t == label]) for label in labels]

    def hover(self, index: int, newline: str = "\n") -> str:
        """What a point says about its trial: number, state, searched params, axis values."""
        lines = [f"trial {self.trials[index]} ({self.states[index]})"]
        shown = dict(self.params[index])
        for axis in (self.x, self.y, self.z, self.color):
            shown.setdefault(axis.name, axis.values[index])
        lines += [f"{k} = {_text(v)}" for k, v in shown.items()]
        return newline.join(lines)


def plot_points(record: StudyRecord, x: str = "lr", y: str = "batch_size", z: str | None = None,
                color: str = "arch", *, space: SearchSpace | None = None) -> PlotData:
    """The 3D plot's data. Each axis takes a hyperparameter or a trial-level metric (the
    objective's name means its best epoch's value); z defaults to min_val_loss when any trial
    logged it, else the objective. `space` (the study's declared space) makes a range declared
    `:log` a log axis, and orders a choice's categories as declared.

    Scales: text and true/false are categories; batch_size is log2 (powers of two); other
    positive numbers are log10 when declared `:log` or when they span more than a decade;
    the rest linear. Unknown axis names raise ConfigError listing what is available."""
    finished = [t for t in record.trials if t.state in FINISHED]
    if z is None:
        z = "min_val_loss" if any("min_val_loss" in t.metrics for t in finished) \
            else record.objective_key
    names = {"x": x, "y": y, "z": z, "color": color}
    keys = {role: _axis_key(record, role, name) for role, name in names.items()}

    kept: list[TrialRecord] = []
    columns: dict[str, list[Scalar]] = {role: [] for role in names}
    left_out = []
    for trial in finished:
        row = {role: _value(trial, key) for role, key in keys.items()}
        if any(v is None for v in row.values()):
            left_out.append(trial.number)
            continue
        kept.append(trial)
        for role, value in row.items():
            columns[role].append(value)  # type: ignore[arg-type]  (None was left out above)

    axes = {role: _axis(keys[role], columns[role], space) for role in names}
    return PlotData(
        study=record.name, x=axes["x"], y=axes["y"], z=axes["z"], color=axes["color"],
        trials=tuple(t.number for t in kept), states=tuple(t.state for t in kept),
        params=tuple({k: t.params[k] for k in record.searched if k in t.params} for t in kept),
        left_out=tuple(left_out),
    )


def _axis_key(record: StudyRecord, role: str, name: str) -> str:
    """The hyperparameter or metric an axis name means; ConfigError naming what exists."""
    params = list(HParams.kinds())
    metrics = summary_metrics(record)
    if name in params or name in metrics:
        return name
    if name in (record.objective, record.objective_key):
        return record.objective_key  # the objective, before any trial logged it
    close = difflib.get_close_matches(name, params + metrics, n=3)
    hint = f"did you mean {' or '.join(close)}? " if close else ""
    raise ConfigError(
        f"{role}={name!r} is neither a hyperparameter nor a metric of study {record.name!r}; "
        f"{hint}hyperparameters: {', '.join(params)}; "
        f"metrics: {', '.join(metrics) or 'none logged yet'}"
    )


def _value(trial: TrialRecord, key: str) -> Scalar | None:
    """A trial's value for an axis; None when missing or NaN (the point is left out)."""
    value = trial.params.get(key, trial.metrics.get(key))
    if isinstance(value, float) and value != value:
        return None
    return value


def _axis(name: str, values: list[Scalar], space: SearchSpace | None) -> Axis:
    declared = space[name] if space is not None and name in space else None
    if any(isinstance(v, bool | str) for v in values):
        texts = {_text(v) for v in values}
        order = [_text(c) for c in getattr(declared, "choices", ())]
        categories = [c for c in order if c in texts] + sorted(texts.difference(order))
        return Axis(name, tuple(values), "category", tuple(categories))
    positive = bool(values) and min(values) > 0  # type: ignore[type-var]  (numbers only here)
    scale: Scale = "linear"
    if positive and name == "batch_size":
        scale = "log2"
    elif positive and ((isinstance(declared, FloatRange | IntRange) and declared.log)
                       or max(values) / min(values) > 10):  # type: ignore[operator,type-var]
        scale = "log"
    return Axis(name, tuple(values), scale)


def _text(value: Scalar) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


# -- the 3D hyperparameter plot: renderers -----------------------------------------------------

def _title(data: PlotData) -> str:
    return (f"study {data.study}: {data.z.name} over {data.x.name} and {data.y.name}, "
            f"colour {data.color.name}; {len(data)} finished trial(s)")


def plot_3d_html(data: PlotData, path: Path) -> Path:
    """The interactive plot as one self-contained HTML file (plotly.js inside: opens offline).
    One trace per colour value (click the legend to hide one), or one colour scale."""
    import plotly.graph_objects as go

    coords = {role: [_plotly_value(a, v) for v in a.values]
              for role, a in (("x", data.x), ("y", data.y), ("z", data.z))}
    hover = [data.hover(i, "<br>") for i in range(len(data))]

    def trace(indices: list[int], **style: object) -> go.Scatter3d:
        return go.Scatter3d(
            x=[coords["x"][i] for i in indices], y=[coords["y"][i] for i in indices],
            z=[coords["z"][i] for i in indices], text=[hover[i] for i in indices],
            mode="markers", hovertemplate="%{text}<extra></extra>", **style,
        )

    fig = go.Figure()
    groups = data.groups()
    for label, indices in groups:
        fig.add_trace(trace(indices, name=label, marker={"size": 5}))
    if not groups:
        fig.add_trace(trace(list(range(len(data))), name=data.color.name, marker={
            "size": 5, "color": list(data.color.values), "colorscale": "Viridis",
            "colorbar": {"title": {"text": data.color.name}}}))
    fig.update_layout(
        title={"text": _title(data)}, legend={"title": {"text": data.color.name}},
        scene={"xaxis": _plotly_axis(data.x), "yaxis": _plotly_axis(data.y),
               "zaxis": _plotly_axis(data.z)},
        margin={"l": 0, "r": 0, "b": 0, "t": 40},
    )
    fig.write_html(path, include_plotlyjs=True, full_html=True)
    return path


def _plotly_value(axis: Axis, value: Scalar) -> Scalar:
    return _text(value) if axis.scale == "category" else value


def _plotly_axis(axis: Axis) -> dict[str, object]:
    """plotly draws log axes itself from the raw values; log2 is a log axis ticked at powers of
    two; categories keep the axis's order."""
    spec: dict[str, object] = {"title": {"text": axis.label}}
    if axis.scale == "category":
        spec.update(type="category", categoryorder="array", categoryarray=list(axis.categories))
    elif axis.scale in ("log", "log2"):
        spec["type"] = "log"
        ticks = axis.ticks()
        if axis.scale == "log2" and ticks:
            spec.update(tickvals=[2.0 ** p for p in ticks[0]], ticktext=ticks[1])
    return spec


def plot_3d_png(data: PlotData) -> Figure:
    """The same plot, static (no pyplot state). Log axes are drawn as log10 (or log2) of the
    values, ticked with the values themselves; a category axis is ticked with its names."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 7))
    ax = fig.add_subplot(projection="3d")
    px, py, pz = data.x.positions(), data.y.positions(), data.z.positions()
    groups = data.groups()
    for label, indices in groups:
        ax.scatter(px[indices], py[indices], pz[indices], label=label, s=36, depthshade=False)
    if groups:
        ax.legend(title=data.color.name, loc="upper left", fontsize=8)
    else:
        points = ax.scatter(px, py, pz, c=np.array(data.color.values, dtype=float),
                            cmap="viridis", s=36, depthshade=False)
        fig.colorbar(points, ax=ax, label=data.color.name, shrink=0.6, pad=0.1)
    if len(data) <= MAX_PNG_LABELS:
        for i, number in enumerate(data.trials):
            ax.text(px[i], py[i], pz[i], f" {number}", fontsize=7)
    for axis, set_label, set_ticks, set_ticklabels in (
            (data.x, ax.set_xlabel, ax.set_xticks, ax.set_xticklabels),
            (data.y, ax.set_ylabel, ax.set_yticks, ax.set_yticklabels),
            (data.z, ax.set_zlabel, ax.set_zticks, ax.set_zticklabels)):
        set_label(axis.label)
        ticks = axis.ticks()
        if ticks:
            set_ticks(ticks[0])
            set_ticklabels(ticks[1], fontsize=8)
    ax.set_title(_title(data) + ("; numbers: trials" if len(data) <= MAX_PNG_LABELS else ""),
                 fontsize=9)
    return fig


# -- Optuna's views ----------------------------------------------------------------------------

def study_space(tracker: Tracker, record: StudyRecord) -> SearchSpace:
    """The search space the study run recorded (its `space.<name>` params, as SPEC text).
    A name this version does not know is left out rather than failing the whole report."""
    params = tracker.client.get_run(record.study_run_id).data.params
    kinds = HParams.kinds()
    entries = {k.removeprefix("space."): v for k, v in params.items()
               if k.startswith("space.") and k.removeprefix("space.") in kinds}
    return SearchSpace.parse(entries, kinds)


def optuna_study(tracker: Tracker, record: StudyRecord, space: SearchSpace | None = None
                 ) -> tuple[optuna.Study, list[str]]:
    """The study's trials in an in-memory Optuna study, whatever backend ran them, so that
    Optuna's views can draw them. Trial k of the record is trial k here: a number with no
    usable record (RUNNING, FAIL, never tracked) is a FAIL placeholder, which every view
    ignores. Intermediate values are the objective per epoch (step = epoch). Returns the study
    and notes on trials that could not be added as they are."""
    import optuna
    from optuna.trial import TrialState, create_trial

    space = space if space is not None else study_space(tracker, record)
    distributions = space.to_optuna()
    direction = "maximize" if record.direction == "max" else "minimize"
    notes: list[str] = []
    with _quiet_optuna():
        study = optuna.create_study(study_name=record.name, direction=direction)
    for trial in record.trials:
        while len(study.trials) < trial.number:  # numbers with no record
            study.add_trial(create_trial(state=TrialState.FAIL))
        study.add_trial(_frozen_trial(tracker, record, trial, distributions, notes))
    return study, notes


def _frozen_trial(tracker: Tracker, record: StudyRecord, trial: TrialRecord,
                  distributions: Mapping[str, optuna.distributions.BaseDistribution],
                  notes: list[str]) -> optuna.trial.FrozenTrial:
    from optuna.trial import TrialState, create_trial

    placeholder = create_trial(state=TrialState.FAIL, user_attrs={"state": trial.state})
    if trial.state not in FINISHED:
        return placeholder
    value = trial.metrics.get(record.objective_key)
    if trial.state == "COMPLETE" and (value is None or value != value):
        notes.append(f"trial {trial.number}: COMPLETE without a {record.objective_key} value; "
                     "left out of the Optuna views")
        return placeholder
    missing = [k for k in distributions if k not in trial.params]
    if missing:
        notes.append(f"trial {trial.number}: no value for {', '.join(missing)}; left out of "
                     "the Optuna views")
        return placeholder
    history = tracker.client.get_metric_history(trial.run_id, record.objective)
    try:
        return create_trial(
            state=TrialState[trial.state], value=value if trial.state == "COMPLETE" else None,
            params={k: trial.params[k] for k in distributions},
            distributions=dict(distributions),
            intermediate_values={m.step: m.value for m in history if m.value == m.value},
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
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


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


# -- everything --------------------------------------------------------------------------------

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
    space = study_space(tracker, record)
    plot = plot_points(record, x, y, z, color, space=space)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (PLOT_HTML, PLOT_PNG, IMPORTANCES_CSV):  # no stale file from an earlier call
        (out_dir / name).unlink(missing_ok=True)
    files = [write_trials_csv(record, out_dir / TRIALS_CSV)]
    notes: list[str] = []

    running = record.counts().get("RUNNING", 0)
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
        for path in files:
            tracker.log_artifact(record.study_run_id, path, ARTIFACT_DIR)
    return ResultsReport(out_dir, files, table, plot, importances, notes,
                         record.study_run_id if log_to_study_run else None)
