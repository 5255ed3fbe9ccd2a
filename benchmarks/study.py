"""Orchestration and MLflow tracking overhead of one search.

What runs: one N-trial study (studies/digits.yaml; Optuna, the random sampler with the study's
seed, pruner none) whose trials all train the same network for their full budget: resnet18 at
batch size 64 for --max-epochs epochs, early stopping off (patience = max_epochs), about 20-25 s
of training per trial on 2 idle cores. Only the continuous hyperparameters (lr, momentum,
weight decay, dropout, label smoothing) are sampled; they do not change the cost of an epoch.

It runs twice, each in a fresh temporary store: (i) tracked, `hpo.search.run.run_search` as
`imgcls-hpo search` runs it; (ii) untracked, the same spec with MLflow tracking switched off
(benchmarks/searches.py: `search_untracked`). Both draw the same trials. Before either, untimed:
the decoded-image cache of both stores is filled, a 1-epoch trial warms torch up (the first
epoch in a process pays ~10 s of one-off set-up), and the tracked store's MLflow database is
created (timed apart: a new store's first search pays it once, 3-4 s of schema migrations), so
that the runs differ only in tracking, as a search in a store that exists does. The last line
counts the database's creation in too.

Wall time: the whole study call (`run_search`, or its untracked counterpart), data preparation
included. Training time: the seconds each trial spends in `Trainer.step()`, its epochs (the
`train_seconds` each trial reports, and logs in MLflow when tracked). Both runs checkpoint as the
study says (checkpoint_every: auto unless --checkpoint-every); the seconds spent writing
checkpoints, timed here, are printed per trial.

    orchestration overhead = (wall untracked - training untracked) / wall untracked
    tracking overhead      = (wall tracked - wall untracked) / wall tracked
    total overhead         = (wall tracked - training tracked) / wall tracked,  target <= 0.05
                             for trials of >= 20 s (the median trial's training is printed)

Run from the repo root: python benchmarks/study.py [--trials 4] [--max-epochs 12]
[--checkpoint-every auto]; about 5-6 min at the defaults on 2 cores (2-3 s per resnet18 epoch on
32 px digits).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import Target, header, median, report
from searches import EpochCounter, search_untracked, study_spec

from hpo.config.space import Scalar
from hpo.config.store import Store
from hpo.config.study import StudySpec
from hpo.config.trial import TrialOutcome
from hpo.search.checkpoints import Checkpoints
from hpo.search.context import StudyContext
from hpo.search.run import run_search
from hpo.search.trial import run_trial
from hpo.tracking.client import Tracker
from imgcls.data import prepare_data

TARGET_OVERHEAD = 0.05  # share of a tracked search's wall time not spent training
MIN_TRIAL_S = 20.0  # seconds of training per trial that the target assumes


class Timeline(EpochCounter):
    """When each trial started and finished (time.perf_counter() seconds) and the seconds it
    trained, from the search's own events."""

    def __init__(self) -> None:
        super().__init__()
        self.started: dict[int, float] = {}
        self.finished: dict[int, float] = {}
        self.trained: dict[int, float] = {}

    def trial_started(self, number: int, params: Mapping[str, Scalar]) -> None:
        self.started[number] = time.perf_counter()

    def trial_finished(self, outcome: TrialOutcome) -> None:
        self.finished[outcome.number] = time.perf_counter()
        self.trained[outcome.number] = outcome.metrics.get("train_seconds", 0.0)


@contextmanager
def checkpoint_seconds() -> Iterator[dict[int, float]]:
    """Seconds spent writing each trial's checkpoints in this process, by trial number (trials
    train in this process: one slot, workers=1)."""
    seconds: dict[int, float] = {}
    original = Checkpoints.save

    def timed(self: Checkpoints, number: int, state: Mapping[str, Any]) -> None:
        start = time.perf_counter()
        try:
            original(self, number, state)
        finally:
            seconds[number] = seconds.get(number, 0.0) + time.perf_counter() - start

    Checkpoints.save = timed  # type: ignore[method-assign]
    try:
        yield seconds
    finally:
        Checkpoints.save = original  # type: ignore[method-assign]


@dataclass
class Run:
    """One timed search."""

    label: str
    wall: float  # seconds of the whole study call
    trials: list[TrialOutcome]
    train: list[float]  # seconds in Trainer.step(), per trial, in trial order
    start: float  # perf_counter() when the call began
    end: float
    timeline: Timeline
    checkpoints: list[float]  # seconds writing checkpoints, per trial
    logged: list[float] = field(default_factory=list)  # tracked: train_seconds in MLflow

    def phases(self) -> dict[str, float]:
        """The wall time cut at the trials' start and finish events."""
        first = min(self.timeline.started.values(), default=self.end)
        last = max(self.timeline.finished.values(), default=self.end)
        in_trials = sum(t.seconds for t in self.trials)
        between = (last - first) - in_trials
        return {"before the first trial (set-up)": first - self.start,
                "in run_trial (sum)": in_trials,
                "between trials (ask, tell, records)": between,
                "after the last trial (summary)": self.end - last,
                "wall": self.wall,
                "training, Trainer.step() (sum)": sum(self.train),
                "writing checkpoints (sum)": sum(self.checkpoints)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="digits", help="a study under studies/ (digits)")
    parser.add_argument("--trials", type=int, default=4, help="trials per search (4)")
    parser.add_argument("--max-epochs", type=int, default=12,
                        help="epochs per trial (12: 20-25 s of resnet18 on 2 cores)")
    parser.add_argument("--arch", default="resnet18", help="the architecture of every trial")
    parser.add_argument("--batch-size", type=int, default=64, help="every trial's batch size")
    parser.add_argument("--sampler", default="random", choices=("random", "tpe"))
    parser.add_argument("--seed", type=int, default=0, help="the study's seed (split, sampler)")
    parser.add_argument("--checkpoint-every", default="auto",
                        help="the study's checkpoint_every: N epochs, 0, or auto (auto)")
    return parser.parse_args(argv)


def make_spec(args: argparse.Namespace) -> StudySpec:
    return study_spec(args.study, {
        "trials": args.trials, "max_epochs": args.max_epochs,
        "patience": args.max_epochs,  # never stops early: each trial trains its full budget
        "seed": args.seed, "sampler": args.sampler, "pruner": "none", "backend": "optuna",
        "workers": 1, "space.arch": args.arch, "space.batch_size": str(args.batch_size),
        "checkpoint_every": args.checkpoint_every,
    })


def warm_up(spec: StudySpec, stores: list[Store], tracked: Store) -> float:
    """Fill each store's image cache, and train one epoch so that torch's one-off set-up (about
    10 s at the first epoch of a process) falls in neither timed run; create the `tracked`
    store's MLflow database. The seconds that creation took."""
    for store in stores:
        data = prepare_data(spec.data, spec.seed, store.cache_dir)
    one_epoch = spec.model_copy(update={"max_epochs": 1, "patience": 1})
    ctx = StudyContext(one_epoch, data, torch.device("cpu"))
    run_trial(ctx, 0, {})  # the space's fixed values (arch, batch size), defaults for the rest
    start = time.perf_counter()
    Tracker(tracked.tracking_uri).client.search_experiments()  # migrates the new database
    return time.perf_counter() - start


def timed(label: str, search: Callable[[Timeline], list[TrialOutcome]]) -> Run:
    timeline = Timeline()
    with checkpoint_seconds() as written:
        start = time.perf_counter()
        trials = search(timeline)
        end = time.perf_counter()
    return Run(label, end - start, trials, [timeline.trained.get(t.number, 0.0) for t in trials],
               start, end, timeline, [written.get(t.number, 0.0) for t in trials])


def tracked(spec: StudySpec, store: Store) -> Run:
    run = timed("tracked", lambda timeline: run_search(spec, store, timeline).trials)
    client = Tracker(store.tracking_uri).client
    run.logged = [client.get_run(t.run_id).data.metrics.get("train_seconds", 0.0) if t.run_id
                  else 0.0 for t in run.trials]
    return run


def untracked(spec: StudySpec, store: Store) -> Run:
    return timed("untracked", lambda timeline: search_untracked(spec, store, timeline))


def print_trials(runs: list[Run]) -> None:
    print("   per trial, seconds: run_trial = the trial's whole call, train = its epochs "
          "(Trainer.step), ckpt = writing its checkpoints, other = the rest")
    print(f"   {'trial':>5}  {'state':<8}" + "".join(
        f"  {r.label + ': run_trial':>20} {'train':>7} {'ckpt':>6} {'other':>6}" for r in runs))
    for i in range(max(len(r.trials) for r in runs)):
        line = ""
        state = ""
        for r in runs:
            if i < len(r.trials):
                t, train, ckpt = r.trials[i], r.train[i], r.checkpoints[i]
                state = state or t.state
                line += (f"  {t.seconds:>20.2f} {train:>7.2f} {ckpt:>6.2f} "
                         f"{t.seconds - train - ckpt:>6.2f}")
            else:
                line += f"  {'':>20} {'':>7} {'':>6} {'':>6}"
        print(f"   {i:>5}  {state:<8}{line}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header("study: orchestration and MLflow tracking overhead of one search")
    spec = make_spec(args)
    print(f"   study {spec.name}: {spec.trials} trials, optuna, {spec.sampler} sampler (seed "
          f"{spec.seed}), pruner none; every trial {args.arch}, batch size {args.batch_size}, "
          f"{spec.max_epochs} epochs, early stopping off")
    print("   image cache warm and torch warmed up (1 epoch) before both runs; each run in a "
          "fresh store, the tracked one's MLflow database created before it")
    print(f"   training seconds: each trial's epochs (Trainer.step); checkpoint_every: "
          f"{spec.checkpoint_every}")

    with tempfile.TemporaryDirectory(prefix="bench-study-") as tmp:
        stores = [Store.resolve(Path(tmp) / label) for label in ("tracked", "untracked")]
        database = warm_up(spec, stores, stores[0])
        runs = [tracked(spec, stores[0]), untracked(spec, stores[1])]
    on, off = runs

    print()
    print_trials(runs)
    drift = max((abs(a - b) for a, b in zip(on.train, on.logged, strict=False)), default=0.0)
    print(f"   (tracked: the train_seconds in MLflow and those the trials reported differ by at "
          f"most {drift:.3f} s)")
    print()
    print(f"   {'where the wall time goes, s':<40} {'tracked':>9} {'untracked':>9}")
    for (name, a), b in zip(on.phases().items(), off.phases().values(), strict=True):
        print(f"   {name:<40} {a:>9.2f} {b:>9.2f}")
    states = ", ".join(f"{r.label}: " + " ".join(t.state for t in r.trials) for r in runs)
    print(f"   trial states: {states}")
    short = median(on.train) < MIN_TRIAL_S
    print(f"   median trial training: {median(on.train):.1f} s tracked, "
          f"{median(off.train):.1f} s untracked (the target is for trials of >= "
          f"{MIN_TRIAL_S:g} s" + ("; these are shorter: raise --max-epochs)" if short else ")"))

    orchestration = (off.wall - sum(off.train)) / off.wall
    tracking = (on.wall - off.wall) / on.wall
    total = (on.wall - sum(on.train)) / on.wall
    set_up = on.phases()["before the first trial (set-up)"]
    per_trial = (on.wall - set_up - sum(on.train)) / (on.wall - set_up)
    print(f"   orchestration overhead (untracked)           {orchestration:>9.3f}")
    print(f"   tracking overhead                            {tracking:>9.3f}")
    print(f"   total overhead without the study's set-up    {per_trial:>9.3f}")
    report([Target("total overhead (tracked, not training)", total, TARGET_OVERHEAD,
                   at_least=False)])
    new_store = (on.wall + database - sum(on.train)) / (on.wall + database)
    print(f"   a new store's first search also creates its MLflow database: {database:.2f} s "
          f"once; total overhead counting it {new_store:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
