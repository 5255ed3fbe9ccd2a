"""Cross-validated selection against one validation split: the chosen trial's test score, with
and without `--folds K`, over several seeds.

What runs: `imgcls-hpo init DATA` writes the study a new user would get (on this machine: the
small CNN and a ResNet-18 from scratch at 64 px), then per seed (--seeds: 0, 1, 2; the seed
fixes the split, so both runs of a seed share their test images) `imgcls-hpo search` with
`--folds 0` and with `--folds K`, each into a store of its own, with MLflow tracking as a user
has it. Read back from each study's MLflow run: the best trial (what `promote` picks), its
validation score (the folds' mean and deviation with folds), its test score with its bootstrap
interval, and the search's wall time.

    test difference = mean over seeds of (test score with folds - test score without)
    time ratio      = total seconds with folds / total seconds without (about K + 1 expected)

No target: the question is whether the folds' steadier choice shows on the test split, and the
intervals printed beside each score say how much a test split of this size can tell.

Run from the repo root: python benchmarks/folds.py [--data ../shared/datasets/hymenoptera]
[--seeds 3] [--folds 5] [--trials 6] [--max-epochs 10]. Cost on 2 cores with the defaults:
about 15 minutes (a seed: under a minute without folds, 3 to 5 with).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header

from hpo.config.study import load_study
from hpo.config.trial import test_counterpart
from hpo.tracking.client import Tracker

CLI = str(Path(sys.executable).with_name("imgcls-hpo"))


@dataclass
class Chosen:
    seed: int
    folds: int
    seconds: float
    trial: str
    arch: str
    val: float
    val_std: float | None
    test: float
    low: float
    high: float


def cli(*args: str, cwd: Path | None = None) -> None:
    """`imgcls-hpo ARGS...`; its last lines, and the benchmark stops, if it fails."""
    done = subprocess.run([CLI, *args], capture_output=True, text=True, cwd=cwd)
    if done.returncode:
        sys.exit(f"imgcls-hpo {' '.join(args)} exited {done.returncode}:\n"
                 + "\n".join((done.stdout + done.stderr).splitlines()[-5:]))


def search(study: Path, store: Path, seed: int, folds: int, args: argparse.Namespace) -> Chosen:
    started = time.perf_counter()
    cli("search", str(study), "--seed", str(seed), "--folds", str(folds), "--trials",
        str(args.trials), "--max-epochs", str(args.max_epochs), "--store", str(store))
    seconds = time.perf_counter() - started
    spec = load_study(str(study))
    objective, test = spec.objective, test_counterpart(spec.objective)
    tracker = Tracker(f"sqlite:///{store}/mlflow.db")
    (study_run,) = tracker.client.search_runs(
        [tracker.experiment(spec.name)], filter_string="tags.imgcls_hpo.role = 'study'")
    best = tracker.client.get_run(study_run.data.tags["imgcls_hpo.best_run_id"])
    m = best.data.metrics
    return Chosen(seed, folds, seconds, study_run.data.tags["imgcls_hpo.best_trial"],
                  best.data.params["arch"], m[f"best_{objective}"],
                  m.get(f"best_{objective}_std"), m[test], m[f"{test}_ci_low"],
                  m[f"{test}_ci_high"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[2] / "shared/datasets/hymenoptera")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--max-epochs", type=int, default=10)
    args = parser.parse_args()
    header(f"folds: the chosen trial's test score with --folds {args.folds} and without")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        study = root / "bench.yaml"
        cli("init", str(args.data), "--out", str(study), cwd=root)
        spec = load_study(str(study))
        print(f"   data: {args.data} · study written by init · objective {spec.objective} · "
              f"{args.trials} trials of up to {args.max_epochs} epochs per search")
        rows = [search(study, root / f"s{seed}-f{folds}", seed, folds, args)
                for seed in range(args.seeds) for folds in (0, args.folds)]
    test = test_counterpart(spec.objective)
    print(f"   seed  folds  trial  arch        {spec.objective} (chosen on)     "
          f"{test} [95% CI]         seconds")
    for r in rows:
        val = f"{r.val:.3f}" + (f" ± {r.val_std:.3f}" if r.val_std is not None else "        ")
        print(f"   {r.seed:>4}  {r.folds:>5}  {r.trial:>5}  {r.arch:<10}  {val:<22} "
              f"{r.test:.3f} [{r.low:.3f}, {r.high:.3f}]  {r.seconds:>7.0f}")
    plain = [r for r in rows if r.folds == 0]
    folded = [r for r in rows if r.folds]
    difference = statistics.mean(f.test - p.test for f, p in zip(folded, plain, strict=True))
    gaps = {name: statistics.mean(r.val - r.test for r in group)
            for name, group in (("without", plain), ("with", folded))}
    print(f"   mean {test}: {statistics.mean(r.test for r in plain):.3f} without folds, "
          f"{statistics.mean(r.test for r in folded):.3f} with; test difference "
          f"{difference:+.3f}")
    print(f"   mean selection gap (chosen-on score - {test}): {gaps['without']:+.3f} without, "
          f"{gaps['with']:+.3f} with")
    print(f"   time ratio {sum(r.seconds for r in folded) / sum(r.seconds for r in plain):.2f}")


if __name__ == "__main__":
    main()
