"""The `imgcls-hpo` command line. Thin: it parses, calls hpo's modules, and renders.

Exit codes: 0 success; 2 bad input (one line naming the problem, no traceback); 1 anything
unexpected (with its traceback); 130 interrupted.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer._click.exceptions import UsageError  # typer 0.29 carries its own click
from typer.core import TyperGroup

# Light imports only, for the help texts: registries of names and the hyperparameters' types
# (none of these imports torch, Optuna, Ray or MLflow; tests/test_layout.py checks it).
from hpo.config.hparams import HParams
from hpo.config.store import mask_uri
from hpo.search.backends import BACKENDS
from hpo.search.backends.optuna.pruners import PRUNERS
from hpo.search.backends.optuna.samplers import SAMPLERS
from hpo.search.backends.ray.schedulers import RAY_SAMPLERS, SCHEDULERS
from imgcls.errors import ImgclsError
from imgcls.metrics import OBJECTIVE_METRICS

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _error_line(message: str) -> None:
    err_console.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


class _Commands(TyperGroup):
    """The commands, whose usage errors (a missing argument, an unknown option, a value out of
    range) are one line like every other bad input, not click's boxed usage text."""

    def invoke(self, ctx: typer.Context) -> Any:
        try:
            return super().invoke(ctx)
        except UsageError as exc:
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            _error_line(f"{exc.format_message()} (see {where} --help)")
            raise typer.Exit(2) from None


app = typer.Typer(
    name="imgcls-hpo", cls=_Commands, no_args_is_help=True, add_completion=False,
    help="Experiment-tracked hyperparameter search for image classification.",
)

F = TypeVar("F", bound=Callable[..., Any])


def user_errors(fn: F) -> F:
    """Print an ImgclsError as one line and exit 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ImgclsError as exc:
            _error_line(str(exc))
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


# Options shared by every command that reads or writes the store.
StoreOpt = typer.Option(None, "--store", envvar="IMGCLS_HPO_STORE", show_default="./mlruns",
                        help="Folder of the MLflow database, artifacts, Optuna journal, cache.")
TrackingOpt = typer.Option(None, "--tracking-uri", envvar="MLFLOW_TRACKING_URI",
                           help="MLflow tracking URI (a server, or a database) instead of the "
                                "store's mlflow.db.")
StorageOpt = typer.Option(None, "--storage",
                          help="Optuna storage instead of the store's journal file: a database "
                               "URL (sqlite:///optuna.db, postgresql://...) or a journal file.")


def _spec_option(flag: str, what: str) -> Any:
    """A search-space flag, with the SPEC forms its hyperparameter's type takes: a range only
    for numbers (a name such as an architecture takes choices)."""
    kind = HParams.kinds()[flag.removeprefix("--").replace("-", "_")]
    forms = "LOW..HIGH, LOW..HIGH:log, A,B,C" if kind in (int, float) else "A,B,C"
    return typer.Option(None, flag, metavar="SPEC", help=f"{what}: {forms} or a fixed value.",
                        rich_help_panel="Search space")


@app.command()
@user_errors
def search(
    study: str = typer.Argument(..., help="A study name under ./studies, or a YAML file."),
    trials: int | None = typer.Option(None, "--trials", help="Finished trials wanted in total."),
    max_epochs: int | None = typer.Option(None, "--max-epochs",
                                          help="Epochs a trial trains at most."),
    patience: int | None = typer.Option(None, "--patience",
                                        help="Epochs without improvement before a trial stops."),
    seed: int | None = typer.Option(
        None, "--seed", help="Seed of the split, the sampler and each trial's initialisation."),
    image_size: int | None = typer.Option(None, "--image-size",
                                          help="Side, in pixels, the images are resized to."),
    data: Path | None = typer.Option(
        None, "--data",
        help="The data: a folder with a sub-folder per class, a CSV manifest (path,label) or a "
             ".npz, as the study's data.source says (--set data.source=csv)."),
    objective: list[str] | None = typer.Option(
        None, "--objective", metavar="METRIC[:max|min]",
        help=f"A validation metric: {', '.join(OBJECTIVE_METRICS)}. Repeat it for a Pareto "
             "search, e.g. --objective val_f1 --objective flops:min (also macs, params_count)."),
    operating_point: str | None = typer.Option(
        None, "--operating-point", metavar="argmax|youden|sens=T|spec=T",
        help="How a two-class model picks its class: the most probable (argmax), or a "
             "threshold chosen on validation: Youden's J, or a sensitivity or specificity "
             "to reach, e.g. sens=0.95."),
    folds: int | None = typer.Option(
        None, "--folds", metavar="K", min=0, max=20,
        help="Cross-validate each trial on K folds of the train and val images (small data "
             "sets): its value is the folds' mean, its model refit on all of them; 0: off."),
    skip_bad_images: bool = typer.Option(
        False, "--skip-bad-images",
        help="Leave out unreadable files and placeholders (listed in the study run) instead of "
             "stopping."),
    settings: list[str] | None = typer.Option(
        None, "--set", metavar="KEY=VALUE",
        help="Any study setting, e.g. data.split=sorted, data.classes=[health,tb], "
             "weights_dir=~/weights (values read as YAML)."),
    sampler: str | None = typer.Option(
        None, "--sampler",
        help=f"Optuna: {', '.join(SAMPLERS.names())}; Ray: {', '.join(RAY_SAMPLERS)}."),
    pruner: str | None = typer.Option(
        None, "--pruner",
        help=f"Optuna: {', '.join(PRUNERS.names())}; Ray: {', '.join(SCHEDULERS.names())} "
             "(the same epochs of comparison as Optuna's)."),
    gpus: str | None = typer.Option(None, "--gpus", help="all (every visible GPU, else the "
                                    "CPU), none (CPU), or GPU ids such as 0,1,3."),
    trials_per_gpu: int | None = typer.Option(None, "--trials-per-gpu",
                                              help="Trials sharing each GPU."),
    workers: int | None = typer.Option(None, "--workers",
                                       help="Trials in parallel on the CPU (cores divided)."),
    timeout: str | None = typer.Option(None, "--timeout", metavar="DURATION",
                                       help="Start no new trial after this long: 90m, 2h, 1h30m."),
    enqueue: list[str] | None = typer.Option(
        None, "--enqueue", metavar="NAME=VALUE,...",
        help="Run this configuration first, e.g. lr=0.001,batch_size=32,arch=resnet18 "
             "(repeatable)."),
    backend: str | None = typer.Option(None, "--backend",
                                       help=" or ".join(BACKENDS.names()) + "."),
    ray_address: str | None = typer.Option(None, "--ray-address",
                                           help="Join this Ray cluster (backend ray)."),
    compile_model: bool = typer.Option(
        False, "--compile",
        help="torch.compile each trial's model: seconds of compilation per trial, paid back "
             "with small batches and ViTs."),
    lr: str | None = _spec_option("--lr", "Learning rate"),
    momentum: str | None = _spec_option("--momentum", "SGD momentum / Adam beta1"),
    batch_size: str | None = _spec_option("--batch-size", "Batch size"),
    arch: str | None = _spec_option("--arch", "Architecture (imgcls-hpo models lists them)"),
    weight_decay: str | None = _spec_option("--weight-decay", "Weight decay"),
    dropout: str | None = _spec_option("--dropout", "Dropout before the head"),
    label_smoothing: str | None = _spec_option("--label-smoothing", "Label smoothing"),
    param: list[str] | None = typer.Option(None, "--param", metavar="NAME=SPEC",
                                           help="Any other hyperparameter (optimizer, hflip).",
                                           rich_help_panel="Search space"),
    store: Path | None = StoreOpt,
    tracking_uri: str | None = TrackingOpt,
    storage: str | None = StorageOpt,
) -> None:
    """Run (or resume) a hyperparameter search; every trial is tracked in MLflow."""
    from hpo.cli.progress import SearchProgress, summary_table
    from hpo.config.space import SpaceError
    from hpo.config.store import Store
    from hpo.config.study import StudyError, load_study, parse_assignments, parse_duration
    from hpo.config.trial import TrialState
    from hpo.search.run import pareto_front, run_search

    overrides: dict[str, Any] = {
        "trials": trials, "max_epochs": max_epochs, "patience": patience, "seed": seed,
        "objective": (objective[0] if len(objective) == 1 else objective) if objective else None,
        "operating_point": operating_point, "folds": folds,
        "sampler": sampler, "pruner": pruner, "gpus": gpus,
        "trials_per_gpu": trials_per_gpu, "workers": workers, "backend": backend,
        "ray_address": ray_address,
        "timeout": parse_duration(timeout) if timeout is not None else None,
        "enqueue": [parse_assignments(item) for item in enqueue] if enqueue else None,
        "data.image_size": image_size, "data.path": str(data) if data else None,
        "space.lr": lr, "space.momentum": momentum, "space.batch_size": batch_size,
        "space.arch": arch, "space.weight_decay": weight_decay, "space.dropout": dropout,
        "space.label_smoothing": label_smoothing,
    }
    if skip_bad_images:
        overrides["data.skip_bad_images"] = True
    if compile_model:
        overrides["compile"] = True
    for item in settings or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or key.strip().startswith("space."):
            raise StudyError(f"--set {item!r}: expected KEY=VALUE for a study setting, e.g. "
                             "data.split=sorted (search-space entries take --param)")
        overrides[key.strip()] = _yaml_value(item, value)
    for item in param or []:
        name, sep, spec_text = item.partition("=")
        if not sep or not name.strip():
            raise SpaceError(f"--param {item!r}: expected NAME=SPEC, e.g. optimizer=sgd,adamw")
        overrides[f"space.{name.strip()}"] = spec_text
    spec = load_study(study, overrides)
    where = Store.resolve(store, tracking_uri, storage)
    if spec.objectives and spec.pruner != "none":
        err_console.print(f"[yellow]note:[/] pruning is off in a Pareto search ({spec.pruner} "
                          "compares one value per epoch)", soft_wrap=True)

    try:
        with SearchProgress(console, where) as progress:
            result = run_search(spec, where, progress, progress.data_progress,
                                progress.download_progress)
    except KeyboardInterrupt:
        err_console.print("\ninterrupted: the running trial is recorded as failed "
                          "(interrupted). Run the same command again to continue the study.")
        raise typer.Exit(130) from None

    for name in result.changed_settings:
        console.print(f"[yellow]note:[/] {name} differs from the value the study run recorded "
                      "first; each trial run records the values it used.")
    console.print()
    if result.best is not None:
        console.print(summary_table(result))
    console.print(f"{len(result.trials)} trials in study {spec.name}: "
                  f"{_state_counts(result.trials)}; {progress.ran} of them ran in this search.",
                  soft_wrap=True)
    if spec.objectives:
        front = pareto_front(result.trials, spec)
        names = ", ".join(name for name, _ in spec.terms)
        console.print(f"Pareto-optimal trials ({names}): "
                      + (", ".join(f"{t.number} ({', '.join(f'{v:.4g}' for v in t.values or [])})"
                                   for t in front) or "none yet")
                      + "; tagged imgcls_hpo.pareto=true in MLflow.", soft_wrap=True)
    console.print(_ui_hint(where, store), soft_wrap=True)  # a command to copy: never wrapped
    if result.best is None and not progress.ran and result.trials.counts()[TrialState.RUNNING]:
        console.print("Nothing was left to run here: the study's other trials are running "
                      f"elsewhere; `imgcls-hpo results {spec.name}` shows them once they end.",
                      soft_wrap=True)
        return
    if result.best is None:
        err_console.print(f"error: no trial completed: {_why_none_completed(result.trials)}",
                          soft_wrap=True)
        raise typer.Exit(1)


def _state_counts(trials: Any) -> str:
    """ "3 complete, 8 pruned, 1 failed" and, where there are any, interrupted and lost."""
    from hpo.config.trial import TrialState

    counts = trials.counts()
    shown = [TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAILED]
    shown += [s for s in (TrialState.INTERRUPTED, TrialState.LOST, TrialState.RUNNING)
              if counts[s]]
    return ", ".join(f"{counts[s]} {s.label}" for s in shown)


def _why_none_completed(trials: Any) -> str:
    """Each reason the failed trials gave, most frequent first, with how many gave it; without
    a failure, how the trials ended ("3 pruned, 1 interrupted")."""
    from collections import Counter

    from hpo.config.trial import TrialState

    reasons = Counter(t.fail_reason or "no reason recorded" for t in trials
                      if t.state == TrialState.FAILED)
    if not reasons:
        return _state_counts(trials) if len(trials) else "the study holds no trial"
    return "; ".join(f"{reason} ({n} trial{'s' if n > 1 else ''})"
                     for reason, n in reasons.most_common())


def _yaml_value(item: str, text: str) -> Any:
    import yaml

    from hpo.config.study import StudyError

    try:
        return yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        raise StudyError(f"--set {item!r}: the value is not valid YAML") from None


def _ui_hint(where: Any, store_arg: Path | None) -> str:
    if not where.tracking_is_local:
        return f"Compare the trials in the MLflow UI at {mask_uri(where.tracking_uri)}"
    flag = f" --store {store_arg}" if store_arg else ""
    return (f"Compare the trials in the MLflow UI: [bold]imgcls-hpo ui{flag}[/], "
            "then open http://127.0.0.1:5000")


@app.command()
@user_errors
def init(
    data: Path | None = typer.Argument(
        None, help="Your images: a folder with a sub-folder per class (or train/ and val/ "
                   "folders of them), a CSV manifest (path,label[,split][,group]) or a .npz."),
    out: Path | None = typer.Option(None, "--out", help="The study file to write "
                                    "(default: NAME.yaml in the current folder)."),
    name: str | None = typer.Option(None, "--name", help="The study's name (default: the "
                                    "data's folder or file name)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing study file."),
    device_check: bool = typer.Option(
        False, "--device-check",
        help="Also train a few steps on each device a search would use, and say how long one "
             "takes (alone: without DATA)."),
) -> None:
    """Inspect your images and write a study for them that `search` runs as it is."""
    from hpo.config.draft import Machine, draft_study, study_name
    from hpo.config.study import StudyError, load_study
    from hpo.search.devices import check_device, describe_slots, discover_gpus, plan_slots
    from imgcls.train.runtime import available_cores

    if data is None and not device_check:
        raise StudyError("init needs your data (a folder, a .csv or a .npz), or --device-check")
    path = None
    if data is not None:
        study = name or study_name(data.expanduser())
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study):
            raise StudyError(f"--name {study!r}: a study name takes letters, digits, '-', '_' "
                             "and '.' only")
        path = out or Path(f"{study}.yaml")
        if path.suffix not in (".yaml", ".yml"):
            raise StudyError(f"--out {path}: a study file ends in .yaml")
        if path.exists() and not force:
            raise StudyError(f"{path} exists; pass --force to overwrite it, or --out another "
                             "file")
        summary = _inspect_with_progress(data)
        machine = Machine(tuple(g.name for g in discover_gpus()), available_cores())
        draft = draft_study(summary, machine)  # no split can be made: said here
    slots = plan_slots()
    console.print("Trials will train on " + "; ".join(describe_slots(slots)), soft_wrap=True)
    if device_check:
        for device in sorted({s.device if s.gpu is None else f"cuda:{s.gpu}" for s in slots}):
            console.print("  " + check_device(device), soft_wrap=True)
    if data is None or path is None:
        return
    _print_summary(summary)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
        tmp.write_text(draft.text, encoding="utf-8")
        try:
            load_study(str(tmp.resolve()), {"name": study})  # what search will read: checked first
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        tmp.replace(path)
    except OSError as exc:
        raise StudyError(f"cannot write {path}: {exc.strerror or exc}") from None
    console.print(f"Wrote {path}: {'; '.join(draft.choices)}.", soft_wrap=True)
    console.print(f"Run it:\n  imgcls-hpo search {path}", soft_wrap=True)


def _inspect_with_progress(data: Path) -> Any:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from imgcls.data.inspect import inspect_data

    with Progress("{task.description}", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err_console, transient=True) as bar:
        task = bar.add_task("reading the images", total=None)
        return inspect_data(data, progress=lambda done, total: bar.update(
            task, completed=done, total=total))


def _print_summary(summary: Any) -> None:
    from imgcls.data.sources import listing

    console.print(f"{summary.path} ({summary.source}): {summary.usable:,} usable images",
                  soft_wrap=True)
    table = Table()
    table.add_column("class")
    table.add_column("images", justify="right")
    table.add_column("share", justify="right")
    for cls, n in zip(summary.classes, summary.counts, strict=True):
        table.add_row(cls, f"{n:,}", f"{n / max(summary.usable, 1):.0%}")
    console.print(table)
    low, mid, high = summary.side_quantiles(0.0, 0.5, 1.0)
    modes = ", ".join(f"{mode} {n:,}" for mode, n in summary.modes.most_common())
    facts = [f"imbalance {summary.imbalance:.1f}:1",
             f"shorter side {low}..{high} px (median {mid})", f"modes {modes}"]
    if summary.given_splits:
        facts.append("split given: " + ", ".join(f"{k} {n:,}"
                                                 for k, n in summary.given_splits.items()))
    if summary.grouped:
        facts.append(f"{len(set(summary.catalog.groups))} groups")
    console.print("; ".join(facts), soft_wrap=True)
    if summary.bad:
        n = len(summary.bad)
        console.print(f"[yellow]{n} file{'s are' if n > 1 else ' is'} not a usable image[/] "
                      f"(left out; listed in the study file): {listing(summary.unusable)}",
                      soft_wrap=True)


@app.command()
@user_errors
def models(
    classes: int = typer.Option(1000, "--classes", help="Number of classes of the head."),
    image_size: int = typer.Option(224, "--image-size",
                                   help="Side of the input image, in pixels."),
    channels: int = typer.Option(3, "--channels", help="Input channels: 1 grey, 3 RGB."),
    as_json: bool = typer.Option(False, "--json", help="A JSON list instead of a table."),
) -> None:
    """List the architectures with their parameter count and FLOPs for one image."""
    from imgcls.errors import ConfigError
    from imgcls.models.catalog import MODELS, check_image_size
    from imgcls.profile import profile_architecture

    if classes < 2 or channels < 1 or image_size < 1:
        raise ConfigError("--classes must be at least 2, --channels and --image-size at least 1")
    rows, skipped = [], []
    for entry in MODELS:
        try:
            check_image_size(entry.name, image_size)
        except ConfigError as exc:
            skipped.append(str(exc).split(";")[0])  # the reason, without "the study uses"
            continue
        rows.append(profile_architecture(entry.name, classes, channels, image_size))
    if as_json:
        print(json.dumps([r.as_dict() for r in rows], indent=2))
        for note in skipped:
            err_console.print(f"note: {note}")
        return
    table = Table(title=f"Architectures for {classes} classes, {channels}x{image_size}x"
                        f"{image_size} input", title_justify="left")
    for column in ("architecture", "parameters", "GFLOPs", "GMACs"):
        table.add_column(column, justify="left" if column == "architecture" else "right")
    for r in rows:
        table.add_row(r.name, f"{r.params:,}", f"{r.flops / 1e9:.3f}", f"{r.macs / 1e9:.3f}")
    for note in skipped:
        table.add_row(note.split()[0], "[dim]" + note.split(" ", 1)[1] + "[/]", "", "")
    console.print(table)


@app.command()
@user_errors
def ui(
    port: int = typer.Option(5000, "--port", help="Port the UI listens on."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Interface to bind; 0.0.0.0 exposes the UI to the network."),
    store: Path | None = StoreOpt,
    tracking_uri: str | None = TrackingOpt,
) -> None:
    """Start the MLflow UI on the project's store."""
    from hpo.cli.processes import run_in_foreground
    from hpo.config.store import Store
    from imgcls.errors import ConfigError

    where = Store.resolve(store, tracking_uri)
    if not where.tracking_is_local:
        console.print(f"{mask_uri(where.tracking_uri)} is a tracking server: open it in a "
                      "browser.", soft_wrap=True)
        return
    database = where.root / "mlflow.db"
    where.check_manifest()
    if where.tracking_uri.startswith("sqlite:") and not database.exists():
        raise ConfigError(f"no MLflow store at {where.root}: run `imgcls-hpo search` first, "
                          "or pass --store")
    mlflow_cli = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    command = [mlflow_cli, "ui", "--backend-store-uri", where.tracking_uri,
               "--host", host, "--port", str(port),
               # experiments made in the UI keep their artifacts under the store too
               "--artifacts-destination", where.artifact_root.as_uri()]
    console.print(f"MLflow UI on http://{host}:{port} for {mask_uri(where.tracking_uri)} "
                  "(Ctrl-C stops it)", soft_wrap=True)
    raise typer.Exit(run_in_foreground(command))


@app.command()
@user_errors
def relocate(store: Path | None = StoreOpt) -> None:
    """Point a moved or copied store's MLflow records at the folder it is in now."""
    from hpo.config.store import Store
    from hpo.tracking.relocate import relocate as rewrite

    where = Store.resolve(store)
    moved = rewrite(where)
    if moved is None:
        console.print(f"The store {where.root} is where it was made: nothing to relocate.",
                      soft_wrap=True)
        return
    console.print(f"Relocated the store from {moved.old_root} to {moved.new_root}: "
                  f"{moved.rewritten} artifact location(s) rewritten.", soft_wrap=True)


def _open_store(store: Path | None, tracking_uri: str | None) -> tuple[Any, Any]:
    """The store a search wrote, and a tracker on it; a one-line error when there is none."""
    from hpo.config.store import Store
    from hpo.tracking.client import Tracker
    from imgcls.errors import ConfigError

    where = Store.resolve(store, tracking_uri)
    where.check_manifest()
    if where.tracking_uri.startswith("sqlite:") and not (where.root / "mlflow.db").exists():
        raise ConfigError(f"no MLflow store at {where.root}: run `imgcls-hpo search` first, "
                          "or pass --store")
    return where, Tracker(where.tracking_uri, where.artifact_root)


@app.command()
@user_errors
def results(
    study: str = typer.Argument(..., help="The study to report on (it may still be running)."),
    top: int = typer.Option(10, "--top", min=1, help="Trials in the table."),
    x: str = typer.Option("lr", "--x", help="3D plot axis: a hyperparameter or a metric."),
    y: str = typer.Option("batch_size", "--y", help="3D plot axis: a hyperparameter or a metric."),
    z: str | None = typer.Option(None, "--z", show_default="min_val_loss, else the objective",
                                 help="3D plot height: a metric or a hyperparameter."),
    color: str = typer.Option("arch", "--color",
                              help="What colours the points: a hyperparameter or a metric."),
    out: Path | None = typer.Option(None, "--out", show_default="<store>/results/<study>",
                                    help="Folder for trials.csv, the plots and the notes."),
    store: Path | None = StoreOpt,
    tracking_uri: str | None = TrackingOpt,
) -> None:
    """Tables, the 3D hyperparameter plot and Optuna's views of a study, also logged to its
    MLflow study run."""
    from hpo.after.results import write_results
    from hpo.cli.progress import format_value
    from hpo.tracking.records import load_record

    where, tracker = _open_store(store, tracking_uri)
    record = load_record(tracker, study)
    out_dir = out or where.root / "results" / study
    report = write_results(tracker, record, out_dir, top=top, x=x, y=y, z=z, color=color)
    table = report.table
    view = Table(title=f"Study {study}: best {len(table.rows)} finished trials by "
                       f"{table.objective}", title_justify="left")
    thresholds = any(row.threshold is not None for row in table.rows)  # an operating point
    for column in ("trial", "state", table.objective, *table.searched,
                   f"{table.test_metric} (95% CI)", *(["threshold"] if thresholds else []),
                   "params", "GFLOPs", "MLflow run"):
        view.add_column(column, justify="left" if column in ("state", "MLflow run") else "right",
                        no_wrap=column not in table.searched)
    for row in table.rows:
        test = "-" if row.test is None else f"{row.test:.3f}"
        if row.test_ci is not None:
            test += f" [{row.test_ci[0]:.2f}, {row.test_ci[1]:.2f}]"
        value = f"{row.value:.4f}" + (f" ± {row.value_std:.3f}" if row.value_std is not None
                                      else "")  # ± the folds' deviation
        view.add_row(str(row.number), row.state, value,
                     *(format_value(row.params.get(name, "")) for name in table.searched), test,
                     *([f"{row.threshold:.3f}" if row.threshold is not None else "-"]
                       if thresholds else []),
                     f"{row.params_count:,}" if row.params_count is not None else "-",
                     f"{row.flops / 1e9:.3g}" if row.flops is not None else "-",
                     row.run_id[:8])
    console.print(view)
    if table.selection_gap is not None:
        top = table.rows[0]
        console.print(f"Selection: trial {top.number}'s {table.objective} {top.value:.4f} looks "
                      f"{table.selection_gap:+.4f} better than its {table.test_metric} "
                      f"{top.test:.4f} (selection_gap).")
    counts = ", ".join(f"{n} {state.label}" for state, n in table.counts.items() if n)
    console.print(f"{sum(table.counts.values())} trials: {counts}.")
    for note in report.notes:
        console.print(f"[yellow]note:[/] {note}", soft_wrap=True)
    console.print(f"Written to {report.out_dir}: "
                  f"{', '.join(p.name for p in report.files)}"
                  + (" (also in the study run's results/)" if report.study_run_id else ""),
                  soft_wrap=True)


@app.command()
@user_errors
def promote(
    study: str = typer.Argument(..., help="The study whose best trial to register."),
    metric: str | None = typer.Option(None, "--metric",
                                      help="Rank by this logged metric instead of the objective "
                                           "(e.g. test_f1, val_auc)."),
    name: str | None = typer.Option(None, "--name", help="Registered model name.",
                                    show_default="<study>-classifier"),
    alias: str = typer.Option("champion", "--alias",
                              help="The alias that moves to the new version."),
    run_id: str | None = typer.Option(None, "--run-id", help="Promote this trial run instead."),
    ensemble: int | None = typer.Option(
        None, "--ensemble", min=2, metavar="K",
        help="Register the top K trials as one model averaging their calibrated "
             "probabilities, evaluated on the test split first."),
    store: Path | None = StoreOpt,
    tracking_uri: str | None = TrackingOpt,
) -> None:
    """Register a trial's model in the MLflow Model Registry and move an alias to it."""
    from hpo.after.promote import promote as promote_trial
    from hpo.tracking.records import load_record

    _, tracker = _open_store(store, tracking_uri)
    record = load_record(tracker, study)
    if ensemble is not None:
        if run_id is not None:
            from imgcls.errors import ConfigError

            raise ConfigError("an ensemble is of the top trials: give --ensemble or --run-id, "
                              "not both")
        _promote_ensemble(tracker, record, ensemble, metric, name, alias)
        return
    done = promote_trial(tracker, record, metric=metric, name=name, alias=alias, run_id=run_id)
    previous = (f"; version {done.previous_version} is now @previous"
                if done.previous_version else "")
    chosen = f"{done.metric} = {done.value:.4f}" if done.value is not None else done.metric
    action = "Registered" if done.created else "Already registered:"
    console.print(f"{action} trial {done.trial} (run {done.run_id}, {chosen}) as "
                  f"[bold]{done.name}[/] version {done.version}, alias @{alias}{previous}.",
                  soft_wrap=True)
    console.print(done.uri, soft_wrap=True)


def _promote_ensemble(tracker: Any, record: Any, k: int, metric: str | None, name: str | None,
                      alias: str) -> None:
    from hpo.after.ensemble import COMPARED, promote_ensemble
    from hpo.cli.progress import with_interval

    done = promote_ensemble(tracker, record, k, metric=metric, name=name, alias=alias)
    table = Table(title=f"Test split: the ensemble of trials "
                        f"{', '.join(map(str, done.members))} against trial {done.members[0]} "
                        f"alone", title_justify="left")
    for column in ("metric", "ensemble (95% CI)", f"trial {done.members[0]} (95% CI)"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for key in (k for k in COMPARED if k in done.metrics):
        table.add_row(key, *(with_interval(scores, key, ci_digits=4)
                                  for scores in (done.metrics, done.best)))
    console.print(table)
    previous = (f"; version {done.previous_version} is now @previous"
                if done.previous_version else "")
    console.print(f"Registered the ensemble of {len(done.members)} trials (ranked by "
                  f"{done.metric}; run {done.run_id}) as [bold]{done.name}[/] version "
                  f"{done.version}, alias @{done.alias}{previous}.", soft_wrap=True)
    console.print(done.uri, soft_wrap=True)



_ModelArg = typer.Argument(..., metavar="MODEL",
                           help="models:/NAME@ALIAS, models:/NAME/VERSION, runs:/ID/model, "
                                "runs:/ID/classifier, or a study name (its "
                                "<study>-classifier@champion).")
_PathsArg = typer.Argument(..., help="Image files or folders (searched recursively).")


@app.command()
@user_errors
def predict(
    model: str = _ModelArg,
    paths: list[Path] = _PathsArg,
    threshold: float | None = typer.Option(
        None, "--threshold", min=0, max=1,
        help="Below this top probability an image is 'unknown'."),
    out: Path | None = typer.Option(None, "--out", help="Write the predictions to this CSV."),
    batch_size: int = typer.Option(32, "--batch-size", min=1,
                                   help="Images classified at a time."),
    mc_dropout: int = typer.Option(
        1, "--mc-dropout", min=1, metavar="N",
        help="Average N forward passes with dropout sampling (a model trained with dropout)."),
    tta: bool = typer.Option(False, "--tta",
                             help="Also average the flips the model trained with."),
    max_entropy: float | None = typer.Option(
        None, "--max-entropy", min=0,
        help="Above this predictive entropy (nats; at most ln K) an image is 'unknown'."),
    seed: int = typer.Option(0, "--seed", help="Seed of the MC-dropout masks."),
    store: Path | None = StoreOpt,
    tracking_uri: str | None = TrackingOpt,
) -> None:
    """Classify images with a registered (or any logged) model."""
    from rich.progress import Progress

    from hpo.after.models import resolve_model
    from imgcls.predict import image_files, summary, write_csv
    from imgcls.uncertainty import Sampling

    sampling = Sampling(mc_dropout, tta, seed)

    _, tracker = _open_store(store, tracking_uri)
    uri, predictor = resolve_model(tracker, model)
    files = image_files(paths)
    with Progress(console=err_console, transient=True) as bar:
        task = bar.add_task(f"classifying {len(files):,} images", total=len(files))
        predictions = predictor.predict_files(
            files, batch_size=batch_size, threshold=threshold,
            progress=lambda done, total: bar.update(task, completed=done),
            sampling=sampling if sampling.stochastic else None, max_entropy=max_entropy)
    if out is not None:
        write_csv(predictions, out, predictor.classes)
    else:
        table = Table(title=f"{uri}", title_justify="left")
        uncertain = any(p.entropy is not None for p in predictions)
        for column in ("file", "prediction", "probability", *(("entropy", "rank") * uncertain)):
            table.add_column(column, justify="left" if column in ("file", "prediction")
                             else "right")
        for p in predictions:
            cells = [f"{p.entropy:.4f}", str(p.entropy_rank)] if p.entropy is not None else []
            table.add_row(p.file, p.prediction or f"[red]unreadable: {p.error}[/]",
                          f"{p.probability:.4f}" if p.probability is not None else "",
                          *(cells or [""] * (2 * uncertain)))
        console.print(table)
    counts = summary(predictions)
    per_class = ", ".join(f"{c}: {n}" for c, n in counts["classes"].items() if n)
    console.print(f"{counts['images']} images with {uri}: {per_class}"
                  + (f", {counts['unknown']} unknown"
                     if threshold is not None or max_entropy is not None else "")
                  + (f", {counts['unreadable']} unreadable" if counts["unreadable"] else "")
                  + _entropy_note(counts.get("entropy"))
                  + (f"; written to {out}" if out is not None else ""), soft_wrap=True)


def _entropy_note(entropy: dict[str, float] | None) -> str:
    """The predictive entropy's mean and maximum against its bound, for the summary line."""
    if entropy is None:
        return ""
    return (f"; entropy mean {entropy['mean']:.3f}, max {entropy['max']:.3f} nats "
            f"(of at most {entropy['bound']:.3f})")


@app.command()
@user_errors
def explain(
    model: str = _ModelArg,
    paths: list[Path] = _PathsArg,
    out: Path = typer.Option(..., "--out", help="Folder for the overlays and plots."),
    embed: bool = typer.Option(False, "--embed",
                               help="Also a t-SNE plot of the penultimate-layer features."),
    mc_dropout: int = typer.Option(
        1, "--mc-dropout", min=1, metavar="N",
        help="Caption each overlay with the mean of N passes with dropout sampling, and the "
             "image's predictive entropy and rank."),
    tta: bool = typer.Option(False, "--tta",
                             help="Also average the flips the model trained with (as above)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the MC-dropout masks."),
    store: Path | None = StoreOpt,
    tracking_uri: str | None = TrackingOpt,
) -> None:
    """Grad-CAM overlays of what the model looked at, per image, captioned with the class and
    its probability (and a t-SNE of the images)."""
    from hpo.after.models import resolve_model
    from imgcls.explain import explain_files
    from imgcls.uncertainty import Sampling

    sampling = Sampling(mc_dropout, tta, seed)
    _, tracker = _open_store(store, tracking_uri)
    uri, predictor = resolve_model(tracker, model)
    report = explain_files(predictor, paths, out, embed=embed,
                           sampling=sampling if sampling.stochastic else None)
    for note in report.unreadable:
        err_console.print(f"[yellow]unreadable, left out:[/] {note}", soft_wrap=True)
    overlays = len(report.written) - embed
    console.print(f"{overlays} Grad-CAM overlays{' and tsne.png' if embed else ''} of {uri} "
                  f"written to {out}", soft_wrap=True)


@app.command()
@user_errors
def samples(
    study: str = typer.Argument(..., help="A study under studies/, or a path to a study YAML."),
    out: Path = typer.Option(Path("samples"), "--out", help="Folder to write the images into."),
    count: int = typer.Option(8, "--count", min=1, help="How many images, the classes in turn."),
    data: str | None = typer.Option(None, "--data",
                                    help="The image folder, CSV manifest or .npz file."),
    folders: bool = typer.Option(False, "--by-class",
                                 help="One sub-folder per class (the layout `init` and the "
                                      "folder source read) instead of <class>_<id>.png."),
    store: Path | None = StoreOpt,
) -> None:
    """Write a few held-out test images of a study as PNG files, as the model sees them (its
    image size and channels): something to try predict, explain and serving on."""
    from PIL import Image

    from hpo.config.store import Store
    from hpo.config.study import load_study
    from imgcls.data.prepare import prepare_data

    spec = load_study(study, {"data.path": data})
    prepared = prepare_data(spec.data, spec.seed, Store.resolve(store).cache_dir)
    split = "test" if len(prepared.split.indices("test")) else "val"
    held_out = prepared.split.indices(split)
    labels = prepared.labels[held_out].numpy()
    by_class = [list(held_out[labels == k]) for k in range(prepared.num_classes)]
    chosen = [i for row in itertools.zip_longest(*by_class) for i in row if i is not None][:count]
    for index in chosen:
        pixels = prepared.images[index].numpy()
        image = pixels[0] if pixels.shape[0] == 1 else pixels.transpose(1, 2, 0)
        name = Path(prepared.catalog.ids[index]).stem
        label = prepared.classes[int(prepared.labels[index])]
        path = out / label / f"{name}.png" if folders else out / f"{label}_{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    layout = "in a folder per class" if folders else "named <class>_<id>.png"
    console.print(f"{len(chosen)} {split} images of study {spec.name} written to {out}/, "
                  f"{layout}", soft_wrap=True)


def main() -> None:
    # Piped into a log, rich would assume 80 columns and squeeze the trials table.
    for c in (console, err_console):
        if not c.is_terminal and "COLUMNS" not in os.environ:
            c.width = 160
    app()


if __name__ == "__main__":
    main()
