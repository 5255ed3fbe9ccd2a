"""hpo.after: the trials table, the 3D plot's data and renderers, Optuna's views of a study.

Data steps are tested on in-memory records; what needs MLflow (metric histories, the study run's
space, artifacts) on a small study logged through the Tracker in a temporary store, without
training; one slow test runs a real search.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from hpo.after.plot3d import Axis, plot_3d_html, plot_3d_png, plot_points
from hpo.after.results import PLOT_HTML, PLOT_PNG, TRIALS_CSV, write_results
from hpo.after.table import trials_table, write_trials_csv
from hpo.after.views import optuna_study, plan_views
from hpo.config.hparams import HParams
from hpo.config.space import SearchSpace
from hpo.config.store import Store
from hpo.config.trial import TrialOutcome, Trials, TrialState
from hpo.tracking.client import Tracker
from hpo.tracking.records import StudyRecord, load_record
from hpo.tracking.runs import open_study_run, start_trial
from imgcls.errors import ConfigError

SPACE = {"lr": "0.0001..0.1:log", "batch_size": "8,16,32,64", "arch": "simplecnn,resnet18",
         "dropout": "0.0..0.5", "momentum": "0.9"}
SEARCHED = ("lr", "batch_size", "arch", "dropout")


@dataclass
class Fake:
    """One trial as a test describes it; the rest of its record is derived."""

    state: str
    lr: float = 0.01
    batch_size: int = 16
    arch: str = "simplecnn"
    dropout: float = 0.1
    history: Sequence[float] = (0.5, 0.7)  # val_f1 per epoch
    extra: Mapping[str, float] = field(default_factory=dict)  # more metrics, or overrides

    def params(self) -> dict[str, object]:
        return HParams(lr=self.lr, batch_size=self.batch_size, arch=self.arch,
                       dropout=self.dropout).model_dump()

    def metrics(self) -> dict[str, float]:
        """What a finished trial logs: summaries and test metrics (none for FAIL/RUNNING)."""
        if self.state not in ("COMPLETE", "PRUNED"):
            return {}
        best = max(self.history)
        return {"best_val_f1": best, "min_val_loss": 1 - best,
                "test_f1": best - 0.05, "test_f1_ci_low": best - 0.2,
                "test_f1_ci_high": min(best + 0.1, 1.0), "params_count": 1000.0 + len(self.arch),
                "flops": 2e6 * self.batch_size, **self.extra}


def in_memory(fakes: Sequence[Fake | None], objective: str = "val_f1") -> StudyRecord:
    """A record as load_record builds it; None leaves a trial number out."""
    trials = (
        TrialOutcome(number=n, state=TrialState(f.state), run_id=f"run{n}", params=f.params(),  # type: ignore[arg-type]
                     metrics={"val_f1": f.history[-1], **f.metrics()},  # val_f1: the last epoch's
                     value=f.metrics().get(f"best_{objective}"),
                     fail_reason="diverged" if f.state == "FAIL" else None)
        for n, f in enumerate(fakes) if f is not None
    )
    return StudyRecord("fake", objective, "1", "study-run", SEARCHED, Trials(objective, trials),
                       SearchSpace.parse(SPACE, HParams.kinds()))


def logged(store: Store, fakes: Sequence[Fake | None], name: str = "fake",
           space: Mapping[str, str] = SPACE) -> tuple[Tracker, StudyRecord]:
    """The trials logged in MLflow with the search's layout (no training), read back."""
    tracker = Tracker(store.tracking_uri, store.artifact_root)
    experiment = tracker.experiment(name)
    params = {"objective": "val_f1", **{f"space.{k}": v for k, v in space.items()}}
    study_run, _ = open_study_run(tracker, experiment, name, None, params)
    for number, fake in enumerate(fakes):
        if fake is None:
            continue
        run = start_trial(tracker, experiment, study_run, name, number, fake.params())
        for epoch, value in enumerate(fake.history, start=1):
            if fake.state != "FAIL":
                run.log_metrics({"val_f1": value}, step=epoch)
        run.log_metrics(fake.metrics())
        if fake.state != "RUNNING":
            run.finish(TrialState(fake.state), "diverged" if fake.state == "FAIL" else None)
    return tracker, load_record(tracker, name)


def a_store(root: Path, template: Path) -> Store:
    root.mkdir()
    shutil.copy(template, root / "mlflow.db")
    return Store.resolve(root)


MIXED = [
    Fake("COMPLETE", lr=0.0002, batch_size=8, arch="resnet18", dropout=0.4,
         history=(0.6, 0.9)),
    Fake("PRUNED", lr=0.09, batch_size=64, history=(0.3,)),
    Fake("FAIL", lr=0.1),
    None,  # a trial number MLflow never saw (its hyperparameters were rejected)
    Fake("COMPLETE", lr=0.003, batch_size=32, dropout=0.2, history=(0.7, 0.8)),
    Fake("RUNNING", lr=0.01, history=(0.4,)),
    Fake("COMPLETE", lr=0.02, batch_size=16, arch="resnet18", dropout=0.0,
         history=(0.5, 0.75, 0.7)),
]
FINISHED_NUMBERS = (0, 1, 4, 6)


# -- the table and trials.csv ------------------------------------------------------------------

def test_table_ranks_finished_trials_by_the_objective_and_counts_every_state() -> None:
    record = in_memory(MIXED)
    table = trials_table(record, top=3)
    values = {n: max(MIXED[n].history) for n in FINISHED_NUMBERS}  # type: ignore[union-attr]
    best_three = sorted(values, key=values.__getitem__, reverse=True)[:3]
    assert [row.number for row in table.rows] == best_three
    first = table.rows[0]
    assert first.value == values[first.number]
    assert first.params == {k: record.trials[0].params[k] for k in SEARCHED}
    assert first.test == record.trials[0].metrics["test_f1"]
    assert first.test_ci == (record.trials[0].metrics["test_f1_ci_low"],
                             record.trials[0].metrics["test_f1_ci_high"])
    assert first.params_count == 1000 + len("resnet18") and first.run_id == "run0"
    assert table.counts == {TrialState.COMPLETE: 3, TrialState.PRUNED: 1, TrialState.FAILED: 1,
                            TrialState.INTERRUPTED: 0, TrialState.LOST: 0, TrialState.RUNNING: 1}
    assert table.test_metric == "test_f1"


def test_a_loss_objective_ranks_lowest_first_against_its_test_log_loss() -> None:
    fakes = [Fake("COMPLETE", extra={"best_val_loss": loss, "test_log_loss": loss + 0.1})
             for loss in (0.4, 0.2, 0.3)]
    table = trials_table(in_memory(fakes, objective="val_loss"))
    assert [row.value for row in table.rows] == [0.2, 0.3, 0.4]
    assert table.test_metric == "test_log_loss"
    assert [row.test for row in table.rows] == [pytest.approx(v + 0.1) for v in (0.2, 0.3, 0.4)]
    assert all(row.test_ci is None for row in table.rows)  # no interval logged: none shown
    assert table.selection_gap == pytest.approx(0.1)  # a loss: validation looked 0.1 better


def test_the_selection_gap_is_the_chosen_trials_validation_score_above_its_test_score() -> None:
    table = trials_table(in_memory(MIXED))
    assert table.selection_gap == pytest.approx(0.05)  # each fake's test_f1 is best - 0.05
    assert trials_table(in_memory([Fake("FAIL")])).selection_gap is None  # nothing chosen


def test_top_below_one_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="top=0"):
        trials_table(in_memory(MIXED), top=0)


def test_trials_csv_has_every_trial_with_params_metrics_and_reason(tmp_path: Path) -> None:
    record = in_memory(MIXED)
    rows = list(csv.DictReader(write_trials_csv(record, tmp_path / "t.csv").open()))
    assert [int(r["number"]) for r in rows] == [t.number for t in record.trials]
    assert [r["state"] for r in rows] == [t.state for t in record.trials]
    by_number = {int(r["number"]): r for r in rows}
    assert by_number[2]["fail_reason"] == "diverged" and by_number[2]["best_val_f1"] == ""
    assert float(by_number[0]["lr"]) == MIXED[0].lr  # type: ignore[union-attr]
    assert float(by_number[0]["best_val_f1"]) == 0.9
    assert by_number[0]["params_count"] == str(1000 + len("resnet18"))  # a count, not 1008.0
    assert by_number[0]["momentum"] == "0.9"  # fixed hyperparameters too
    assert "val_f1" not in rows[0]  # the last epoch's value is no summary of the trial


# -- the 3D plot's data --------------------------------------------------------------------------

def test_plot_holds_every_finished_trial_and_only_those() -> None:
    record = in_memory(MIXED)
    plot = plot_points(record)
    assert plot.trials == FINISHED_NUMBERS
    assert plot.states == tuple(MIXED[n].state for n in FINISHED_NUMBERS)  # type: ignore[union-attr]
    assert plot.x.values == tuple(MIXED[n].lr for n in FINISHED_NUMBERS)  # type: ignore[union-attr]
    assert plot.z.name == "min_val_loss"  # logged: the default height
    assert plot.color.name == "arch" and plot.left_out == ()
    assert "trial 4 (COMPLETE)" in plot.hover(2) and "batch_size = 32" in plot.hover(2)
    assert dict(plot.groups()) == {"resnet18": [0, 3], "simplecnn": [1, 2]}


def test_the_height_falls_back_to_the_objective_and_any_name_goes_on_any_axis() -> None:
    fakes = [Fake("COMPLETE", lr=0.001 * (k + 1), history=(0.5 + k / 10,)) for k in range(3)]
    record = in_memory(fakes)
    record = dataclasses.replace(record, trials=Trials(record.objective, (
        dataclasses.replace(t, metrics={k: v for k, v in t.metrics.items()
                                        if k != "min_val_loss"})
        for t in record.trials)))
    assert plot_points(record).z.name == "best_val_f1"
    plot = plot_points(record, x="flops", y="arch", z="val_f1", color="dropout")
    assert plot.z.name == "best_val_f1"  # the objective's name means its best epoch's value
    assert plot.x.values == tuple(t.metrics["flops"] for t in record.trials)


def test_a_finished_trial_without_a_value_on_an_axis_is_left_out_and_named() -> None:
    fakes = [Fake("COMPLETE"), Fake("COMPLETE", extra={"min_val_loss": math.nan})]
    plot = plot_points(in_memory(fakes))
    assert plot.trials == (0,) and plot.left_out == (1,)


def test_axis_scales() -> None:
    record = in_memory(MIXED)
    plot = plot_points(record, x="lr", y="batch_size", z="dropout", color="flops")
    assert plot.x.scale == "log"  # positive, spans 0.0002..0.09: more than a decade
    assert plot.y.scale == "log2"
    assert plot.z.scale == "linear"
    # declared :log in the space: a log axis even when the values span less than a decade
    narrow = in_memory([Fake("COMPLETE", lr=0.02), Fake("COMPLETE", lr=0.05)])
    assert plot_points(narrow).x.scale == "linear"
    space = SearchSpace.parse(SPACE, HParams.kinds())
    assert plot_points(narrow, space=space).x.scale == "log"
    # text is a category in the space's order; true/false too
    arch = plot_points(record, x="arch", space=space).x
    assert arch.scale == "category" and arch.categories == ("simplecnn", "resnet18")
    assert plot_points(record, x="nesterov").x.categories == ("False",)
    # a numeric colour with more than ten values is a colour scale, not one trace each
    many = in_memory([Fake("COMPLETE", dropout=k / 40) for k in range(12)])
    assert plot_points(many, color="dropout").groups() == []


def test_log_ticks_state_the_values_they_mark() -> None:
    for values in ((1e-4, 3e-3, 0.1), (0.02, 0.05), (0.03, 0.031)):
        axis = Axis("lr", values, "log")
        ticks = axis.ticks()
        assert ticks is not None and len(ticks[0]) >= 2
        positions = axis.positions()
        for where, label in zip(*ticks, strict=True):
            assert float(label) == pytest.approx(10 ** where, rel=1e-2)
            assert positions.min() - 1e-9 <= where <= positions.max() + 1e-9
    log2 = Axis("batch_size", (8, 16, 64), "log2")
    where, labels = log2.ticks()  # type: ignore[misc]
    assert labels == ["8", "16", "32", "64"] and [2 ** w for w in where] == [8, 16, 32, 64]


def test_the_png_labels_log_axes_with_the_values() -> None:
    plot = plot_points(in_memory(MIXED))
    figure = plot_3d_png(plot)
    ax = figure.axes[0]
    labels = [float(t.get_text()) for t in ax.get_xticklabels()]
    assert labels and all(lab == pytest.approx(10 ** pos, rel=1e-2)
                          for lab, pos in zip(labels, ax.get_xticks(), strict=True))
    assert [t.get_text() for t in ax.get_yticklabels()] == ["8", "16", "32", "64"]
    assert "log10" in ax.get_xlabel()


def test_the_renderers_draw_categories_and_a_colour_scale(tmp_path: Path) -> None:
    many = in_memory([Fake("COMPLETE", dropout=k / 40, arch=("resnet18", "simplecnn")[k % 2])
                      for k in range(12)])
    plot = plot_points(many, x="arch", color="dropout")
    page = plot_3d_html(plot, tmp_path / "p.html").read_text()
    assert "colorbar" in page and all(f"trial {n} (" in page for n in range(12))
    figure = plot_3d_png(plot)
    assert len(figure.axes) == 2  # the 3D axes and the colour bar
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == list(plot.x.categories)


def test_one_architecture_is_coloured_by_the_objective_with_a_colour_bar(
        tmp_path: Path) -> None:
    fakes = [Fake("COMPLETE", lr=0.001 * (k + 1), history=(0.5 + k / 10,)) for k in range(3)]
    plot = plot_points(in_memory(fakes))  # colour: arch, but every trial is simplecnn
    assert plot.color.name == "best_val_f1" and plot.recoloured == "arch = simplecnn"
    assert plot.color.values == pytest.approx((0.5, 0.6, 0.7)) and plot.groups() == []
    figure = plot_3d_png(plot)
    assert len(figure.axes) == 2 and figure.axes[1].get_ylabel() == "best_val_f1"
    assert "(every trial arch = simplecnn)" in figure.axes[0].get_title()
    assert "colorbar" in plot_3d_html(plot, tmp_path / "p.html").read_text()
    # two architectures keep their colours
    assert plot_points(in_memory(MIXED)).recoloured == ""


def test_an_unknown_axis_name_lists_what_is_available(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"x='lrr'.*did you mean lr.*batch_size.*best_val_f1"):
        plot_points(in_memory(MIXED), x="lrr")
    with pytest.raises(ConfigError, match="color='val_loss'") as info:
        plot_points(in_memory(MIXED), color="val_loss")
    assert "\n" not in str(info.value) and "min_val_loss" in str(info.value)


# -- Optuna's views and write_results, on a study logged in MLflow ---------------------------------

@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory, _empty_mlflow_db: Path
          ) -> Iterator[tuple[Tracker, StudyRecord, Path]]:
    """MIXED logged in MLflow, and write_results run once on it."""
    root = tmp_path_factory.mktemp("results")
    tracker, record = logged(a_store(root / "store", _empty_mlflow_db), MIXED)
    yield tracker, record, root / "out"


@pytest.fixture(scope="module")
def mixed_report(mixed: tuple[Tracker, StudyRecord, Path]):  # type: ignore[no-untyped-def]
    tracker, record, out = mixed
    return write_results(tracker, record, out)


def test_the_optuna_study_mirrors_the_records(mixed: tuple[Tracker, StudyRecord, Path]) -> None:
    tracker, record, _ = mixed
    space = record.space  # as the study run recorded it
    assert [p.name for p in space.searched] == list(SEARCHED)
    study, notes = optuna_study(tracker, record, space)
    assert notes == []
    states = [t.state.name for t in study.trials]
    # numbers line up with the record's: 3 (never tracked) and 5 (RUNNING) are FAIL placeholders
    assert states == ["COMPLETE", "PRUNED", "FAIL", "FAIL", "COMPLETE", "FAIL", "COMPLETE"]
    for trial in record.trials:
        frozen = study.trials[trial.number]
        if trial.state == "COMPLETE":
            assert frozen.value == trial.metrics["best_val_f1"]
        if trial.state.has_result:
            assert frozen.params == {k: trial.params[k] for k in SEARCHED}
            history = MIXED[trial.number].history  # type: ignore[union-attr]
            assert frozen.intermediate_values == dict(enumerate(history, start=1))
    assert study.direction.name == "MAXIMIZE"


def test_views_that_cannot_be_drawn_are_planned_out_with_a_reason(
        mixed: tuple[Tracker, StudyRecord, Path]) -> None:
    tracker, record, _ = mixed
    study, _ = optuna_study(tracker, record)
    planned = {v.name: v for v in plan_views(study, {"dropout": 0.6, "lr": 0.3, "arch": 0.1})}
    assert all(v.skipped is None for v in planned.values())
    assert planned["contour"].params == ("dropout", "lr")  # the two most important
    one = dataclasses.replace(record, trials=Trials(record.objective, record.trials[:1]))
    study, _ = optuna_study(tracker, one)
    planned = {v.name: v for v in plan_views(study, {}, "importances: why")}
    assert planned["importances"].skipped == "importances: why"
    assert planned["history"].skipped is None and planned["slice"].skipped is None
    assert "single value" in str(planned["contour"].skipped)


def test_write_results_writes_the_files_and_logs_them_to_the_study_run(
        mixed: tuple[Tracker, StudyRecord, Path], mixed_report) -> None:  # type: ignore[no-untyped-def]
    tracker, record, out = mixed
    report = mixed_report
    names = {p.name for p in report.files}
    assert {TRIALS_CSV, PLOT_HTML, PLOT_PNG, "optuna.html", "importances.csv",
            "notes.txt"} <= names
    assert all(p.parent == out and p.stat().st_size > 0 for p in report.files)
    page = (out / PLOT_HTML).read_text()
    assert "plotly.js v" in page and '<script src="https://cdn.plot.ly' not in page  # offline
    for number in FINISHED_NUMBERS:
        assert f"trial {number} (" in page
    assert "trial 2 (" not in page and "trial 5 (" not in page  # FAIL, RUNNING: not plotted
    with Image.open(out / PLOT_PNG) as image:
        assert image.width > 500 and image.height > 500
    assert (out / PLOT_PNG).stat().st_size > 20_000
    assert len(list(csv.DictReader((out / TRIALS_CSV).open()))) == len(record.trials)
    assert set(report.importances) == set(SEARCHED)
    views = (out / "optuna.html").read_text()
    assert views.count("plotly.js v") == 1 and "optimization history" in views
    assert any("RUNNING" in n for n in report.notes)
    assert [r.number for r in report.table.rows] == [0, 4, 6, 1]
    logged_names = {a.path for a in tracker.client.list_artifacts(record.study_run_id, "results")}
    assert logged_names == {f"results/{n}" for n in names}
    assert report.study_run_id == record.study_run_id
    logged = tracker.client.get_run(record.study_run_id).data.metrics
    assert logged["selection_gap"] == pytest.approx(report.table.selection_gap)


def test_a_single_finished_trial_still_writes_what_it_can(
        tmp_path: Path, _empty_mlflow_db: Path) -> None:
    tracker, record = logged(a_store(tmp_path / "store", _empty_mlflow_db),
                             [Fake("COMPLETE"), Fake("FAIL")])
    report = write_results(tracker, record, tmp_path / "out", log_to_study_run=False)
    names = {p.name for p in report.files}
    assert {TRIALS_CSV, PLOT_HTML, PLOT_PNG, "optuna.html", "notes.txt"} <= names
    assert "importances.csv" not in names and report.importances == {}
    assert any("importances" in n and "2 COMPLETE" in n for n in report.notes)
    assert any(n.startswith("contour") for n in report.notes)
    notes = (tmp_path / "out" / "notes.txt").read_text().splitlines()
    assert notes == report.notes
    assert report.plot.trials == (0,) and report.study_run_id is None
    assert tracker.client.list_artifacts(record.study_run_id, "results") == []


def test_a_study_with_no_finished_trial_writes_the_table_and_why(
        tmp_path: Path, _empty_mlflow_db: Path) -> None:
    tracker, record = logged(a_store(tmp_path / "store", _empty_mlflow_db), [Fake("RUNNING")])
    report = write_results(tracker, record, tmp_path / "out")
    assert {p.name for p in report.files} == {TRIALS_CSV, "optuna.html", "notes.txt"}
    assert len(report.plot) == 0 and report.table.rows == ()
    assert report.table.counts[TrialState.RUNNING] == 1
    assert any(n.startswith("3D plot: not drawn") for n in report.notes)
    assert any(n.startswith("optimization history: not drawn") for n in report.notes)


def test_a_bad_axis_writes_nothing(mixed: tuple[Tracker, StudyRecord, Path], tmp_path: Path
                                   ) -> None:
    tracker, record, _ = mixed
    with pytest.raises(ConfigError, match="z='nope'"):
        write_results(tracker, record, tmp_path / "out", z="nope")
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_results_of_a_real_search(study_file: Path, store: Store, tmp_path: Path) -> None:
    from hpo.config.study import load_study
    from hpo.search.run import run_search

    run_search(load_study(str(study_file), {"trials": 3}), store)
    tracker = Tracker(store.tracking_uri, store.artifact_root)
    record = load_record(tracker, "tiny")
    report = write_results(tracker, record, tmp_path / "results")
    assert report.plot.trials == (0, 1, 2)
    assert report.plot.x.scale == "log"  # the study declares lr 0.01..0.1:log
    assert report.plot.y.scale == "log2"
    study, notes = optuna_study(tracker, record)
    assert notes == [] and [t.value for t in study.trials] == [
        t.metrics["best_val_f1"] for t in record.trials]
    assert all(len(t.intermediate_values) == 2 for t in study.trials)  # max_epochs 2
    logged_names = {a.path for a in tracker.client.list_artifacts(record.study_run_id, "results")}
    assert f"results/{PLOT_HTML}" in logged_names and f"results/{TRIALS_CSV}" in logged_names


def test_the_plots_tell_complete_from_pruned_and_number_their_points(tmp_path: Path) -> None:
    trials = in_memory([Fake("COMPLETE" if k % 3 else "PRUNED", dropout=k / 40,
                             arch=("resnet18", "simplecnn")[k % 2]) for k in range(6)])
    plot = plot_points(trials)
    page = plot_3d_html(plot, tmp_path / "p.html").read_text()
    symbols = {m for found in re.findall(r'"symbol":\[([^\]]*)\]', page)
               for m in re.findall(r'"([a-z-]+)"', found)}
    assert symbols == {"circle", "x"}  # completed trials as dots, pruned ones as crosses
    assert "markers+text" in page  # each point carries its trial number
    figure = plot_3d_png(plot)
    title = figure.axes[0].get_title()
    assert "6 trials: 4 complete (dots), 2 pruned (crosses)" in title
    markers = {c.get_paths()[0].vertices.shape for c in figure.axes[0].collections}
    assert len(markers) == 2  # two marker shapes: dots and crosses
