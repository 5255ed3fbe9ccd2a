"""What a running search shows: live progress while it runs, a table of the best trials after."""

from __future__ import annotations

import time
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console, Group
from rich.live import Live
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Table
from rich.text import Text

from hpo.config.space import Scalar
from hpo.config.store import Store, mask_uri
from hpo.config.study import StudySpec
from hpo.config.trial import TrialOutcome, Trials, TrialState, test_counterpart

if TYPE_CHECKING:
    from hpo.search.run import SearchResult
    from imgcls.data.prepare import PreparedData

STATE_STYLE = {TrialState.COMPLETE: "green", TrialState.PRUNED: "yellow",
               TrialState.FAILED: "red", TrialState.INTERRUPTED: "magenta",
               TrialState.LOST: "magenta", TrialState.RUNNING: "cyan"}


def format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def format_params(params: Mapping[str, Scalar], names: list[str] | None = None) -> str:
    keys = names if names is not None else list(params)
    return ", ".join(f"{k}={format_value(params[k])}" for k in keys if k in params)


# Where nothing is live (a log file, a batch job): a line for an epoch at most this often
LOG_EVERY_S = 10.0


class TrialsEta(ProgressColumn):
    """Time left: the trials still to finish at the pace of those finished in this run, less
    what the running trials have done already; it counts down between trials (rich's own
    estimate stands still until the next one ends)."""

    def __init__(self) -> None:
        super().__init__()
        self.started = time.monotonic()
        self.finished = 0  # trials finished in this run
        self.last_finish = self.started

    def trial_finished(self) -> None:
        self.finished += 1
        self.last_finish = time.monotonic()

    def render(self, task: Task) -> Text:
        left = (task.total or 0) - task.completed
        if left <= 0:
            return Text("eta 0:00:00", style="progress.remaining")
        if not self.finished:
            return Text("eta -:--:--", style="progress.remaining")
        now = time.monotonic()
        pace = (self.last_finish - self.started) / self.finished
        seconds = max(0.0, pace * left - (now - self.last_finish))
        minutes, secs = divmod(int(seconds + 0.5), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"eta {hours}:{minutes:02d}:{secs:02d}", style="progress.remaining")


class SearchProgress:
    """Live view of a search: trials finished / pruned / failed of N with a time estimate, the
    best value so far and its parameters, and the running trial's epoch. Each finished trial
    also prints one line, which stays in the terminal (and in logs, where nothing is live)."""

    def __init__(self, console: Console, store: Store) -> None:
        self.console = console
        self.store = store
        self.eta = TrialsEta()
        self.trials = Progress(TextColumn("{task.description}"), BarColumn(),
                               MofNCompleteColumn(), TimeElapsedColumn(), self.eta,
                               console=console)
        self._last_line = 0.0  # when the last epoch line was printed (no live view)
        self.epochs = Progress(TextColumn("{task.description}"), BarColumn(),
                               MofNCompleteColumn(), TextColumn("{task.fields[last]}"),
                               console=console)
        self.images = Progress(TextColumn("{task.description}"), BarColumn(),
                               MofNCompleteColumn(), TimeElapsedColumn(), console=console)
        self.downloads = Progress(TextColumn("{task.description}"), BarColumn(),
                                  DownloadColumn(), TransferSpeedColumn(), console=console)
        self.best_line = Text("")
        # One live display for everything: rich allows a single one at a time.
        self.live = Live(Group(self.downloads, self.images, self.trials, self.epochs,
                               self.best_line),
                         console=console, refresh_per_second=4, transient=True)
        self.spec: StudySpec | None = None
        self.finished: Trials | None = None  # the trials that ended so far, and count
        self.ran = 0  # trials this search ran to their end (other machines' are not seen)
        self._trial_task = self._epoch_task = self._images_task = self._download_task = None
        self._searched: list[str] = []

    def __enter__(self) -> SearchProgress:
        self.live.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.live.__exit__(kind, exc, tb)

    def data_progress(self, done: int, total: int) -> None:
        """Images decoded (or found in the cache) so far."""
        if self._images_task is None:
            self._images_task = self.images.add_task("decoding images", total=total)
        self.images.update(self._images_task, completed=done)
        if done >= total:
            self.images.update(self._images_task, visible=False)

    def download_progress(self, filename: str, done: int, total: int) -> None:
        """Bytes of a pretrained weights file downloaded so far (total 0: not known). A log
        gets a line when it starts and one when it ends."""
        size = f" ({total / 2**20:.1f} MiB)" if total else ""
        if self._download_task is None:
            self._download_task = self.downloads.add_task(f"downloading {filename}",
                                                          total=total or None)
            if not self.console.is_terminal:
                self.console.print(f"downloading pretrained weights {filename}{size}",
                                   soft_wrap=True)
        self.downloads.update(self._download_task, completed=done)
        if total and done >= total:
            self.downloads.update(self._download_task, visible=False)
            self._download_task = None
            if not self.console.is_terminal:
                self.console.print(f"downloaded {filename}", soft_wrap=True)

    # -- SearchObserver ------------------------------------------------------------------------

    def study_started(self, spec: StudySpec, data: PreparedData,
                      previous: list[TrialOutcome]) -> None:
        self.spec = spec
        self.finished = Trials(spec.objective)
        counts = data.split.counts()
        config = data.config
        self.console.print(
            f"Study [bold]{spec.name}[/]: {len(data.catalog):,} images, {data.num_classes} "
            f"classes (train {counts['train']:,} · val {counts['val']:,} · test "
            f"{counts['test']:,}), {config.image_size}px, "
            f"{'grayscale' if config.channels == 1 else 'RGB'}\n"
            f"{spec.trials} trials of up to {spec.max_epochs} epochs "
            f"{'maximizing' if spec.direction == 'max' else 'minimizing'} {spec.objective}; "
            f"searching {', '.join(p.name for p in spec.space.searched) or 'nothing'}\n"
            f"[dim]store {self.store.root} · tracking {mask_uri(self.store.tracking_uri)} · "
            f"trials in {self.store.describe_storage()}[/]"
        )
        if data.skipped:
            self.console.print(
                f"[yellow]left out {len(data.skipped)} unusable image(s)[/] (--skip-bad-images; "
                "listed in the study run's skipped_images.txt): "
                + "; ".join(data.skipped[:3]) + ("; ..." if len(data.skipped) > 3 else "")
            )
        self._searched = [p.name for p in spec.space.searched]
        done = [t for t in previous if t.state.counts]
        for t in done:
            self.finished.add(t)
        if done:
            self.console.print(f"Resuming study [bold]{spec.name}[/]: {len(done)} of "
                               f"{spec.trials} trials already finished.")
        self._trial_task = self.trials.add_task(self._summary(), total=spec.trials,
                                                completed=min(len(done), spec.trials))
        self._update_best()

    def trial_started(self, number: int, params: Mapping[str, Scalar]) -> None:
        assert self.spec is not None
        if self._epoch_task is not None:
            self.epochs.remove_task(self._epoch_task)
        arch = params.get("arch") or self.spec.space.fixed_values().get("arch", "")
        self._epoch_task = self.epochs.add_task(f"trial {number} {arch} · epoch",
                                                total=self.spec.max_epochs, last="")

    def trial_resumed(self, number: int, epochs: int, why_not: str | None) -> None:
        if why_not:
            self.console.print(f"trial {number:>3} [magenta]restarts[/] from epoch 1: {why_not}",
                               soft_wrap=True)
        elif epochs:
            self.console.print(f"trial {number:>3} [magenta]resumes[/] after epoch {epochs} of "
                               "its checkpoint", soft_wrap=True)
        if self._epoch_task is not None:
            self.epochs.update(self._epoch_task, completed=epochs)

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        assert self.spec is not None
        objective = self.spec.objective
        last = f"{objective} {metrics[objective]:.4f}  train_loss {metrics['train_loss']:.4f}"
        self.epochs.update(self._epoch_task, completed=epoch, last=last)
        now = time.monotonic()
        if not self.console.is_terminal and now - self._last_line >= LOG_EVERY_S:
            self._last_line = now  # a log shows life during long trials
            self.console.print(f"trial {number:>3} epoch {epoch}/{self.spec.max_epochs}  {last}",
                               soft_wrap=True)

    def trial_finished(self, outcome: TrialOutcome) -> None:
        assert self.spec is not None and self.finished is not None
        self.finished.add(outcome)
        self.ran += 1
        if outcome.state.counts:
            self.eta.trial_finished()
        self.trials.update(self._trial_task, advance=1 if outcome.state.counts else 0,
                           description=self._summary())
        self._update_best()
        style = STATE_STYLE.get(outcome.state, "")
        value = f"{self.spec.objective} {outcome.value:.4f}" if outcome.value is not None else ""
        detail = outcome.fail_reason if not outcome.state.has_result else \
            f"{value} at epoch {outcome.best_epoch}/{outcome.epochs}"
        self.console.print(
            f"trial {outcome.number:>3} [{style}]{outcome.state.stored:<8}[/] {detail}  "
            f"({outcome.seconds:.1f}s)  [dim]{format_params(outcome.params, self._searched)}[/]"
        )

    # -- rendering -----------------------------------------------------------------------------

    def _summary(self) -> str:
        assert self.finished is not None
        c = self.finished.counts()
        return (f"trials: [green]{c[TrialState.COMPLETE]} complete[/] · "
                f"[yellow]{c[TrialState.PRUNED]} pruned[/] · [red]{c[TrialState.FAILED]} failed[/]")

    def _update_best(self) -> None:
        assert self.spec is not None and self.finished is not None
        best = self.finished.best
        if best is None:
            self.best_line.plain = f"best {self.spec.objective}: none yet"
            return
        self.best_line.plain = (
            f"best {self.spec.objective} {best.value:.4f} (trial {best.number}): "
            f"{format_params(best.params, self._searched)}"
        )


def summary_table(result: SearchResult, top: int = 5) -> Table:
    """The best finished trials, best first, with the parameters the study searched."""
    spec = result.spec
    searched = [p.name for p in spec.space.searched]
    ranked = result.trials.ranked()
    table = Table(title=f"Study {spec.name}: best {min(top, len(ranked))} trials "
                        f"by {spec.objective} ({'higher' if spec.direction == 'max' else 'lower'}"
                        " is better)", title_justify="left")
    table.add_column("trial", justify="right")
    table.add_column(spec.objective, justify="right", style="bold")
    table.add_column("epoch", justify="right")
    for name in searched:
        table.add_column(name, justify="right")
    test = test_counterpart(spec.objective)
    table.add_column(f"{test} (95% CI)", justify="right")
    table.add_column("time", justify="right")
    table.add_column("MLflow run")
    for t in ranked[:top]:
        table.add_row(str(t.number), f"{t.value:.4f}", f"{t.best_epoch}/{t.epochs}",
                      *(format_value(t.params.get(name, "")) for name in searched),
                      with_interval(t.test, test), f"{t.seconds:.0f}s", (t.run_id or "")[:12])
    return table


def with_interval(metrics: Mapping[str, float], name: str, ci_digits: int = 3) -> str:
    """`name`'s value and its `<name>_ci_low`/`_ci_high` interval, as "0.9817 [0.962, 0.996]";
    "-" when `metrics` lacks it."""
    if name not in metrics:
        return "-"
    low, high = metrics.get(f"{name}_ci_low"), metrics.get(f"{name}_ci_high")
    interval = (f" [{low:.{ci_digits}f}, {high:.{ci_digits}f}]"
                if low is not None and high is not None else "")
    return f"{metrics[name]:.4f}{interval}"
