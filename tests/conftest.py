"""Fixtures: tiny images made on the spot, a temporary store, a tiny study. CPU only."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hpo.config.store import Store
from hpo.search.events import NullObserver

PATTERNS = ("rows", "columns", "diagonals")


def stripes(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A striped 8-bit image with noise: classes a small CNN tells apart in an epoch or two."""
    yy, xx = np.mgrid[0:size, 0:size]
    pattern = {"rows": yy // 2, "columns": xx // 2, "diagonals": (xx + yy) // 2}[kind] % 2
    return (pattern * 190 + rng.integers(0, 60, (size, size))).astype(np.uint8)


def make_image_folder(root: Path, classes: tuple[str, ...] = ("ants", "bees"),
                      per_class: int = 10, size: int = 16) -> Path:
    rng = np.random.default_rng(0)
    for k, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True)
        for i in range(per_class):
            gray = stripes(PATTERNS[k % len(PATTERNS)], size, rng)
            Image.fromarray(np.stack([gray] * 3, axis=-1)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(autouse=True)
def _isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test runs in its own folder, on CPU, offline, with no store or tracking URI
    inherited."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "IMGCLS_HPO_STORE"):
        # set, then delete: teardown restores the variable as it was before the test, even
        # when the test's code set it (mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI)
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    # No test reaches the internet for pretrained weights: a missing file is the offline
    # one-line error; the download tests serve the file from 127.0.0.1 themselves.
    monkeypatch.setenv("IMGCLS_HPO_OFFLINE", "1")
    monkeypatch.delenv("IMGCLS_HPO_WEIGHTS_URL", raising=False)
    torch.set_num_threads(1)  # tiny models: threads cost more than they give


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data")


@pytest.fixture(scope="session")
def _empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow database with its tables made, once: creating one takes seconds."""
    from mlflow import MlflowClient

    from hpo.tracking.client import quiet_mlflow

    quiet_mlflow()
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def store(tmp_path: Path, _empty_mlflow_db: Path) -> Store:
    root = tmp_path / "store"
    root.mkdir()
    shutil.copy(_empty_mlflow_db, root / "mlflow.db")
    return Store.resolve(root)


TINY_STUDY = """\
description: striped squares, for tests
data:
  source: folder
  path: {data}
  image_size: 16
  channels: 3
  val_fraction: 0.25
  test_fraction: 0.25
objective: val_f1
trials: {trials}
max_epochs: 2
patience: null
seed: 0
sampler: random
pruner: none
checkpoint_every: 1  # every epoch: what the resume tests count on
space:
  lr: 0.01..0.1:log
  momentum: 0.9
  batch_size: 4,8
  arch: simplecnn
  dropout: 0.0..0.3
  hflip: 0.5
"""


@pytest.fixture
def study_file(tmp_path: Path, image_folder: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_STUDY.format(data=image_folder, trials=2))
    return path


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[None]:
    """One local Ray runtime per test module (starting one takes seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    yield
    ray.shutdown()


class InterruptAt(NullObserver):
    """An observer that presses Ctrl-C in trial `trial`'s first epoch."""

    def __init__(self, trial: int) -> None:
        self.trial = trial

    def epoch_finished(self, number: int, epoch: int, metrics: Mapping[str, float]) -> None:
        if number == self.trial:
            raise KeyboardInterrupt
