"""Pruned vs unpruned search: epochs saved, and whether the best trial is as good.

What runs: the digits study as studies/digits.yaml defines it (search space, sampler, max_epochs,
patience 3 early stopping in every run), once per seed (--seeds: 0, 1, 2; the seed fixes the
split, the sampler's draws and each trial's initialisation) with the study's pruner (--pruner,
default the study's: median; several names, comma-separated, each compared with the same
unpruned run), and once with `pruner: none`. MLflow tracking is off: it does not change which
epochs run or what they score, and it saves time. Each run is in a fresh Optuna journal; the
decoded-image cache is shared.

Measured per run: epochs trained in total (counted at every epoch's end, failed trials included)
and the best objective value of the COMPLETE trials (what `promote` picks from).

    epochs ratio = sum over seeds of pruned epochs / sum of unpruned epochs, target <= 0.40
    best ratio   = mean over seeds of pruned best / mean of unpruned best, target >= 1 - s/m
                   where m, s = mean and sample standard deviation of the unpruned best over the
                   seeds: met when mean(pruned best) >= mean(unpruned best) - s, i.e. pruning
                   costs less than the seed-to-seed noise. (For an objective to minimize the
                   ratio is the same and the target <= 1 + s/m.)

Run from the repo root: python benchmarks/pruning.py [--seeds 3] [--trials 12] [--pruner median]
[--param NAME=SPEC]. Cost on 2 cores: a seed's unpruned search is 1.5 min when TPE draws mostly
simplecnn (seed 0) and 5-8 min when it draws mostly resnet18 (seeds 1, 2), so the defaults take
15-25 min. `--param arch=simplecnn` (about 1 s per epoch) brings 3 seeds to 6-8 min.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Target, header, report
from searches import EpochCounter, best_value, search_untracked, study_spec

from hpo.config.store import Store
from hpo.config.study import StudySpec
from hpo.search.backends.optuna.pruners import PRUNERS
from imgcls.errors import ConfigError

TARGET_EPOCHS = 0.40  # pruned epochs / unpruned epochs


@dataclass
class Run:
    seed: int
    pruner: str
    epochs: int  # trained in total, every trial
    best: float | None  # best COMPLETE trial's objective value
    pruned: int  # trials the pruner stopped
    failed: int
    seconds: float  # wall time of the search


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", default="digits", help="a study under studies/ (digits)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per comparison (3)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds run from here (0)")
    parser.add_argument("--trials", type=int, default=None,
                        help="trials per search (default: the study's, 12 for digits)")
    parser.add_argument("--pruner", default=None,
                        help=f"pruner(s) to compare with none, comma-separated: "
                             f"{', '.join(n for n in PRUNERS.names() if n != 'none')} "
                             "(default: the study's)")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=SPEC",
                        help="override one search-space entry, as `imgcls-hpo search --param` "
                             "does (repeatable), e.g. arch=simplecnn for a shorter run")
    args = parser.parse_args(argv)
    for item in args.param:
        if "=" not in item:
            parser.error(f"--param {item!r}: expected NAME=SPEC, e.g. arch=simplecnn")
    for name in (args.pruner or "").split(","):
        try:
            if name.strip():
                PRUNERS.entry(name.strip())  # an unknown name fails now, listing the known ones
        except ConfigError as exc:
            parser.error(str(exc))
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def search(spec: StudySpec, root: Path, pruner: str) -> Run:
    """One untracked search with `pruner`, in its own Optuna journal under `root`."""
    label = f"seed{spec.seed}-{pruner}"
    store = Store.resolve(root, storage=str(root / f"{label}.journal"))
    counter = EpochCounter()
    start = time.perf_counter()
    trials = search_untracked(spec.model_copy(update={"pruner": pruner}), store, counter)
    seconds = time.perf_counter() - start
    return Run(spec.seed, pruner, counter.total, best_value(trials, spec),
               sum(t.state == "PRUNED" for t in trials), sum(t.state == "FAIL" for t in trials),
               seconds)


def fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "none"


def compare(pruner: str, runs: list[Run], baseline: list[Run], spec: StudySpec) -> list[Target]:
    """The totals of `pruner`'s runs against the unpruned ones, seed by seed."""
    epochs = sum(r.epochs for r in runs) / max(1, sum(r.epochs for r in baseline))
    targets = [Target(f"{pruner}: epochs pruned / unpruned", epochs, TARGET_EPOCHS,
                      at_least=False)]
    pairs = [(r.best, b.best) for r, b in zip(runs, baseline, strict=True)
             if r.best is not None and b.best is not None]
    if not pairs:
        print(f"   {pruner}: no seed has a COMPLETE trial in both runs: no best to compare")
        return targets
    pruned_best = [p for p, _ in pairs]
    unpruned_best = [u for _, u in pairs]
    mean_pruned, mean_unpruned = statistics.mean(pruned_best), statistics.mean(unpruned_best)
    noise = statistics.stdev(unpruned_best) if len(unpruned_best) > 1 else 0.0
    gap = statistics.mean(p - u for p, u in pairs)
    print(f"   {pruner}: mean(pruned best - unpruned best) = {gap:+.4f} over {len(pairs)} "
          f"seed(s); std of the unpruned best = {noise:.4f}"
          + ("" if len(pairs) > 1 else " (one seed: no spread, the bound is 1)"))
    maximize = spec.direction == "max"
    bound = 1 - noise / mean_unpruned if maximize else 1 + noise / mean_unpruned
    targets.append(Target(f"{pruner}: best, mean pruned / mean unpruned",
                          mean_pruned / mean_unpruned, bound, at_least=maximize))
    return targets


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header("pruning: pruned vs unpruned search, epochs trained and best value")
    overrides: dict[str, object] = {"trials": args.trials, "backend": "optuna", "workers": 1}
    for item in args.param:  # as `imgcls-hpo search --param NAME=SPEC`
        name, _, value = item.partition("=")
        overrides[f"space.{name.strip()}"] = value.strip()
    base = study_spec(args.study, overrides)
    # "none" is the baseline every pruner is compared with, not a candidate
    pruners = [p.strip() for p in (args.pruner or base.pruner).split(",")
               if p.strip() not in ("", "none")]
    if not pruners:
        print("   nothing to compare: give --pruner a pruner other than none")
        return 0
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print(f"   study {base.name}: {base.trials} trials, {base.sampler} sampler, max_epochs "
          f"{base.max_epochs}, patience {base.patience}, objective {base.objective}; seeds "
          f"{', '.join(map(str, seeds))}; pruners {', '.join(pruners)} vs none; tracking off")
    if args.param:
        print(f"   search space changed: {', '.join(args.param)}")
    columns = ["none", *pruners]
    print(f"   {'seed':>4}" + "".join(f"  {name + ': epochs':>16} {'best':>7} {'pruned':>6} "
                                      f"{'s':>5}" for name in columns))

    runs: dict[str, list[Run]] = {name: [] for name in columns}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        for seed in seeds:
            spec = base.model_copy(update={"seed": seed})
            line = f"   {seed:>4}"
            for name in columns:
                run = search(spec, Path(tmp), name)
                runs[name].append(run)
                fails = f" ({run.failed} failed)" if run.failed else ""
                line += (f"  {run.epochs:>16} {fmt(run.best):>7} {run.pruned:>6} "
                         f"{run.seconds:>5.0f}{fails}")
            print(line, flush=True)
    print(f"   total: {sum(r.epochs for r in runs['none'])} epochs unpruned; "
          + ", ".join(f"{name} {sum(r.epochs for r in runs[name])}" for name in pruners)
          + f"; {time.perf_counter() - started:.0f} s in all")

    targets: list[Target] = []
    for name in pruners:
        targets += compare(name, runs[name], runs["none"], base)
    report(targets)
    return 0


if __name__ == "__main__":
    sys.exit(main())
