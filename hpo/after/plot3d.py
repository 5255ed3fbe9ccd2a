"""The 3D hyperparameter plot: one point per finished trial on three axes and a colour, each a
hyperparameter or a trial-level metric. Plain data first (`plot_points`, tested), then two thin
renderers: interactive HTML (plotly) and PNG (matplotlib)."""

from __future__ import annotations

import difflib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from hpo.after.table import summary_metrics
from hpo.config.hparams import HParams
from hpo.config.space import FloatRange, IntRange, Scalar, SearchSpace
from hpo.config.trial import TrialOutcome
from hpo.tracking.records import StudyRecord
from imgcls.errors import ConfigError

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# A numeric colour with more distinct values than this is a colour scale, not one trace each.
MAX_COLOR_GROUPS = 10
# A point's number is written next to it in the PNG up to this many points (then it clutters).
MAX_PNG_LABELS = 30

Scale = Literal["linear", "log", "log2", "category"]


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
    states: tuple[str, ...]  # each point's trial state (COMPLETE or PRUNED)
    params: tuple[dict[str, Scalar], ...]  # each point's searched hyperparameters (hover text)
    left_out: tuple[int, ...] = ()  # finished trials without a value on some axis
    # why the colour is the objective rather than the one asked for: "arch = simplecnn" when
    # every point had that value (one colour would say nothing); "" when it is the one asked for
    recoloured: str = ""

    def __len__(self) -> int:
        return len(self.trials)

    def groups(self) -> list[tuple[str, list[int]]]:
        """Point indices per colour value, in the colour axis's order; [] when the colour is a
        continuous scale (a number with more than MAX_COLOR_GROUPS distinct values, or the
        objective standing in for a colour that every point shared)."""
        if self.recoloured or (self.color.scale != "category"
                               and len(set(self.color.values)) > MAX_COLOR_GROUPS):
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
    finished = [t for t in record.trials if t.state.has_result]
    if z is None:
        z = "min_val_loss" if any("min_val_loss" in t.metrics for t in finished) \
            else record.objective_key
    names = {"x": x, "y": y, "z": z, "color": color}
    keys = {role: _axis_key(record, role, name) for role, name in names.items()}

    kept: list[TrialOutcome] = []
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
    recoloured = ""
    objective = [_value(t, record.objective_key) for t in kept]
    if (len(set(map(_text, columns["color"]))) == 1 and len(kept) > 1
            and keys["color"] != record.objective_key and None not in objective):
        recoloured = f"{keys['color']} = {_text(columns['color'][0])}"
        axes["color"] = _axis(record.objective_key, objective, space)  # type: ignore[arg-type]
    return PlotData(
        study=record.name, x=axes["x"], y=axes["y"], z=axes["z"], color=axes["color"],
        trials=tuple(t.number for t in kept), states=tuple(t.state.value for t in kept),
        params=tuple({k: t.params[k] for k in record.searched if k in t.params} for t in kept),
        left_out=tuple(left_out), recoloured=recoloured,
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


def _value(trial: TrialOutcome, key: str) -> Scalar | None:
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
    complete = data.states.count("COMPLETE")
    shared = f" (every trial {data.recoloured})" if data.recoloured else ""
    return (f"study {data.study}: {data.z.name} over {data.x.name} and {data.y.name}, "
            f"colour {data.color.name}{shared}; {len(data)} trials: {complete} complete (dots), "
            f"{len(data) - complete} pruned (crosses)")


# How a point shows its trial's end: a completed trial a dot, a pruned one a cross
HTML_SYMBOL = {"COMPLETE": "circle", "PRUNED": "x"}
PNG_MARKER = {"COMPLETE": "o", "PRUNED": "x"}
PNG_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown",
               "tab:pink", "tab:gray", "tab:olive", "tab:cyan")


def plot_3d_html(data: PlotData, path: Path) -> Path:
    """The interactive plot as one self-contained HTML file (plotly.js inside: opens offline).
    One trace per colour value (click the legend to hide one), or one colour scale."""
    import plotly.graph_objects as go

    coords = {role: [_plotly_value(a, v) for v in a.values]
              for role, a in (("x", data.x), ("y", data.y), ("z", data.z))}
    hover = [data.hover(i, "<br>") for i in range(len(data))]

    def trace(indices: list[int], marker: dict[str, object], **style: object) -> go.Scatter3d:
        return go.Scatter3d(
            x=[coords["x"][i] for i in indices], y=[coords["y"][i] for i in indices],
            z=[coords["z"][i] for i in indices], hovertext=[hover[i] for i in indices],
            text=[str(data.trials[i]) for i in indices], mode="markers+text",
            textposition="top center", textfont={"size": 9},
            hovertemplate="%{hovertext}<extra></extra>",
            marker={**marker, "symbol": [HTML_SYMBOL.get(data.states[i], "circle")
                                         for i in indices]}, **style,
        )

    fig = go.Figure()
    groups = data.groups()
    for label, indices in groups:
        fig.add_trace(trace(indices, {"size": 5}, name=label))
    if not groups:
        fig.add_trace(trace(list(range(len(data))), {
            "size": 5, "color": list(data.color.values), "colorscale": "Viridis",
            "colorbar": {"title": {"text": data.color.name}}}, name=data.color.name))
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
    for (label, indices), colour in zip(groups, itertools.cycle(PNG_COLOURS)):
        for n, (marker, these) in enumerate(_by_state(data, indices)):
            ax.scatter(px[these], py[these], pz[these], marker=marker, color=colour, s=36,
                       depthshade=False, label=label if n == 0 else None)
    if groups:
        ax.legend(title=data.color.name, loc="upper left", fontsize=8)
    elif len(data):
        values = np.array(data.color.values, dtype=float)
        for marker, these in _by_state(data, list(range(len(data)))):
            points = ax.scatter(px[these], py[these], pz[these], c=values[these],
                                cmap="viridis", vmin=values.min(), vmax=values.max(), s=36,
                                marker=marker, depthshade=False)
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


def _by_state(data: PlotData, indices: list[int]) -> list[tuple[str, list[int]]]:
    """`indices` split by their trial's end, each with its PNG marker; empty parts left out."""
    parts = [(marker, [i for i in indices if data.states[i] == state])
             for state, marker in PNG_MARKER.items()]
    return [(marker, these) for marker, these in parts if these]
