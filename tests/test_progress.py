"""What a running search shows: the time estimate, and life in a log where nothing is live."""

import io
from pathlib import Path

import pytest
from rich.console import Console
from rich.progress import Progress

import hpo.cli.progress as progress
from hpo.cli.progress import SearchProgress, TrialsEta
from hpo.config.store import Store
from hpo.config.study import load_study


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    return clock


def test_the_estimate_counts_down_between_trials_at_the_pace_of_those_finished(
        clock: Clock) -> None:
    eta = TrialsEta()
    bar = Progress(eta)
    bar.add_task("trials", total=4)
    (task,) = bar.tasks
    assert eta.render(task).plain == "eta -:--:--"  # nothing to go by yet
    clock.now += 90
    eta.trial_finished()
    bar.update(task.id, completed=1)
    assert eta.render(task).plain == "eta 0:04:30"  # 3 more at 90 s each
    clock.now += 40  # 40 s into the next trial, no trial finished meanwhile
    assert eta.render(task).plain == "eta 0:03:50"
    bar.update(task.id, completed=4)
    assert eta.render(task).plain == "eta 0:00:00"


def test_a_log_gets_an_epoch_line_at_most_every_ten_seconds(clock: Clock,
                                                            tmp_path: Path) -> None:
    out = io.StringIO()
    view = SearchProgress(Console(file=out, force_terminal=False, width=200),
                          Store.resolve(str(tmp_path)))
    view.spec = load_study("digits")
    view.trial_started(3, {"arch": "resnet18"})
    for seconds, epoch in ((0, 1), (5, 2), (12, 3)):
        clock.now = 1000.0 + seconds
        view.epoch_finished(3, epoch, {"val_f1": 0.5 + epoch / 10, "train_loss": 1 / epoch})
    assert out.getvalue().splitlines() == [
        "trial   3 epoch 1/8  val_f1 0.6000  train_loss 1.0000",
        "trial   3 epoch 3/8  val_f1 0.8000  train_loss 0.3333"]


def test_a_terminal_gets_no_epoch_lines(clock: Clock, tmp_path: Path) -> None:
    out = io.StringIO()
    view = SearchProgress(Console(file=out, force_terminal=True, width=200),
                          Store.resolve(str(tmp_path)))
    view.spec = load_study("digits")
    view.trial_started(0, {})
    view.epoch_finished(0, 1, {"val_f1": 0.5, "train_loss": 1.0})
    assert "epoch 1/8" not in out.getvalue()  # the live view shows it instead


def test_a_log_says_when_a_weights_download_starts_and_ends(tmp_path: Path) -> None:
    out = io.StringIO()
    view = SearchProgress(Console(file=out, force_terminal=False, width=200),
                          Store.resolve(str(tmp_path)))
    size = 3 << 20
    for done in (0, 1 << 20, size):
        view.download_progress("resnet18-f37072fd.pth", done, size)
    assert out.getvalue().splitlines() == [
        "downloading pretrained weights resnet18-f37072fd.pth (3.0 MiB)",
        "downloaded resnet18-f37072fd.pth"]
