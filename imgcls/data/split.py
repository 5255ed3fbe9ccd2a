"""Train/validation/test splits, fixed by a seed."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls.data.sources import Catalog
from imgcls.errors import ConfigError, DataError

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Split:
    """Which split each image of a catalog belongs to (an index into SPLIT_NAMES)."""

    assignment: np.ndarray  # int8 per image

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.assignment == SPLIT_NAMES.index(name))

    def counts(self) -> dict[str, int]:
        return {name: int((self.assignment == i).sum()) for i, name in enumerate(SPLIT_NAMES)}

    def write_csv(self, path: Path, catalog: Catalog) -> Path:
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["index", "id", "label", "class", "split"])
            for i, (item, label, part) in enumerate(
                zip(catalog.ids, catalog.labels, self.assignment, strict=True)
            ):
                writer.writerow([i, item, int(label), catalog.classes[label], SPLIT_NAMES[part]])
        return path


def stratified_split(catalog: Catalog, val_fraction: float, test_fraction: float,
                     seed: int) -> Split:
    """Split every class in the same proportions, shuffled by `seed`.

    Per class, the validation and test parts get round(n * fraction) images, and at least one
    each when their fraction is above zero, so that a small class is still evaluated; train keeps
    the rest and must keep at least one.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must each be in "
            "[0, 1) and leave some images for training"
        )
    rng = np.random.default_rng(seed)
    assignment = np.zeros(len(catalog), dtype=np.int8)
    for label, name in enumerate(catalog.classes):
        members = rng.permutation(np.flatnonzero(catalog.labels == label))
        n = len(members)
        n_val = max(round(n * val_fraction), 1 if val_fraction > 0 else 0)
        n_test = max(round(n * test_fraction), 1 if test_fraction > 0 else 0)
        if n - n_val - n_test < 1:
            need = 1 + (val_fraction > 0) + (test_fraction > 0)
            raise DataError(
                f"class '{name}' has {n} image(s); a train/val/test split needs at least {need}"
            )
        assignment[members[:n_val]] = 1
        assignment[members[n_val:n_val + n_test]] = 2
    return Split(assignment)
