"""What every trial of a study shares, prepared once per search (or per worker process)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from hpo.config.study import StudySpec
from hpo.search.artifacts import ArtifactWriter, Inline
from hpo.search.checkpoints import Checkpoints, WriteSpeed
from hpo.tracking.client import Tracker
from imgcls.data.prepare import PreparedData
from imgcls.data.split import Split, fold_splits
from imgcls.train.accel import Acceleration, fits_on_device


@dataclass
class StudyContext:
    """What every trial of a study shares, prepared once per `search` (or per worker)."""

    spec: StudySpec
    data: PreparedData
    device: torch.device
    tracker: Tracker | None = None  # None: no tracking (benchmarks of the bare training path)
    experiment_id: str = ""
    study_run_id: str = ""
    checkpoints: Checkpoints | None = None  # None: trials do not checkpoint (or Ray does)
    # Where a trial's figures are rendered: in the background, or at once (Inline)
    artifacts: ArtifactWriter | Inline = field(default_factory=Inline)
    # How fast this process writes checkpoints: what checkpoint_every auto plans with
    checkpoint_speed: WriteSpeed = field(default_factory=WriteSpeed)

    @cached_property
    def acceleration(self) -> Acceleration:
        """How trials train on this context's device (configures CUDA when first asked)."""
        return Acceleration.for_device(self.device, compile=self.spec.compile,
                                       mixed_precision=self.spec.mixed_precision)

    @cached_property
    def images_on_device(self) -> bool:
        """Whether the images fit this trial's share of its device's memory; else they are
        prefetched from host memory batch by batch."""
        share = self.spec.device_cache / self.spec.trials_per_gpu
        return fits_on_device(self.data.images.nbytes, self.device, share)

    @cached_property
    def folds(self) -> list[Split]:
        """The study's cross-validation folds (none without `folds`); whole groups go to one
        fold when the data is split by group."""
        if not self.spec.folds:
            return []
        return study_folds(self.spec, self.data)

    def trial_settings(self, number: int) -> dict[str, Any]:
        """The fixed settings a trial logs beside its hyperparameters."""
        spec, data = self.spec, self.data.config
        accel = self.acceleration
        return {
            "objective": spec.objective, "max_epochs": spec.max_epochs,
            "patience": spec.patience, "seed": trial_seed(spec.seed, number),
            "image_size": data.image_size, "channels": data.channels,
            "normalize": data.normalize, "num_classes": self.data.num_classes,
            "device": str(self.device), "precision": accel.precision,
            "channels_last": accel.channels_last, "compile": accel.compile,
            "images_on_device": self.images_on_device, "folds": spec.folds,
        }


def study_folds(spec: StudySpec, data: PreparedData) -> list[Split]:
    """The K folds of a study's train and validation images (DataError when K is too many)."""
    return fold_splits(data.split, data.catalog.labels, data.classes, spec.folds, spec.seed,
                       grouped=data.config.split == "group")


def trial_seed(study_seed: int, number: int) -> int:
    """Each trial its own reproducible initialisation and batch order."""
    return study_seed * 100_003 + number


